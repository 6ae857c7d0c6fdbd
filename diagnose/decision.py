"""The streaming decision rule (docs/architecture.md §8; paper Sec. 4.3 "Streaming inference" and Appendix E.1).

At each new frame TEViD gives class probabilities `p (K,)` (class 0 = Healthy) and a vacuity `u`:

- `u > tau` (or any non-finite input): the frame is Unknown (abstain). An Unknown frame is not a
  prediction, so it BREAKS every streak: "its non-abstain probability exceeds a class-specific
  threshold for three consecutive predictions" (paper) reads as three consecutive non-abstained frames.
- otherwise, for each anomaly class c = 1..K-1: the streak of c grows by one if `p_c > threshold_c`
  (strictly) and is reset to 0 if not.
- the alert for c fires at the frame where its streak reaches `consecutive` (3). It stays active, and
  is not fired again, while the streak continues; after a break, a new full streak fires it again.
- Unknown frames by vacuity have a streak of their own: at the frame where `consecutive` of them in a
  row are reached, `Decision.unknown_alert` is set (once per streak). Any other frame resets it.

With an anomaly score (a TEViD with `anomaly_head`, calibrated with `score_threshold`), the score alone
drives the alarm and the class head names the kind: one streak grows while `score > score_threshold`,
whatever the vacuity; when it reaches `consecutive` the alarm fires, named for the anomaly class with the
highest probability at that frame, or named Unknown (`Decision.unknown_alert`) when that frame's vacuity is
above tau: the model sees something wrong but not which kind. The class stays active while the streak lasts
and fires again only after a break; non-finite frames break it. High vacuity alone raises no alert in this
mode (a job unlike the training runs is not by that an anomaly); it still marks the frame Unknown. With
`known_first`, a frame whose likeliest anomaly class is above its class threshold is named for that class even
when its vacuity is above tau: a vacuity that is a familiarity score (a bank of the inputs, diagnose.familiarity)
says the window is unlike training, not that the model cannot name it, and a fault the head is sure of keeps
its name (an LR raised 50x on a job unlike every training run is still instability).

The familiarity gate (`gate` > 0, a TEViD whose vacuity is its familiarity score): the median vacuity of the
first `gate` frames (the job's healthy phase) decides once, at frame `gate` - 1, whether the job is familiar.
If it is above `tau`, that frame carries `Decision.unfamiliar_alert` and from it on no class or Unknown alert
fires (`Decision.unfamiliar`): a model unlike every training run degrades to the rule symptoms, not to false
alarms. With `gate` = `consecutive` (as calibrated) no alert can fire before the gate has decided.

A pure function over an immutable state, like Lightning's `EarlyStopping._evaluate_stopping_criteria`:
the live monitor and the replay used by evaluation and calibration share `decide`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

UNKNOWN = -1  # `Decision.label` of an abstained frame


class Reason(str, Enum):
    KNOWN = "known"  # a prediction was made (u <= tau)
    VACUITY = "vacuity"  # u > tau: not enough evidence, Unknown
    NONFINITE = "nonfinite"  # a probability or the vacuity is NaN/inf: Unknown, never an alert


@dataclass(frozen=True)
class DecisionState:
    """Per-anomaly-class streak lengths (index c-1 for class c) and the frames seen so far."""

    streaks: tuple[int, ...] = ()
    frames: int = 0
    unknown_streak: int = 0  # Unknown-by-vacuity frames in a row
    anomaly_streak: int = 0  # score mode: frames in a row with score > score_threshold
    anomaly_class: int = 0  # score mode: the class the current streak fired (0 before it fires)
    gate: tuple[float, ...] = ()  # the familiarity gate: vacuities of the first frames (non-finite as 1.0)
    unfamiliar: bool = False  # the gate found the job unfamiliar: alerts are muted from then on

    @classmethod
    def start(cls, num_classes: int) -> "DecisionState":
        return cls(streaks=(0,) * (num_classes - 1))


@dataclass(frozen=True)
class Decision:
    label: int  # argmax class, or UNKNOWN
    reason: Reason
    new_alerts: tuple[int, ...] = ()  # classes whose alert fires at this frame
    active: tuple[int, ...] = ()  # classes whose streak is >= consecutive (includes new_alerts)
    frame: int = 0  # 0-based index of the frame in the stream
    unknown_alert: bool = False  # the Unknown streak reached `consecutive` at this frame
    unfamiliar_alert: bool = False  # the familiarity gate found the job unfamiliar at this frame (once per run)
    unfamiliar: bool = False  # alerts are muted: the gate found the job unfamiliar at or before this frame
    gate_familiarity: float = math.nan  # the gate's upper median of the first frames' vacuities, at the frame it decides

    @property
    def unknown(self) -> bool:
        return self.label == UNKNOWN


def decide(
    state: DecisionState,
    probs: Sequence[float],
    vacuity: float,
    thresholds: Sequence[float],
    tau: float,
    consecutive: int = 3,
    score: float | None = None,
    score_threshold: float | None = None,
    gate: int = 0,
    known_first: bool = False,
) -> tuple[DecisionState, Decision]:
    """One step of the rule. `probs` has K entries, `thresholds` K-1 (one per anomaly class 1..K-1).
    With `score_threshold`, the anomaly `score` of the frame drives the alarm (score mode) and the
    per-class thresholds only name the kind with `known_first`. `gate` > 0: the familiarity gate over the first
    `gate` frames."""
    if gate < 0:
        raise ValueError(f"decide: gate must be >= 0, got {gate}")
    new_state, d = _decide(state, probs, vacuity, thresholds, tau, consecutive, score, score_threshold, known_first)
    if not gate:
        return new_state, d
    gated, unfamiliar = state.gate, state.unfamiliar
    if state.frames < gate:
        u = float(vacuity)
        gated = gated + (u if math.isfinite(u) else 1.0,)
        if state.frames == gate - 1:
            median = sorted(gated)[len(gated) // 2]  # the upper median
            unfamiliar = median > tau
            d = replace(d, unfamiliar_alert=unfamiliar, gate_familiarity=median)
    new_state = replace(new_state, gate=gated, unfamiliar=unfamiliar)
    if unfamiliar:
        d = replace(d, new_alerts=(), active=(), unknown_alert=False, unfamiliar=True)
    return new_state, d


def _decide(state, probs, vacuity, thresholds, tau, consecutive, score, score_threshold,
            known_first=False) -> tuple[DecisionState, Decision]:
    probs = [float(p) for p in probs]
    k = len(probs)
    if len(thresholds) != k - 1:
        raise ValueError(f"decide: {len(thresholds)} thresholds for {k} classes; need one per anomaly class ({k - 1})")
    if consecutive < 1:
        raise ValueError(f"decide: consecutive must be >= 1, got {consecutive}")
    streaks = state.streaks or (0,) * (k - 1)
    if len(streaks) != k - 1:
        raise ValueError(f"decide: state has {len(streaks)} streaks but probs have {k} classes")
    frame = state.frames
    if score_threshold is not None:
        if score is None:
            raise ValueError("decide: score_threshold is set but no anomaly score was given")
        score = float(score)
    if not (all(math.isfinite(p) for p in probs) and math.isfinite(float(vacuity))
            and (score_threshold is None or math.isfinite(score))):
        return DecisionState((0,) * (k - 1), frame + 1), Decision(UNKNOWN, Reason.NONFINITE, frame=frame)
    if score_threshold is not None:
        unknown = float(vacuity) > tau
        if unknown and known_first:  # the head is sure of a known anomaly: it keeps its name
            c = max(range(k - 1), key=lambda c: probs[1 + c])
            unknown = not probs[1 + c] > thresholds[c]
        return _decide_score(state, probs, unknown, score > score_threshold, consecutive)
    if float(vacuity) > tau:
        unknown = state.unknown_streak + 1
        return (DecisionState((0,) * (k - 1), frame + 1, unknown),
                Decision(UNKNOWN, Reason.VACUITY, frame=frame, unknown_alert=unknown == consecutive))
    label = max(range(k), key=lambda c: probs[c])
    new = tuple(s + 1 if p > t else 0 for s, p, t in zip(streaks, probs[1:], thresholds))
    active = tuple(c + 1 for c, s in enumerate(new) if s >= consecutive)
    fired = tuple(c + 1 for c, s in enumerate(new) if s == consecutive)
    return DecisionState(new, frame + 1), Decision(label, Reason.KNOWN, fired, active, frame)


def _decide_score(state, probs, unknown: bool, above: bool, consecutive) -> tuple[DecisionState, Decision]:
    """Score mode (module docstring): the anomaly streak fires the alarm; the frame's vacuity names it Unknown."""
    k, frame = len(probs), state.frames
    streak = state.anomaly_streak + 1 if above else 0
    fires = streak == consecutive
    if fires:  # the kind is the likeliest anomaly class now, unless the model lacks the evidence to say (0)
        cls = 0 if unknown else 1 + max(range(k - 1), key=lambda c: probs[1 + c])
    else:  # the class the streak fired keeps it active; 0 before it fires, after a break or for an Unknown alarm
        cls = state.anomaly_class if streak > consecutive else 0
    label = UNKNOWN if unknown else max(range(k), key=lambda c: probs[c])
    decision = Decision(label, Reason.VACUITY if unknown else Reason.KNOWN, (cls,) if fires and cls else (),
                        (cls,) if cls else (), frame, unknown_alert=fires and unknown)
    return DecisionState((0,) * (k - 1), frame + 1, 0, streak, cls), decision


@dataclass(frozen=True)
class Rule:
    """The frozen operating point: thresholds (K-1), tau, consecutive, and in score mode the anomaly
    score's threshold. `step` decides one frame, `replay` runs a whole stream."""

    thresholds: tuple[float, ...]
    tau: float
    consecutive: int = 3
    score_threshold: float | None = None
    gate: int = 0  # the familiarity gate's frames (0: off)
    known_first: bool = False  # score mode: a class above its threshold is named even when the vacuity is above tau

    def step(self, state: DecisionState, probs: Sequence[float], vacuity: float,
             score: float | None = None) -> tuple[DecisionState, Decision]:
        """One frame under this rule (`decide` with its settings): the live stream's call."""
        return decide(state, probs, vacuity, self.thresholds, self.tau, self.consecutive, score, self.score_threshold,
                      self.gate, self.known_first)

    def replay(self, probs: Sequence[Sequence[float]], vacuity: Sequence[float],
               scores: Sequence[float] | None = None) -> list[Decision]:
        if len(probs) != len(vacuity) or (scores is not None and len(scores) != len(probs)):
            raise ValueError(f"Rule.replay: {len(probs)} probability rows but {len(vacuity)} vacuities"
                             + (f" and {len(scores)} scores" if scores is not None else ""))
        if self.score_threshold is not None and scores is None:
            raise ValueError("Rule.replay: this rule alarms on an anomaly score (score_threshold); give scores=")
        state, out = DecisionState.start(len(self.thresholds) + 1), []
        for i, (p, u) in enumerate(zip(probs, vacuity)):
            state, d = self.step(state, p, u, None if scores is None else scores[i])
            out.append(d)
        return out


def alert_names(d: Decision, classes: Sequence[str] | None = None) -> list[str]:
    """The alerts that fire at a decision, by name: its classes' (`classes`, default the corpus's CLASSES), then
    "unknown" for an Unknown alert."""
    if classes is None:
        from capture.schema import CLASSES as classes
    return [classes[c] for c in d.new_alerts] + ["unknown"] * d.unknown_alert


def first_alerts(decisions: Sequence[Decision]) -> dict[int, int]:
    """{class: frame index of its first alert} over a replayed stream."""
    first: dict[int, int] = {}
    for d in decisions:
        for c in d.new_alerts:
            first.setdefault(c, d.frame)
    return first


def run_macro_f1(pairs: Sequence[tuple[str, str]], known: Sequence[str]) -> float:
    """Run-level macro F1 over the known anomaly classes: one (true label, predicted class) pair per Healthy or
    known-anomaly run, the prediction being the class of the run's first alert at/after its onset, else
    "healthy". sklearn f1_score(average="macro") with labels = the known classes that occur as a true or a
    predicted class (a class absent from both has no F1 and is left out); NaN when none occurs. Validation
    (`diagnose.calibrate`) and test (`eval.metrics.macro_f1`) both use this definition."""
    from sklearn.metrics import f1_score

    labels = [c for c in known if any(c in p for p in pairs)]
    if not labels:
        return math.nan
    y_true, y_pred = zip(*pairs)
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))

