"""The deterministic labeling rules of the TEViD paper, Appendix A (A.1 priority, A.2 definitions),
as pure functions over one run's signals (numpy arrays in, `RuleResult` out).

Rules and their paper thresholds (the defaults; the factory's thresholds live in configs):
  overfitting   AR(1)-prewhitened Mann-Kendall on [e0, e0+W-1] (val up, train down), p < 0.05 after
                Benjamini-Yekutieli across candidates e0, and a practical gap test (A.2 "Overfitting")
  loss_spikes   robust z >= 3.5 against the previous 1000 steps, >= 3 spikes within 500 steps
  lyapunov      99% stationary-bootstrap CI of the mean log growth factor (Algorithm 1) above 0
  collapse      (the factory's addition) learned, then back at chance to the end: a saturated blow-up
  forgetting    relative accuracy drop >= 30% after the task switch, McNemar p < 0.01
  concept_bias  logistic regression correct ~ shortcut + C(class), shortcut coefficient > 0, p < 0.01
  healthy       final metric meets the dataset floor (Appendix B, Table 10)
  assign_label  priority Instability > Forgetting > Concept Bias > Overfitting > Healthy (A.1)

Statistics come from pymannkendall, statsmodels, scipy, arch and pandas (rolling quantiles). Every
`detail` dict holds plain Python values (non-finite numbers as None), so it serialises to strict JSON.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pymannkendall as mk
import statsmodels.api as sm
from arch.bootstrap import StationaryBootstrap
from scipy.stats import fisher_exact, median_abs_deviation
from statsmodels.stats.contingency_tables import StratifiedTable, mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.tools.sm_exceptions import (
    ConvergenceWarning,
    HessianInversionWarning,
    PerfectSeparationError,
    PerfectSeparationWarning,
)

from capture.schema import LABEL_PRIORITY as PRIORITY  # paper A.1
IQR_TO_SIGMA = 1.349  # IQR of a standard normal: sigma = IQR / 1.349
MCNEMAR_EXACT_BELOW = 25  # discordant pairs b + c below this: exact binomial McNemar
MAX_LOGIT_COEF = 10.0  # |coefficient| above this (odds ratio > 2e4) means separation, not an estimate
MAX_LISTED = 100  # spike steps listed in `detail`


@dataclass(frozen=True)
class RuleResult:
    fired: bool
    trigger: int | None  # index where the rule first fires (epoch or step, per rule); None if not fired
    detail: dict  # the statistics behind the decision, JSON-serialisable


def _num(x: Any) -> float | None:
    """A float for `detail`, None when not finite (strict JSON has no NaN/inf)."""
    x = float(x)
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------ overfitting
def _mk_prewhitened(x: np.ndarray, alpha: float) -> tuple[float, float]:
    """(two-sided p, z) of the AR(1)-prewhitened MK test in its trend-free form (TFPW, Yue et al.
    2002, pymannkendall's `trend_free_pre_whitening_modification_test`): the Sen slope is removed
    before the lag-1 autocorrelation is estimated and added back after prewhitening. Plain
    prewhitening estimates the autocorrelation on the un-detrended window, which absorbs most of a
    real trend: on a 0.6-sigma-per-epoch trend it detected 7% (n=8) vs TFPW's 53%, so overfitting
    would almost never fire on the factory's short windows. A constant window is "no trend"."""
    if np.ptp(x) == 0:
        return 1.0, 0.0
    res = mk.trend_free_pre_whitening_modification_test(x, alpha=alpha)
    return float(res.p), float(res.z)


def _spread(hist: np.ndarray, gap_scale: str) -> float:
    """Typical historical fluctuation of the gap (see `overfitting`)."""
    if gap_scale == "std":
        return float(np.std(hist, ddof=1))
    if gap_scale == "mad":
        return float(median_abs_deviation(hist, scale="normal"))
    return float(median_abs_deviation(np.diff(hist), scale="normal") / math.sqrt(2))


def overfitting(
    train_loss_ep: np.ndarray,
    val_loss_ep: np.ndarray,
    *,
    window: int = 10,
    alpha: float = 0.05,
    gap_sigmas: float = 2.0,
    min_history: int = 3,
    gap_scale: str = "std",
    train_trend: str = "significant",
) -> RuleResult:
    """Overfitting at the first candidate epoch e0 (with >= `min_history` epochs before it and
    [e0, e0+W-1] inside the run, W = `window`) where all hold:

      1. prewhitened MK on L_val over the window: z > 0, BY-adjusted p < alpha;
      2. prewhitened MK on L_tr over the window: z < 0, BY-adjusted p < alpha (`train_trend`);
      3. Delta(e0+W-1) - median_{e<e0} Delta(e) > gap_sigmas * std_{e<e0} Delta(e),  Delta = L_val - L_tr.

    p is the library's two-sided p; a trend in the wrong direction enters the correction as p = 1.
    Benjamini-Yekutieli runs per series over all tested candidates. std is the sample std (ddof=1)
    over the finite history values. Windows holding a non-finite value are not tested (and not
    counted in the correction). trigger = e0 + W - 1, the epoch at which the window is complete.
    `gap_scale="mad"` measures "typical historical fluctuation" as the normal-consistent median
    absolute deviation (scipy) instead of the std: a short history that holds the first epochs'
    fast fall of the loss has a std far above its usual epoch-to-epoch fluctuation. `gap_scale="diff"`
    measures it from the history's epoch-to-epoch changes (normal-consistent MAD of the first
    differences, / sqrt(2)), which is blind to the level of the early transient altogether: in a
    run of 20 epochs the history before any e0 is mostly that transient, and both "std" and "mad"
    then exceed the whole rise of an unmistakably overfitting run (factory pilot, docs/factory.md).
    `train_trend` is what condition 2 asks of the training loss: "significant" (as above),
    "decreasing" (only a decreasing direction, MK z < 0, as the paper's A.2 words it: "a significant
    increasing trend and ... a decreasing trend") or "not_rising" (no significant increase: not
    z > 0 with BY-adjusted p < alpha). Once a model has memorised its subset, the training loss sits
    at ~0 and its "trend" over the window is noise: its fall is rarely significant, and its direction
    is a coin flip, so "decreasing" missed runs whose validation loss rose six-fold after the
    memorisation (docs/factory.md). "not_rising" still tells overfitting from a run that degrades on
    both losses.

    Short series: MK sees W-1 residuals, so the smallest attainable p is ~0.027 for W=6, 0.0085 for
    W=7, 0.0027 for W=8, 0.00026 for W=10; after BY over m candidates (factor m * sum_{i<=m} 1/i for
    a lone discovery) windows below ~8 fire only when many candidates agree.
    """
    train = np.asarray(train_loss_ep, dtype=float)
    val = np.asarray(val_loss_ep, dtype=float)
    if train.ndim != 1 or train.shape != val.shape:
        raise ValueError(f"train and val losses must be 1-D of equal length, got {train.shape} and {val.shape}")
    if window < 3:
        raise ValueError(f"window must be >= 3 (prewhitened MK needs >= 2 residuals), got {window}")
    if gap_scale not in ("std", "mad", "diff"):
        raise ValueError(f"gap_scale must be 'std', 'mad' or 'diff', got {gap_scale!r}")
    if min_history < 2:
        raise ValueError(f"min_history must be >= 2 (the gap test needs a std), got {min_history}")
    if train_trend not in ("significant", "decreasing", "not_rising"):
        raise ValueError(f"train_trend must be 'significant', 'decreasing' or 'not_rising', got {train_trend!r}")
    gap = val - train
    e0s, p_val, z_val, p_tr, p_tr_up, z_tr = [], [], [], [], [], []
    skipped = 0
    for e0 in range(min_history, len(val) - window + 1):
        v, t = val[e0:e0 + window], train[e0:e0 + window]
        if not (np.isfinite(v).all() and np.isfinite(t).all()):
            skipped += 1
            continue
        (pv, zv), (pt, zt) = _mk_prewhitened(v, alpha), _mk_prewhitened(t, alpha)
        e0s.append(e0)
        p_val.append(pv if zv > 0 else 1.0)
        p_tr.append(pt if zt < 0 else 1.0)
        p_tr_up.append(pt if zt > 0 else 1.0)
        z_val.append(zv)
        z_tr.append(zt)
    detail: dict = {"window": window, "n_candidates": len(e0s), "n_skipped_nonfinite": skipped}
    if not e0s:
        return RuleResult(False, None, detail)

    val_sig, p_val_adj, _, _ = multipletests(p_val, alpha=alpha, method="fdr_by")
    tr_sig, p_tr_adj, _, _ = multipletests(p_tr, alpha=alpha, method="fdr_by")
    excess, threshold, practical = [], [], []
    for e0 in e0s:
        hist = gap[:e0][np.isfinite(gap[:e0])]
        enough = len(hist) >= min_history
        excess.append(gap[e0 + window - 1] - np.median(hist) if enough else math.nan)
        spread = _spread(hist, gap_scale) if enough else math.nan
        threshold.append(gap_sigmas * spread)
        practical.append(bool(enough and excess[-1] > threshold[-1]))
    if train_trend == "significant":
        train_ok = list(tr_sig)
    elif train_trend == "decreasing":
        train_ok = [z < 0 for z in z_tr]
    else:
        train_ok = [not rising for rising in multipletests(p_tr_up, alpha=alpha, method="fdr_by")[0]]
    fired_at = [i for i in range(len(e0s)) if val_sig[i] and train_ok[i] and practical[i]]
    # the decisive candidate: the first that fires, else the one closest to firing on trends
    i = fired_at[0] if fired_at else int(np.argmin(np.maximum(p_val_adj, p_tr_adj)))
    detail.update(
        e0=e0s,
        p_val_adj=[_num(p) for p in p_val_adj],
        p_train_adj=[_num(p) for p in p_tr_adj],
        practical=practical,
        decisive={
            "e0": e0s[i], "z_val": _num(z_val[i]), "p_val": _num(p_val[i]), "p_val_adj": _num(p_val_adj[i]),
            "z_train": _num(z_tr[i]), "p_train": _num(p_tr[i]), "p_train_adj": _num(p_tr_adj[i]),
            "gap_excess": _num(excess[i]), "gap_threshold": _num(threshold[i]), "practical": practical[i],
        },
    )
    if not fired_at:
        return RuleResult(False, None, detail)
    return RuleResult(True, e0s[i] + window - 1, detail)


def memorised(train_loss_ep: np.ndarray, val_loss_ep: np.ndarray, *, rise: float = 1.5, train_frac: float = 0.1,
              tail: float = 0.25) -> RuleResult:
    """The end state of memorisation, for runs whose validation loss rose before the trend test has a
    history (`overfitting` starts after `min_history` epochs): over the last `tail` of the epochs the
    median validation loss is >= `rise` x its best and the median training loss <= `train_frac` x the
    first epoch's. trigger = the first epoch after the best from which both hold epoch by epoch to the
    end. A run with a non-finite loss is not tested (instability's rules speak for it)."""
    train = np.asarray(train_loss_ep, dtype=float)
    val = np.asarray(val_loss_ep, dtype=float)
    if train.shape != val.shape or len(val) < 4 or not (np.isfinite(train).all() and np.isfinite(val).all()):
        return RuleResult(False, None, {"reason": "fewer than 4 finite epochs"})
    k = max(2, int(round(tail * len(val))))
    best, start = float(np.min(val)), float(train[0])
    end_rise, end_train = float(np.median(val[-k:])) / best, float(np.median(train[-k:])) / start
    detail = {"rise": _num(end_rise), "train_frac": _num(end_train), "tail_epochs": k}
    if not (end_rise >= rise and end_train <= train_frac):
        return RuleResult(False, None, detail)
    holds = (val >= rise * best) & (train <= train_frac * start)
    first = len(val) - 1
    while first > int(np.argmin(val)) + 1 and holds[first - 1]:
        first -= 1
    return RuleResult(True, first, detail)


# ------------------------------------------------------------------ instability
def loss_spikes(
    loss: np.ndarray,
    *,
    z: float = 3.5,
    window: int = 1000,
    count: int = 3,
    span: int = 500,
    min_history: int | None = None,
    merge_gap: int = 0,
    min_rise: float = 0.0,
    jump_frac: float = 0.0,
) -> RuleResult:
    """Spike at step t if z_t = (L_t - mu_t) / (sigma_t + 1e-6) >= z, with mu_t the median and
    sigma_t = IQR / 1.349 of the finite losses among the strictly previous `window` steps (z_t is
    defined once >= `min_history`, default window // 10, of them exist), or if L_t is not finite.
    Fires when `count` spikes lie within `span` consecutive steps (last - first < span);
    trigger = the step (index into `loss`) of the spike that completes the count.

    `merge_gap` > 0 counts spike *events*: a spike within `merge_gap` steps of the previous one
    belongs to the same event (the paper's 0 counts every step). A sustained level shift, such as
    the loss jump of a task switch, is then one event rather than a run of "spikes". Non-finite
    losses are never merged: a diverged run still fires.

    `min_rise` > 0 also asks L_t - mu_t >= min_rise (an absolute rise). A model that has memorised
    its data has a loss near zero with a tiny IQR, so a batch loss of 0.01 against a median of 0.001
    scores z ~ 100 without being a spike of anything; the factory sets min_rise from the loss level
    at the start of the run (`LabelConfig.spike_min_rise_frac`).

    `jump_frac` > 0 (with `merge_gap`) lets a spike step inside a merged stretch start a new event
    when the loss jumped into it: L_t - L_{t-1} >= jump_frac * (L_t - mu_t) and >= `min_rise`. Repeated
    bursts that keep the loss raised in between are then several events, while a plateau after a
    level shift, whose steps do not jump, stays one.
    """
    if count < 1 or span < 1 or window < 1:
        raise ValueError(f"count, span and window must be >= 1, got {count}, {span}, {window}")
    losses = np.asarray(loss, dtype=float).ravel()
    finite = np.isfinite(losses)
    min_history = max(1, window // 10 if min_history is None else min_history)
    # rolling statistics over [t-window, t-1]: roll over [t-window+1, t], then shift by one step
    rolling = pd.Series(np.where(finite, losses, np.nan)).rolling(window, min_periods=min_history)
    mu = rolling.median().shift(1).to_numpy()
    sigma = ((rolling.quantile(0.75) - rolling.quantile(0.25)) / IQR_TO_SIGMA).shift(1).to_numpy()
    with np.errstate(invalid="ignore"):
        z_t = (losses - mu) / (sigma + 1e-6)
        spike = ~finite | ((z_t >= z) & (losses - mu >= min_rise))  # NaN z (too little history) compares False
    steps = np.flatnonzero(spike)
    if merge_gap > 0 and len(steps):  # first step of each event; a non-finite loss always counts
        new_event = np.concatenate([[True], np.diff(steps) > merge_gap]) | ~finite[steps]
        if jump_frac > 0:  # a fresh jump inside a raised stretch starts an event of its own
            prev = np.concatenate([[np.nan], losses[:-1]])[steps]
            with np.errstate(invalid="ignore"):
                rise = losses[steps] - prev
                new_event |= (rise >= jump_frac * (losses[steps] - mu[steps])) & (rise >= min_rise)
        steps = steps[new_event]
    detail: dict = {
        "n_spikes": int(len(steps)),
        "n_nonfinite": int((~finite).sum()),
        "spike_steps": steps[:MAX_LISTED].tolist(),
        "spike_z": [_num(v) for v in z_t[steps[:MAX_LISTED]]],  # None for non-finite losses
    }
    if len(steps) >= count:
        completes = np.flatnonzero(steps[count - 1:] - steps[: len(steps) - count + 1] < span)
        if len(completes):
            first = int(completes[0])
            detail["firing_spikes"] = steps[first:first + count].tolist()
            return RuleResult(True, int(steps[first + count - 1]), detail)
    return RuleResult(False, None, detail)


def lyapunov(
    windows: Sequence[tuple[int, np.ndarray]],
    *,
    confidence: float = 0.99,
    n_boot: int = 2000,
    block: float = 10.0,
    seed: int = 0,
) -> RuleResult:
    """For each window (start_step, {log alpha_i}_{i<H}) of Algorithm 1: lambda_hat = mean(log alpha)
    with a `confidence` percentile interval from the stationary bootstrap (expected block length
    `block`, `n_boot` replicates, the same `seed` for every window). Windows are taken in order of
    start step; fires at the first whose lower bound > 0, or that holds a non-finite log alpha
    (a diverged run: +inf growth). trigger = start_step + H. Empty windows are skipped.
    """
    per_window, trigger = [], None
    for start, log_alphas in sorted(windows, key=lambda w: w[0]):
        a = np.asarray(log_alphas, dtype=float).ravel()
        rec: dict = {"start": int(start), "H": int(len(a))}
        if len(a) == 0:
            per_window.append(rec)
            continue
        if not np.isfinite(a).all():
            rec.update(mean=None, lower=None, upper=None, nonfinite=True)
            fired = True
        else:
            ci = StationaryBootstrap(block, a, seed=seed).conf_int(np.mean, reps=n_boot, method="percentile", size=confidence)
            rec.update(mean=_num(a.mean()), lower=_num(ci[0, 0]), upper=_num(ci[1, 0]), nonfinite=False)
            fired = bool(ci[0, 0] > 0)
        rec["fired"] = fired
        per_window.append(rec)
        if fired and trigger is None:
            trigger = int(start) + len(a)
    return RuleResult(trigger is not None, trigger, {"confidence": confidence, "windows": per_window})


def collapse(
    val_acc_ep: np.ndarray,
    train_loss: np.ndarray,
    chance: float,
    *,
    window: int = 5,
    learned: float = 2.0,
    level: float = 2.0,
    loss_return: float = 0.9,
) -> RuleResult:
    """Collapse: the finite counterpart of divergence. A model that had learned (some epoch's
    validation accuracy >= `learned` x chance) ends at chance: each of the last `window` epochs has
    validation accuracy <= `level` x chance, and the training loss over the steps of those epochs
    has returned to >= `loss_return` x its level over the first 10 steps (the model lost what it had
    learned on its own training data). The paper counts a non-finite loss as instability; a small
    model whose learning rate blows up usually saturates instead, its loss back at log K, and that
    is one level shift, not three spikes. trigger = the first epoch of the final stretch at chance.
    """
    acc = np.asarray(val_acc_ep, dtype=float)
    loss = np.asarray(train_loss, dtype=float)
    detail: dict = {"chance": _num(chance), "window": window}
    if len(acc) <= window or not (0 < chance < 1) or len(loss) < 10:
        return RuleResult(False, None, {**detail, "reason": "too few epochs or steps"})
    peak = float(np.nanmax(acc[:-window])) if np.isfinite(acc[:-window]).any() else math.nan
    at_chance = np.isfinite(acc) & (acc <= level * chance)
    tail_steps = max(1, round(len(loss) * window / len(acc)))
    start, end = np.nanmedian(loss[:10]), np.nanmedian(np.where(np.isfinite(loss[-tail_steps:]), loss[-tail_steps:], np.inf))
    detail.update(peak_acc=_num(peak), final_acc=_num(acc[-1]), start_loss=_num(start), end_loss=_num(end))
    fired = bool(peak >= learned * chance and at_chance[-window:].all() and end >= loss_return * start)
    if not fired:
        return RuleResult(False, None, detail)
    first = len(acc) - 1
    while first > 0 and at_chance[first - 1]:
        first -= 1
    return RuleResult(True, first, detail)


def loss_jump(train_loss: np.ndarray, *, span: int, jump: float = 2.0, min_rise: float = 0.0,
              min_history: int | None = None, baseline: str = "window") -> RuleResult:
    """A sustained jump of the training loss: at some step t the median over the next `span` steps is
    >= `jump` x the median over the previous `span` steps (non-finite losses count as infinite). An
    adaptive optimizer hit by LR bursts keeps its loss raised for tens of steps, so the bursts merge into
    one or two spike events and the spike rule (3 events) misses them; a level shift is the signature.
    The caller rules out runs whose task changes (a task switch raises the loss by design). t starts
    after `min_history` steps (default `2 * span`: the fast first fall is not a baseline). The rise must
    also be >= `min_rise` in loss units: a memorised model's loss doubling from 0.05 to 0.1 at a warm
    restart is not instability. trigger = t + span, the step by which the raised level is established.

    `baseline="best"` compares the median over the next `span` steps with the lowest such median up to
    the span before t instead: bursts that raise the loss in steps, each less than `jump` x the level just
    before it, add up against the run's best level (char LMs under Adam, issue 19 corpus)."""
    if baseline not in ("window", "best"):
        raise ValueError(f"loss_jump: baseline must be 'window' or 'best', got {baseline!r}")
    loss = np.where(np.isfinite(np.asarray(train_loss, dtype=float)), np.asarray(train_loss, dtype=float), np.inf)
    start = 2 * span if min_history is None else max(span, min_history)
    detail: dict = {"span": span, "jump": jump}
    if span < 1 or len(loss) < start + span:
        return RuleResult(False, None, {**detail, "reason": "run too short for the span"})
    windows = np.lib.stride_tricks.sliding_window_view(loss, span)
    med = np.median(windows, axis=1)  # med[i] = median of loss[i:i+span]
    ref = np.minimum.accumulate(med) if baseline == "best" else med
    for t in range(start, len(loss) - span + 1):
        before, after = ref[t - span], med[t]
        if np.isfinite(before) and before > 0 and after >= jump * before and after - before >= min_rise:
            return RuleResult(True, int(t + span), {**detail, "step": int(t), "before": _num(before), "after": _num(after)})
    return RuleResult(False, None, detail)


def blowup(
    val_loss_ep: np.ndarray,
    val_acc_ep: np.ndarray,
    chance: float,
    *,
    factor: float = 10.0,
    learned: float = 2.0,
    level: float = 2.0,
) -> RuleResult:
    """Blow-up: a transient divergence, seen where it shows, on held-out data. At some epoch e the
    validation loss jumps to >= `factor` x the previous epoch's (or turns non-finite) and validation
    accuracy falls to <= `level` x chance, in a model that had learned (some earlier epoch >= `learned`
    x chance). It may recover afterwards, which is what `collapse` (which needs the end at chance) and
    the training-loss spikes miss: with BatchNorm, an LR burst wrecks the running statistics the
    validation pass uses (loss x 12-15, accuracy at chance) while an AdamW run's training-mode loss rises
    by 13-31% over that epoch (docs/factory.md). The jump is from one epoch to the next: a gradual rise,
    however large (a memorising model's validation loss), never fires. trigger = e.
    """
    loss = np.asarray(val_loss_ep, dtype=float)
    acc = np.asarray(val_acc_ep, dtype=float)
    if loss.shape != acc.shape or loss.ndim != 1:
        raise ValueError(f"val loss and accuracy must be 1-D of equal length, got {loss.shape} and {acc.shape}")
    detail: dict = {"chance": _num(chance), "factor": factor}
    if len(loss) < 2 or not (0 < chance < 1):
        return RuleResult(False, None, {**detail, "reason": "too few epochs"})
    peak = np.fmax.accumulate(np.where(np.isfinite(acc), acc, -np.inf))  # best accuracy up to each epoch
    for e in range(1, len(loss)):
        jumped = not np.isfinite(loss[e]) or (np.isfinite(loss[e - 1]) and loss[e] >= factor * loss[e - 1])
        lost = not np.isfinite(acc[e]) or acc[e] <= level * chance
        if jumped and lost and peak[e - 1] >= learned * chance:
            return RuleResult(True, e, {**detail, "epoch": e, "loss_before": _num(loss[e - 1]), "loss": _num(loss[e]),
                                        "acc_before_peak": _num(peak[e - 1]), "acc": _num(acc[e])})
    return RuleResult(False, None, detail)


# ------------------------------------------------------------------ catastrophic forgetting
def forgetting(
    primary_acc_ep: np.ndarray,
    switch_epoch: int,
    correct_before: np.ndarray,
    correct_after: np.ndarray,
    *,
    window: int = 10,
    drop: float = 0.30,
    p: float = 0.01,
) -> RuleResult:
    """A_peak = max_{e < e_s} A(e), A_post = mean A(e) over e_s .. e_s+W-1 (those that exist, finite).
    Fires if (A_peak - A_post) / A_peak >= `drop` and McNemar's test on the paired correctness at
    e_s-1 (`correct_before`) and at the end of the post-switch window (`correct_after`) gives
    p < `p` with more samples lost (right -> wrong, b) than gained (c). Exact binomial McNemar when
    b + c < 25, else chi-square with continuity correction. trigger = min(e_s + W - 1, last epoch).
    """
    acc = np.asarray(primary_acc_ep, dtype=float)
    before, after = np.asarray(correct_before, dtype=bool), np.asarray(correct_after, dtype=bool)
    if before.shape != after.shape:
        raise ValueError(f"paired correctness arrays differ in shape: {before.shape} vs {after.shape}")
    if not 0 < switch_epoch < len(acc):
        return RuleResult(False, None, {"reason": f"switch epoch {switch_epoch} leaves no epoch before or after it"})
    pre, post = acc[:switch_epoch], acc[switch_epoch:switch_epoch + window]
    pre, post = pre[np.isfinite(pre)], post[np.isfinite(post)]
    lost, gained = int((before & ~after).sum()), int((~before & after).sum())
    table = [[int((before & after).sum()), lost], [gained, int((~before & ~after).sum())]]
    exact = lost + gained < MCNEMAR_EXACT_BELOW
    pvalue = float(mcnemar(table, exact=exact, correction=True).pvalue)
    detail: dict = {"lost": lost, "gained": gained, "mcnemar_p": _num(pvalue), "exact": exact, "n_post_epochs": int(len(post))}
    if len(pre) == 0 or len(post) == 0 or pre.max() <= 0:
        return RuleResult(False, None, {**detail, "reason": "no finite positive peak or no post-switch accuracy"})
    peak, post_mean = float(pre.max()), float(post.mean())
    rel_drop = (peak - post_mean) / peak
    detail.update(a_peak=peak, a_post=post_mean, rel_drop=rel_drop)
    fired = rel_drop >= drop and pvalue < p and lost > gained
    return RuleResult(fired, min(switch_epoch + window - 1, len(acc) - 1) if fired else None, detail)


# ------------------------------------------------------------------ concept bias
def _fit_logit(y: np.ndarray, s: np.ndarray, cls: np.ndarray) -> tuple[float, float, float] | str:
    """(coef, se, p) of the shortcut in Logit(correct ~ 1 + shortcut + C(class)), or the reason the
    fit cannot be trusted (separation, no convergence, singular information matrix)."""
    dummies = pd.get_dummies(pd.Categorical(cls), drop_first=True, dtype=float).to_numpy()
    X = np.column_stack([np.ones_like(s), s, dummies])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = sm.Logit(y, X).fit(disp=0)
        except (PerfectSeparationError, np.linalg.LinAlgError) as err:
            return f"logit failed: {type(err).__name__}"
    untrusted = (PerfectSeparationWarning, ConvergenceWarning, HessianInversionWarning)
    bad = [w.category.__name__ for w in caught if issubclass(w.category, untrusted)]
    coef, se, pv = float(fit.params[1]), float(fit.bse[1]), float(fit.pvalues[1])
    if bad or not fit.mle_retvals.get("converged", False):
        return f"logit unreliable: {', '.join(sorted(set(bad))) or 'not converged'}"
    if not all(map(math.isfinite, (coef, se, pv))) or np.abs(fit.params).max() > MAX_LOGIT_COEF:
        return "logit unreliable: coefficients diverge (quasi-separation)"
    return coef, se, pv


def concept_bias(correct: np.ndarray, shortcut: np.ndarray, classes: np.ndarray, *, p: float = 0.01) -> RuleResult:
    """Logistic regression logit P(correct) = b0 + b_s * shortcut + sum_k b_k [class = k] on the
    union of clean (shortcut 0) and poisoned (shortcut 1) validation samples; fires if b_s > 0 with
    Wald p < `p`. trigger is None: the caller evaluates it per epoch.

    Classes whose samples are all right or all wrong are dropped first: they say nothing about the
    shortcut given the class, and their dummy would diverge. If the shortcut separates the outcome
    (e.g. every poisoned sample correct: the strongest evidence, for which the MLE does not exist
    and the Wald p goes to 1) or the fit is otherwise unreliable, the test falls back to
    Cochran-Mantel-Haenszel over the per-class 2x2 tables (statsmodels StratifiedTable), or Fisher's
    exact test when a single class is informative; direction from sum_k (a_k - E[a_k]).
    `detail["method"]` says which test decided and `detail["fallback_reason"]` why.
    """
    y = np.asarray(correct).astype(bool).ravel()
    s = np.asarray(shortcut).astype(bool).ravel()
    cls = np.asarray(classes).ravel()
    if not len(y) == len(s) == len(cls):
        raise ValueError(f"correct, shortcut and classes differ in length: {len(y)}, {len(s)}, {len(cls)}")
    frame = pd.DataFrame({"y": y, "s": s, "c": cls})
    rate = frame.groupby("c")["y"].mean()
    dropped = rate.index[(rate == 0) | (rate == 1)].tolist()
    frame = frame[~frame["c"].isin(dropped)]
    detail: dict = {
        "n": int(len(y)), "n_used": int(len(frame)), "dropped_classes": dropped, "method": None, "fallback_reason": None,
    }
    # per-class 2x2 tables [[shortcut & right, shortcut & wrong], [clean & right, clean & wrong]]
    tables = [
        np.array([[(g.s & g.y).sum(), (g.s & ~g.y).sum()], [(~g.s & g.y).sum(), (~g.s & ~g.y).sum()]], dtype=float)
        for _, g in frame.groupby("c") if g.s.any() and (~g.s).any()
    ]
    if not tables:
        return RuleResult(False, None, {**detail, "reason": "no class with both outcomes and both shortcut levels"})
    ys, ss = frame["y"].to_numpy(), frame["s"].to_numpy()
    if ys[ss].all() or not ys[ss].any() or ys[~ss].all() or not ys[~ss].any():
        fit: tuple[float, float, float] | str = "shortcut separates the outcome"
    else:
        fit = _fit_logit(ys.astype(float), ss.astype(float), frame["c"].to_numpy())
    if not isinstance(fit, str):
        coef, se, pvalue = fit
        detail.update(method="logit", coef=coef, se=se, pvalue=pvalue)
        return RuleResult(bool(coef > 0 and pvalue < p), None, detail)

    # a_k - E[a_k] under no association, E[a_k] = row_k * col_k / n_k: the sign of the CMH numerator
    excess = float(sum(t[0, 0] - t[0].sum() * t[:, 0].sum() / t.sum() for t in tables))
    if len(tables) == 1:
        odds, pvalue = fisher_exact(tables[0])
        detail.update(method="fisher_exact", odds_ratio=_num(odds))
    else:
        pvalue = StratifiedTable(tables).test_null_odds(correction=True).pvalue
        detail.update(method="mantel_haenszel")
    detail.update(fallback_reason=fit, pvalue=_num(pvalue), excess_correct=excess, n_strata=len(tables))
    return RuleResult(bool(excess > 0 and pvalue < p), None, detail)


# ------------------------------------------------------------------ healthy and the final label
def healthy(final_metric: float, floor: float, *, higher_is_better: bool = True) -> bool:
    """The final validation metric meets the floor tau(arch, dataset): >= floor (accuracy) or
    <= floor (perplexity, `higher_is_better=False`). A non-finite metric never does."""
    m = float(final_metric)
    if not math.isfinite(m):
        return False
    return m >= floor if higher_is_better else m <= floor


def assign_label(
    results: dict[str, RuleResult], healthy_ok: bool, priority: Sequence[str] = PRIORITY
) -> tuple[str, str | None]:
    """The first class in `priority` whose rule fired (missing classes count as not fired), else
    "healthy" if `healthy_ok`, else "underperforming". Returns (label, deciding rule or None)."""
    for name in priority:
        res = results.get(name)
        if res is not None and res.fired:
            return name, name
    return ("healthy" if healthy_ok else "underperforming"), None
