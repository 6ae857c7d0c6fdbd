"""CUSUM on loss residuals (Page 1954), a streaming scalar baseline (paper Sec. 5.1, Table 3).

On the standardised residuals z_s of `residuals.LossResiduals` (steps, causal):

    S+_s = max(0, S+_{s-1} + z_s - k)        upper: the loss rises above its trend (spikes, divergence)
    S-_s = max(0, S-_{s-1} - z_s - k)        lower (two_sided only): the loss falls below its trend

statistic = S+ (or max(S+, S-)); a frame's score is the statistic at the frame's step, or its max over
the steps since the previous frame (`aggregate`). The alert threshold on the score is set on
validation for FAR <= 5% (eval.metrics.threshold_for_far), as for every method; `h`, the classic
CUSUM alarm level, only matters when `reset_at_h` is set: the statistic restarts from 0 after it
crosses h (so the detector signals repeated changes instead of staying high).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from eval.baselines.residuals import LossResiduals, ResidualConfig, aggregate
from eval.replay import FrameOutput, PastView


@dataclass
class CusumConfig:
    k: float = 0.5  # drift (allowance) in sigmas per step
    h: float = 5.0  # alarm level (sigmas); used only with reset_at_h
    reset_at_h: bool = False
    two_sided: bool = False
    aggregate: str = "max"  # "max" | "last" over the steps since the previous frame
    residuals: ResidualConfig = field(default_factory=ResidualConfig)


def cusum(z, k: float, two_sided: bool = False, h: float | None = None, state: tuple[float, float] = (0.0, 0.0)):
    """CUSUM statistic of each value of `z` (1-D), and the final (S+, S-) state to continue from.
    With `h`, a statistic that exceeds h is reported and then restarts from 0."""
    up, down = state
    out = np.empty(len(z))
    for i, x in enumerate(np.asarray(z, dtype=np.float64)):
        up = max(0.0, up + x - k)
        down = max(0.0, down - x - k) if two_sided else 0.0
        out[i] = max(up, down)
        if h is not None and out[i] > h:
            up = down = 0.0
    return out, (up, down)


class CusumDetector:
    """CUSUM of the training-loss residuals as a streaming Diagnoser (score only)."""

    kind = "scalar"
    frame_window = 0  # reads no frames

    def __init__(self, cfg: CusumConfig | None = None, name: str = "cusum"):
        self.cfg, self.name = cfg or CusumConfig(), name
        self.residuals = LossResiduals(self.cfg.residuals)
        self.reset({})

    def reset(self, run_info: dict) -> None:
        self.residuals.reset()
        self.state, self.last = (0.0, 0.0), 0.0

    def step(self, view: PastView) -> FrameOutput:
        c = self.cfg
        z = self.residuals.new_steps(view)
        stat, self.state = cusum(z, c.k, c.two_sided, c.h if c.reset_at_h else None, self.state)
        self.last = aggregate(stat, self.last, c.aggregate)
        return FrameOutput(score=self.last)
