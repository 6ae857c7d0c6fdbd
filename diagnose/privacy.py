"""DP telemetry: per-sample clipping plus Gaussian noise on the captured per-sample head terms (or on any
released tensor), and privacy accounting with opacus's accountants over the releases that really happen.

The mechanism is DP-SGD's sampled Gaussian mechanism (Abadi et al. 2016; opacus `DPOptimizer`): each
sample's term is clipped to L2 norm <= C, the clipped terms are summed, N(0, (z C)^2) noise is added to
every coordinate, and the sum is divided by the batch size N. One release = one privatized tensor from
one batch drawn with sample rate q; the accountant composes exactly the releases made, nothing else.

Per-sample head terms (seed 000 §3.3, capture/readouts.py): for a linear head with input Z (N, d) and
dL/dlogits G (N, C) of a mean-reduced loss, sample i's own loss gradient is `N G_i z_i^T` (C, d); their
mean is the head gradient g = G^T Z behind `head_grad_norm`, `score_w` and `score_z`.

Issue 6 quotes a paper's epsilon ~ 8 for z = 1.12, q = 0.00128, 1,560 compositions, delta = 1e-5;
`paper_numbers()` reports what opacus's accountants say for those numbers (RDP ~ 0.55, PRV ~ 0.20).

    python -m diagnose.privacy            # prints the accountants' epsilon for the paper's numbers
"""
from __future__ import annotations

import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import argparse
import logging
import sys

import torch
from einops import rearrange, reduce

logger = logging.getLogger("tevid")

PAPER = {"noise_multiplier": 1.12, "sample_rate": 0.00128, "releases": 1560, "delta": 1e-5}


# --------------------------------------------------------------------------- the mechanism
def clip_per_sample(per_sample: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale each sample's term (`per_sample[i]`, any shape) to L2 norm <= `clip` (opacus's flat
    clipping: factor min(1, C / ||x_i||))."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if per_sample.ndim < 1 or per_sample.shape[0] == 0:
        raise ValueError(f"per_sample must have shape (N, ...) with N >= 1, got {tuple(per_sample.shape)}")
    flat = rearrange(per_sample.float(), "n ... -> n (...)")
    norms = flat.norm(dim=1, keepdim=True)  # (N, 1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return (flat * factor).reshape(per_sample.shape)


def privatize(per_sample: torch.Tensor, clip: float, noise_multiplier: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """`(sum_i clip(x_i) + N(0, (z C)^2 I)) / N`, shape `per_sample.shape[1:]`: the Gaussian mechanism on
    the mean of N per-sample terms. `noise_multiplier = 0` gives the clipped mean (no privacy)."""
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    clipped = clip_per_sample(per_sample, clip)
    total = reduce(clipped, "n ... -> ...", "sum")
    noise = torch.randn(total.shape, generator=generator, dtype=total.dtype, device="cpu").to(total.device)
    return (total + noise_multiplier * clip * noise) / per_sample.shape[0]


def per_sample_head_gradients(z: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
    """`(N, C, d)`: each sample's own loss gradient on the head weight, `N G_i z_i^T`, for head input
    `z (..., d)` and dL/dlogits `grad_logits (..., C)` of a mean-reduced loss (token axes are flattened
    into N). Their mean is `capture.readouts.head_gradient(z, grad_logits)`."""
    zf = rearrange(z.detach().float(), "... d -> (...) d")
    gf = rearrange(grad_logits.detach().float(), "... c -> (...) c")
    if zf.shape[0] != gf.shape[0]:
        raise ValueError(f"z has {zf.shape[0]} rows but grad_logits has {gf.shape[0]}")
    return torch.einsum("nc,nd->ncd", gf * gf.shape[0], zf)


def private_head_scores(z: torch.Tensor, grad_logits: torch.Tensor, weight: torch.Tensor, clip: float,
                        noise_multiplier: float, generator: torch.Generator | None = None,
                        eps: float = 1e-12) -> dict[str, torch.Tensor]:
    """`head_grad_norm`, `score_w`, `score_z` (seed 000 eq. 3) from the privatized head gradient. The
    norms of W and Z are not private here: W is the model's own weight, and `score_z` divides by
    ||Z||_F, which does depend on the batch (release `head_grad_norm`/`score_w` alone if that matters)."""
    g = privatize(per_sample_head_gradients(z, grad_logits), clip, noise_multiplier, generator)  # (C, d)
    norm = torch.linalg.matrix_norm(g)
    zf = rearrange(z.detach().float(), "... d -> (...) d")
    return {"head_grad_norm": norm, "score_w": norm / (torch.linalg.matrix_norm(weight.detach().float()) + eps),
            "score_z": norm / (torch.linalg.matrix_norm(zf) + eps)}


def private_gwa(alignments: torch.Tensor, clip: float, noise_multiplier: float,
                generator: torch.Generator | None = None, beta: float = 1.2, min_denominator: float = 0.1) -> torch.Tensor:
    """GWA (seed 004: mean / (excess kurtosis + beta), as `capture.readouts.gwa_aggregate`) from the
    privatized raw moments of the per-sample alignments: each sample releases `(a, a^2, a^3, a^4)`;
    alignments are cosines in [-1, 1], so that vector's norm is <= 2 and `clip = 2` clips nothing.
    The kurtosis amplifies the noise (fourth moments over squared second moments): at N = 2000,
    z = 1 single releases of a GWA of 0.22 ranged 0.14-0.38 (tests/test_privacy.py)."""
    a = alignments.detach().double().reshape(-1)
    r1, r2, r3, r4 = privatize(torch.stack([a, a**2, a**3, a**4], dim=1), clip, noise_multiplier, generator).double()
    m2 = r2 - r1**2  # central moments from the raw ones
    m4 = r4 - 4 * r1 * r3 + 6 * r1**2 * r2 - 3 * r1**4
    excess = m4 / m2**2 - 3.0 if m2 > 1e-12 else torch.zeros((), dtype=torch.float64)  # noise can make m2 <= 0
    return (r1 / (excess + beta).clamp_min(min_denominator)).float()


# --------------------------------------------------------------------------- accounting
class DPAccountant:
    """opacus's accountant ("rdp": `RDPAccountant`, "prv": `PRVAccountant`) over the releases made:
    call `step(noise_multiplier, sample_rate)` once per release, read `epsilon(delta)`."""

    def __init__(self, mechanism: str = "rdp"):
        from opacus.accountants import PRVAccountant, RDPAccountant

        kinds = {"rdp": RDPAccountant, "prv": PRVAccountant}
        if mechanism not in kinds:
            raise ValueError(f"mechanism must be one of {sorted(kinds)}, got {mechanism!r}")
        self.mechanism = mechanism
        self._accountant = kinds[mechanism]()
        self.releases = 0

    def step(self, noise_multiplier: float, sample_rate: float, n: int = 1) -> None:
        """Record `n` releases of the sampled Gaussian mechanism (noise multiplier z, sample rate q)."""
        if noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0 for a finite epsilon, got {noise_multiplier}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        for _ in range(n):  # opacus merges identical consecutive steps into one history entry
            self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        self.releases += n

    def epsilon(self, delta: float) -> float:
        if self.releases == 0:
            return 0.0
        return float(self._accountant.get_epsilon(delta=delta))

    def report(self, delta: float) -> str:
        """The (epsilon, delta) spent so far, printed and logged: every DP run states it."""
        text = f"DP telemetry ({self.mechanism} accountant): epsilon = {self.epsilon(delta):.4g}, delta = {delta:g}, over {self.releases} releases"
        print(text)
        logger.info(text)
        return text


class DPRelease:
    """Privatize-and-account in one call: each `__call__(per_sample)` releases one privatized mean and
    records one composition in the accountant, so epsilon counts exactly the releases made."""

    def __init__(self, clip: float, noise_multiplier: float, sample_rate: float, mechanism: str = "rdp",
                 seed: int = 0):
        if noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        self.clip, self.noise_multiplier, self.sample_rate = clip, noise_multiplier, sample_rate
        self.accountant = DPAccountant(mechanism)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, per_sample: torch.Tensor) -> torch.Tensor:
        out = privatize(per_sample, self.clip, self.noise_multiplier, self.generator)
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        return out

    def epsilon(self, delta: float) -> float:
        return self.accountant.epsilon(delta)


def paper_numbers(noise_multiplier: float = PAPER["noise_multiplier"], sample_rate: float = PAPER["sample_rate"],
                  releases: int = PAPER["releases"], delta: float = PAPER["delta"],
                  mechanisms: tuple[str, ...] = ("rdp", "prv")) -> dict[str, float]:
    """Epsilon of each accountant for the issue's numbers (the paper claims ~ 8), printed with delta."""
    out = {}
    for mech in mechanisms:
        acc = DPAccountant(mech)
        acc.step(noise_multiplier, sample_rate, n=releases)
        out[mech] = acc.epsilon(delta)
        acc.report(delta)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="opacus accountants' epsilon for the sampled Gaussian mechanism")
    p.add_argument("--noise-multiplier", type=float, default=PAPER["noise_multiplier"])
    p.add_argument("--sample-rate", type=float, default=PAPER["sample_rate"])
    p.add_argument("--releases", type=int, default=PAPER["releases"])
    p.add_argument("--delta", type=float, default=PAPER["delta"])
    args = p.parse_args(argv)
    print(f"z = {args.noise_multiplier}, q = {args.sample_rate}, {args.releases} releases, delta = {args.delta:g}")
    paper_numbers(args.noise_multiplier, args.sample_rate, args.releases, args.delta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
