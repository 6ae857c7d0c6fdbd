"""Run-relative inputs (issue 20): what a window looks like once the look of the network is taken out.

The frames TEViD read so far carry each architecture's constants: levels about 9 orders of magnitude apart,
upsampling blocks, the dataset's mean image, readouts whose size grows with width and class count. A store
also keeps, per frame and map, the raw level (log10 RMS of the batch-mean map) and a standardised 8 x 8
pattern (`capture.frames.summarise_maps`), so inputs relative to the run are computed at read time:

    levels    (N, 6)        --minus the causal run reference, asinh-->        rel_level   (N, 6)
                            --minus the previous frame's level-->             d_level     (N, 6)
    patterns  (N, 6, P, P)  --per frame and map to unit spatial sd-->          patterns    (N, 6, P, P)
    readouts  (N, 8)        --head-gradient sizes as log ratios to the window's first frame, loss and
                              entropy over log C, confidence above chance, the loss's log ratio--> (N, 9)

The run reference of a channel at frame t is the mean of its finite levels over the run's first
`reference_frames` frames that exist by t (no look-ahead: frame 0 is its own reference). Every scalar
goes through asinh after non-finite values are replaced: near-linear where healthy runs sit, logarithmic
for a diverging one, never clamped. `relative_window` takes only what both a store and the live monitor's
frames hold (`Frame.levels`, `Frame.patterns`, the readouts), so the two can share it; today only the
probes read it (`eval/fingerprint.py`, `eval/transfer_probe.py`): TEViD and the monitor do not yet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import reduce

from capture.frames import CHANNELS
from capture.schema import CLIP_READOUTS

SIZE_READOUTS = ("head_grad_norm", "score_w", "score_z")  # grow with width, classes and tokens: ratios only
RELATIVE_FEATURES = (
    tuple(f"rel_level_{c}" for c in CHANNELS)
    + tuple(f"d_level_{c}" for c in CHANNELS)
    + tuple(f"log_ratio_{r}" for r in SIZE_READOUTS)
    + ("gwa", "confidence_above_chance", "entropy_over_log_c", "margin", "loss_over_log_c", "log_ratio_loss")
)
BIG = 1e6  # what +-inf becomes before asinh (asinh(1e6) ~ 14.5)
EPS = 1e-12


@dataclass
class RelativeConfig:
    reference_frames: int = 4  # the run reference: mean level over the run's first frames
    level_scale: float = 0.25  # decades of level per unit before asinh: 0.25 decade (x1.8) ~ 1


def run_reference(levels: torch.Tensor, reference_frames: int = RelativeConfig.reference_frames) -> torch.Tensor:
    """`(N, 6)` levels of a run from its first frame -> `(N, 6)` causal reference: at frame t, the mean of each
    channel's finite levels over frames 0 .. min(t, reference_frames - 1); NaN while a channel has none."""
    if levels.ndim != 2:
        raise ValueError(f"levels must be (frames, channels), got shape {tuple(levels.shape)}")
    if reference_frames < 1:
        raise ValueError(f"reference_frames must be >= 1, got {reference_frames}")
    lv = levels.double()
    ok = torch.isfinite(lv)
    head = torch.where(ok, lv, torch.zeros_like(lv))[:reference_frames].cumsum(0)
    count = ok[:reference_frames].double().cumsum(0)
    ref = head / count  # NaN (0 / 0) while a channel has no finite level yet
    if len(lv) > reference_frames:
        ref = torch.cat([ref, ref[-1:].expand(len(lv) - reference_frames, -1)])
    return ref.to(levels.dtype)


def _squash(x: torch.Tensor) -> torch.Tensor:
    return torch.asinh(torch.nan_to_num(x, nan=0.0, posinf=BIG, neginf=-BIG))


def unit_patterns(patterns: torch.Tensor) -> torch.Tensor:
    """`(N, 6, P, P)` standardised-then-resized patterns -> each map at zero mean and unit spatial sd (a
    constant map stays zero); resizing shrank the spread by an amount that depends on the native size."""
    p = torch.nan_to_num(patterns.float())
    mean = reduce(p, "n c h w -> n c 1 1", "mean")
    sd = torch.sqrt(reduce((p - mean) ** 2, "n c h w -> n c 1 1", "mean"))
    return torch.where(sd > 1e-6, (p - mean) / sd.clamp_min(1e-6), torch.zeros_like(p))


def relative_window(levels: torch.Tensor, patterns: torch.Tensor, readouts: torch.Tensor, num_classes: int,
                    reference: torch.Tensor, previous_level: torch.Tensor | None = None,
                    cfg: RelativeConfig = RelativeConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """One window of T frames -> (patterns `(T, 6, P, P)`, scalars `(T, len(RELATIVE_FEATURES))`), float32.

    levels `(T, 6)`, patterns `(T, 6, P, P)`, readouts `(T, 8)` in `CLIP_READOUTS` order, the run reference
    `(T, 6)` or `(6,)` (`run_reference`), and the level of the frame before the window (`(6,)`, None: the
    window's first frame has no change). Ratios "to the window's start" use the window's first frame."""
    if levels.ndim != 2 or readouts.ndim != 2 or patterns.ndim != 4 or not len(levels) == len(readouts) == len(patterns):
        raise ValueError(f"expected levels (T, 6), patterns (T, 6, P, P), readouts (T, {len(CLIP_READOUTS)}) of one T, got "
                         f"{tuple(levels.shape)}, {tuple(patterns.shape)}, {tuple(readouts.shape)}")
    if readouts.shape[1] != len(CLIP_READOUTS):
        raise ValueError(f"readouts must have the {len(CLIP_READOUTS)} columns {CLIP_READOUTS}, got {readouts.shape[1]}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    lv = levels.double()
    ref = reference.double().expand_as(lv)
    rel = (lv - ref) / cfg.level_scale
    prev = torch.full_like(lv[:1], math.nan) if previous_level is None else previous_level.double().reshape(1, -1)
    d = (lv - torch.cat([prev, lv[:-1]])) / cfg.level_scale
    d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))  # no previous frame / a map without data: no change
    rel = torch.where(torch.isnan(rel), torch.zeros_like(rel), rel)

    r = {name: readouts[:, i].double() for i, name in enumerate(CLIP_READOUTS)}
    log_c = math.log(num_classes)
    ratios = [torch.log(r[n].abs() + EPS) - torch.log(r[n][:1].abs() + EPS) for n in SIZE_READOUTS]
    scalars = torch.stack([
        *ratios,
        r["gwa"],
        (r["confidence"] - 1.0 / num_classes) / (1.0 - 1.0 / num_classes),
        r["entropy"] / log_c,
        r["margin"],
        r["loss"] / log_c,
        torch.log(r["loss"].abs() + EPS) - torch.log(r["loss"][:1].abs() + EPS),
    ], dim=1)
    out = torch.cat([rel, d, scalars], dim=1)
    return unit_patterns(patterns), _squash(out).float()


def relative_run(levels: torch.Tensor, patterns: torch.Tensor, readouts: torch.Tensor, num_classes: int,
                 window: int, cfg: RelativeConfig = RelativeConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Every causal window of a whole run, ending at frames window-1 .. N-1: patterns `(W, T, 6, P, P)` and
    scalars `(W, T, F)`. The reference at a window is the one known at its last frame."""
    n = len(levels)
    if n < window:
        return patterns.new_zeros((0, window, *patterns.shape[1:])), levels.new_zeros((0, window, len(RELATIVE_FEATURES)))
    ref = run_reference(levels, cfg.reference_frames)
    pats, scal = [], []
    for end in range(window - 1, n):
        s = end - window + 1
        p, x = relative_window(levels[s:end + 1], patterns[s:end + 1], readouts[s:end + 1], num_classes, ref[end],
                               levels[s - 1] if s > 0 else None, cfg)
        pats.append(p)
        scal.append(x)
    return torch.stack(pats), torch.stack(scal)


def pooled(patterns: torch.Tensor, scalars: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """A window's `(T, 6, P, P)` maps and `(T, F)` scalars -> one vector: the maps averaged over time and
    pooled to grid x grid, the scalars' mean and last value (the probes' view of a window: relative
    patterns and scalars, or raw frames and readout features)."""
    p = reduce(patterns, "t c (h a) (w b) -> (c h w)", "mean", h=grid, w=grid)
    return torch.cat([p, scalars.mean(0), scalars[-1]])


__all__ = ["RELATIVE_FEATURES", "RelativeConfig", "pooled", "relative_run", "relative_window", "run_reference",
           "unit_patterns"]
