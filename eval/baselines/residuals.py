"""Standardised residuals of the training loss against a causal robust trend (input of CUSUM and BOCPD;
paper Sec. 5.1 "Baselines", Table 3).

Per optimizer step s, with level m, slope b and scale d from steps < s only (Holt's linear
exponential smoothing, Huber-clipped so that a spike moves the trend little):

    f_s = m_{s-1} + b_{s-1}                      forecast of the loss from the past (b = 0 for trend="ewma")
    r_s = loss_s - f_s                           residual against the trend of the past
    z_s = clip(r_s / sigma_{s-1}, +-z_clip)      sigma = 1.2533 * d (E|r| = 0.7979 sigma for a Gaussian),
                                                 floored at rel_floor * |m| so a flat loss cannot divide by ~0
    m_s = f_s + a * clip(r_s, +-c sigma)         a = 2 / (span + 1)
    b_s = b_{s-1} + a_b * (m_s - m_{s-1} - b_{s-1})   a_b = 2 / (slope_span + 1)
    d_s = d_{s-1} + a_d * (min(|r_s|, c sigma) - d_{s-1})

The slope matters: a plain EWMA lags a decaying training loss, so its residuals are biased negative and
their scale is inflated by the lag.

A non-finite loss (a diverged step) gives z = +z_clip and leaves trend and scale untouched; the first
`warmup` steps give z = 0 while the estimates settle. Streaming: `LossResiduals.update(new_losses)`
takes the steps since the last frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from eval.replay import PastView

SIGMA_PER_MAD = math.sqrt(math.pi / 2)  # sigma / E|r| for a Gaussian


@dataclass
class ResidualConfig:
    trend: str = "holt"  # "holt" (level + slope) | "ewma" (level only)
    span: float = 20.0  # EWMA span (steps) of the loss level
    slope_span: float = 50.0  # EWMA span (steps) of the slope (trend="holt")
    scale_span: float = 50.0  # EWMA span (steps) of the mean absolute residual
    clip: float = 3.0  # Huber clip (in sigmas) of the trend and scale updates
    z_clip: float = 10.0  # |z| is clipped here; a non-finite loss gives +z_clip
    rel_floor: float = 1e-3  # sigma >= rel_floor * |trend|
    warmup: int = 5  # steps with z = 0 at the start of a run

    def __post_init__(self):
        if self.trend not in ("holt", "ewma"):
            raise ValueError(f"ResidualConfig.trend must be 'holt' or 'ewma', got {self.trend!r}")


class LossResiduals:
    """Streaming standardised loss residuals of one run; `reset()` between runs."""

    def __init__(self, cfg: ResidualConfig | None = None):
        self.cfg = cfg or ResidualConfig()
        self.reset()

    def reset(self) -> None:
        self.trend = math.nan  # level m
        self.slope = 0.0
        self.mad = math.nan  # EWMA of |r|
        self.n = 0  # finite losses seen
        self.steps = 0  # steps consumed

    def _sigma(self) -> float:
        floor = self.cfg.rel_floor * abs(self.trend) + 1e-12
        return max(SIGMA_PER_MAD * self.mad, floor) if math.isfinite(self.mad) else floor

    def update_one(self, x: float) -> float:
        c = self.cfg
        self.steps += 1
        if not math.isfinite(x):
            return c.z_clip
        if self.n == 0:
            self.trend, self.n = x, 1
            return 0.0
        forecast = self.trend + self.slope
        r = x - forecast
        sigma = self._sigma()
        z = 0.0 if self.n < c.warmup else max(-c.z_clip, min(c.z_clip, r / sigma))
        bound = c.clip * sigma if math.isfinite(self.mad) else abs(r)
        level = forecast + 2.0 / (c.span + 1.0) * max(-bound, min(bound, r))
        if c.trend == "holt":
            self.slope += 2.0 / (c.slope_span + 1.0) * (level - self.trend - self.slope)
        self.trend = level
        a = abs(r) if not math.isfinite(self.mad) else min(abs(r), bound)
        self.mad = a if not math.isfinite(self.mad) else self.mad + 2.0 / (c.scale_span + 1.0) * (a - self.mad)
        self.n += 1
        return z

    def update(self, losses) -> np.ndarray:
        """z of each new step, in order."""
        return np.array([self.update_one(float(x)) for x in np.asarray(losses, dtype=np.float64).reshape(-1)])

    def new_steps(self, view: PastView) -> np.ndarray:
        """z of the steps of `view.train_loss` not consumed yet (the steps since the previous frame)."""
        if len(view.train_loss) < self.steps:
            raise ValueError(f"LossResiduals: the view has {len(view.train_loss)} steps but {self.steps} were consumed "
                             f"already: reset() at the start of each run")
        return self.update(view.train_loss[self.steps:])


def aggregate(values: np.ndarray, last: float, how: str) -> float:
    """A frame's score from the per-step statistic since the previous frame: "last" or "max"."""
    if len(values) == 0:
        return last
    if how == "last":
        return float(values[-1])
    if how == "max":
        return float(np.max(values))
    raise ValueError(f"aggregate must be 'last' or 'max', got {how!r}")
