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

In the live path (`diagnose.watch(..., dp=DPConfig(...))`, main paper App. J.1) `DPTelemetry` is the
capture's `release`: at each frame every data-dependent quantity the frame carries (six maps, eight
readouts, the non-finite count) comes from ONE joint release of the capture batch's per-sample terms
(`privatize_parts`), and the accountant composes one sampled Gaussian mechanism per frame.

    python -m diagnose.privacy            # prints the accountants' epsilon for the paper's numbers
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass, field

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
    moments = privatize(torch.stack([a, a**2, a**3, a**4], dim=1), clip, noise_multiplier, generator)
    return gwa_from_moments(moments, beta, min_denominator)


def gwa_from_moments(moments: torch.Tensor, beta: float = 1.2, min_denominator: float = 0.1) -> torch.Tensor:
    """GWA from the raw moments `(E a, E a^2, E a^3, E a^4)` of the alignments (as `gwa_aggregate`)."""
    r1, r2, r3, r4 = moments.double()
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


# --------------------------------------------------------------------------- the live path (DP telemetry)
DP_PARTS = ("activations", "gradients", "head", "head_input", "gwa", "outputs", "loss", "nonfinite")
# parts whose per-sample terms are bounded by construction: clipping at these bounds changes nothing
NATURAL_BOUNDS = {"gwa": 2.0, "outputs": math.sqrt(3.0), "nonfinite": 1.0}


@dataclass
class DPConfig:
    """DP telemetry for `diagnose.watch(..., dp=DPConfig(...))` (main paper App. J.1)."""

    clip: float = 1.0  # C: L2 bound of each sample's term in every part without a natural bound
    noise_multiplier: float = 1.0  # z: noise std z * C (per part, see privatize_parts); 0 = no noise, no privacy
    delta: float = 1e-5
    sample_rate: float | None = None  # q = batch size / dataset size; or give dataset_size
    dataset_size: int | None = None  # q = (samples in the capture batch) / dataset_size
    mechanism: str = "rdp"  # opacus accountant: "rdp" | "prv"
    part_clip: dict = field(default_factory=dict)  # bounds per part (DP_PARTS), over `clip` / NATURAL_BOUNDS
    loss: bool = True  # release the per-sample softmax cross-entropy recovered from the head (False: loss NaN)
    seed: int = 0  # the noise generator's seed

    def __post_init__(self):
        if not self.clip > 0:
            raise ValueError(f"DPConfig.clip must be > 0 (inf: no clipping), got {self.clip}")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"DPConfig.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"DPConfig.delta must be in (0, 1), got {self.delta}")
        if (self.sample_rate is None) == (self.dataset_size is None):
            raise ValueError("DPConfig needs exactly one of sample_rate (q = batch / dataset size) and dataset_size "
                             f"(got sample_rate={self.sample_rate}, dataset_size={self.dataset_size})")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ValueError(f"DPConfig.sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.dataset_size is not None and self.dataset_size < 1:
            raise ValueError(f"DPConfig.dataset_size must be >= 1, got {self.dataset_size}")
        if self.mechanism not in ("rdp", "prv"):
            raise ValueError(f"DPConfig.mechanism must be 'rdp' or 'prv', got {self.mechanism!r}")
        unknown = set(self.part_clip) - set(DP_PARTS)
        if unknown:
            raise ValueError(f"DPConfig.part_clip: unknown part(s) {sorted(unknown)}; parts: {list(DP_PARTS)}")
        bounds = self.bounds()
        if any(not b > 0 for b in bounds.values()):
            raise ValueError(f"DPConfig: every part's bound must be > 0, got {bounds}")
        if self.noise_multiplier > 0 and any(math.isinf(b) for b in bounds.values()):
            raise ValueError("DPConfig: noise needs finite bounds (noise std is z x bound); clip=inf goes with noise_multiplier=0")

    def bounds(self) -> dict[str, float]:
        return {p: float(self.part_clip.get(p, NATURAL_BOUNDS.get(p, self.clip))) for p in DP_PARTS}

    def rate(self, batch: int) -> float:
        return self.sample_rate if self.sample_rate is not None else min(1.0, batch / self.dataset_size)


@dataclass
class OuterTerms:
    """Per-sample terms `x_b = sum_t a_bt b_bt^T` ((C, d) each) kept factored: a head gradient's per-sample
    terms are never built as an (N, C, d) tensor. a: (N, L, C), b: (N, L, d)."""

    a: torch.Tensor
    b: torch.Tensor

    def norms(self) -> torch.Tensor:
        """||x_b||_F (N,): sum_{t,s} (a_bt . a_bs)(b_bt . b_bs), an (N, L, L) Gram product."""
        gram = torch.einsum("nlc,nmc->nlm", self.a, self.a) * torch.einsum("nld,nmd->nlm", self.b, self.b)
        return gram.sum(dim=(1, 2)).clamp_min(0).sqrt()

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        """sum_b w_b x_b (C, d)."""
        return torch.einsum("nlc,nld->cd", self.a * w[:, None, None], self.b)


def privatize_parts(parts: dict, bounds: dict[str, float], noise_multiplier: float,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One Gaussian release of several per-sample terms at once -> their privatized means.

    Part k (`(N, ...)` or `OuterTerms`) is clipped per sample to its bound C_k; N(0, (z C_k sqrt(K))^2)
    noise is added to each coordinate of its clipped sum; the sum is divided by N. Rescaling part k by
    1 / (C_k sqrt(K)) gives each sample's joint vector an L2 norm <= 1 with noise std z on every
    coordinate: this is ONE sampled Gaussian mechanism of noise multiplier z (one composition for the
    accountant), whatever K. With K = 1 it is `privatize`. Bounds of inf with z = 0 return exact means."""
    k = len(parts)
    out = {}
    for name, x in parts.items():
        bound = bounds[name]
        n = x.a.shape[0] if isinstance(x, OuterTerms) else x.shape[0]
        if isinstance(x, OuterTerms):
            norms = x.norms()
        else:
            flat = rearrange(x, "n ... -> n (...)")
            norms = flat.norm(dim=1)
        factor = (bound / (norms + 1e-6)).clamp(max=1.0) if math.isfinite(bound) else torch.ones_like(norms)
        total = x.weighted_sum(factor) if isinstance(x, OuterTerms) else (flat * factor[:, None]).sum(0).reshape(x.shape[1:])
        if noise_multiplier > 0:
            noise = torch.randn(total.shape, generator=generator, dtype=total.dtype, device="cpu").to(total.device)
            total = total + noise_multiplier * bound * math.sqrt(k) * noise
        out[name] = total / n
    return out


def _per_example(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., k) -> (B, L, k): the token axes of one example flattened into L."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def per_sample_parts(ps, loss: bool = True) -> dict:
    """The per-sample terms (`DP_PARTS`) of one capture step (`capture.recorder.PerSample`), each a
    tensor `(B, ...)` or `OuterTerms` whose mean over the B samples gives the frame's value:

    activations  the three per-sample activation maps, flattened and concatenated
    gradients    the three per-sample gradient maps x B (per-sample loss units: dL/dh_i = dl_i/dh_i / B)
    head         B * sum_t G_bt z_bt^T: sample b's own loss gradient on the head weight (seed 000 §3.3)
    head_input   sum_t ||z_bt||^2 (its mean x B is ||Z||_F^2, the denominator of score_z)
    gwa          mean over the sample's rows of (a, a^2, a^3, a^4), a = the GWA alignment (seed 004)
    outputs      mean over its rows of (max p, entropy / log C, top-1 minus top-2 p)
    loss         mean over its rows with a non-zero gradient of -log p_y, y = argmin of the row's
                 gradient (softmax cross-entropy, as `diagnose.monitor.recover_loss`)
    nonfinite    1 if any captured value of the sample (maps' tensors, logits) was non-finite

    Non-finite entries are zeroed (the sample is counted in `nonfinite`). Token models: one example =
    one sequence (its rows are its tokens)."""
    from capture.readouts import gwa_alignments

    clean = lambda t: torch.nan_to_num(t.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)  # noqa: E731
    parts: dict = {}
    for name, idx, scale in (("activations", (0, 1, 2), False), ("gradients", (3, 4, 5), True)):
        maps = [ps.maps[i] for i in idx if ps.maps[i] is not None]
        if maps:
            b = maps[0].shape[0]
            parts[name] = torch.cat([clean(m).reshape(b, -1) * (b if scale else 1) for m in maps], dim=1)
    if ps.z is not None and ps.grad_logits is not None and ps.weight is not None:
        z, g, w = _per_example(clean(ps.z)), _per_example(clean(ps.grad_logits)), clean(ps.weight)  # (B, L, d), (B, L, C)
        b = z.shape[0]
        parts["head"] = OuterTerms(g * b, z)
        parts["head_input"] = (z * z).sum(dim=(1, 2))
        a = gwa_alignments(z.reshape(-1, z.shape[-1]), g.reshape(-1, g.shape[-1]), w).reshape(b, -1).double()  # (B, L)
        parts["gwa"] = torch.stack([a.mean(1), (a**2).mean(1), (a**3).mean(1), (a**4).mean(1)], dim=1)
    if ps.logits is not None and ps.logits.ndim >= 2:
        lf = _per_example(clean(ps.logits))  # (B, L, C)
        logp = torch.log_softmax(lf, dim=-1)
        p = logp.exp()
        c = p.shape[-1]
        top2 = p.topk(2, dim=-1).values if c >= 2 else torch.cat([p, torch.zeros_like(p)], dim=-1)
        ent = -(p * logp).sum(-1) / max(math.log(c), 1.0)
        parts["outputs"] = torch.stack([p.amax(-1).mean(1), ent.mean(1), (top2[..., 0] - top2[..., 1]).mean(1)], dim=1)
        if loss and ps.grad_logits is not None:
            g = _per_example(clean(ps.grad_logits))
            active = (g.abs().amax(-1) > 0).float()  # (B, L)
            nll = -logp.gather(-1, g.argmin(-1, keepdim=True)).squeeze(-1)  # (B, L)
            parts["loss"] = (nll * active).sum(1) / active.sum(1).clamp_min(1)
    if ps.nonfinite is not None:
        parts["nonfinite"] = (ps.nonfinite > 0).float()
    return parts


def readouts_from_means(means: dict, weight: torch.Tensor | None, batch: int, num_classes: int | None,
                        eps: float = 1e-12) -> dict[str, float]:
    """The frame's readouts from the released means (`capture.readouts` definitions)."""
    out = {}
    if "head" in means:
        norm = torch.linalg.matrix_norm(means["head"].double())
        out["head_grad_norm"] = float(norm)
        out["score_w"] = float(norm / (torch.linalg.matrix_norm(weight.double()) + eps))
        out["score_z"] = float(norm / ((means["head_input"].double() * batch).clamp_min(0).sqrt() + eps))
        out["gwa"] = float(gwa_from_moments(means["gwa"]))
    if "outputs" in means:
        conf, ent, margin = means["outputs"].double().tolist()
        out.update(confidence=conf, entropy=ent * max(math.log(num_classes), 1.0), margin=margin)
    if "loss" in means:
        out["loss"] = float(means["loss"])
    if "nonfinite" in means:
        out["nonfinite"] = float(means["nonfinite"]) * batch  # samples (not elements) with non-finite values
    return out


class DPTelemetry:
    """The capture's `release` under DP: per-sample terms -> one joint Gaussian release per frame, and
    one step of the accountant per release made (`releases` counts them; z = 0 releases are counted but
    give epsilon = inf). `privacy()` -> {epsilon, delta, releases, mechanism, ...}."""

    def __init__(self, config: DPConfig):
        self.config = config
        self.releases = 0
        self.batch: int | None = None
        self.accountant = DPAccountant(config.mechanism) if config.noise_multiplier > 0 else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.bounds = config.bounds()

    def __call__(self, ps) -> tuple[list, dict[str, float]]:
        dev = next((t.device for t in (*ps.maps, ps.z, ps.logits) if t is not None), torch.device("cpu"))
        with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):  # fp32, whatever the step runs under
            return self._release(ps)

    def _release(self, ps) -> tuple[list, dict[str, float]]:
        parts = per_sample_parts(ps, loss=self.config.loss)
        if not parts:
            raise ValueError("DP telemetry: the capture step produced no per-sample term to release")
        first = next(iter(parts.values()))
        batch = first.a.shape[0] if isinstance(first, OuterTerms) else first.shape[0]
        means = privatize_parts(parts, {k: self.bounds[k] for k in parts}, self.config.noise_multiplier, self.generator)
        if self.accountant is not None:
            self.accountant.step(self.config.noise_multiplier, self.config.rate(batch))
        self.releases += 1
        self.batch = batch
        maps = list(ps.maps)
        for name, idx in (("activations", (0, 1, 2)), ("gradients", (3, 4, 5))):
            if name in means:  # split the released vector back into the maps it was made of
                flat, i = means[name], 0
                present = [c for c in idx if ps.maps[c] is not None]
                scale = ps.maps[present[0]].shape[0] if name == "gradients" else 1  # undo the x B of the gradient maps
                for c in present:
                    hw = ps.maps[c].shape[1:]
                    maps[c], i = flat[i: i + hw.numel()].reshape(hw) / scale, i + hw.numel()
        logits = ps.logits if ps.logits is not None else ps.grad_logits
        classes = logits.shape[-1] if logits is not None else None
        return maps, readouts_from_means(means, ps.weight, batch, classes)

    def epsilon(self) -> float:
        if self.accountant is None:
            return math.inf if self.releases else 0.0
        return self.accountant.epsilon(self.config.delta)

    def privacy(self) -> dict:
        return {"epsilon": self.epsilon(), "delta": self.config.delta, "releases": self.releases,
                "mechanism": self.config.mechanism, "noise_multiplier": self.config.noise_multiplier,
                "sample_rate": self.config.sample_rate if self.config.sample_rate is not None
                else (self.config.rate(self.batch) if self.batch else None),
                "clip": self.bounds}

    def report(self) -> str:
        """Print and log "DP telemetry: epsilon=... delta=... after N releases": every DP run states it."""
        text = (f"DP telemetry: epsilon={self.epsilon():.4g} delta={self.config.delta:g} after {self.releases} releases "
                f"({self.config.mechanism} accountant, noise multiplier {self.config.noise_multiplier:g})")
        print(text)
        logger.info(text)
        return text

    def state_dict(self) -> dict:
        history = [list(h) for h in self.accountant._accountant.history] if self.accountant is not None else []
        return {"releases": self.releases, "batch": self.batch, "history": history}

    def load_state_dict(self, state: dict) -> None:
        self.releases, self.batch = int(state["releases"]), state.get("batch")
        if self.accountant is not None:
            self.accountant._accountant.history = [tuple(h) for h in state.get("history", [])]
            self.accountant.releases = self.releases


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
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
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
