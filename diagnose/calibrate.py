"""Calibration of TEViD on the validation split (docs/architecture.md §7-§9; paper Sec. 4.3, Appendices E.1, H.1).

Fitted once on validation, then frozen and saved as `calibration.json` beside the weights:

1. temperature T (optional): minimises the validation NLL of the tempered Dirichlet mean
   `softmax(log p / T)` over windows with a known target; bounded to [0.25, 4] so that a tiny,
   perfectly fitted validation set cannot push it to 0. Vacuity does not depend on T.
2. vacuity threshold tau: the `tau_quantile` (0.95) quantile of vacuity over all windows of known
   (non-novel) validation runs, i.e. about 5% of in-distribution windows abstain (the paper's
   "global quantile" scheme, App. H.1); a fixed `tau` may be given instead; 0.35 (the paper's value)
   when there are no windows.
3. per-class alert thresholds of the streaming rule (diagnose.decision) and, for a TEViD with an anomaly
   head, the anomaly score's threshold (score mode: it alone drives the alarm), fitted the same way: each Healthy validation run
   is replayed window by window, in order, with the rule. For class c and run r let m_r(c) be the
   largest value such that p_c > m for `consecutive` known frames in a row would need a threshold
   below m_r(c) (the max over runs of 3 consecutive known frames of their min p_c). Thresholds are
   order statistics of m(c) (plus 1e-6) taken at a common rank k, the smallest k at which at most
   `allowed_false_alarms(n, far_target)` of the n Healthy runs alarm (FAR: fraction of Healthy runs with any
   confirmed alert, docs/architecture.md §9); then clipped to [`min_threshold`, 1]. That count is split
   conformal: a new run exchangeable with the n alarms with probability <= (allowed + 1) / (n + 1) <=
   `far_target` (5%). Allowing floor(far_target * n) instead, as this did before, promises only
   (floor(0.05 n) + 1) / (n + 1): 5.8% for the 85 Healthy runs the cpu validation split once had (it has 330). Without Healthy validation runs: `default_threshold` (0.9, App. E.1).

`python -m diagnose.recalibrate` runs this on a checkpoint (`diagnose.finetune` does at the end of training).
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diagnose.decision import Rule, alert_names, first_alerts, run_macro_f1
from diagnose.evidential import IGNORE, tempered_probs

CALIBRATION_FILE = "calibration.json"
MARGIN = 1e-6  # thresholds sit just above an order statistic, so float noise between replays cannot flip a tie


def allowed_false_alarms(n: int, far: float) -> int:
    """How many of `n` Healthy calibration runs may alarm at a threshold set on them so that a new run exchangeable
    with them alarms with probability <= `far`: the largest a with (a + 1) / (n + 1) <= far (split conformal), and
    0 when even that is too many (n + 1 < 1 / far: the threshold then sits above every run, the best they allow)."""
    if n < 0 or not 0 <= far <= 1:
        raise ValueError(f"allowed_false_alarms: need n >= 0 and 0 <= far <= 1, got n={n}, far={far}")
    return max(0, math.floor(far * (n + 1) + 1e-9) - 1)


@dataclass
class CalibrationConfig:
    far_target: float = 0.05  # max chance that a new Healthy run alarms (split conformal over the Healthy validation runs)
    fit_temperature: bool = True
    temperature_bounds: list = field(default_factory=lambda: [0.25, 4.0])
    tau: float | None = None  # fixed vacuity threshold; None = the tau_quantile of validation vacuity
    tau_quantile: float = 0.95
    default_tau: float = 0.35  # the paper's value, used when validation has no window
    consecutive: int = 3
    min_threshold: float = 0.5  # an alert needs the class to hold at least half the probability
    default_threshold: float = 0.9  # without Healthy validation runs (paper App. E.1)


@dataclass
class Calibration:
    """The frozen operating point of a fine-tuned TEViD. Checked on construction: K distinct class
    names, K-1 thresholds in [0, 1], a finite temperature > 0, tau in [0, 1] (vacuity is in (0, 1]),
    consecutive an integer >= 1. `load_calibration` also requires every field but `report` in the file."""

    classes: list[str]
    thresholds: list[float]  # K-1 floats, for classes[1:]
    temperature: float = 1.0
    tau: float = 0.35
    consecutive: int = 3
    report: dict = field(default_factory=dict, metadata={"optional": True})  # descriptive only
    # score mode (a model with an anomaly head): the alarm is anomaly score > this for `consecutive` frames
    score_threshold: float | None = field(default=None, metadata={"optional": True})
    # the familiarity gate's frames (diagnose.decision; 0: off): set with a familiarity bank, whose score is the vacuity
    gate: int = field(default=0, metadata={"optional": True})
    # score mode: a frame's likeliest anomaly class above its threshold is named even when the vacuity is above tau
    known_first: bool = field(default=False, metadata={"optional": True})

    def __post_init__(self):
        from capture.config import FieldError

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if (not isinstance(self.classes, (list, tuple)) or len(self.classes) < 2
                or not all(isinstance(c, str) for c in self.classes) or len(set(self.classes)) != len(self.classes)):
            raise FieldError("classes", f"must be >= 2 distinct class names, got {self.classes!r}")
        if not isinstance(self.thresholds, (list, tuple)) or len(self.thresholds) != len(self.classes) - 1:
            raise FieldError("thresholds", f"must be {len(self.classes) - 1} numbers (one per anomaly class of "
                                           f"{list(self.classes)}), got {self.thresholds!r}")
        for i, t in enumerate(self.thresholds):
            if not (number(t) and 0 <= t <= 1):
                raise FieldError(f"thresholds[{i}]", f"must be a number in [0, 1], got {t!r}")
        if not (number(self.temperature) and self.temperature > 0):
            raise FieldError("temperature", f"must be a finite number > 0, got {self.temperature!r}")
        if not (number(self.tau) and 0 <= self.tau <= 1):
            raise FieldError("tau", f"must be a number in [0, 1] (a vacuity), got {self.tau!r}")
        if not (isinstance(self.consecutive, int) and not isinstance(self.consecutive, bool) and self.consecutive >= 1):
            raise FieldError("consecutive", f"must be an integer >= 1, got {self.consecutive!r}")
        if self.score_threshold is not None and not (number(self.score_threshold) and 0 <= self.score_threshold <= 1):
            raise FieldError("score_threshold", f"must be null or a number in [0, 1] (an anomaly probability), got {self.score_threshold!r}")
        if not (isinstance(self.gate, int) and not isinstance(self.gate, bool) and self.gate >= 0):
            raise FieldError("gate", f"must be an integer >= 0 (0: off), got {self.gate!r}")
        if not isinstance(self.known_first, bool):
            raise FieldError("known_first", f"must be true or false, got {self.known_first!r}")
        if not isinstance(self.report, dict):
            raise FieldError("report", f"must be a mapping, got {type(self.report).__name__}")

    @classmethod
    def default(cls, num_classes: int, classes) -> "Calibration":
        return cls(list(classes), [CalibrationConfig.default_threshold] * (num_classes - 1), 1.0,
                   CalibrationConfig.default_tau, CalibrationConfig.consecutive, {"calibrated": False})

    def rule(self) -> Rule:
        return Rule(tuple(self.thresholds), self.tau, self.consecutive, self.score_threshold, self.gate, self.known_first)

    def probs(self, alpha: torch.Tensor) -> torch.Tensor:
        return tempered_probs(alpha, self.temperature)


def save_calibration(cal: Calibration, directory: str | Path) -> Path:
    """Write `calibration.json` atomically into `directory`."""
    path = Path(directory) / CALIBRATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{CALIBRATION_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_finite(asdict(cal)), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def _finite(obj):
    """JSON has no NaN/inf: non-finite report figures (e.g. an NLL with no scored window) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def load_calibration(directory: str | Path) -> Calibration:
    """`calibration.json` of `directory`, checked (`Calibration`) with every field but `report` required;
    a `capture.config.ConfigError` (a ValueError) names the file and the field."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: calibrate the checkpoint first "
                                f"(python -m diagnose.recalibrate --checkpoint {directory} --corpus CORPUS --out {directory})")
    from capture.config import ConfigError, from_dict

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a calibration file: not valid JSON ({err})") from None
    # every field that changes a decision must be in the file: none is filled with a default
    return from_dict(Calibration, data, str(path), require_all=True)


# ---------------------------------------------------------------- predictions of the validation runs

@dataclass
class RunStream:
    """One run's window predictions in frame order."""

    run_id: str
    label: str
    end_frame: np.ndarray  # (N,) int
    target: np.ndarray  # (N,) int, IGNORE where not scored
    novel: np.ndarray  # (N,) bool
    alpha: np.ndarray  # (N, K) float
    anomaly: np.ndarray | None = None  # (N,) the anomaly head's score, when the model has one
    unknown: np.ndarray | None = None  # (N,) the familiarity score, when the model has a bank (diagnose.familiarity)

    @property
    def vacuity(self) -> np.ndarray:
        """(N,) what the rule's Unknown gate reads: the familiarity score, else the Dirichlet vacuity K / S."""
        return self.unknown if self.unknown is not None else self.alpha.shape[1] / self.alpha.sum(1)

    @property
    def known(self) -> bool:
        return not bool(self.novel.any())


@torch.no_grad()
def predict_records(model, dataset, indices=None, batch_size: int = 64, device: torch.device | str = "cpu") -> list[dict]:
    """Run `model.predict` over `dataset[i]` for i in `indices` (all by default); one dict per window:
    run_id, label, end_frame, target, novel, alpha and logits (lists of K floats), and the anomaly
    score when the model has an anomaly head."""
    indices = range(len(dataset)) if indices is None else indices
    subset = torch.utils.data.Subset(dataset, list(indices))
    # torch's default collate stacks tensors, makes ints/bools tensors and keeps strings as lists, as
    # pretrain.clips.collate does, without importing the data path into this library module
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    records = []
    for batch in loader:
        out = model.predict(batch["frames"].to(device), batch["readouts"].to(device))
        alpha, logits = out["alpha"].cpu().double().tolist(), out["logits"].cpu().double().tolist()
        anomaly = out["anomaly"].cpu().double().tolist() if "anomaly" in out else None
        unknown = out["vacuity"].cpu().double().tolist() if "evidential_vacuity" in out else None  # a familiarity score
        for j in range(len(alpha)):
            records.append({"run_id": batch["run_id"][j], "label": batch["label"][j], "end_frame": int(batch["end_frame"][j]),
                            "target": int(batch["target"][j]), "novel": bool(batch["novel"][j]), "alpha": alpha[j],
                            "logits": logits[j]})
            if anomaly is not None:
                records[-1]["anomaly"] = anomaly[j]
            if unknown is not None:
                records[-1]["unknown"] = unknown[j]
    model.train(was_training)
    return records


PREDICTIONS_FILE = "val_predictions.jsonl"  # diagnose.finetune writes its validation windows' records there


def write_predictions(records: list[dict], path: str | Path) -> Path:
    """`predict_records` output as JSON lines, atomically (the cross-fitted calibration reads them back)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


def read_predictions(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a fine-tuning output directory holds its validation predictions there")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def streams_from_records(records: list[dict]) -> list[RunStream]:
    by_run: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_run[r["run_id"]].append(r)
    streams = []
    for run_id in sorted(by_run):
        rows = sorted(by_run[run_id], key=lambda r: r["end_frame"])
        streams.append(RunStream(run_id, rows[0]["label"], np.array([r["end_frame"] for r in rows]),
                                 np.array([r["target"] for r in rows]), np.array([r["novel"] for r in rows], dtype=bool),
                                 np.array([r["alpha"] for r in rows], dtype=np.float64),
                                 np.array([r["anomaly"] for r in rows]) if "anomaly" in rows[0] else None,
                                 np.array([r["unknown"] for r in rows]) if "unknown" in rows[0] else None))
    return streams


def window_metrics(records: list[dict]) -> dict:
    """Window-level validation metrics: macro F1 and accuracy of argmax p over windows with a known
    target (macro over the classes present in the targets), mean vacuity over all windows."""
    from sklearn.metrics import f1_score

    if not records:
        return {"windows": 0, "scored": 0, "macro_f1": float("nan"), "accuracy": float("nan"), "mean_vacuity": float("nan")}
    alpha = np.array([r["alpha"] for r in records])
    target = np.array([r["target"] for r in records])
    vacuity = alpha.shape[1] / alpha.sum(1)
    pred = alpha.argmax(1)
    scored = target != IGNORE
    out = {"windows": len(records), "scored": int(scored.sum()), "mean_vacuity": float(vacuity.mean())}
    if scored.any():
        y, p = target[scored], pred[scored]
        out["macro_f1"] = float(f1_score(y, p, labels=sorted(set(y.tolist())), average="macro", zero_division=0))
        out["accuracy"] = float((y == p).mean())
    else:
        out["macro_f1"] = out["accuracy"] = float("nan")
    return out


# ---------------------------------------------------------------- fitting

def fit_temperature(alpha: np.ndarray, target: np.ndarray, bounds=(0.25, 4.0)) -> tuple[float, float, float]:
    """(T, NLL at T=1, NLL at T) minimising the mean NLL of softmax(log p / T) over valid targets."""
    from scipy.optimize import minimize_scalar

    valid = target != IGNORE
    if valid.sum() == 0:
        return 1.0, float("nan"), float("nan")
    logp = torch.log(torch.from_numpy(alpha[valid] / alpha[valid].sum(1, keepdims=True)))
    y = torch.from_numpy(target[valid]).long()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logp / math.exp(log_t), y))

    res = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded")
    t = float(math.exp(res.x))
    return t, nll(0.0), nll(res.x)


def _peak_streak_min(p: np.ndarray, known: np.ndarray, consecutive: int) -> float:
    """max over runs of `consecutive` consecutive known frames of min p (the rule fires iff threshold < it)."""
    best = -math.inf
    for i in range(len(p) - consecutive + 1):
        if known[i:i + consecutive].all():
            best = max(best, float(p[i:i + consecutive].min()))
    return best


def calibrate(streams: list[RunStream], cfg: CalibrationConfig = CalibrationConfig(), classes=None) -> Calibration:
    """Temperature, tau and per-class thresholds from the validation runs' streams (module docstring)."""
    if not streams:
        raise ValueError("calibrate: no validation runs to calibrate on")
    k = streams[0].alpha.shape[1]
    classes = list(classes) if classes is not None else [str(c) for c in range(k)]
    report: dict = {"calibrated": True, "runs": len(streams), "windows": int(sum(len(s.target) for s in streams))}

    alpha = np.concatenate([s.alpha for s in streams])
    target = np.concatenate([s.target for s in streams])
    temperature = 1.0
    if cfg.fit_temperature:
        temperature, before, after = fit_temperature(alpha, target, cfg.temperature_bounds)
        report["nll_t1"], report["nll_fitted"] = before, after

    known = [s for s in streams if s.known]
    if cfg.tau is not None:
        tau, report["tau_source"] = float(cfg.tau), "fixed"
    elif known:
        vac = np.concatenate([s.vacuity for s in known])
        tau, report["tau_source"] = float(np.quantile(vac, cfg.tau_quantile)), f"quantile {cfg.tau_quantile} of {len(vac)} known windows"
    else:
        tau, report["tau_source"] = cfg.default_tau, "default (no known validation windows)"

    probs = _stream_probs(streams, temperature)
    healthy = [s for s in known if s.label == "healthy"]
    report["healthy_runs"] = len(healthy)
    if not healthy:
        thresholds = [cfg.default_threshold] * (k - 1)
        report["threshold_source"] = "default (no Healthy validation runs)"
    else:
        thresholds = _fit_thresholds(healthy, probs, tau, cfg)
        report["threshold_source"] = f"FAR <= {cfg.far_target} (split conformal) on {len(healthy)} Healthy runs"
    score_threshold = None
    if streams[0].anomaly is not None:  # score mode: the anomaly score alone drives the alarm
        score_threshold = _fit_score_threshold(healthy, cfg) if healthy else cfg.default_threshold
        report["score_threshold_source"] = (f"FAR <= {cfg.far_target} (split conformal) on {len(healthy)} Healthy runs" if healthy
                                            else "default (no Healthy validation runs)")
    cal = Calibration(classes, [float(t) for t in thresholds], float(temperature), float(tau), cfg.consecutive, report,
                      score_threshold)
    report.update(_replay_report(streams, probs, cal))
    return cal


def _fit_thresholds(healthy: list[RunStream], probs: dict, tau: float, cfg: CalibrationConfig) -> list[float]:
    k = healthy[0].alpha.shape[1]
    # m[r, c-1]: the rule fires class c on run r iff threshold_c < m[r, c-1]
    m = np.full((len(healthy), k - 1), -math.inf)
    for r, s in enumerate(healthy):
        vac = s.vacuity
        known = vac <= tau
        for c in range(1, k):
            m[r, c - 1] = _peak_streak_min(probs[s.run_id][:, c], known, cfg.consecutive)
    order = np.sort(m, axis=0)  # ascending per class
    allowed = allowed_false_alarms(len(healthy), cfg.far_target)
    for rank in range(len(healthy)):
        thresholds = [float(min(1.0, max(cfg.min_threshold, order[rank, c] + MARGIN))) for c in range(k - 1)]
        alarms = int(np.any(np.array(thresholds)[None, :] < m, axis=1).sum())  # the closed form of the replayed rule
        if alarms <= allowed:
            return thresholds
    raise AssertionError("unreachable: at the top rank no Healthy run can fire")  # threshold >= every m


def _fit_score_threshold(healthy: list[RunStream], cfg: CalibrationConfig) -> float:
    """The lowest anomaly-score threshold (an order statistic of the runs' peak 3-frame minima, + 1e-6)
    at which at most `allowed_false_alarms` of the Healthy runs alarm; not below `min_threshold`."""
    m = sorted(_peak_streak_min(s.anomaly, np.ones(len(s.anomaly), bool), cfg.consecutive) for s in healthy)  # vacuity breaks no streak
    allowed = allowed_false_alarms(len(healthy), cfg.far_target)  # Healthy runs that may alarm
    return float(min(1.0, max(cfg.min_threshold, m[len(m) - 1 - allowed] + MARGIN)))


def replay_report(streams: list[RunStream], cal: Calibration) -> dict:
    """`_replay_report` of streams under a calibration fitted elsewhere (its temperature applied here): FAR,
    per-class detection, run macro-F1 and the Unknown fraction of those runs (`eval.folds` scores two fold
    models on the runs both held out)."""
    return _replay_report(streams, _stream_probs(streams, cal.temperature), cal)


def _stream_probs(streams: list[RunStream], temperature: float) -> dict[str, np.ndarray]:
    """Each run's tempered class probabilities `(N, K)` by run id."""
    return {s.run_id: tempered_probs(torch.from_numpy(s.alpha), temperature).numpy() for s in streams}


def _replay_report(streams: list[RunStream], probs: dict, cal: Calibration) -> dict:
    """FAR on Healthy runs, per-class detection on anomalous runs and the Unknown fraction, replayed
    with the calibrated rule on the validation streams themselves (optimistic: fitted on them)."""
    rule = cal.rule()
    healthy_alarms, detected, anomalous, unknown, pairs = 0, defaultdict(int), defaultdict(int), [], []
    for s in streams:
        decisions = rule.replay(probs[s.run_id], s.vacuity, s.anomaly)
        first = first_alerts(decisions)
        unknown.append(np.mean([d.unknown for d in decisions]))
        if not s.known:
            continue
        alerts = [(d.frame, name) for d in decisions for name in alert_names(d, cal.classes)]  # Unknown alerts too
        if s.label == "healthy":
            healthy_alarms += bool(alerts)
            pairs.append(("healthy", alerts[0][1] if alerts else "healthy"))
        elif s.label in cal.classes:
            anomalous[s.label] += 1
            detected[s.label] += cal.classes.index(s.label) in first
            onset = int(np.argmax(s.target != 0)) if (s.target != 0).any() else len(s.target)  # targets leave 0 at the onset
            after = [name for frame, name in alerts if frame >= onset]
            pairs.append((s.label, after[0] if after else "healthy"))
    f1 = run_macro_f1(pairs, cal.classes[1:])  # the test split's definition (eval.metrics.macro_f1)
    out = {"val_unknown_fraction": float(np.mean(unknown)), "val_run_macro_f1": f1 if math.isfinite(f1) else None}
    n_healthy = sum(s.known and s.label == "healthy" for s in streams)
    if n_healthy:
        out["val_far"] = healthy_alarms / n_healthy
    out["val_detection"] = {c: f"{detected[c]}/{anomalous[c]}" for c in sorted(anomalous)}
    return out

