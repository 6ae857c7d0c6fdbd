"""Metrics of the evaluation, as pure functions of replayed runs (docs/architecture.md §9; paper Sec. 5, App. E.2, H, I).

Input: one `RunResult` per held-out run replayed frame by frame (eval.replay writes them): per-frame
anomaly score, class probabilities, vacuity, and the confirmed alerts at the frozen operating point.
Frame targets are `pretrain.clips.window_targets` (the clips' own rule, so training and scoring agree):

    known anomaly (class c, onset o, trigger g): step < o -> 0 | o <= step < max(o, g - H) -> not scored | -> c
    healthy: 0 everywhere;  underperforming / unlabeled: not scored;  novel: < o -> 0, >= o -> novel
    H = horizon_epochs * epoch_steps (default 2 epochs); an onset of None counts as 0.

Run outcomes (one per run; novel and unscored runs have none):
    false alarm: a Healthy run with any confirmed alert, or a known-anomaly run with an alert before its onset
    detected:    a known-anomaly run with a confirmed alert at a step >= onset (any class)
    lead:        (trigger_step - step of the first alert at/after onset) / epoch_steps; > 0 = before the rule
    predicted:   class of that first alert at/after onset, else "healthy" (Healthy runs: their first alert)

Every metric is a function `metric(runs) -> float` (NaN when undefined on these runs), written against
scikit-learn where one exists. `bootstrap_ci` resamples RUNS (scipy.stats.bootstrap, BCa); each metric of
`summarize` also has a weighted form `counts (B, R) -> (B,)` used for the resamples, equal to the metric
on the resampled list (tests/test_metrics.py checks it) and fast enough for 2,000 resamples x 200 runs.
Rules and choices: docs/evaluation.md, section Metrics.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import scipy.stats
from sklearn.metrics import average_precision_score, roc_auc_score
from tqdm import tqdm

from capture.schema import CLASSES, IGNORE
from capture.schema import KNOWN_CLASSES as KNOWN
from diagnose.calibrate import allowed_false_alarms
from diagnose.decision import run_macro_f1
from pretrain.clips import ClipConfig, window_targets

HORIZON_EPOCHS = ClipConfig.horizon_epochs
COSTS = (1.0, 10.0, -0.5)  # (C_FA, C_MD, C_lead), paper App. I
_OTHER = len(CLASSES)  # index of an alert class that is not a known class (e.g. "anomaly" of a score-only method)


@dataclass
class RunResult:
    """One held-out run replayed frame by frame. Arrays are indexed by scored frame (the end of each window).

    frame_step (T,) training step of each frame; score (T,) anomaly score = 1 - p(healthy) (or a baseline's
    score, higher = more anomalous); probs (T, K) class probabilities in `CLASSES` order, or None; vacuity
    (T,) or None; alerts: confirmed alerts `(step, class name)` in order (see `alerts_at_threshold` for
    score-only methods).
    """

    run_id: str
    label: str | None
    novel: bool
    onset_step: int | None
    trigger_step: int | None
    epoch_steps: float | None
    frame_step: np.ndarray
    score: np.ndarray
    probs: np.ndarray | None = None
    vacuity: np.ndarray | None = None
    alerts: list = field(default_factory=list)

    def __post_init__(self):
        where = f"RunResult {self.run_id!r}"
        self.frame_step = np.asarray(self.frame_step, dtype=np.int64).reshape(-1)
        self.score = np.asarray(self.score, dtype=np.float64).reshape(-1)
        t = len(self.frame_step)
        if len(self.score) != t:
            raise ValueError(f"{where}: score has {len(self.score)} frames, frame_step has {t}")
        if t > 1 and np.any(np.diff(self.frame_step) <= 0):
            raise ValueError(f"{where}: frame_step must be strictly increasing")
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float64)
            if self.probs.shape != (t, len(CLASSES)):
                raise ValueError(f"{where}: probs has shape {self.probs.shape}, expected ({t}, {len(CLASSES)}) "
                                 f"(classes {CLASSES})")
        if self.vacuity is not None:
            self.vacuity = np.asarray(self.vacuity, dtype=np.float64).reshape(-1)
            if len(self.vacuity) != t:
                raise ValueError(f"{where}: vacuity has {len(self.vacuity)} frames, frame_step has {t}")
        if self.label not in CLASSES + ("underperforming", None):
            raise ValueError(f"{where}: unknown label {self.label!r}; expected one of {CLASSES + ('underperforming',)}")
        self.alerts = [(int(s), str(c)) for s, c in self.alerts]
        if any(b[0] < a[0] for a, b in zip(self.alerts, self.alerts[1:])):
            raise ValueError(f"{where}: alerts must be in step order, got {self.alerts}")
        if self.kind == "anomaly" and self.trigger_step is not None and not (self.epoch_steps and self.epoch_steps > 0):
            raise ValueError(f"{where}: a {self.label} run needs epoch_steps > 0 (steps per epoch), got {self.epoch_steps!r}")

    @classmethod
    def from_attrs(cls, run_id: str, attrs: dict, frame_step, score, probs=None, vacuity=None, alerts=()) -> "RunResult":
        """From a run store's public attrs, with the onset rule of `pretrain.clips.run_targets` (a novel
        run's onset is its perturbation's onset when the labeler left onset_step null)."""
        pert = attrs.get("perturbation") or {}
        novel = pert.get("kind") == "novel"
        onset = attrs.get("onset_step")
        if onset is None and novel:
            onset = pert.get("onset", 0)
        return cls(run_id, attrs.get("label"), novel, onset, attrs.get("trigger_step"), attrs.get("epoch_steps"),
                   frame_step, score, probs, vacuity, list(alerts))

    @property
    def kind(self) -> str:
        """"novel", "healthy", "anomaly" (a known class) or "unscored" (underperforming / unlabeled)."""
        if self.novel:
            return "novel"
        if self.label == "healthy":
            return "healthy"
        return "anomaly" if self.label in KNOWN else "unscored"

    @property
    def onset(self) -> int:
        return 0 if self.onset_step is None else int(self.onset_step)

    @property
    def alert_steps(self) -> list[int]:
        return [s for s, _ in self.alerts]

    def targets(self, horizon_epochs: float = HORIZON_EPOCHS) -> tuple[np.ndarray, np.ndarray]:
        """(target (T,) int with IGNORE = -1, novel (T,) bool) of each frame: `pretrain.clips.window_targets`."""
        target, novel = window_targets(self.frame_step, self.label, self.onset_step, self.trigger_step,
                                       self.epoch_steps, self.novel, ClipConfig(horizon_epochs=horizon_epochs))
        return target.numpy(), novel.numpy()


# --------------------------------------------------------------------------- alerts from a scalar score

def alert_frames(score, threshold: float, consecutive: int = 3) -> list[int]:
    """Frame indices where an alert fires: `score > threshold` (strictly) holds for the `consecutive`-th
    frame in a row; after a break a new full streak fires again (diagnose.decision's rule). NaN breaks a streak."""
    if consecutive < 1:
        raise ValueError(f"alert_frames: consecutive must be >= 1, got {consecutive}")
    above = np.asarray(score, dtype=np.float64) > threshold  # NaN > x is False
    out, streak = [], 0
    for i, a in enumerate(above):
        streak = streak + 1 if a else 0
        if streak == consecutive:
            out.append(i)
    return out


def alerts_from_scores(score, threshold: float, consecutive: int = 3) -> int | None:
    """Index of the first confirmed alert frame (`consecutive` frames in a row with score > threshold), or None."""
    frames = alert_frames(score, threshold, consecutive)
    return frames[0] if frames else None


def _streak_mins(score, consecutive: int) -> np.ndarray:
    """(T - consecutive + 1,) the min score of each window of `consecutive` frames (NaN frames count as -inf:
    they cannot be part of a streak); empty when the run is shorter."""
    s = np.asarray(score, dtype=np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    return np.lib.stride_tricks.sliding_window_view(s, consecutive).min(axis=1) if len(s) >= consecutive else s[:0]


def alert_level(score: np.ndarray, consecutive: int) -> float:
    """Largest m such that the run alerts at every threshold < m: max over windows of `consecutive`
    frames of their min score (-inf when shorter; NaN frames cannot be part of a streak)."""
    mins = _streak_mins(score, consecutive)
    return float(mins.max()) if len(mins) else -np.inf


def held_scores(score, consecutive: int = 3) -> np.ndarray:
    """(T,) the run's alert level so far at each frame: the highest score it has held for `consecutive`
    frames in a row up to that frame (`alert_level` of the frames <= t; -inf before `consecutive` frames,
    NaN frames break a streak). A threshold alerts by frame t exactly when it is below this value, so
    ranking frames by it ranks the evidence a run has given so far, not only its latest window's."""
    out = np.full(len(score), -np.inf)
    mins = _streak_mins(score, consecutive)
    out[len(out) - len(mins):] = np.maximum.accumulate(mins)
    return out


def threshold_for_far(runs: Sequence[RunResult], far: float = 0.05, consecutive: int = 3) -> float:
    """The lowest score threshold at which a new Healthy run exchangeable with the Healthy runs here has a
    confirmed alert (`alert_frames`) with probability <= `far`: at most `diagnose.calibrate.allowed_false_alarms`
    of them alert (split conformal, as TEViD's calibration). Set it on validation, then freeze it. -inf if every run may alert."""
    levels = np.sort([alert_level(r.score, consecutive) for r in runs if r.kind == "healthy"])[::-1]
    if len(levels) == 0:
        raise ValueError("threshold_for_far: no Healthy (non-novel) run among the runs; the FAR needs Healthy runs")
    allowed = allowed_false_alarms(len(levels), far)  # runs that may alert
    # thresholds >= the (allowed+1)-th largest level keep every other run silent; lower ones do not
    return float(levels[allowed]) if allowed < len(levels) else -math.inf


def alerts_at_threshold(runs: Sequence[RunResult], threshold: float, consecutive: int = 3) -> list[RunResult]:
    """Copies of `runs` whose alerts come from their score at a frozen threshold (score-only baselines,
    or TEViD with one anomaly threshold). Alert class: the most probable anomaly class at that frame
    when the run has probs, else "anomaly" (not a known class: it counts as a wrong class in macro F1)."""
    out = []
    for r in runs:
        alerts = []
        for i in alert_frames(r.score, threshold, consecutive):
            cls = KNOWN[int(np.argmax(r.probs[i, 1:]))] if r.probs is not None else "anomaly"
            alerts.append((int(r.frame_step[i]), cls))
        out.append(dataclasses.replace(r, alerts=alerts))
    return out


# --------------------------------------------------------------------------- run outcomes

class Outcome(NamedTuple):
    false_alarm: bool  # Healthy run with an alert, or known-anomaly run with an alert before onset
    detected: bool  # known-anomaly run with an alert at/after onset
    missed: bool  # known-anomaly run without one
    lead: float  # epochs; NaN unless detected with a trigger step
    predicted: str  # class of the first alert at/after onset, else "healthy"


def outcome(run: RunResult) -> Outcome | None:
    """The run-level outcome of a Healthy or known-anomaly run (None for novel and unscored runs)."""
    if run.kind == "healthy":
        return Outcome(bool(run.alerts), False, False, math.nan, run.alerts[0][1] if run.alerts else "healthy")
    if run.kind != "anomaly":
        return None
    after = [(s, c) for s, c in run.alerts if s >= run.onset]
    before = len(after) < len(run.alerts)
    if not after:
        return Outcome(before, False, True, math.nan, "healthy")
    lead = math.nan if run.trigger_step is None else (run.trigger_step - after[0][0]) / run.epoch_steps
    return Outcome(before, True, False, lead, after[0][1])


def _outcomes(runs) -> list[Outcome | None]:
    return [outcome(r) for r in runs]


def far(runs: Sequence[RunResult]) -> float:
    """FAR: fraction of Healthy runs with at least one confirmed alert (NaN without Healthy runs)."""
    v = [o.false_alarm for r, o in zip(runs, _outcomes(runs)) if r.kind == "healthy"]
    return float(np.mean(v)) if v else math.nan


def detection_rate(runs: Sequence[RunResult]) -> float:
    """Fraction of known-anomaly runs with a confirmed alert at a step >= onset."""
    v = [o.detected for r, o in zip(runs, _outcomes(runs)) if r.kind == "anomaly"]
    return float(np.mean(v)) if v else math.nan


def leads_epochs(runs: Sequence[RunResult]) -> np.ndarray:
    """Lead in epochs of each detected known-anomaly run that has a trigger step, in run order."""
    return np.array([o.lead for o in _outcomes(runs) if o is not None and o.detected and not math.isnan(o.lead)])


def median_lead_epochs(runs: Sequence[RunResult]) -> float:
    """Median lead (epochs) over detected known-anomaly runs; > 0 = earlier than the labeling rule."""
    leads = leads_epochs(runs)
    return float(np.median(leads)) if len(leads) else math.nan


def macro_f1(runs: Sequence[RunResult]) -> float:
    """Macro F1 over the known anomaly classes, one prediction per Healthy and known-anomaly run
    (`outcome(run).predicted`): sklearn f1_score(average="macro") with labels = the known classes that
    occur as a true or a predicted class (a class absent from both has no F1 and is left out)."""
    return run_macro_f1([(r.label, o.predicted) for r, o in zip(runs, _outcomes(runs)) if o is not None], KNOWN)


def decision_cost(runs: Sequence[RunResult], c_fa: float = COSTS[0], c_md: float = COSTS[1],
                  c_lead: float = COSTS[2], per_runs: int | None = None) -> float:
    """C_FA N_FA + C_MD N_MD + C_lead sum(lead) (paper App. I). N_FA: Healthy runs with an alert plus
    known-anomaly runs with an alert before onset (one per run); N_MD: undetected known-anomaly runs;
    leads of the detected runs. `per_runs` (e.g. 100): scaled to that many Healthy + known-anomaly runs."""
    per_run = [_run_cost(o, c_fa, c_md, c_lead) for o in _outcomes(runs) if o is not None]
    if not per_run:
        return math.nan
    total = float(np.sum(per_run))
    return total * per_runs / len(per_run) if per_runs else total


def _run_cost(o: Outcome, c_fa, c_md, c_lead) -> float:
    lead = 0.0 if math.isnan(o.lead) else o.lead  # NaN unless detected (or no trigger step)
    return c_fa * o.false_alarm + c_md * o.missed + c_lead * lead


def operating_curve(runs: Sequence[RunResult], thresholds, consecutive: int = 3) -> dict[str, np.ndarray]:
    """FAR, detection rate and median lead of a score-thresholded method at each threshold
    (`alerts_at_threshold`): the points of a lead-vs-FAR Pareto front (paper App. I, Fig. 6)."""
    out = {k: [] for k in ("threshold", "far", "detection_rate", "median_lead_epochs")}
    for t in thresholds:
        alerted = alerts_at_threshold(runs, float(t), consecutive)
        for k, v in (("threshold", float(t)), ("far", far(alerted)), ("detection_rate", detection_rate(alerted)),
                     ("median_lead_epochs", median_lead_epochs(alerted))):
            out[k].append(v)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


# --------------------------------------------------------------------------- frame-level metrics

class _Frames(NamedTuple):
    run: np.ndarray  # (F,) index of the frame's run
    target: np.ndarray  # (F,) window target, IGNORE = not scored
    novel: np.ndarray  # (F,) frame of a novel run from its onset on
    novel_run: np.ndarray  # (F,) frame of a novel run

    @property
    def known(self) -> np.ndarray:
        """Scored frames of the non-novel runs (Healthy and known-anomaly runs, pre-onset frames included)."""
        return (self.target != IGNORE) & ~self.novel_run


def _frames(runs, horizon_epochs) -> _Frames:
    parts = [r.targets(horizon_epochs) for r in runs]
    run = np.concatenate([np.full(len(t), i) for i, (t, _) in enumerate(parts)] or [np.zeros(0, np.int64)])
    novel_run = np.array([r.novel for r in runs], dtype=bool)[run]
    return _Frames(run, np.concatenate([t for t, _ in parts] or [np.zeros(0, np.int64)]),
                   np.concatenate([n for _, n in parts] or [np.zeros(0, bool)]), novel_run)


def _per_frame(runs, name: str) -> np.ndarray:
    """Concatenate a per-frame output of every run; a clear error when the method has none. A run with no
    scored frame (shorter than a window) has nothing to give and adds nothing."""
    missing = [r.run_id for r in runs if getattr(r, name) is None and len(r.score)]
    if missing:
        raise ValueError(f"runs {missing[:5]} have no {name}: this metric needs the method's {name}")
    empty = np.zeros((0,) if name != "probs" else (0, len(CLASSES)))
    return np.concatenate([getattr(r, name) if len(r.score) else empty for r in runs] or [empty])


def _vacuity(runs) -> np.ndarray:
    v = _per_frame(runs, "vacuity")
    return np.where(np.isfinite(v), v, np.inf)  # non-finite = abstain first (diagnose.decision: Unknown)


def _errors(runs, target) -> np.ndarray:
    """argmax class != target; a frame with non-finite probabilities is an error."""
    p = _per_frame(runs, "probs")
    ok = np.isfinite(p).all(axis=1)
    return ~ok | (np.argmax(np.where(ok[:, None], p, 0.0), axis=1) != target)


def _ranks(x: np.ndarray, nan_as: float) -> np.ndarray:
    """Dense ranks (order and ties kept, +-inf allowed): the sklearn curves need finite inputs."""
    return scipy.stats.rankdata(np.where(np.isnan(x), nan_as, x), method="dense").astype(np.float64)


def n_frames_scored(runs: Sequence[RunResult], horizon_epochs: float = HORIZON_EPOCHS) -> int:
    """Frames that enter the event-time AUPRC (target not IGNORE, novel frames excluded)."""
    return int(np.sum(_frames(runs, horizon_epochs).target != IGNORE))


def event_auprc(runs: Sequence[RunResult], horizon_epochs: float = HORIZON_EPOCHS) -> float:
    """Event-time AUPRC: sklearn average_precision_score over all scored frames of all runs, positive =
    a known-anomaly frame (target > 0), score = the anomaly score (NaN scores rank lowest). NaN without positives."""
    f = _frames(runs, horizon_epochs)
    keep = f.target != IGNORE
    y = f.target[keep] > 0
    if not y.any():
        return math.nan
    return float(average_precision_score(y, _ranks(_per_frame(runs, "score")[keep], -np.inf)))


def event_base_rate(runs: Sequence[RunResult], horizon_epochs: float = HORIZON_EPOCHS) -> float:
    """The event AUPRC of a constant score: the share of positives among the frames `event_auprc` scores
    (known-anomaly frames over scored frames). NaN without scored frames."""
    f = _frames(runs, horizon_epochs)
    keep = f.target != IGNORE
    return float(np.mean(f.target[keep] > 0)) if keep.any() else math.nan


def unknown_auroc(runs: Sequence[RunResult], horizon_epochs: float = HORIZON_EPOCHS) -> float:
    """Known-vs-novel AUROC on vacuity (sklearn roc_auc_score): positives = frames of novel runs from their
    onset on; negatives = every scored frame of the non-novel runs (Healthy frames included).
    NaN unless both are present."""
    f, v = _frames(runs, horizon_epochs), _vacuity(runs)
    keep = f.novel | f.known
    if not f.novel.any() or not f.known.any():
        return math.nan
    return float(roc_auc_score(f.novel[keep], _ranks(v[keep], np.inf)))


class RiskCoverage(NamedTuple):
    """Selective classification curve, one point per distinct vacuity threshold (accept vacuity <= threshold)."""
    threshold: np.ndarray  # ascending vacuity
    coverage: np.ndarray  # accepted / all
    risk: np.ndarray  # selective risk: errors among accepted / accepted
    generalized_risk: np.ndarray  # errors among accepted / all (Traub et al. 2024)


def _selective(runs, horizon_epochs):
    """Frames of non-novel runs with a target: vacuity and error (argmax class != target; non-finite probs = error)."""
    f = _frames(runs, horizon_epochs)
    return f.run[f.known], _vacuity(runs)[f.known], _errors(runs, f.target)[f.known]


def risk_coverage(runs: Sequence[RunResult], horizon_epochs: float = HORIZON_EPOCHS) -> RiskCoverage:
    """Risk-coverage curve over the scored frames of known (non-novel) runs, rejecting the highest
    vacuity first (paper App. E.2, H.2). Error = argmax class != the frame's target."""
    _, v, err = _selective(runs, horizon_epochs)
    order, starts = _tie_groups(v, descending=False)
    v, err = v[order], err[order]
    ends = np.r_[starts[1:], len(v)] - 1  # last frame of each tie group
    n_acc, n_err = ends + 1.0, np.cumsum(err)[ends]
    n = max(len(v), 1)
    return RiskCoverage(v[ends], n_acc / n, n_err / n_acc, n_err / n)


def augrc(runs: Sequence[RunResult], horizon_epochs: float = HORIZON_EPOCHS) -> float:
    """AUGRC (Traub et al. 2024, "Overcoming common flaws in the evaluation of selective classification
    systems"): area under the generalized risk (errors among accepted / all frames) vs coverage, from
    (0, 0), linear between the curve's points (one per distinct vacuity). Lower is better; NaN without frames."""
    rc = risk_coverage(runs, horizon_epochs)
    if len(rc.coverage) == 0:
        return math.nan
    return float(np.trapezoid(np.r_[0.0, rc.generalized_risk], np.r_[0.0, rc.coverage]))


# --------------------------------------------------------------------------- weighted (resampled) forms
# A resample of runs is a count per run (how often it was drawn); every metric above is a function of
# those counts, so many resamples are scored at once with array operations: counts (B, R) -> (B,).
# Frame metrics sort the frames once and sum the counts over each group of tied values (the points of
# the PR / ROC / risk-coverage curve); run metrics are ratios or sums of per-run values.

def _tie_groups(values: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """(order that sorts `values`, start of each group of equal values in that order)."""
    order = np.argsort(-values if descending else values, kind="stable")
    s = values[order]
    return order, np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, np.int64)


def _group_sums(run: np.ndarray, starts: np.ndarray, weight: np.ndarray):
    """counts (B, R) -> (B, G): per tie group, the sum over its frames (in sorted order: `run`, `weight`)
    of weight x how often the frame's run was drawn. C-ordered, so cumulative sums run along the fast axis."""
    weight = weight.astype(np.float64)

    def sums(counts):
        x = counts[:, run] * weight  # (B, F)
        return x if len(starts) == len(run) else np.add.reduceat(x, starts, axis=1)
    return sums


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _auprc_prepare(runs, horizon_epochs=HORIZON_EPOCHS):
    f = _frames(runs, horizon_epochs)
    keep = f.target != IGNORE
    run, y, s = f.run[keep], f.target[keep] > 0, _per_frame(runs, "score")[keep]
    order, starts = _tie_groups(np.where(np.isnan(s), -np.inf, s), descending=True)  # thresholds high to low
    pos = _group_sums(run[order], starts, y[order])
    tot = _group_sums(run[order], starts, np.ones(len(order)))

    def fn(counts):
        if len(starts) == 0:
            return np.full(len(counts), np.nan)
        p = pos(counts)  # (B, G): positives at each threshold = the recall step there (x total positives)
        tp, n = np.cumsum(p, axis=1), np.cumsum(tot(counts), axis=1)
        precision = np.divide(tp, n, out=np.zeros_like(tp), where=n > 0)  # n = 0: a zero-weight group, p = 0
        return _div((p * precision).sum(axis=1), tp[:, -1])
    return fn


def _auroc_prepare(runs, horizon_epochs=HORIZON_EPOCHS):
    f = _frames(runs, horizon_epochs)
    keep = f.novel | f.known
    run, novel, v = f.run[keep], f.novel[keep], _vacuity(runs)[keep]
    order, starts = _tie_groups(v, descending=False)
    pos = _group_sums(run[order], starts, novel[order])
    neg = _group_sums(run[order], starts, ~novel[order])

    def fn(counts):
        p, q = pos(counts), neg(counts)  # (B, G)
        # Mann-Whitney: negatives with a lower vacuity, ties count one half: cumsum(q) - q / 2
        return _div((p * (np.cumsum(q, axis=1) - 0.5 * q)).sum(axis=1), p.sum(axis=1) * q.sum(axis=1))
    return fn


def _augrc_prepare(runs, horizon_epochs=HORIZON_EPOCHS):
    run, v, err = _selective(runs, horizon_epochs)
    order, starts = _tie_groups(v, descending=False)  # accept the lowest vacuity first
    acc = _group_sums(run[order], starts, np.ones(len(order)))
    wrong = _group_sums(run[order], starts, err[order])

    def fn(counts):
        if len(starts) == 0:
            return np.full(len(counts), np.nan)
        a, e = acc(counts), wrong(counts)  # (B, G)
        n = a.sum(axis=1)
        # trapezoids between consecutive points: coverage step a_g / n, mean generalized risk
        # (E_g + E_{g-1}) / (2 n) with E the cumulative errors and E_{g-1} = E_g - e_g
        return _div((a * (2 * np.cumsum(e, axis=1) - e)).sum(axis=1), 2 * n * n)
    return fn


def _ratio_prepare(num: np.ndarray, den: np.ndarray):
    return lambda counts: _div(counts @ num, counts @ den)


def _far_prepare(runs):
    o = _outcomes(runs)
    healthy = np.array([r.kind == "healthy" for r in runs], dtype=float)
    return _ratio_prepare(healthy * [bool(x and x.false_alarm) for x in o], healthy)


def _detection_prepare(runs):
    o = _outcomes(runs)
    anomaly = np.array([r.kind == "anomaly" for r in runs], dtype=float)
    return _ratio_prepare(anomaly * [bool(x and x.detected) for x in o], anomaly)


def _median_lead_prepare(runs):
    o = _outcomes(runs)
    idx = np.array([i for i, x in enumerate(o) if x is not None and x.detected and not math.isnan(x.lead)], dtype=np.int64)
    leads = np.array([o[i].lead for i in idx])
    order = np.argsort(leads, kind="stable")
    idx, leads = idx[order], leads[order]

    def fn(counts):
        if len(idx) == 0:
            return np.full(len(counts), np.nan)
        cum = np.cumsum(counts[:, idx], axis=1)  # (B, D)
        n = cum[:, -1]
        lo = np.argmax(cum > ((n - 1) // 2)[:, None], axis=1)  # sorted position (n-1)//2 and n//2
        hi = np.argmax(cum > (n // 2)[:, None], axis=1)
        return np.where(n > 0, (leads[lo] + leads[hi]) / 2, np.nan)
    return fn


def _macro_f1_prepare(runs):
    o = _outcomes(runs)
    index = {c: i for i, c in enumerate(CLASSES)}
    rows = [i for i, x in enumerate(o) if x is not None]
    pair = np.zeros((len(runs), (_OTHER + 1) ** 2))  # one-hot (true, predicted) per run
    for i in rows:
        pair[i, index[runs[i].label] * (_OTHER + 1) + index.get(o[i].predicted, _OTHER)] = 1.0

    def fn(counts):
        conf = (counts @ pair).reshape(len(counts), _OTHER + 1, _OTHER + 1)  # (B, true, predicted)
        k = np.arange(1, len(CLASSES))
        tp, n_true, n_pred = conf[:, k, k], conf[:, k, :].sum(axis=2), conf[:, :, k].sum(axis=1)  # (B, 4)
        present = (n_true + n_pred) > 0
        f1 = np.where(present, 2 * tp / np.where(present, n_true + n_pred, 1), 0.0)
        return _div(f1.sum(axis=1), present.sum(axis=1).astype(float))
    return fn


def _cost_prepare(runs, c_fa=COSTS[0], c_md=COSTS[1], c_lead=COSTS[2], per_runs=None):
    o = _outcomes(runs)
    cost = np.array([_run_cost(x, c_fa, c_md, c_lead) if x is not None else 0.0 for x in o])
    counted = np.array([x is not None for x in o], dtype=float)
    if per_runs:
        return lambda counts: _div(counts @ cost, counts @ counted) * per_runs
    return lambda counts: np.where(counts @ counted > 0, counts @ cost, np.nan)


_BATCHED: dict[Callable, Callable] = {
    event_auprc: _auprc_prepare, unknown_auroc: _auroc_prepare, augrc: _augrc_prepare,
    far: _far_prepare, detection_rate: _detection_prepare, median_lead_epochs: _median_lead_prepare,
    macro_f1: _macro_f1_prepare, decision_cost: _cost_prepare,
}


def _prepared(metric: Callable, runs: list[RunResult]) -> Callable | None:
    """The weighted form of a metric of this module (also through functools.partial keywords), else None."""
    kwargs = {}
    if isinstance(metric, functools.partial) and not metric.args:
        kwargs, metric = dict(metric.keywords), metric.func
    prepare = _BATCHED.get(metric)
    return None if prepare is None else prepare(runs, **kwargs)


# --------------------------------------------------------------------------- bootstrap intervals

class CI(NamedTuple):
    low: float
    high: float
    method: str  # "BCa" | "percentile" (BCa undefined, or some resamples undefined and dropped) | "undefined"


_ROWS_PER_CHUNK = 32  # resamples scored at once: ~32 x frames floats per array (memory, cache)


def _resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(B, m) resampled run indices -> (B, n) how often each run was drawn."""
    b = len(idx)
    return np.bincount((np.arange(b)[:, None] * n + idx).ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def _rows(runs: list[RunResult], metric: Callable) -> Callable[[np.ndarray], np.ndarray]:
    """The metric on resampled runs: (B, m) run indices -> (B,)."""
    n, weighted = len(runs), _prepared(metric, runs)

    def rows(idx: np.ndarray) -> np.ndarray:
        if weighted is None:  # any other metric: call it on each resampled list
            return np.array([metric([runs[i] for i in row]) for row in idx], dtype=np.float64)
        return np.concatenate([weighted(_resample_counts(idx[k:k + _ROWS_PER_CHUNK], n))
                               for k in range(0, len(idx), _ROWS_PER_CHUNK)])

    return rows


def _bootstrap(runs: list[RunResult], metric: Callable, n_resamples: int, confidence: float, seed: int):
    """(CI, number of undefined resamples)."""
    n = len(runs)
    if n < 2 or not np.isfinite(metric(runs)):
        return CI(math.nan, math.nan, "undefined"), 0
    return _interval(n, _rows(runs, metric), n_resamples, confidence, seed)


def _interval(n: int, rows: Callable[[np.ndarray], np.ndarray], n_resamples: int, confidence: float, seed: int):
    """BCa interval of a statistic of resampled run indices (`rows`: (B, m) -> (B,)), with the fallbacks of
    `bootstrap_ci`; (CI, number of undefined resamples)."""

    def statistic(idx, axis=-1):  # scipy passes (..., m): resamples, or jackknife samples (m = n - 1)
        idx = np.asarray(idx)
        return rows(idx.reshape(-1, idx.shape[-1])).reshape(idx.shape[:-1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = scipy.stats.bootstrap((np.arange(n),), statistic, n_resamples=n_resamples, vectorized=True,
                                    confidence_level=confidence, method="BCa", rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution)
    finite = np.isfinite(dist)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if finite.all() and np.isfinite(low) and np.isfinite(high):
        return CI(low, high, "BCa"), 0
    if not finite.any():
        return CI(math.nan, math.nan, "undefined"), int(len(dist))
    # BCa is undefined (a degenerate distribution, e.g. FAR 0 in every resample) or resamples without
    # the metric's positives exist: percentile interval over the defined resamples
    alpha = (1 - confidence) / 2
    low, high = np.quantile(dist[finite], [alpha, 1 - alpha])
    return CI(float(low), float(high), "percentile"), int((~finite).sum())


def bootstrap_ci(runs: Sequence[RunResult], metric: Callable, n_resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> CI:
    """95% BCa interval of `metric(runs)` resampling RUNS, not frames (scipy.stats.bootstrap over run
    indices). Resamples where the metric is undefined (NaN: no positives, no Healthy run, ...) are dropped
    and the percentile interval of the rest is returned instead, as when BCa itself is undefined (a
    degenerate bootstrap distribution): `method` says which. The metrics of this module (also wrapped in
    functools.partial with keywords) are scored in a vectorised weighted form; any other callable is
    called on each resampled list."""
    return _bootstrap(list(runs), metric, n_resamples, confidence, seed)[0]


class Paired(NamedTuple):
    difference: float  # metric(a) - metric(b) on all runs
    ci: CI  # of the difference, the same resampled runs for both methods
    n_runs: int


def paired_difference(runs_a: Sequence[RunResult], runs_b: Sequence[RunResult], metric: Callable, n_resamples: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> Paired:
    """metric(a) - metric(b) for two methods scored on the same runs, with a paired bootstrap interval: each
    resample draws RUNS once and scores both methods on that draw (scipy.stats.bootstrap, BCa, with the
    fallbacks of `bootstrap_ci`). An interval above 0 says a beats b on these runs beyond resampling noise.
    The two lists must hold the same run ids (any order)."""
    a = {r.run_id: r for r in runs_a}
    b = {r.run_id: r for r in runs_b}
    if set(a) != set(b) or len(a) != len(runs_a) or len(b) != len(runs_b):
        only = sorted(set(a) ^ set(b))[:5]
        raise ValueError(f"paired_difference: the methods were scored on different runs (e.g. {only}); pair them on the same test runs")
    ids = sorted(a)
    ra, rb = [a[i] for i in ids], [b[i] for i in ids]
    diff = float(metric(ra) - metric(rb))
    if len(ids) < 2 or not np.isfinite(diff):
        return Paired(diff, CI(math.nan, math.nan, "undefined"), len(ids))
    rows_a, rows_b = _rows(ra, metric), _rows(rb, metric)
    ci, _ = _interval(len(ids), lambda idx: rows_a(idx) - rows_b(idx), n_resamples, confidence, seed)
    return Paired(diff, ci, len(ids))


# --------------------------------------------------------------------------- summary

def _has(runs: list[RunResult], name: str) -> bool:
    present = [getattr(r, name) is not None for r in runs]
    if any(present) and not all(present):
        missing = [r.run_id for r, p in zip(runs, present) if not p]
        raise ValueError(f"summarize: runs {missing[:5]} have no {name} but other runs do; a method gives it for all runs or none")
    return bool(present) and all(present)


def summarize(runs: Sequence[RunResult], n_resamples: int = 2000, *, horizon_epochs: float = HORIZON_EPOCHS,
              costs: tuple[float, float, float] = COSTS, confidence: float = 0.95, seed: int = 0,
              progress: bool = True) -> dict:
    """Every metric of one method on one set of runs, each with its bootstrap interval (`<name>_ci` =
    [low, high]; `ci_method[name]`, `ci_undefined[name]` = resamples dropped). Metrics that need the
    method's probs (macro_f1, augrc) or vacuity (unknown_auroc, augrc) are None when it has none; a
    metric undefined on these runs is NaN. `cost` is the total over the runs, `cost_per_100_runs` the
    paper's Table 19 scale (per 100 Healthy + known-anomaly runs)."""
    runs = list(runs)
    has_probs, has_vacuity = _has(runs, "probs"), _has(runs, "vacuity")
    c_fa, c_md, c_lead = costs
    cost = functools.partial(decision_cost, c_fa=c_fa, c_md=c_md, c_lead=c_lead)
    metrics = {
        "event_auprc": functools.partial(event_auprc, horizon_epochs=horizon_epochs),
        "median_lead_epochs": median_lead_epochs,
        "far": far,
        "detection_rate": detection_rate,
        "macro_f1": macro_f1 if has_probs else None,
        "unknown_auroc": functools.partial(unknown_auroc, horizon_epochs=horizon_epochs) if has_vacuity else None,
        "augrc": functools.partial(augrc, horizon_epochs=horizon_epochs) if has_probs and has_vacuity else None,
        "cost": cost,
        "cost_per_100_runs": functools.partial(cost.func, **cost.keywords, per_runs=100),
    }
    out: dict = {"ci_method": {}, "ci_undefined": {}}
    for name, metric in tqdm(metrics.items(), desc="metrics + bootstrap", disable=not progress, leave=False):
        if metric is None:
            out[name] = out[f"{name}_ci"] = None
            continue
        out[name] = float(metric(runs))
        ci, undefined = _bootstrap(runs, metric, n_resamples, confidence, seed)
        out[f"{name}_ci"] = [ci.low, ci.high]
        out["ci_method"][name], out["ci_undefined"][name] = ci.method, undefined
    o = [x for x in _outcomes(runs) if x is not None]
    kinds = [r.kind for r in runs]
    out.update(
        n_runs=len(runs), n_frames_scored=n_frames_scored(runs, horizon_epochs),
        event_base_rate=event_base_rate(runs, horizon_epochs),
        n_healthy=kinds.count("healthy"), n_anomalous=kinds.count("anomaly"), n_novel=kinds.count("novel"),
        n_unscored=kinds.count("unscored"), n_false_alarms=sum(x.false_alarm for x in o),
        n_detected=sum(x.detected for x in o), n_missed=sum(x.missed for x in o),
        n_resamples=n_resamples, confidence=confidence, horizon_epochs=horizon_epochs, costs=list(costs),
    )
    return out
