"""A single label-free readout as a detector: the head-gradient norm alone (seed papers 000/002) or
GWA alone (seed 004) (paper Sec. 5.1 "Baselines", Table 3; docs/architecture.md §4).

Per frame t, causal, on the run's own history only:

    x_t   = transform(readout_t)                 "log": log(|v| + eps) (the norm spans decades), "identity"
    x~_t  = EWMA of x over frames (span `smooth_span`; 1 = no smoothing)
    ref   = median and scale of x over the run's first `ref_frames` frames (fewer while t < ref_frames)
    z_t   = (x~_t - median) / scale              scale = max(1.4826 MAD, rel_floor |median|, abs_floor)
    score = z (direction "up"), -z ("down") or |z| ("abs")

A missing readout (NaN) leaves the smoothed value where it was; a run whose readout is missing from
the start scores 0 until it appears.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from eval.replay import FrameOutput, PastView

DIRECTIONS = ("up", "down", "abs")
TRANSFORMS = ("log", "identity")


@dataclass
class ReadoutConfig:
    readout: str = "head_grad_norm"  # a name of capture.readouts.READOUT_NAMES
    transform: str = "log"
    direction: str = "up"
    ref_frames: int = 3  # the run's own early frames that define "normal"
    smooth_span: float = 1.0  # EWMA span in frames (1 = raw)
    rel_floor: float = 0.05
    abs_floor: float = 1e-3
    eps: float = 1e-12

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"ReadoutConfig.direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"ReadoutConfig.transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.ref_frames < 1 or self.smooth_span < 1:
            raise ValueError(f"ReadoutConfig: ref_frames and smooth_span must be >= 1, got {self.ref_frames}, {self.smooth_span}")


def head_grad_config(**kw) -> ReadoutConfig:
    return ReadoutConfig(**{"readout": "head_grad_norm", "transform": "log", "direction": "up", **kw})


def gwa_config(**kw) -> ReadoutConfig:
    """GWA falls when the head's updates stop aligning with its weights (seed 004): direction "down"."""
    return ReadoutConfig(**{"readout": "gwa", "transform": "identity", "direction": "down", **kw})


class ReadoutDeviation:
    """Streaming score of one readout series: `update(value) -> score`, one call per frame."""

    def __init__(self, cfg: ReadoutConfig):
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self.smooth, self.ref, self.med, self.scale = math.nan, [], math.nan, math.nan
        self.n = 0  # frames consumed

    def update(self, value: float) -> float:
        c = self.cfg
        self.n += 1
        x = math.log(abs(value) + c.eps) if c.transform == "log" else float(value)
        if math.isfinite(x):
            self.smooth = x if not math.isfinite(self.smooth) else self.smooth + 2.0 / (c.smooth_span + 1.0) * (x - self.smooth)
            if len(self.ref) < c.ref_frames:  # the reference grows over the first ref_frames frames, then freezes
                self.ref.append(x)
                self.med = float(np.median(self.ref))
                mad = float(np.median(np.abs(np.subtract(self.ref, self.med))))
                self.scale = max(1.4826 * mad, c.rel_floor * abs(self.med), c.abs_floor)
        if not self.ref:
            return 0.0
        z = (self.smooth - self.med) / self.scale
        return z if c.direction == "up" else -z if c.direction == "down" else abs(z)


def deviation_scores(values, cfg: ReadoutConfig) -> np.ndarray:
    """Score of every frame of a readout series (frame t uses values[:t+1] only)."""
    dev = ReadoutDeviation(cfg)
    return np.array([dev.update(v) for v in np.asarray(values, dtype=np.float64)])


class ReadoutDetector:
    """One readout's causal deviation from the run's early frames, as a streaming Diagnoser (score only)."""

    kind = "readout"
    frame_window = 0

    def __init__(self, cfg: ReadoutConfig | None = None, name: str | None = None):
        self.cfg = cfg or ReadoutConfig()
        self.name = name or {"head_grad_norm": "head_grad", "gwa": "gwa"}.get(self.cfg.readout, self.cfg.readout)
        self.dev = ReadoutDeviation(self.cfg)

    def reset(self, run_info: dict) -> None:
        self.dev.reset()

    def step(self, view: PastView) -> FrameOutput:
        if self.cfg.readout not in view.readout_names:
            raise KeyError(f"{self.name}: readout {self.cfg.readout!r} is not among the run's readouts {view.readout_names}")
        values = view.readout(self.cfg.readout)
        if len(values) < self.dev.n:
            raise ValueError(f"{self.name}: the view has {len(values)} frames but {self.dev.n} were consumed: reset() per run")
        score = math.nan
        for v in values[self.dev.n:]:  # the frames since the previous call (one, in a replay)
            score = self.dev.update(v)
        return FrameOutput(score=float(score))
