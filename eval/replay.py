"""Streaming replay of held-out runs through a diagnoser that sees only the past (docs/architecture.md §8-§9;
paper Sec. 5.1 "Streaming protocol" and Appendix E.1).

    corpus -> load_runs (public arrays only, via capture.store.RunStore) -> LoadedRun (private, whole run)
           -> for t in frames: PastView(t) = fresh COPIES of frames/readouts/loss/lr up to frame t
           -> diagnoser.step(view) -> FrameOutput(score, probs, vacuity)
           -> after the last frame: the run's truth (label, onset, trigger from the manifest) -> RunResult

No look-ahead by construction: a `PastView` holds only arrays that were copied out of the run's
arrays for the past (never a slice or view: a numpy slice keeps the whole array in `.base`, a torch
slice shares the whole `untyped_storage()`), so nothing handed to `step()` can reach frame t+1,
whatever the diagnoser keeps between calls. The diagnoser gets public run facts in `reset()` (arch,
dataset, optimizer, epoch_steps, ...), never the label, onset or trigger: those are attached to the
outputs only after the run has been replayed. tests/test_replay.py checks both. (The guarantee is
about the data handed over; code that walks the interpreter stack or opens the store itself is
outside it.)

Scored frames: every diagnoser sees every frame from 0, but outputs are kept from frame
`score_from` on (default `ClipConfig.window - 1` = 9, the first frame with a full TEViD window), so
that all methods are scored on the same frames of the same runs.

Confirmed alerts (docs/architecture.md §8): `with_alerts(results, threshold=...)` for score-only detectors
(score > threshold for 3 consecutive frames, `eval.metrics.alerts_at_threshold`) and
`with_alerts(results, rule=...)` for class-probability diagnosers (`diagnose.decision.Rule`:
per-class thresholds, 3 consecutive frames, Unknown when vacuity > tau, shared with the live hook).
`TEViDDiagnoser` runs a fine-tuned TEViD on the same windows it was trained and calibrated on.
Baselines: eval/baselines/. Rules and choices: docs/evaluation_baselines.md.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm import tqdm

from capture.relative import readout_column, share_columns
from capture.store import RunStore
from diagnose.decision import Decision, Rule, alert_names
from eval.metrics import RunResult, alerts_at_threshold
from pretrain.clips import CLASSES, CLIP_READOUTS, ClipConfig, corpus_runs

SCORE_FROM = ClipConfig.window - 1  # first scored frame: the first full TEViD window
RUN_INFO_KEYS = ("run_id", "arch", "dataset", "optimizer", "epoch_steps", "num_classes", "modality", "frame_size")
Kind = Literal["scalar", "readout", "video", "tevid"]


# ---------------------------------------------------------------- what a diagnoser sees and says

@dataclass(frozen=True, eq=False)
class PastView:
    """Everything a diagnoser may know at frame t: the past only, each array a private copy.

    t: index of the current frame; frame_step (t+1,) int64; frames (n, 6, S, S) float32, the last
    n = min(t+1, diagnoser.frame_window) frames (all t+1 by default; None when frame_window = 0);
    readouts (t+1, R) float32 raw, columns `readout_names` (the store's names; NaN = missing);
    train_loss, lr (frame_step[t]+1,) float32: every optimizer step up to and including frame t's;
    frame_arrays: the run's optional public per-frame arrays (capture.store), each (t+1,) float32,
    e.g. `hessian_top` (NaN where not computed). levels (t+1, 6) float32 and pattern (6, P, P) float32 of
    frame t: the per-map summaries of stores that keep them (capture.relative's inputs), else None; like
    the frames, given only to diagnosers that read frames.
    """

    t: int
    frame_step: np.ndarray
    frames: torch.Tensor | None
    readouts: np.ndarray
    readout_names: tuple[str, ...]
    train_loss: np.ndarray
    lr: np.ndarray
    frame_arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    levels: np.ndarray | None = None
    pattern: torch.Tensor | None = None

    @property
    def step(self) -> int:
        """Optimizer step of the current frame."""
        return int(self.frame_step[-1])

    def readout(self, name: str) -> np.ndarray:
        """(t+1,) values of one readout (a copy)."""
        if name not in self.readout_names:
            raise KeyError(f"readout {name!r} not in this run's readouts {self.readout_names}")
        return self.readouts[:, self.readout_names.index(name)].copy()


@dataclass(frozen=True)
class FrameOutput:
    """A diagnoser's output at one frame: anomaly score (higher = more anomalous; 1 - p(healthy) for
    class-probability models), class probabilities (K,) in `CLASSES` order or None, vacuity or None."""

    score: float
    probs: np.ndarray | None = None
    vacuity: float | None = None


@runtime_checkable
class Diagnoser(Protocol):
    """A streaming detector. `reset` is called once per run with its public facts (RUN_INFO_KEYS; never
    label, onset or trigger), then `step` once per frame in order, with the past only.

    Optional attribute `frame_window: int | None`: how many of the latest frames `view.frames`
    holds (None = all past frames; 0 = none, for detectors that read no frames, which also skips
    reading frames from the stores).
    """

    name: str
    kind: Kind

    def reset(self, run_info: dict) -> None: ...

    def step(self, view: PastView) -> FrameOutput: ...


def frame_window(diagnoser) -> int | None:
    w = getattr(diagnoser, "frame_window", None)
    if w is not None and (not isinstance(w, int) or w < 0):
        name = getattr(diagnoser, "name", diagnoser)
        raise ValueError(f"diagnoser {name!r}: frame_window must be None or an int >= 0, got {w!r}")
    return w


# ---------------------------------------------------------------- runs, loaded once

@dataclass(eq=False)
class LoadedRun:
    """One run's public arrays and facts, held by the replay (never handed to a diagnoser).

    `info`: the public facts given to `reset`. `truth`: label, onset_step, trigger_step (manifest),
    perturbation and epoch_steps (store attrs), attached to the outputs after the replay.
    frames (T, 6, S, S) bfloat16 or None when loaded without frames. frame_arrays: optional public
    per-frame arrays (T,) by name (`RunStore.frame_array`). source: the store's path (for messages).
    """

    info: dict
    truth: dict
    frame_step: np.ndarray
    readouts: np.ndarray
    readout_names: tuple[str, ...]
    train_loss: np.ndarray
    lr: np.ndarray
    frames: torch.Tensor | None = None
    frame_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    source: str | None = None
    levels: np.ndarray | None = None  # (T, 6) float32, with the frames, when the store keeps summaries
    patterns: torch.Tensor | None = None  # (T, 6, P, P) bfloat16, likewise

    @property
    def run_id(self) -> str:
        return self.info["run_id"]

    def __len__(self) -> int:
        return len(self.frame_step)

    def truncated(self, n_frames: int) -> "LoadedRun":
        """The run as it was when frame n_frames-1 had just been captured (for look-ahead tests)."""
        if not 1 <= n_frames <= len(self):
            raise ValueError(f"run {self.run_id}: cannot truncate {len(self)} frames to {n_frames}")
        last = int(self.frame_step[n_frames - 1]) + 1
        return dataclasses.replace(
            self, frame_step=self.frame_step[:n_frames].copy(), readouts=self.readouts[:n_frames].copy(),
            train_loss=self.train_loss[:last].copy(), lr=self.lr[:last].copy(),
            frames=None if self.frames is None else self.frames[:n_frames].clone(),
            frame_arrays={k: v[:n_frames].copy() for k, v in self.frame_arrays.items()},
            levels=None if self.levels is None else self.levels[:n_frames].copy(),
            patterns=None if self.patterns is None else self.patterns[:n_frames].clone())


def load_run(corpus: str | Path, record: dict, *, frames: bool = True) -> LoadedRun:
    """Read one manifest record's store through `RunStore` (public arrays and attributes only)."""
    store = RunStore(Path(corpus) / record["store"])
    attrs = store.attrs
    info = {"run_id": record["run_id"], "arch": record.get("arch"), "dataset": record.get("dataset"),
            "optimizer": record.get("optimizer"), "epoch_steps": attrs.get("epoch_steps"),
            "num_classes": attrs.get("num_classes"), "modality": attrs.get("modality"), "frame_size": store.frame_size}
    truth = {"label": record.get("label"), "onset_step": record.get("onset_step"), "trigger_step": record.get("trigger_step"),
             "perturbation": attrs.get("perturbation"), "epoch_steps": attrs.get("epoch_steps")}
    steps = store.frame_step().numpy().astype(np.int64)
    n_steps = len(store.train_loss())
    if len(steps) and steps[-1] >= n_steps:
        raise ValueError(f"run store {store.path}: frame at step {steps[-1]} but train_loss has only {n_steps} steps")
    return LoadedRun(info, truth, steps, store.readouts().numpy().astype(np.float32), tuple(store.readout_names),
                     store.train_loss().numpy().astype(np.float32), store.lr().numpy().astype(np.float32),
                     store.frames() if frames else None,
                     {k: store.frame_array(k).numpy().astype(np.float32) for k in store.frame_array_names}, str(store.path),
                     store.levels().numpy().astype(np.float32) if frames and store.has_summaries else None,
                     store.patterns() if frames and store.has_summaries else None)


def load_runs(corpus: str | Path, split: str | None, runs: Sequence[str] | None = None, *,
              frames: bool = True, progress: bool = True) -> list[LoadedRun]:
    """The usable runs of `split` (manifest order, or the order of `runs`), loaded once: replay them
    many times with `replay_runs` (e.g. in `eval.tune`). `frames=False` skips the frames (scalar detectors)."""
    records = corpus_runs(corpus, split, list(runs) if runs is not None else None)
    bar = tqdm(records, desc=f"loading {split or 'all'} runs", unit="run", file=sys.stderr, disable=not progress, leave=False)
    return [load_run(corpus, r, frames=frames) for r in bar]


def iter_views(run: LoadedRun, window: int | None = None) -> Iterator[PastView]:
    """The run's PastViews, frame by frame. Every array is a fresh copy of the past (see module doc)."""
    if window != 0 and run.frames is None:
        raise ValueError(f"run {run.run_id} was loaded without frames (load_runs(..., frames=False)) "
                         f"but the diagnoser reads frames (frame_window={window!r}; 0 reads none)")
    for t in range(len(run)):
        last = int(run.frame_step[t]) + 1
        frames = levels = pattern = None
        if window != 0:
            first = 0 if window is None else max(0, t + 1 - window)
            frames = run.frames[first:t + 1].to(torch.float32, copy=True)  # its own storage of n frames
            if run.levels is not None:
                levels, pattern = _past(run.levels[:t + 1]), run.patterns[t].to(torch.float32, copy=True)
        yield PastView(t=t, frame_step=_past(run.frame_step[:t + 1]), frames=frames,
                       readouts=_past(run.readouts[:t + 1]), readout_names=run.readout_names,
                       train_loss=_past(run.train_loss[:last]), lr=_past(run.lr[:last]),
                       frame_arrays={k: _past(v[:t + 1]) for k, v in run.frame_arrays.items()},
                       levels=levels, pattern=pattern)


def _past(a: np.ndarray) -> np.ndarray:
    out = np.array(a, copy=True)  # owns its memory: out.base is None
    out.flags.writeable = False
    return out


# ---------------------------------------------------------------- the replay

def run_outputs(run: LoadedRun, diagnoser: Diagnoser) -> list[FrameOutput]:
    """Reset the diagnoser with the run's public facts and step it through every frame."""
    diagnoser.reset(dict(run.info))
    out = []
    for view in iter_views(run, frame_window(diagnoser)):
        y = diagnoser.step(view)
        if not isinstance(y, FrameOutput):
            raise TypeError(f"diagnoser {diagnoser.name!r} returned {type(y).__name__} at frame {view.t} of run "
                            f"{run.run_id}; step() must return a FrameOutput")
        out.append(y)
    return out


def _stack(outputs: list[FrameOutput], what: str, name: str, run_id: str) -> np.ndarray | None:
    values = [getattr(o, what) for o in outputs]
    given = [v is not None for v in values]
    if not any(given):
        return None
    if not all(given):
        raise ValueError(f"diagnoser {name!r} gave {what} at some frames of run {run_id} but not at others")
    arr = np.asarray(values, dtype=np.float64)
    if what == "probs" and arr.shape[1:] != (len(CLASSES),):
        raise ValueError(f"diagnoser {name!r}: probs of shape {arr.shape[1:]} in run {run_id}, expected ({len(CLASSES)},) "
                         f"in the order {CLASSES}")
    return arr


def to_result(run: LoadedRun, outputs: list[FrameOutput], name: str = "diagnoser", score_from: int = SCORE_FROM) -> RunResult:
    """A RunResult of the frames >= score_from; the truth is attached here, after the outputs exist. A run
    shorter than that (a diverged one) has no scored frame: its probs and vacuity are then empty arrays if the
    method gives them at its earlier frames, so it looks like every other run of the method."""
    kept = outputs[score_from:]
    score = np.array([float(o.score) for o in kept], dtype=np.float64)
    probs, vacuity = _stack(kept, "probs", name, run.run_id), _stack(kept, "vacuity", name, run.run_id)
    if not kept and outputs:
        probs = np.zeros((0, len(CLASSES))) if outputs[0].probs is not None else None
        vacuity = np.zeros(0) if outputs[0].vacuity is not None else None
    return RunResult.from_attrs(run.run_id, run.truth, run.frame_step[score_from:], score, probs, vacuity)


def replay_runs(runs: Sequence[LoadedRun], diagnoser: Diagnoser, *, score_from: int = SCORE_FROM,
                progress: bool = True) -> list[RunResult]:
    """Replay loaded runs frame by frame through `diagnoser`; one RunResult per run (no alerts yet)."""
    if score_from < 0:
        raise ValueError(f"score_from must be >= 0, got {score_from}")
    bar = tqdm(runs, desc=f"replay {diagnoser.name}", unit="run", file=sys.stderr, disable=not progress, leave=False)
    return [to_result(run, run_outputs(run, diagnoser), diagnoser.name, score_from) for run in bar]


def replay(corpus: str | Path, split: str | None, diagnoser: Diagnoser, runs: Sequence[str] | None = None, *,
           score_from: int = SCORE_FROM, progress: bool = True) -> list[RunResult]:
    """Replay the usable runs of `split` (or the named `runs`) of a corpus through `diagnoser`, one run
    in memory at a time (use `load_runs` + `replay_runs` to replay the same runs many times)."""
    if score_from < 0:
        raise ValueError(f"score_from must be >= 0, got {score_from}")
    records = corpus_runs(corpus, split, list(runs) if runs is not None else None)
    frames = frame_window(diagnoser) != 0
    bar = tqdm(records, desc=f"replay {diagnoser.name} ({split or 'all'})", unit="run", file=sys.stderr, disable=not progress)
    out = []
    for record in bar:
        run = load_run(corpus, record, frames=frames)
        out.append(to_result(run, run_outputs(run, diagnoser), diagnoser.name, score_from))
    return out


# ---------------------------------------------------------------- TEViD as a diagnoser

class TEViDDiagnoser:
    """A fine-tuned TEViD (diagnose.tevid) in the replay, through the live monitor's own stream
    (`diagnose.stream.TEViDStream`): at frame t it reads the window of the last T frames and their
    CLIP_READOUTS, and gives probs (tempered by the calibration), vacuity and as score its anomaly head's
    score (a model with one), else 1 - p(healthy). Unlike the live
    monitor, frames before T-1 get an output too (`pad_start`: frame 0 repeated on the left); the scored
    frames start at T-1 (`score_from`), where both read the same full window."""

    def __init__(self, model, calibration=None, name: str = "tevid", kind: Kind = "tevid", window: int = ClipConfig.window):
        from diagnose.stream import TEViDStream

        self.model, self.calibration, self.name, self.kind, self.window = model.eval(), calibration, name, kind, window
        temperature = calibration.temperature if calibration is not None else 1.0
        self.stream = TEViDStream(self.model, None, window, pad_start=True, temperature=temperature)  # rule: later
        # the stream keeps its own window: the newest frame only (a relative model reads its levels and pattern)
        self.frame_window = 1 if self.stream.uses_video or self.stream.relative else 0
        self._num_classes = None
        self._last = -1

    @classmethod
    def from_checkpoint(cls, path: str | Path, name: str = "tevid", require_calibration: bool = True) -> "TEViDDiagnoser":
        """The fine-tuned model of `path` with its calibration, reading the window length it was trained on
        (the saved config's `data.window`, default 10)."""
        from diagnose.tevid import load_tevid
        from pretrain.checkpoint import load_checkpoint

        model, cal = load_tevid(path, require_calibration=require_calibration)
        window = int((load_checkpoint(path).config.get("data") or {}).get("window", ClipConfig.window))
        return cls(model, cal, name, window=window)

    def reset(self, run_info: dict) -> None:
        self.stream.reset()
        self._last = -1
        self._num_classes = run_info.get("num_classes")  # what a relative model's loss and entropy are read against

    @torch.no_grad()
    def step(self, view: PastView) -> FrameOutput:
        missing = [k for k in CLIP_READOUTS if k not in view.readout_names]
        if missing:
            raise ValueError(f"{self.name}: readouts {missing} missing from run (it has {view.readout_names})")
        if view.t != self._last + 1:
            raise ValueError(f"{self.name}: frames must be replayed in order (got frame {view.t} after {self._last})")
        self._last = view.t
        cols = [view.readout_names.index(k) for k in CLIP_READOUTS]
        readouts = torch.from_numpy(view.readouts[view.t, cols].astype(np.float32))  # (8,)
        frame = view.frames[-1] if self.stream.uses_video else None  # (6, S, S); view.frames holds frames .. t
        if self.stream.relative:
            if view.levels is None:
                raise ValueError(f"{self.name}: a relative model needs the stores' levels and patterns (layout 2)")
            first = int(view.frame_step[-2]) + 1 if view.t else 0  # the steps since the previous frame
            ws = readout_column(view.readouts, view.readout_names, "weight_step")  # this frame's, if the store has them
            ws = None if ws is None else float(ws[view.t])
            shares = {n: float(c[view.t]) for n, c in share_columns(view.readouts, view.readout_names).items()}
            pred = self.stream.push(view.t, frame, readouts, torch.tensor(view.levels[-1]), view.pattern, self._num_classes,
                                    torch.from_numpy(view.train_loss[first:view.step + 1].copy()), ws, shares)
        else:
            pred = self.stream.push(view.t, frame, readouts)
        probs = np.asarray(pred.probs, dtype=np.float64)
        score = pred.anomaly if pred.anomaly is not None else 1.0 - probs[0]
        return FrameOutput(score=float(score), probs=probs, vacuity=float(pred.vacuity))


# ---------------------------------------------------------------- decisions and confirmed alerts

def decisions(result: RunResult, rule: Rule) -> list[Decision]:
    """The streaming rule (diagnose.decision) over a replayed run's probs and vacuity (no vacuity:
    never Unknown). Decision.frame indexes the result's frames; a run with no scored frame has none."""
    if len(result.score) == 0:
        return []
    if result.probs is None:
        raise ValueError(f"run {result.run_id}: the decision rule needs class probabilities; this method gives a score only "
                         f"(use a score threshold)")
    vacuity = result.vacuity if result.vacuity is not None else np.zeros(len(result.score))
    return rule.replay(result.probs, vacuity, result.score if rule.score_threshold is not None else None)


def unknown_mask(result: RunResult, rule: Rule) -> np.ndarray:
    """(T,) bool: frames where the rule abstains (Unknown)."""
    return np.array([d.unknown for d in decisions(result, rule)], dtype=bool)


def confirmed_alerts(result: RunResult, *, threshold: float | None = None, rule: Rule | None = None,
                     consecutive: int = 3) -> list[tuple[int, str]]:
    """Confirmed alerts `(step, class name)` of one run, in order. Exactly one of:
    threshold: score > threshold for `consecutive` frames in a row (score-only detectors; the class is
    the most probable anomaly class when the run has probs, else "anomaly");
    rule: diagnose.decision with per-class thresholds and tau (class-probability diagnosers); its Unknown
    alerts count as alerts named "unknown", as the live monitor raises them (a false alarm on a Healthy run,
    a detection with the wrong kind on an anomalous one)."""
    if (threshold is None) == (rule is None):
        raise ValueError("confirmed_alerts: give exactly one of threshold= (score-only) or rule= (class probabilities)")
    if rule is not None:
        return [(int(result.frame_step[d.frame]), name) for d in decisions(result, rule) for name in alert_names(d)]
    return alerts_at_threshold([result], threshold, consecutive)[0].alerts


def with_alerts(results: Sequence[RunResult], *, threshold: float | None = None, rule: Rule | None = None,
                consecutive: int = 3) -> list[RunResult]:
    """Copies of `results` with their confirmed alerts at a frozen operating point (see confirmed_alerts)."""
    return [dataclasses.replace(r, alerts=confirmed_alerts(r, threshold=threshold, rule=rule, consecutive=consecutive))
            for r in results]


@dataclass
class ReplayConfig:
    """How runs are replayed (saved with the outputs of eval scripts)."""

    score_from: int = SCORE_FROM
    consecutive: int = 3
    far: float = 0.05  # FAR target of the frozen operating threshold (set on validation)
