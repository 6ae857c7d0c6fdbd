"""Scalar readouts of a training step, all in closed form from the head's input and output gradient.

docs/architecture.md §4; head-gradient probe from seed 000 §3.3 (eq. 2-3), Gradient-Weight Alignment from
seed 004 (GWA = M1 / (excess kurtosis + beta), beta = 1.2).

Notation, for a linear head `logits = Z W^T + b` with `W (C x d)`:
    Z  (N, d)  head input, detached            (N = batch, or batch x tokens for the LM)
    G  (N, C)  dL/dlogits, captured by a tensor hook in the user's own backward pass
For mean-reduced softmax cross-entropy G = (P - Y) / N, so `g = G^T Z` is the paper's
`(P - Y) Z^T / B`, and in general it is exactly `dL/dW`: no second backward pass is needed.
"""
from __future__ import annotations

import math

import torch

READOUT_NAMES = (
    "head_grad_norm",  # ||g||_F
    "score_w",  # ||g||_F / (||W||_F + eps)
    "score_z",  # ||g||_F / (||Z||_F + eps)
    "gwa",  # mean / max(excess kurtosis + 1.2, guard) of per-sample alignments
    "confidence",  # mean max softmax probability
    "entropy",  # mean predictive entropy (nats)
    "margin",  # mean top-1 minus top-2 probability
    "loss",  # training loss at the capture step
    "lr",  # learning rate (first param group)
    "nonfinite",  # non-finite elements in the captured activations/gradients (+ logits)
    "weight_step",  # the watched layers' weights: relative movement per step since the previous frame (capture.weights)
    "weight_still",  # the share of the watched weight tensors that stopped moving while the others move (capture.weights)
    "batch_repeat",  # 1 when the capture batch is one an earlier frame saw, else 0 (capture.batches)
    "confident_miss",  # share of the capture batch's rows whose label the model contradicts at p >= 0.5
)
HEAD_READOUTS = ("head_grad_norm", "score_w", "score_z", "gwa")
SOFTMAX_READOUTS = ("confidence", "entropy", "margin", "confident_miss")  # meaningful only when the loss reads the logits through a softmax
EPS = 1e-12
GWA_BETA = 1.2
GWA_MIN_DENOMINATOR = 0.1


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def head_gradient(z: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
    """`g = G^T Z`, shape `(C, d)`: the gradient of the loss with respect to the head weight."""
    return _flat(grad_logits).T @ _flat(z)  # (C, N) @ (N, d)


def head_gradient_scores(
    z: torch.Tensor, grad_logits: torch.Tensor, weight: torch.Tensor, eps: float = EPS
) -> dict[str, torch.Tensor]:
    """`||g||_F`, `score_w`, `score_z` as 0-d tensors (no device sync)."""
    g = torch.linalg.matrix_norm(head_gradient(z, grad_logits))
    return {
        "head_grad_norm": g,
        "score_w": g / (torch.linalg.matrix_norm(weight) + eps),
        "score_z": g / (torch.linalg.matrix_norm(_flat(z)) + eps),
    }


def gwa_alignments(
    z: torch.Tensor, grad_logits: torch.Tensor, weight: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """Per-sample cosine between the update direction `-g_i = -G_i z_i^T` and `W`, shape `(N,)`.

    `<G_i z_i^T, W> = G_i . (W z_i)` and `||G_i z_i^T||_F = ||G_i|| ||z_i||` (rank one), so no
    per-sample `C x d` matrix is ever built. Samples with a zero gradient get alignment 0.
    """
    zf, gf = _flat(z), _flat(grad_logits)
    inner = (gf * (zf @ weight.T)).sum(dim=1)  # (N,)
    norms = gf.norm(dim=1) * zf.norm(dim=1) * torch.linalg.matrix_norm(weight)
    return -inner / (norms + eps)


def gwa_aggregate(
    alignments: torch.Tensor, beta: float = GWA_BETA, min_denominator: float = GWA_MIN_DENOMINATOR
) -> torch.Tensor:
    """`GWA = mean / (excess_kurtosis + beta)` over a set of per-sample alignments.

    Excess kurtosis uses population moments (`scipy.stats.kurtosis(fisher=True, bias=True)`).
    It is >= -2, so the denominator can reach zero or below (e.g. a bimodal distribution): it
    is clamped at `min_denominator`. A constant set (zero variance) counts as excess kurtosis 0.
    Returns NaN for an empty set.
    """
    a = alignments.double()
    if a.numel() == 0:
        return torch.tensor(float("nan"))
    mean = a.mean()
    centred = a - mean
    m2 = (centred**2).mean()
    m4 = (centred**4).mean()
    excess = torch.where(m2 > 1e-24, m4 / (m2 * m2).clamp_min(1e-48) - 3.0, torch.zeros_like(m2))
    return (mean / (excess + beta).clamp_min(min_denominator)).float()


def softmax_rows(grad: torch.Tensor, probs: torch.Tensor, dtype: torch.dtype, rtol: float = 1e-3) -> torch.Tensor:
    """Per row `(..., C) -> (...)` bool: whether this row of dL/dlogits can be that of a loss that reads the
    logits through a softmax. Softmax is unchanged by adding a constant to every logit, so such a loss
    (cross-entropy, with label smoothing or ignored rows too) has gradient rows that sum to 0; MSE, BCE
    and any single-logit head do not. Rows whose softmax `probs` is nearly one-hot (max p >= 0.999) pass
    unjudged: their gradient is as small as its rounding error. `dtype`: the gradient's own dtype (bf16 /
    fp16 round each entry, so the tolerance grows with its epsilon)."""
    if grad.shape[-1] < 2:
        return torch.zeros(grad.shape[:-1], dtype=torch.bool, device=grad.device)
    rtol = max(rtol, 4 * torch.finfo(dtype).eps)
    zero_sum = grad.sum(dim=-1).abs() <= rtol * grad.abs().sum(dim=-1) + 1e-30
    return zero_sum | ~(probs.amax(dim=-1) < 0.999)


def softmax_gradient(grad_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """`softmax_rows` over a whole head output, as a 0-d bool tensor (no sync); a non-finite gradient is
    not judged (True)."""
    g = _flat(grad_logits.detach().float())
    probs = torch.softmax(_flat(logits.detach().float()), dim=-1)
    return ~torch.isfinite(g).all() | softmax_rows(g, probs, grad_logits.dtype).all()


def gradient_labels(grad_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Each row's training label `(rows,)` (long), read from dL/dlogits of a softmax loss without the labels.

    For cross-entropy a row's gradient is `(p_i - t_i) / s` with t_i the (possibly label-smoothed) one-hot
    target and s the loss's scale (N rows for a mean, 1 for a sum, N k under gradient accumulation over k), so
    `t_i = p_i - s G_i` and the label is its argmax. The scale comes from the batch: every entry with G > 0
    has `p / G = s p / (p - t) >= s`, with equality where the target is 0, so the least such ratio is s (a
    little above it under label smoothing, whose targets are never 0: the argmax is unchanged). Rows with
    an all-zero gradient (ignored tokens) read as their prediction."""
    return label_readouts(grad_logits, logits)[0]


def confident_miss(grad_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None = None,
                   confidence: float = 0.5) -> torch.Tensor:
    """The share of rows whose label (`gradient_labels`) the model contradicts: its top class is another one,
    with probability >= `confidence`. A 0-d tensor (no sync); rows with an all-zero gradient (ignored
    tokens, padding) are left out, NaN when none is left.

    Healthy training drives it down as the model fits; labels flipped at random raise it at once by about
    the flipped share times the model's accuracy, and keep it there, since a model that generalises keeps
    answering the true class."""
    return label_readouts(grad_logits, logits, labels, confidence)[1]


def label_readouts(grad_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None = None,
                   confidence: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gradient_labels, confident_miss)` from one softmax of the logits (the capture's head hook needs both)."""
    g = _flat(grad_logits.detach().float())
    probs = torch.softmax(_flat(logits.detach().float()), dim=-1)
    if labels is None:
        ratio = torch.where(g > 0, probs / g, torch.full_like(g, math.inf)).amin()
        scale = torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, float(len(g))))
        labels = (probs - scale * g).argmax(dim=-1)
    top_p, top = probs.max(dim=-1)
    counted = (g != 0).any(dim=-1)
    miss = (top != labels) & (top_p >= confidence) & counted
    return labels, miss.double().sum() / counted.double().sum()


def output_stats(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean confidence, predictive entropy and top-2 margin of the softmax over the last axis."""
    logp = torch.log_softmax(_flat(logits.detach().float()), dim=-1)
    p = logp.exp()
    if p.shape[-1] >= 2:
        top2 = p.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).mean()
    else:
        margin = torch.ones((), device=p.device)
    return {
        "confidence": p.max(dim=-1).values.mean(),
        "entropy": -(p * logp).sum(dim=-1).mean(),
        "margin": margin,
    }
