"""Hyper-parameters of the baselines, tuned with optuna on the validation split (docs/architecture.md §9; paper
Sec. 5.1: "each baseline's hyper-parameters tuned on validation", App. G).

`tune(make_diagnoser, val_runs, n_trials=25, seed=0)` runs a TPE study (optuna TPESampler(seed)) that
maximises the event-time AUPRC (eval.metrics.event_auprc) of the replayed validation runs. The runs are
read from the stores once (`eval.replay.load_runs`) and replayed for every trial, so a trial of CUSUM
or BOCPD costs only the detector's own arithmetic.

    python -m eval.tune --corpus outputs/corpus/cpu --out outputs/tune/cusum baseline=cusum [n_trials=25 seed=0]

writes `config.json` (this TuneConfig), `best.json` (best value, params, and the baseline's resolved
config), `trials.json` (every trial's params, value, state and seconds) and `study.journal` (the optuna study:
rerunning the command resumes it, a killed trial is run again; `n_trials=` may grow). `workers=2` tunes
the one study in 2 processes at once (each with its own TPE seed, seed + k), e.g. on a 2-core machine. Search spaces: `PARAMS`; the names of the
params are the config fields they set (dots for nested sections: `residuals.span`).
The TCNs (`tcn_scalar`, `hessian_tcn`: the same space) train on the train split in every trial; so do
the video baselines (`r2plus1d`, `video_swin`), whose trials can be given a budget with `video={...}`
(VideoConfig fields set over every trial's, e.g. `video={max_steps: 100, threads: 1}`): the budget is
not a tuned param, so a report that wants it passes it again (`r2plus1d={max_steps: 100}`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from tqdm.auto import tqdm

from capture.config import cli_parser, from_dict, load_config, save_config
from eval.baselines import CONFIGS, TCNConfig, make_baseline, require_hessian, train_hessian_tcn, train_tcn
from eval.baselines.video import VIDEO_CONFIGS, train_video
from eval.metrics import event_auprc
from eval.replay import SCORE_FROM, Diagnoser, LoadedRun, load_runs, replay_runs


def tune(make_diagnoser: Callable[[optuna.Trial], Diagnoser], val_runs: Sequence[LoadedRun], n_trials: int = 25,
         seed: int = 0, *, metric: Callable = event_auprc, score_from: int = SCORE_FROM, progress: bool = True,
         study_name: str | None = None, storage: str | Path | None = None) -> tuple[dict, optuna.Study]:
    """Maximise `metric(replayed val_runs)` over `n_trials` TPE trials; returns (best params, study).

    `make_diagnoser(trial)` builds a diagnoser from `trial.suggest_*` values (see PARAMS). A metric that
    is undefined on the validation runs (NaN: no positive frame) is an error, not a bad trial.
    `storage`: a journal file holding the study (created, or loaded to resume); `n_trials` is then the
    study's total, shared by every process that tunes against the same file at once (see `main`'s
    `workers`): a process starts a trial only while fewer than `n_trials` are complete or running (optuna's
    MaxTrialsCallback checks after each trial, so workers that start their last trials at the same moment can
    end up to `workers - 1` trials over)."""
    if not val_runs:
        raise ValueError("tune: no validation runs")
    runs = list(val_runs)

    def objective(trial: optuna.Trial) -> float:
        value = float(metric(replay_runs(runs, make_diagnoser(trial), score_from=score_from, progress=False)))
        if not math.isfinite(value):
            raise ValueError(f"tune: {getattr(metric, '__name__', metric)} is {value} on the {len(runs)} validation runs "
                             f"(no positive frame from frame {score_from} on?): nothing to tune against")
        return value

    sampler = optuna.samplers.TPESampler(seed=seed)
    shared = storage is not None
    study = optuna.create_study(direction="maximize", sampler=sampler, study_name=study_name or (STUDY if shared else None),
                                storage=journal(storage) if shared else None, load_if_exists=shared)
    todo = remaining(study, n_trials)
    callbacks = [optuna.study.MaxTrialsCallback(n_trials, states=COUNTED)] if shared else []
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if todo > 0:
            study.optimize(objective, n_trials=todo, callbacks=callbacks, show_progress_bar=progress)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return dict(study.best_params), study


STUDY = "tune"  # the study's name in a journal file
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)  # toward n_trials of a shared study


def journal(path: str | Path) -> optuna.storages.JournalStorage:
    """The optuna storage in the journal file `path` (safe for several processes at once)."""
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def remaining(study: optuna.Study, n_trials: int) -> int:
    """How many trials `study` still needs to reach `n_trials` (complete and running ones count)."""
    return n_trials - len(study.get_trials(deepcopy=False, states=COUNTED))


def fail_stale_trials(storage: optuna.storages.BaseStorage, study_name: str = STUDY) -> int:
    """Mark the RUNNING trials of the study FAILED (a killed process left them; call it before any process
    tunes against the storage) so that a resumed study runs them again; returns how many."""
    study_id = storage.get_study_id_from_name(study_name)
    stale = optuna.load_study(study_name=study_name, storage=storage).get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    return len(stale)


# ---------------------------------------------------------------- search spaces

def _cusum_params(trial: optuna.Trial) -> dict:
    p = {"k": trial.suggest_float("k", 0.0, 2.0),
         "two_sided": trial.suggest_categorical("two_sided", [False, True]),
         "aggregate": trial.suggest_categorical("aggregate", ["max", "last"]),
         "reset_at_h": trial.suggest_categorical("reset_at_h", [False, True]),
         "residuals.span": trial.suggest_float("residuals.span", 5.0, 100.0, log=True),
         "residuals.scale_span": trial.suggest_float("residuals.scale_span", 10.0, 200.0, log=True)}
    if p["reset_at_h"]:
        p["h"] = trial.suggest_float("h", 2.0, 20.0, log=True)
    return p


def _bocpd_params(trial: optuna.Trial) -> dict:
    return {"hazard_lambda": trial.suggest_float("hazard_lambda", 10.0, 1000.0, log=True),
            "recent": trial.suggest_int("recent", 2, 30),
            "kappa0": trial.suggest_float("kappa0", 0.1, 10.0, log=True),
            "alpha0": trial.suggest_float("alpha0", 0.5, 10.0, log=True),
            "beta0": trial.suggest_float("beta0", 0.5, 10.0, log=True),
            "aggregate": trial.suggest_categorical("aggregate", ["max", "last"]),
            "residuals.span": trial.suggest_float("residuals.span", 5.0, 100.0, log=True)}


def _readout_params(trial: optuna.Trial) -> dict:
    return {"ref_frames": trial.suggest_int("ref_frames", 1, 8),
            "smooth_span": trial.suggest_float("smooth_span", 1.0, 6.0),
            "direction": trial.suggest_categorical("direction", ["up", "down", "abs"])}


def _tcn_params(trial: optuna.Trial) -> dict:
    return {"channels": trial.suggest_categorical("channels", [16, 32, 64]),
            "levels": trial.suggest_int("levels", 2, 4),
            "dropout": trial.suggest_float("dropout", 0.0, 0.3),
            "lr": trial.suggest_float("lr", 1e-3, 1e-2, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True),
            "epochs": trial.suggest_int("epochs", 10, 60, step=10),
            "relative": trial.suggest_categorical("relative", [False, True])}


def _video_params(trial: optuna.Trial) -> dict:
    return {"lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 1e-3, 0.2, log=True),
            "epochs": trial.suggest_int("epochs", 1, 5)}


def _r2plus1d_params(trial: optuna.Trial) -> dict:
    return {**_video_params(trial), "width": trial.suggest_categorical("width", [16, 32, 64])}


def _video_swin_params(trial: optuna.Trial) -> dict:
    return {**_video_params(trial), "embed_dim": trial.suggest_categorical("embed_dim", [24, 48])}


PARAMS = {"cusum": _cusum_params, "bocpd": _bocpd_params, "head_grad": _readout_params, "gwa": _readout_params,
          "tcn_scalar": _tcn_params, "hessian_tcn": _tcn_params,
          "r2plus1d": _r2plus1d_params, "video_swin": _video_swin_params}
TRAINED = {"tcn_scalar": train_tcn, "hessian_tcn": train_hessian_tcn}  # trained on the train split in every trial


def baseline_config(name: str, params: dict):
    """The baseline's config with `params` (dotted names = nested fields) set over its defaults."""
    default = (TCNConfig() if name in TRAINED else CONFIGS[name]() if name in CONFIGS
               else VIDEO_CONFIGS[name]() if name in VIDEO_CONFIGS else None)
    if default is None:
        raise ValueError(f"unknown baseline {name!r}; tunable: {sorted(PARAMS)}")
    data = dataclasses.asdict(default)
    for key, value in params.items():
        node, *path = data, *key.split(".")
        for k in path[:-1]:
            node = node[k]
        if path[-1] not in node:
            raise KeyError(f"baseline_config({name!r}): {key!r} is not a field of {type(default).__name__}")
        node[path[-1]] = value
    return from_dict(type(default), data, f"{name} config")


def space(name: str, train_runs: Sequence[LoadedRun] | None = None, *, corpus: str | Path | None = None,
          train_split: str = "train", video: dict | None = None) -> Callable[[optuna.Trial], Diagnoser]:
    """`make_diagnoser(trial)` of a named baseline; a TCN trains on `train_runs` in every trial, a video
    baseline on the `train_split` clips of `corpus`, with the VideoConfig fields of `video` set over the
    trial's (its budget: max_steps, threads, batch_size)."""
    if name not in PARAMS:
        raise ValueError(f"unknown baseline {name!r}; tunable: {sorted(PARAMS)}")
    if name in VIDEO_CONFIGS:
        if corpus is None:
            raise ValueError(f"space({name!r}): a video baseline needs corpus= to train on in each trial")
        return lambda trial: train_video(corpus, baseline_config(name, {**PARAMS[name](trial), **(video or {})}),
                                         train_split, progress=False, name=name)[0]
    if name in TRAINED:
        if not train_runs:
            raise ValueError(f"space({name!r}): the TCN needs train_runs to train in each trial")
        train = TRAINED[name]
        return lambda trial: train(list(train_runs), baseline_config(name, PARAMS[name](trial)), progress=False)[0]
    return lambda trial: make_baseline(name, baseline_config(name, PARAMS[name](trial)))


# ---------------------------------------------------------------- command line

@dataclass
class TuneConfig:
    baseline: str = "cusum"  # one of PARAMS
    n_trials: int = 25
    seed: int = 0
    split: str = "val"  # tuned on
    train_split: str = "train"  # the TCN's training runs
    score_from: int = SCORE_FROM
    video: dict = field(default_factory=dict)  # VideoConfig fields over every video trial's (budget: max_steps, threads)
    workers: int = 1  # processes tuning the one study at once (each loads the runs; worker k samples with seed + k)


RESUMABLE = ("n_trials", "workers")  # what a resumed study may change; any other field must match the saved config


def _load(corpus: str | Path, cfg: TuneConfig, progress: bool = True):
    """The validation runs (with frames for a video baseline) and the TCNs' training runs, checked."""
    val = load_runs(corpus, cfg.split, frames=cfg.baseline in VIDEO_CONFIGS, progress=progress)
    train = load_runs(corpus, cfg.train_split, frames=False, progress=progress) if cfg.baseline in TRAINED else None
    if cfg.baseline == "hessian_tcn":  # fail before any trial, naming the corpus and the config key
        require_hessian(val, cfg.split)
        require_hessian(train, cfg.train_split)
    return val, train


def _work(corpus: str | Path, cfg: TuneConfig, study_file: Path, worker: int = 0, runs=None) -> optuna.Study:
    """One process's share of the study in `study_file` (the whole of it when workers=1)."""
    val, train = runs or _load(corpus, cfg, progress=False)
    make = space(cfg.baseline, train, corpus=corpus, train_split=cfg.train_split, video=cfg.video)
    return tune(make, val, cfg.n_trials, cfg.seed + worker, score_from=cfg.score_from, storage=study_file,
                progress=cfg.workers == 1)[1]


def _run_workers(corpus: str | Path, cfg: TuneConfig, study_file: Path, study: optuna.Study) -> None:
    """`cfg.workers` processes on the one study (`study`: the parent's handle on its file); a bar counts its
    complete trials until all have exited."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has started torch's threads
    procs = [ctx.Process(target=_work, args=(str(corpus), cfg, study_file, k), name=f"tune-worker-{k}")
             for k in range(cfg.workers)]
    for p in procs:
        p.start()
    complete = lambda: len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))  # noqa: E731
    with tqdm(total=cfg.n_trials, initial=complete(), desc=f"{cfg.workers} workers", unit="trial") as bar:
        while any(p.is_alive() for p in procs):
            time.sleep(2)
            if (done := complete()) > bar.n:
                bar.update(done - bar.n)
        bar.update(max(0, complete() - bar.n))
    failed = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode != 0]
    if failed:
        raise SystemExit(f"eval.tune: {', '.join(failed)} failed (its error is printed above); the complete trials "
                         f"stay in {study_file}: rerun the same command to resume")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    parser = cli_parser("Tune a baseline's hyper-parameters on validation (optuna TPE, event-time AUPRC)", corpus=True)
    args = parser.parse_args(argv)
    cfg = load_config(TuneConfig, args.config, args.overrides)
    if cfg.baseline not in PARAMS:
        raise SystemExit(f"baseline={cfg.baseline!r} is not tunable; choose one of {sorted(PARAMS)}")
    if cfg.video and cfg.baseline not in VIDEO_CONFIGS:
        raise SystemExit(f"video={cfg.video} is for the video baselines {sorted(VIDEO_CONFIGS)}, not baseline={cfg.baseline!r}")
    if cfg.workers < 1:
        raise SystemExit(f"workers={cfg.workers}: need at least 1")
    out = Path(args.out)
    study_file = out / "study.journal"
    if study_file.exists():  # resume: the same study, maybe more trials or workers
        saved = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
        changed = sorted(k for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE and saved.get(k) != v)
        if changed:
            raise SystemExit(f"{out} holds a study with other settings ({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); "
                             f"use another --out, or delete {out} to start over")
        stale = fail_stale_trials(journal(study_file))
        print(f"resuming the study in {study_file}" + (f" ({stale} trial(s) left running by a killed process: "
                                                       f"marked failed, run again)" if stale else ""))
    save_config(cfg, out)
    # the parent's handle on the study file: every read syncs with what the workers wrote
    study = optuna.create_study(direction="maximize", study_name=STUDY, storage=journal(study_file), load_if_exists=True)
    runs = _load(args.corpus, cfg)  # loaded (and checked) here even with workers, to fail before any is started
    n_val = len(runs[0])
    if remaining(study, cfg.n_trials) <= 0:
        print(f"the study has its {cfg.n_trials} trials already: writing its results")
    elif cfg.workers == 1:
        _work(args.corpus, cfg, study_file, runs=runs)
    else:
        del runs  # each worker loads its own
        _run_workers(args.corpus, cfg, study_file, study)
    params = dict(study.best_params)
    best = {"baseline": cfg.baseline, "event_auprc": study.best_value, "params": params,
            "config": dataclasses.asdict(baseline_config(cfg.baseline, params)), "n_val_runs": n_val}
    (out / "best.json").write_text(json.dumps(best, indent=1) + "\n")
    trials = [{"number": t.number, "value": t.value, "params": t.params, "state": t.state.name,
               "seconds": (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None}
              for t in study.trials]
    (out / "trials.json").write_text(json.dumps(trials, indent=1, default=float) + "\n")
    values = np.array([t["value"] for t in trials if t["value"] is not None])
    seconds = sum(t["seconds"] or 0 for t in trials)
    print(f"{cfg.baseline}: best event-time AUPRC {study.best_value:.4f} on {n_val} {cfg.split} runs "
          f"({len(values)} complete trials, median {np.median(values):.4f}, {seconds / 60:.1f} process-minutes); params {params}")
    print(f"wrote {out / 'best.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
