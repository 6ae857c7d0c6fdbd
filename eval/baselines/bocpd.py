"""Bayesian online change-point detection (Adams & MacKay 2007, "Bayesian Online Changepoint
Detection", arXiv:0710.3742) on loss residuals: a streaming scalar baseline (paper Sec. 5.1, Table 3).

Model: observations are Gaussian with unknown mean and variance, Normal-Gamma prior
(mu0, kappa0, alpha0, beta0), so the predictive of each run length is a Student-t with 2 alpha degrees
of freedom, location mu and scale^2 = beta (kappa + 1) / (alpha kappa); constant hazard 1 / lam.
Per observation x (Algorithm 1 of the paper, in log space):

    pi_r      = Student-t(x | params_r)                         predictive of each run length r
    growth    P(r+1, x_1:t) = P(r, x_1:t-1) pi_r (1 - H)
    change    P(0, x_1:t)   = sum_r P(r, x_1:t-1) pi_r H
    posterior P(r | x_1:t)  = normalised; sufficient statistics updated, the prior prepended for r = 0

r_t counts the observations of the current run: r_t = 0 means a change right after x_t (its posterior
is H whatever the data), so `recent` >= 2. Run lengths above `max_run` are merged into the last one
(constant memory). Score of a step: P(r_t < recent | x_1:t), the posterior mass on a change within
the last `recent` steps. Pure numpy (+ scipy.special.gammaln).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import gammaln

from eval.baselines.residuals import LossResiduals, ResidualConfig, aggregate
from eval.replay import FrameOutput, PastView


@dataclass
class BocpdConfig:
    hazard_lambda: float = 100.0  # expected run length between changes (steps): H = 1 / lambda
    mu0: float = 0.0  # prior mean (residuals are centred)
    kappa0: float = 1.0
    alpha0: float = 1.0
    beta0: float = 1.0  # prior E[variance] = beta0 / (alpha0 - 1) for alpha0 > 1; residuals have sigma ~ 1
    recent: int = 5  # score = P(run length < recent); >= 2 (P(r = 0) is the hazard whatever the data)
    max_run: int = 500  # run lengths kept (longer ones merged)
    aggregate: str = "max"  # "max" | "last" over the steps since the previous frame
    residuals: ResidualConfig = field(default_factory=ResidualConfig)


class BOCPD:
    """The run-length posterior of Adams & MacKay, updated one observation at a time.

    kappa and alpha of run length r are kappa0 + r and alpha0 + r/2 whatever the data, so they and the
    Student-t constants are tabulated once; per observation only mu, beta and the posterior change."""

    def __init__(self, hazard_lambda: float = 100.0, mu0: float = 0.0, kappa0: float = 1.0, alpha0: float = 1.0,
                 beta0: float = 1.0, max_run: int = 500):
        if hazard_lambda <= 1 or kappa0 <= 0 or alpha0 <= 0 or beta0 <= 0 or max_run < 1:
            raise ValueError(f"BOCPD: need hazard_lambda > 1, kappa0, alpha0, beta0 > 0, max_run >= 1; got "
                             f"{hazard_lambda}, {kappa0}, {alpha0}, {beta0}, {max_run}")
        self.log_h, self.log_1mh = math.log(1 / hazard_lambda), math.log1p(-1 / hazard_lambda)
        self.mu0, self.beta0 = mu0, beta0
        r = np.arange(max_run + 1)
        self.kappa = kappa0 + r
        alpha = alpha0 + r / 2
        self.nu = 2 * alpha  # Student-t degrees of freedom
        self.scale_factor = (self.kappa + 1) / (alpha * self.kappa)  # scale^2 = beta * scale_factor
        self.log_const = gammaln((self.nu + 1) / 2) - gammaln(self.nu / 2) - 0.5 * np.log(self.nu * np.pi)
        self.reset()

    def reset(self) -> None:
        size = len(self.kappa)
        self.n = 1  # run lengths 0 .. n-1 in use
        self.log_r = np.full(size, -np.inf)
        self.log_r[0] = 0.0  # P(r_0 = 0) = 1: a run starts at the first observation
        self.mu, self.beta = np.full(size, float(self.mu0)), np.full(size, float(self.beta0))

    def _log_predictive(self, x: float) -> np.ndarray:
        n = self.n
        scale2 = self.beta[:n] * self.scale_factor[:n]
        nu = self.nu[:n]
        return self.log_const[:n] - 0.5 * np.log(scale2) - (nu + 1) / 2 * np.log1p((x - self.mu[:n]) ** 2 / (nu * scale2))

    def update(self, x: float) -> np.ndarray:
        """Add one observation; returns the posterior P(r_t = r | x_1:t), r = 0 .. n-1."""
        x, n, size = float(x), self.n, len(self.kappa)
        joint = self.log_r[:n] + self._log_predictive(x)
        change = _logsumexp(joint) + self.log_h
        growth = joint + self.log_1mh
        kappa, mu = self.kappa[:n], self.mu[:n]
        beta = self.beta[:n] + kappa * (x - mu) ** 2 / (2 * (kappa + 1))
        mu = (kappa * mu + x) / (kappa + 1)
        if n < size:
            self.log_r[1:n + 1], self.mu[1:n + 1], self.beta[1:n + 1] = growth, mu, beta
            self.n = n + 1
        else:  # full: merge the two longest run lengths, keeping the longer one's statistics
            last = np.logaddexp(growth[-2], growth[-1])
            self.log_r[1:], self.mu[1:], self.beta[1:] = growth[:-1], np.append(mu[:-2], mu[-1]), np.append(beta[:-2], beta[-1])
            self.log_r[-1] = last
        self.log_r[0], self.mu[0], self.beta[0] = change, self.mu0, self.beta0
        self.log_r[:self.n] -= _logsumexp(self.log_r[:self.n])
        return np.exp(self.log_r[:self.n])

    def recent_mass(self, recent: int) -> float:
        """P(r_t < recent): posterior mass of a change within the last `recent` observations."""
        return float(np.exp(_logsumexp(self.log_r[:min(recent, self.n)])))

    def run(self, xs, recent: int) -> tuple[np.ndarray, np.ndarray]:
        """(P(r_t < recent), MAP run length) after each observation of `xs`."""
        mass, map_r = [], []
        for x in np.asarray(xs, dtype=np.float64):
            map_r.append(int(np.argmax(self.update(x))))
            mass.append(self.recent_mass(recent))
        return np.array(mass), np.array(map_r, dtype=np.int64)


def _logsumexp(a: np.ndarray) -> float:
    m = float(np.max(a))
    return m if not math.isfinite(m) else m + math.log(float(np.sum(np.exp(a - m))))


class BocpdDetector:
    """BOCPD on the training-loss residuals as a streaming Diagnoser (score only)."""

    kind = "scalar"
    frame_window = 0

    def __init__(self, cfg: BocpdConfig | None = None, name: str = "bocpd"):
        self.cfg, self.name = cfg or BocpdConfig(), name
        c = self.cfg
        self.residuals = LossResiduals(c.residuals)
        self.bocpd = BOCPD(c.hazard_lambda, c.mu0, c.kappa0, c.alpha0, c.beta0, c.max_run)
        self.reset({})

    def reset(self, run_info: dict) -> None:
        self.residuals.reset()
        self.bocpd.reset()
        self.last = 0.0

    def step(self, view: PastView) -> FrameOutput:
        mass = []
        for z in self.residuals.new_steps(view):
            self.bocpd.update(z)
            mass.append(self.bocpd.recent_mass(self.cfg.recent))
        self.last = aggregate(mass, self.last, self.cfg.aggregate)
        return FrameOutput(score=self.last)
