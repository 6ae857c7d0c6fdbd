"""Label-free model selection from per-frame readouts: head-gradient checkpoint selection and GWA early
stopping, with their smoothing parameters tuned on runs that have validation labels.

- Head-gradient checkpoint selection (seed 000 §3.3 eq. 3, §6.1): smooth `score_w` (or `score_z`) with
  an EMA of span k over the frames, keep the last `tail_frac` of the run, select the argmin. The paper's
  universal configuration is k = 3 and "the last s = 80 steps"; our corpus runs are 300 steps with a
  frame every 10, so s = 80 becomes `tail_frac = 80 / 300` (the last 8 of 30 frames).
- GWA early stopping (seed 004): stop at the maximum of the (EMA-smoothed) GWA after a 10% warm-up; for
  fine-tuning, first a minimum, then the maximum after it. `GWAStopper` is the streaming, past-only
  form (one value per frame; says when to stop); with `patience=None` its choice equals `gwa_stop`.
- `tune_selection`: optuna (TPESampler(seed)) picks the EMA span and the tail window (or GWA warm-up)
  that minimise the mean gap to the oracle checkpoint on runs WITH validation labels; the tuned values
  are then used on runs without them (seed 000 §6.2, "automatic parameter tuning").

Everything here is a pure numpy function over one run's frames; validation accuracy appears only in
the evaluation (`selection_gap`, `tune_selection`), read from a store's privileged group.

    python -m diagnose.selection --corpus outputs/corpus/cpu [--out selection.json] [key=value ...]

measures the gap to the oracle on the corpus's healthy and overfitting classification runs
(docs/selection_privacy.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

UNIVERSAL_SPAN = 3  # seed 000 §6.1: k = 3
UNIVERSAL_TAIL_FRAC = 80 / 300  # seed 000 §6.1: s = 80 last steps, of our 300-step corpus runs
GWA_WARMUP_FRAC = 0.1  # seed 004: maximum after a 10% warm-up


# --------------------------------------------------------------------------- smoothing
def ema(x: np.ndarray, span: float) -> np.ndarray:
    """Causal exponential moving average with `alpha = 2 / (span + 1)`, bias-corrected at the start
    (pandas `Series.ewm(span=span).mean()`, adjust=True). NaN entries add nothing but age the others;
    the output is NaN until the first finite value. `span <= 1` returns the input."""
    x = np.asarray(x, dtype=np.float64)
    if span <= 1:
        return x.copy()
    decay = 1.0 - 2.0 / (span + 1.0)
    out = np.full_like(x, np.nan)
    num = den = 0.0
    for i, v in enumerate(x):
        num, den = num * decay, den * decay
        if math.isfinite(v):
            num, den = num + v, den + 1.0
        if den > 0:
            out[i] = num / den
    return out


def _check_series(frame_step: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    steps, vals = np.asarray(frame_step).reshape(-1), np.asarray(values, dtype=np.float64).reshape(-1)
    if len(steps) == 0:
        raise ValueError("selection needs at least one frame, got none")
    if len(steps) != len(vals):
        raise ValueError(f"frame_step has {len(steps)} entries but the score has {len(vals)}")
    if np.any(np.diff(steps) < 0):
        raise ValueError("frame_step must be non-decreasing (frames in training order)")
    return steps, vals


# --------------------------------------------------------------------------- head-gradient selection
def tail_start(n_frames: int, tail_frac: float) -> int:
    """Index of the first frame of the tail window: the last `ceil(tail_frac * n)` frames (at least 1)."""
    if not 0 < tail_frac <= 1:
        raise ValueError(f"tail_frac must be in (0, 1], got {tail_frac}")
    return n_frames - max(1, math.ceil(tail_frac * n_frames - 1e-9))


def select_checkpoint(frame_step, score, span: float = UNIVERSAL_SPAN, tail_frac: float = UNIVERSAL_TAIL_FRAC) -> int:
    """Seed 000 §6.1: the step of the frame minimising the EMA-smoothed head-gradient score over the
    tail window. The EMA runs over the whole run (so the window's first frames are smoothed too). If no
    frame in the window has a finite score, the last frame is returned (keep the final checkpoint)."""
    steps, vals = _check_series(frame_step, score)
    smooth = ema(vals, span)[tail_start(len(steps), tail_frac):]
    if not np.isfinite(smooth).any():
        return int(steps[-1])
    i = int(np.nanargmin(smooth))
    return int(steps[len(steps) - len(smooth) + i])


# --------------------------------------------------------------------------- GWA early stopping
def _warmup_mask(steps: np.ndarray, warmup_frac: float, total_steps: int | None) -> np.ndarray:
    total = int(steps[-1]) if total_steps is None else int(total_steps)
    return steps >= warmup_frac * total


def gwa_stop(frame_step, gwa, span: float = 1, warmup_frac: float = GWA_WARMUP_FRAC, finetune: bool = False,
             total_steps: int | None = None) -> int:
    """Seed 004: the step of the maximum of the EMA-smoothed GWA among frames at or after
    `warmup_frac * total_steps` (default total: the last frame's step). `finetune=True`: first the
    minimum after the warm-up, then the maximum at or after it. Ties go to the earliest frame. If no
    eligible frame has a finite GWA, the last frame is returned."""
    steps, vals = _check_series(frame_step, gwa)
    smooth = ema(vals, span)
    eligible = _warmup_mask(steps, warmup_frac, total_steps) & np.isfinite(smooth)
    if not eligible.any():
        return int(steps[-1])
    idx = np.nonzero(eligible)[0]
    if finetune:
        lo = idx[int(np.argmin(smooth[idx]))]
        idx = idx[idx >= lo]
    return int(steps[idx[int(np.argmax(smooth[idx]))]])


@dataclass
class GWAStopper:
    """Streaming GWA early stopping, past-only: `update(step, gwa)` once per frame returns True when
    training should stop; `best_step` is the checkpoint to keep (seed 004).

    The warm-up needs the planned run length (`total_steps`), known before training. The stop comes
    `patience` frames after the last new maximum (`patience=None`: never stop; `best_step` at the end
    of the run then equals `gwa_stop` on the same frames). With `finetune=True` the maximum is sought
    after the running minimum, and a stop needs a rise above that minimum first.
    """

    total_steps: int
    span: float = 1
    warmup_frac: float = GWA_WARMUP_FRAC
    patience: int | None = 5
    finetune: bool = False
    best_step: int | None = field(default=None, init=False)
    best_value: float = field(default=-math.inf, init=False)
    stopped_at: int | None = field(default=None, init=False)
    _num: float = field(default=0.0, init=False, repr=False)
    _den: float = field(default=0.0, init=False, repr=False)
    _min: float = field(default=math.inf, init=False, repr=False)
    _since_best: int = field(default=0, init=False, repr=False)
    _last_step: int | None = field(default=None, init=False, repr=False)

    def update(self, step: int, value: float) -> bool:
        if self._last_step is not None and step < self._last_step:
            raise ValueError(f"GWAStopper: step {step} comes after step {self._last_step}; frames must be in order")
        self._last_step = int(step)
        decay = 0.0 if self.span <= 1 else 1.0 - 2.0 / (self.span + 1.0)  # same EMA as `ema`
        self._num, self._den = self._num * decay, self._den * decay
        if math.isfinite(value):
            self._num, self._den = self._num + float(value), self._den + 1.0
        if self._den == 0 or step < self.warmup_frac * self.total_steps:
            return self.should_stop
        smooth = self._num / self._den
        if not math.isfinite(smooth):
            return self.should_stop
        self._since_best += 1
        if self.finetune and smooth < self._min:  # a new minimum: the maximum is sought from here on
            self._min = smooth
            self.best_step, self.best_value, self._since_best = int(step), smooth, 0
        elif smooth > self.best_value:
            self.best_step, self.best_value, self._since_best = int(step), smooth, 0
        rose = not self.finetune or self.best_value > self._min
        if self.stopped_at is None and self.patience is not None and rose and self._since_best >= self.patience:
            self.stopped_at = int(step)
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None


# --------------------------------------------------------------------------- evaluation (privileged)
@dataclass
class RunReadouts:
    """One run's public frames plus, for evaluation only, its per-epoch validation accuracy."""

    run_id: str
    arch: str
    split: str
    label: str
    frame_step: np.ndarray  # (T,)
    readouts: dict[str, np.ndarray]  # name -> (T,)
    epoch_step: np.ndarray  # (E,) optimizer step at the end of each epoch
    val_acc: np.ndarray  # (E,) in [0, 1]


def selected_accuracy(step: int, epoch_step: np.ndarray, val_acc: np.ndarray) -> float:
    """Validation accuracy of the checkpoint at `step`: the epoch whose end step is the nearest at or
    after it (the last epoch if the step is past every epoch end)."""
    if len(epoch_step) == 0:
        raise ValueError("no epochs: the run has no validation accuracy to evaluate against")
    e = min(int(np.searchsorted(epoch_step, step, side="left")), len(epoch_step) - 1)
    return float(val_acc[e])


def selection_gap(run: RunReadouts, step: int, from_step: int | None = None) -> float:
    """Oracle (best validation accuracy over the run's epochs) minus the selected checkpoint's, in
    percentage points (seed 000 §6.1, Delta). `from_step`: seed 000's tail oracle, the best over the
    epochs ending at or after that step only."""
    acc = run.val_acc
    if from_step is not None:
        first = min(int(np.searchsorted(run.epoch_step, from_step, side="left")), len(acc) - 1)
        acc = acc[first:]
    return 100.0 * (float(np.nanmax(acc)) - selected_accuracy(step, run.epoch_step, run.val_acc))


def head_gap(run: RunReadouts, score: str, span: float, tail_frac: float) -> float:
    return selection_gap(run, select_checkpoint(run.frame_step, run.readouts[score], span, tail_frac))


def gwa_gap(run: RunReadouts, span: float, warmup_frac: float = GWA_WARMUP_FRAC, finetune: bool = False) -> float:
    return selection_gap(run, gwa_stop(run.frame_step, run.readouts["gwa"], span, warmup_frac, finetune))


def streaming_gwa(run: RunReadouts, span: float = 1, warmup_frac: float = GWA_WARMUP_FRAC, patience: int = 5,
                  finetune: bool = False) -> tuple[float, float]:
    """Replay `GWAStopper` over a run: (gap of the kept checkpoint `best_step`, fraction of the run's
    frames seen when it stopped; 1.0 if it never stopped). The planned length is the last frame's step."""
    stopper = GWAStopper(int(run.frame_step[-1]), span, warmup_frac, patience, finetune)
    seen = len(run.frame_step)
    for i, (st, v) in enumerate(zip(run.frame_step, run.readouts["gwa"])):
        if stopper.update(int(st), float(v)):
            seen = i + 1
            break
    best = stopper.best_step if stopper.best_step is not None else int(run.frame_step[seen - 1])
    return selection_gap(run, best), seen / len(run.frame_step)


def mean_gap(runs: list[RunReadouts], method: str, params: dict, score: str = "score_w") -> float:
    """Mean selection gap (percentage points) over `runs` for `method` "head" (params span, tail_frac)
    or "gwa" (params span, warmup_frac, optional finetune)."""
    if not runs:
        return float("nan")
    if method == "head":
        gaps = [head_gap(r, score, params["span"], params["tail_frac"]) for r in runs]
    elif method == "gwa":
        gaps = [gwa_gap(r, params["span"], params.get("warmup_frac", GWA_WARMUP_FRAC), params.get("finetune", False)) for r in runs]
    else:
        raise ValueError(f"method must be 'head' or 'gwa', got {method!r}")
    return float(np.mean(gaps))


def tune_selection(runs: list[RunReadouts], n_trials: int = 25, seed: int = 0, method: str = "head",
                   score: str = "score_w", finetune: bool = False, max_span: int = 15) -> dict:
    """Tune the EMA span (integer 1..max_span) and the tail window `tail_frac` (method "head") or the
    warm-up `warmup_frac` (method "gwa", `finetune` variant or not) with optuna's TPESampler(seed) to
    minimise the mean gap to the oracle on `runs`, which must carry validation accuracy. The universal
    configuration is the first trial, so the result is never worse than it on `runs`. Returns the best
    params plus `gap` (the mean gap on `runs`, percentage points) and `n_trials`."""
    import optuna

    if not runs:
        raise ValueError("tune_selection needs at least one run with validation accuracy")
    if method not in ("head", "gwa"):
        raise ValueError(f"method must be 'head' or 'gwa', got {method!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    window = "tail_frac" if method == "head" else "warmup_frac"
    low, high, start = (0.05, 1.0, UNIVERSAL_TAIL_FRAC) if method == "head" else (0.0, 0.5, GWA_WARMUP_FRAC)

    def objective(trial: optuna.Trial) -> float:
        params = {"span": trial.suggest_int("span", 1, max_span), window: trial.suggest_float(window, low, high),
                  "finetune": finetune}
        return mean_gap(runs, method, params, score)

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({"span": UNIVERSAL_SPAN if method == "head" else 1, window: start})
    study.optimize(objective, n_trials=n_trials)
    best = {**study.best_params, "gap": float(study.best_value), "n_trials": n_trials}
    return {**best, "finetune": finetune} if method == "gwa" else best


# --------------------------------------------------------------------------- corpus measurement
@dataclass
class SelectionConfig:
    """The corpus measurement; both head-gradient scores (`score_w`, `score_z`) are always measured."""

    span: int = UNIVERSAL_SPAN
    tail_frac: float = UNIVERSAL_TAIL_FRAC
    gwa_span: int = 1
    gwa_warmup_frac: float = GWA_WARMUP_FRAC
    gwa_patience: int = 5  # streaming GWAStopper: frames without a new maximum before stopping
    labels: list[str] = field(default_factory=lambda: ["healthy", "overfitting"])
    skip_archs: list[str] = field(default_factory=lambda: ["lm", "lm_base"])  # classification only
    tune_split: str = "train"
    n_trials: int = 25
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.tail_frac <= 1 or not 0 <= self.gwa_warmup_frac < 1:
            raise ValueError(f"tail_frac must be in (0, 1] and gwa_warmup_frac in [0, 1), got {self.tail_frac}, {self.gwa_warmup_frac}")


def load_runs(corpus: str | Path, labels=("healthy", "overfitting"), skip_archs=("lm", "lm_base")) -> list[RunReadouts]:
    """The corpus's finished classification runs with one of `labels`, with their validation accuracy
    (privileged: read for evaluation only)."""
    from capture.corpus import corpus_runs
    from capture.store import RunStore, read_privileged

    corpus = Path(corpus)
    runs = []
    for rec in corpus_runs(corpus):
        if rec.get("label") not in labels or rec.get("arch") in skip_archs:
            continue
        path = corpus / rec["store"]
        store, priv = RunStore(path), read_privileged(path)
        names, table = store.readout_names, store.readouts().numpy().astype(np.float64)
        if len(priv.get("val_acc", [])) == 0 or len(store) == 0:
            continue
        runs.append(RunReadouts(rec["run_id"], rec["arch"], rec["split"], rec["label"], store.frame_step().numpy(),
                                {n: table[:, i] for i, n in enumerate(names)},
                                np.asarray(priv["epoch_step"]), np.asarray(priv["val_acc"], dtype=np.float64)))
    return runs


def _stats(gaps: list[float]) -> dict:
    if not gaps:
        return {"n": 0}
    return {"n": len(gaps), "mean_gap": float(np.mean(gaps)), "std_gap": float(np.std(gaps)),
            "median_gap": float(np.median(gaps)), "zero_gap": int(sum(g <= 1e-9 for g in gaps))}


def _summary(runs: list[RunReadouts], method: str, params: dict, score: str) -> dict:
    if method == "head":  # plus seed 000's tail-oracle gap (best epoch inside the tail window)
        tail = [selection_gap(r, select_checkpoint(r.frame_step, r.readouts[score], params["span"], params["tail_frac"]),
                              int(r.frame_step[tail_start(len(r.frame_step), params["tail_frac"])])) for r in runs]
        return {**_stats([head_gap(r, score, params["span"], params["tail_frac"]) for r in runs]),
                "mean_gap_tail_oracle": float(np.mean(tail)) if tail else None}
    return _stats([gwa_gap(r, params["span"], params["warmup_frac"], params.get("finetune", False)) for r in runs])


def last_frame_gaps(runs: list[RunReadouts]) -> dict:
    """Baseline: keep the final checkpoint (no selection)."""
    return _stats([selection_gap(r, int(r.frame_step[-1])) for r in runs])


def measure(runs: list[RunReadouts], cfg: SelectionConfig) -> dict:
    """Universal vs tuned (on `cfg.tune_split`) gaps per split, for head-gradient selection with
    score_w and score_z and for GWA early stopping (plain and fine-tuning variants)."""
    splits = sorted({r.split for r in runs})
    by_split = {s: [r for r in runs if r.split == s] for s in splits}
    tune_runs = by_split.get(cfg.tune_split, [])
    out: dict = {"runs": {s: len(v) for s, v in by_split.items()},
                 "labels": {s: {lab: sum(r.label == lab for r in v) for lab in cfg.labels} for s, v in by_split.items()},
                 "final_checkpoint": {s: last_frame_gaps(v) for s, v in by_split.items()}}
    for score in ("score_w", "score_z"):
        universal = {"span": cfg.span, "tail_frac": cfg.tail_frac}
        tuned = tune_selection(tune_runs, cfg.n_trials, cfg.seed, "head", score) if tune_runs else None
        out[f"head_{score}"] = _entries(by_split, "head", score, universal, tuned)
        # seed 000 §6.2's per-architecture tuning, in-sample on each split: an optimistic upper bound
        per_arch = {}
        for s, split_runs in by_split.items():
            gaps = []
            for arch in sorted({r.arch for r in split_runs}):
                arch_runs = [r for r in split_runs if r.arch == arch]
                best = tune_selection(arch_runs, cfg.n_trials, cfg.seed, "head", score)
                gaps += [head_gap(r, score, best["span"], best["tail_frac"]) for r in arch_runs]
            per_arch[s] = _stats(gaps)
        out[f"head_{score}"]["per_arch_in_sample"] = {"params": {"tuned_per": "architecture, in-sample"}, **per_arch}
    # seed 000 §6.1's sensitivity grid, k in {1, 3, 5, 9} x s in {60, 80, 100} of 300 steps, all splits
    out["grid"] = {score: {f"span={k},tail_frac={s_ / 300:.3g}": mean_gap(runs, "head", {"span": k, "tail_frac": s_ / 300}, score)
                           for k in (1, 3, 5, 9) for s_ in (60, 80, 100)} for score in ("score_w", "score_z")}
    out["per_arch_universal"] = {
        score: {s: {a: mean_gap([r for r in v if r.arch == a], "head", {"span": cfg.span, "tail_frac": cfg.tail_frac}, score)
                    for a in sorted({r.arch for r in v})} for s, v in by_split.items()}
        for score in ("score_w", "score_z")}
    streamed = {s: [streaming_gwa(r, cfg.gwa_span, cfg.gwa_warmup_frac, cfg.gwa_patience) for r in v] for s, v in by_split.items()}
    out["gwa_streaming"] = {"params": {"span": cfg.gwa_span, "warmup_frac": cfg.gwa_warmup_frac, "patience": cfg.gwa_patience},
                            **{s: {**_stats([g for g, _ in v]), "mean_frames_seen": float(np.mean([f for _, f in v])) if v else None}
                               for s, v in streamed.items()}}
    for finetune in (False, True):
        universal = {"span": cfg.gwa_span, "warmup_frac": cfg.gwa_warmup_frac, "finetune": finetune}
        tuned = tune_selection(tune_runs, cfg.n_trials, cfg.seed, "gwa", finetune=finetune) if tune_runs else None
        out["gwa_finetune" if finetune else "gwa"] = _entries(by_split, "gwa", "gwa", universal, tuned)
    return out


def _entries(by_split: dict, method: str, score: str, universal: dict, tuned: dict | None) -> dict:
    return {
        "universal": {"params": universal, **{s: _summary(v, method, universal, score) for s, v in by_split.items()}},
        "tuned": None if tuned is None else {"params": tuned, **{s: _summary(v, method, tuned, score) for s, v in by_split.items()}},
    }


def format_report(res: dict) -> str:
    splits = [s for s in ("train", "val", "test") if s in res["runs"]] + sorted(set(res["runs"]) - {"train", "val", "test"})
    lines = ["| method | params | " + " | ".join(f"{s} (n={res['runs'][s]})" for s in splits) + " |",
             "|---" * (len(splits) + 2) + "|"]

    def cell(d: dict) -> str:
        if not d.get("n"):
            return "-"
        tail = f" (tail oracle {d['mean_gap_tail_oracle']:.2f})" if d.get("mean_gap_tail_oracle") is not None else ""
        return f"{d['mean_gap']:.2f} ± {d['std_gap']:.2f}{tail}"

    lines.append("| final checkpoint | - | " + " | ".join(cell(res["final_checkpoint"][s]) for s in splits) + " |")
    for key in ("head_score_w", "head_score_z", "gwa", "gwa_finetune"):
        for kind in ("universal", "tuned", "per_arch_in_sample"):
            entry = res[key].get(kind)
            if entry is None:
                continue
            p = entry["params"]
            ps = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items() if k not in ("gap", "n_trials"))
            lines.append(f"| {key} {kind} | {ps} | " + " | ".join(cell(entry[s]) for s in splits) + " |")
    st = res["gwa_streaming"]
    lines.append(f"| gwa streaming (stop, keep best) | patience={st['params']['patience']} | "
                 + " | ".join(f"{cell(st[s])}, {100 * st[s]['mean_frames_seen']:.0f}% of frames" if st[s].get("n") else "-" for s in splits) + " |")
    for score, grid in res["grid"].items():  # seed 000 §6.1's sensitivity grid, all splits pooled
        lines += ["", f"| {score}: span \\ tail_frac (all splits) | 0.2 | 0.267 | 0.333 |", "|---|---|---|---|"]
        lines += [f"| {k} | " + " | ".join(f"{grid[f'span={k},tail_frac={t}']:.2f}" for t in ("0.2", "0.267", "0.333")) + " |"
                  for k in (1, 3, 5, 9)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    from capture.config import load_config

    p = argparse.ArgumentParser(description="Label-free selection: gap to the oracle checkpoint on a corpus")
    p.add_argument("--config", default=None, help="yaml config file (SelectionConfig)")
    p.add_argument("--corpus", required=True, help="corpus directory (with manifest.jsonl)")
    p.add_argument("--out", default=None, help="JSON file for the results (config included)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. n_trials=50)")
    args = p.parse_args(argv)
    cfg = load_config(SelectionConfig, args.config, args.overrides)
    t0 = time.time()
    runs = load_runs(args.corpus, cfg.labels, cfg.skip_archs)
    if not runs:
        print(f"no {'/'.join(cfg.labels)} classification runs in {args.corpus}", file=sys.stderr)
        return 1
    res = measure(runs, cfg)
    res["config"], res["corpus"], res["seconds"] = asdict(cfg), str(args.corpus), round(time.time() - t0, 1)
    print(f"corpus {args.corpus}: {len(runs)} runs ({res['runs']}), labels {res['labels']}")
    print("mean gap to the oracle checkpoint, percentage points (mean ± std over runs):")
    print(format_report(res))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
