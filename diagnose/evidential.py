"""Evidential (Dirichlet) head and loss of TEViD (docs/architecture.md §7; paper Sec. 4.3 and Appendix D.2).

Given evidence logits `f (B, K)`:

    alpha = softplus(f) + 1        S = sum_k alpha_k        p = alpha / S        vacuity u = K / S

Loss per sample with one-hot target `y`:

    sum_k y_k (digamma(S) - digamma(alpha_k))  +  lambda * KL(Dir(alpha_tilde) || Dir(1)),
    alpha_tilde = y + (1 - y) * alpha

`lambda` follows `kl_anneal`: 0 -> 1 linearly over the first 10 epochs. Samples whose target is
`IGNORE` (-1: windows between onset and the positive zone, see pretrain/clips.py) are excluded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from capture.schema import IGNORE



@dataclass(frozen=True)
class Dirichlet:
    """The Dirichlet read-out of evidence logits: concentration, mean probabilities, vacuity."""

    alpha: torch.Tensor  # (..., K)
    probs: torch.Tensor  # (..., K)   alpha / S
    vacuity: torch.Tensor  # (...)    K / S

    @property
    def strength(self) -> torch.Tensor:
        return self.alpha.sum(-1)


def dirichlet(logits: torch.Tensor) -> Dirichlet:
    """alpha = softplus(f) + 1, p = alpha / S, u = K / S (computed in fp32)."""
    alpha = F.softplus(logits.float()) + 1.0
    strength = alpha.sum(-1)
    return Dirichlet(alpha=alpha, probs=alpha / strength.unsqueeze(-1), vacuity=alpha.shape[-1] / strength)


def kl_to_uniform(alpha: torch.Tensor) -> torch.Tensor:
    """KL(Dir(alpha) || Dir(1, ..., 1)) per row, in closed form. alpha (..., K) -> (...)."""
    k = alpha.shape[-1]
    strength = alpha.sum(-1)
    log_norm = torch.lgamma(strength) - torch.lgamma(alpha).sum(-1) - torch.lgamma(alpha.new_tensor(float(k)))
    digamma_gap = torch.digamma(alpha) - torch.digamma(strength).unsqueeze(-1)
    return log_norm + ((alpha - 1.0) * digamma_gap).sum(-1)


def evidential_terms(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (NLL term, KL term) for valid targets (0 <= target < K). logits (B, K), target (B,)."""
    alpha = dirichlet(logits).alpha
    y = F.one_hot(target.long(), alpha.shape[-1]).to(alpha.dtype)  # (B, K)
    strength = alpha.sum(-1, keepdim=True)
    nll = (y * (torch.digamma(strength) - torch.digamma(alpha))).sum(-1)
    alpha_tilde = y + (1.0 - y) * alpha  # the target class's evidence is removed before the KL
    return nll, kl_to_uniform(alpha_tilde)


def evidential_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    kl_weight: float,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean evidential loss over the samples whose target is not `IGNORE`.

    `class_weights (K,)`, if given, weight each sample by the weight of its target class and the
    mean becomes a weighted mean (sum w_i L_i / sum w_i). With no valid sample in the batch the
    result is a zero that still carries a graph (every process of a distributed step must call
    backward on something connected to the parameters).
    """
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"evidential_loss: logits must be (B, K) and target (B,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    k = logits.shape[-1]
    valid = target != IGNORE
    bad = valid & ((target < 0) | (target >= k))
    if bad.any():
        raise ValueError(f"evidential_loss: targets {sorted(set(target[bad].tolist()))} outside 0..{k - 1} (and not IGNORE={IGNORE})")
    if not valid.any():
        return logits.sum() * 0.0
    nll, kl = evidential_terms(logits[valid], target[valid])
    per_sample = nll + kl_weight * kl
    if class_weights is None:
        return per_sample.mean()
    w = class_weights.to(per_sample)[target[valid].long()]
    return (w * per_sample).sum() / w.sum()


def kl_anneal(epoch: float, epochs: float = 10.0) -> float:
    """lambda of the KL term: min(1, epoch / epochs); 0 at the start, 1 from `epochs` on."""
    if epochs <= 0:
        return 1.0
    return float(min(1.0, max(0.0, epoch) / epochs))


def tempered_probs(alpha: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Dirichlet mean probabilities sharpened/softened by a temperature: softmax(log(p) / T).

    T = 1 returns `alpha / S` exactly. The temperature changes only the class probabilities used by
    the alert thresholds; vacuity K/S (and so the Unknown decision) does not depend on it.
    """
    probs = alpha / alpha.sum(-1, keepdim=True)
    if temperature == 1.0:
        return probs
    return torch.softmax(torch.log(probs) / temperature, dim=-1)
