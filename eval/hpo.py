"""Hyperband with and without early-stopping detectors: the main paper's Appendix M (Table 23) at this
machine's scale (issue 6 "HPO").

Three optuna studies with the same TPE sampler seed, the same search space, the same Hyperband pruner
and the same study name (optuna assigns a trial to a Hyperband bracket by a hash of study name and
trial number, so trial k lands in the same bracket in every arm):

    hyperband           Hyperband alone (SuccessiveHalving on the validation accuracy of each epoch)
    hyperband+tevid     + `diagnose.watch` on every trial: a confirmed alert whose name is in `prune_on`
                        prunes the trial at once (`diagnose.adapters.prune_on_alert`)
    hyperband+cusum     + CUSUM on the training-loss residuals (eval/baselines/cusum.py): an alarm
                        (frame score > `cusum_threshold` for `consecutive` frames) prunes the trial

A trial trains `arch` on `dataset` (factory archs and built-in datasets) for at most `epochs` "epochs" of
`epoch_steps` optimizer steps (warm-up then cosine over the full budget, as the factory's runs), reports
the validation accuracy after each epoch and returns the last one. Trial k is seeded by (seed, k), so
the first `n_startup` (random) trials train identically in all arms until a pruner stops them; after
them TPE sees different histories and the arms' suggestions part.

    python -m eval.hpo --out outputs/hpo/cpu [--trials 20] [--epochs 8] [--checkpoint DIR|none] [--seed 0] [key=value ...]

writes config.json (this HPOConfig, resolved), hpo.json (per arm: summary and every trial) and hpo.md
(the table, which is also printed). Without --checkpoint the monitor loads the shipped model
(`diagnose/default_checkpoint/`, with its calibration); `none` (or no shipped model) runs it with rule
symptoms only, and the output says which. The CUSUM arm's default operating point is the benchmark's
tuned CUSUM (docs/benchmark/issue7/metrics.json, "cusum": `tuned_params` and its FAR <= 5% `threshold`).
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
import torch

from capture.config import cli_parser, load_config, save_config
from capture.schema import KNOWN_CLASSES
from diagnose.adapters import prune_on_alert
from diagnose.api import watch
from diagnose.callbacks import jsonable as _jsonable
from diagnose.monitor import DEFAULT_CHECKPOINT
from eval.baselines.cusum import CusumConfig, cusum
from eval.baselines.residuals import LossResiduals, ResidualConfig, aggregate
from factory.config import TrainingConfig
from factory.job import build_job, cached_dataset, evaluate
from factory.loop import JobCallback, MonitorLoss, StepLoop
from factory.perturbations import Perturbation, RunSettings

ARMS = ("hyperband", "hyperband+tevid", "hyperband+cusum")
STUDY_NAME = "tevid-hpo"  # one name for every arm: same Hyperband bracket for the same trial number


def benchmark_cusum() -> CusumConfig:
    """The CUSUM of the benchmark report (docs/benchmark/issue7/metrics.json, "cusum"."tuned_params": 25 optuna
    trials on the cpu corpus's validation split, `python -m eval.tune`; docs/benchmark/issue7/README.md)."""
    return CusumConfig(k=0.35756352466042973, two_sided=True, aggregate="max", reset_at_h=False,
                       residuals=ResidualConfig(span=80.50845643882911, scale_span=16.333216017949866))


@dataclass
class HPOConfig:
    trials: int = 20  # per arm
    epochs: int = 8  # Hyperband's max_resource
    epoch_steps: int = 30  # optimizer steps per "epoch"
    batch_size: int = 32
    arch: str = "resnet"  # factory.archs name
    dataset: str = "mnist1d"  # factory built-in dataset
    image_size: int = 32
    max_train: int = 3000
    max_val: int = 500
    optimizer: str = "sgd"  # factory.job.make_optimizer name (sgd: Nesterov momentum 0.9)
    lr_min: float = 1e-2  # learning rate, log-uniform; SGD on this task collapses to chance above ~1
    lr_max: float = 5.0
    wd_min: float = 1e-6  # weight decay, log-uniform
    wd_max: float = 1e-2
    warmup_frac: float = 0.05
    min_resource: int = 1  # Hyperband's first rung (epochs)
    reduction_factor: int = 3
    n_startup: int = 10  # TPE's random trials
    seed: int = 0
    threads: int = 1
    cadence: int = 10  # frames every n steps, for the monitor and CUSUM (one of the cadences the shipped TEViD was trained on)
    checkpoint: str = "auto"  # TEViD directory | "auto" (the shipped model, if present) | "none" (rule symptoms only)
    prune_on: list[str] = field(default_factory=lambda: ["instability", "nan_inf", "exploding_gradients"])
    # the benchmark CUSUM's FAR <= 5% threshold on the cpu corpus's validation split, set by
    # `python -m eval.report` (docs/benchmark/issue7/metrics.json, "cusum"."threshold")
    cusum_threshold: float = 54.512767079482934
    cusum: CusumConfig = field(default_factory=benchmark_cusum)
    consecutive: int = 3  # frames in a row above the CUSUM threshold (the alert rule of docs/architecture.md §8)
    enqueue_lr: list[float] = field(default_factory=list)  # learning rates of the first trials (others sampled)
    arms: list[str] = field(default_factory=lambda: list(ARMS))

    def __post_init__(self):
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise ValueError(f"arms: unknown {unknown}; valid: {list(ARMS)}")
        if not 1 <= self.min_resource <= self.epochs:
            raise ValueError(f"min_resource must be in [1, epochs = {self.epochs}], got {self.min_resource}")
        if self.trials < 1 or self.epochs < 1 or self.epoch_steps < 1 or self.cadence < 1:
            raise ValueError(f"trials, epochs, epoch_steps and cadence must be >= 1, got {self.trials}, {self.epochs}, "
                             f"{self.epoch_steps}, {self.cadence}")
        if not 0 < self.lr_min < self.lr_max or not 0 < self.wd_min < self.wd_max:
            raise ValueError(f"need 0 < lr_min < lr_max and 0 < wd_min < wd_max, got lr [{self.lr_min}, {self.lr_max}], "
                             f"wd [{self.wd_min}, {self.wd_max}]")
        from diagnose.symptoms import SYMPTOM_NAMES

        valid = set(SYMPTOM_NAMES) | set(KNOWN_CLASSES) | {"unknown"}
        if set(self.prune_on) - valid:
            raise ValueError(f"prune_on: unknown alert name(s) {sorted(set(self.prune_on) - valid)}; valid: {sorted(valid)}")
        bad = [lr for lr in self.enqueue_lr if not self.lr_min <= lr <= self.lr_max]
        if bad:
            raise ValueError(f"enqueue_lr {bad} outside [lr_min, lr_max] = [{self.lr_min}, {self.lr_max}]")


def resolve_checkpoint(value: str | None) -> str | None:
    """The TEViD directory the monitor loads, or None for rule symptoms only."""
    if value in (None, "auto"):
        return str(DEFAULT_CHECKPOINT) if (DEFAULT_CHECKPOINT / "config.json").is_file() else None
    if value == "none":
        return None
    if not (Path(value) / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {value}: no config.json there (a diagnose.finetune 'final' directory "
                                f"is expected; or 'none' for rule symptoms only)")
    return str(value)


class CusumAlarm:
    """CUSUM of the standardised training-loss residuals (`cfg`, as `eval.baselines.cusum.CusumDetector`
    scores a run), streamed step by step and alarmed like the replay scores it: the frame score (frames at
    steps 0, cadence, 2 cadence, ...) aggregates the statistic over the steps since the previous frame
    (`cfg.aggregate`), and the alarm fires when it exceeds `threshold` for `consecutive` frames in a row
    (eval.metrics.alert_frames)."""

    def __init__(self, threshold: float, cfg: CusumConfig | None = None, cadence: int = 10, consecutive: int = 3):
        self.cfg = cfg = cfg or CusumConfig()
        self.threshold, self.cadence, self.consecutive = threshold, cadence, consecutive
        self.residuals = LossResiduals(cfg.residuals)
        self.state, self.pending, self.streak, self.steps = (0.0, 0.0), [], 0, 0
        self.scores: list[float] = []

    def update(self, loss: float) -> bool:
        """Add one optimizer step's loss; True at the frame where the alarm is confirmed."""
        c = self.cfg
        stat, self.state = cusum([self.residuals.update_one(loss)], c.k, c.two_sided, c.h if c.reset_at_h else None,
                                 state=self.state)
        self.pending.append(float(stat[0]))
        step, self.steps = self.steps, self.steps + 1
        if step % self.cadence:
            return False
        score, self.pending = aggregate(self.pending, 0.0, c.aggregate), []
        self.scores.append(score)
        self.streak = self.streak + 1 if score > self.threshold else 0
        return self.streak == self.consecutive


class _DetectorPruned(optuna.TrialPruned):
    pass


class PruneOnAlert(JobCallback):
    """hyperband+tevid: after each step, a confirmed monitor alert named in `names` prunes the trial
    (`diagnose.adapters.prune_on_alert`; the alert is kept as the trial's `pruned_on`)."""

    def __init__(self, trial: optuna.Trial, monitor, names: list[str]):
        self.trial, self.monitor, self.names = trial, monitor, names

    def on_step_end(self, loop: StepLoop) -> None:
        try:
            prune_on_alert(self.trial, self.monitor, loop.steps_done, names=self.names)
        except optuna.TrialPruned as err:
            self.trial.set_user_attr("pruned_on", self.trial.user_attrs["tevid_alerts"][0])
            raise _DetectorPruned(str(err)) from None


class PruneOnCusum(JobCallback):
    """hyperband+cusum: each step's loss goes to the `CusumAlarm`; its alarm prunes the trial."""

    def __init__(self, alarm: CusumAlarm):
        self.alarm = alarm

    def on_step_end(self, loop: StepLoop) -> None:
        if self.alarm.update(loop.loss.item()):
            raise _DetectorPruned(f"CUSUM alarm at step {loop.step}: frame score > {self.alarm.threshold} "
                                  f"for {self.alarm.consecutive} frames")


class HyperbandEpochs(JobCallback):
    """After every `epoch_steps` steps: the validation accuracy, reported to the trial (resource = epochs
    trained); Hyperband may prune there (`pruned_by` "hyperband")."""

    def __init__(self, trial: optuna.Trial, data, epoch_steps: int):
        self.trial, self.data, self.epoch_steps = trial, data, epoch_steps
        self.accs: list[float] = []

    def on_step_end(self, loop: StepLoop) -> None:
        if loop.steps_done % self.epoch_steps:
            return
        epoch = loop.steps_done // self.epoch_steps
        self.accs.append(evaluate(loop.job.model, self.data.x_val, self.data.y_val)[1])
        self.trial.report(self.accs[-1], epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_by", "hyperband")
            raise optuna.TrialPruned(f"Hyperband at epoch {epoch}")


def run_trial(trial: optuna.Trial, arm: str, cfg: HPOConfig, checkpoint: str | None, data) -> float:
    """Train one configuration; returns the last epoch's validation accuracy or raises TrialPruned.
    User attrs: pruned_by ("hyperband" | "monitor" | "cusum") and pruned_on (the monitor alert that
    pruned: name, source, step), steps, epochs_run, val_acc (per epoch),
    seconds; with the monitor: alerts (every alert, pruning or not) and tevid_labels (TEViD's label per
    window: how many of each); with CUSUM: cusum_max (the highest frame score).

    The trial is a factory job (`factory.job.build_job`, run by `factory.loop`): no perturbation, no
    augmentation, warm-up then cosine over the full budget; seeded by (seed, trial number), so trial k
    starts from the same weights and draws the same batches in every arm."""
    lr = trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True)
    wd = trial.suggest_float("weight_decay", cfg.wd_min, cfg.wd_max, log=True)
    training = TrainingConfig(steps=cfg.epochs * cfg.epoch_steps, batch_size=cfg.batch_size, warmup_frac=cfg.warmup_frac,
                              image_size=cfg.image_size)
    job = build_job(cfg.arch, data, cfg.optimizer, Perturbation(), training, cfg.seed * 100_003 + trial.number,
                    RunSettings(lr=lr, weight_decay=wd, augment=False))
    monitor = alarm = None
    callbacks: list[JobCallback] = []
    if arm == "hyperband+tevid":
        monitor = watch(job.model, job.optimizer, checkpoint if checkpoint is not None else False, cadence=cfg.cadence,
                        **({"modules": job.modules} if job.modules else {}))
        callbacks += [MonitorLoss(monitor), PruneOnAlert(trial, monitor, cfg.prune_on)]
    elif arm == "hyperband+cusum":
        alarm = CusumAlarm(cfg.cusum_threshold, cfg.cusum, cfg.cadence, cfg.consecutive)
        callbacks.append(PruneOnCusum(alarm))
    epochs = HyperbandEpochs(trial, data, cfg.epoch_steps)
    loop = StepLoop(job, [*callbacks, epochs])
    start = time.perf_counter()
    try:
        loop.run()
        return epochs.accs[-1]
    except _DetectorPruned:
        trial.set_user_attr("pruned_by", "monitor" if monitor is not None else "cusum")
        raise
    finally:
        if monitor is not None:
            monitor.remove()
            trial.set_user_attr("alerts", [{"name": a.name, "step": a.step, "source": a.source} for a in monitor.alerts])
            trial.set_user_attr("monitor_disabled", monitor.disabled_reason)
            labels = [p["label"] for p in monitor.predictions]
            trial.set_user_attr("tevid_labels", {k: labels.count(k) for k in sorted(set(labels))})
        if alarm is not None:
            trial.set_user_attr("cusum_max", max(alarm.scores, default=0.0))
        trial.set_user_attr("steps", loop.steps_done)
        trial.set_user_attr("epochs_run", loop.steps_done / cfg.epoch_steps)
        trial.set_user_attr("val_acc", epochs.accs)
        trial.set_user_attr("seconds", time.perf_counter() - start)


def run_arm(arm: str, cfg: HPOConfig, checkpoint: str | None, data) -> tuple[dict, list[dict]]:
    """One study; returns (summary, trials)."""
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.n_startup)
    pruner = optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource, max_resource=cfg.epochs,
                                            reduction_factor=cfg.reduction_factor)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner, study_name=STUDY_NAME)
    for lr in cfg.enqueue_lr:
        study.enqueue_trial({"lr": lr})
    start, cpu_start = time.perf_counter(), time.process_time()
    study.optimize(lambda t: run_trial(t, arm, cfg, checkpoint, data), n_trials=cfg.trials, catch=())
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    trials = [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
               "pruned_by": t.user_attrs.get("pruned_by"), **{k: t.user_attrs.get(k) for k in
               ("pruned_on", "epochs_run", "steps", "val_acc", "seconds", "alerts", "monitor_disabled", "tevid_labels",
                "cusum_max")
               if k in t.user_attrs}}
              for t in study.trials]
    return summarize(arm, trials, seconds, cpu_seconds), trials


def summarize(arm: str, trials: list[dict], seconds: float, cpu_seconds: float) -> dict:
    epochs = [t["epochs_run"] for t in trials]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    best = max(done, key=lambda t: t["value"]) if done else None
    seen = [a for t in trials if t.get("val_acc") for a in t["val_acc"]]
    alert_trials: dict[str, int] = {}
    tevid_labels: dict[str, int] = {}
    for t in trials:
        for name in sorted({a["name"] for a in t.get("alerts") or []}):
            alert_trials[name] = alert_trials.get(name, 0) + 1
        for label, n in (t.get("tevid_labels") or {}).items():
            tevid_labels[label] = tevid_labels.get(label, 0) + n
    cusum = [t["cusum_max"] for t in trials if "cusum_max" in t]
    return {"arm": arm, "trials": len(trials), "complete": len(done),
            "pruned_hyperband": sum(t["pruned_by"] == "hyperband" for t in trials),
            "pruned_detector": sum(t["pruned_by"] in ("monitor", "cusum") for t in trials),
            "epochs_mean": statistics.fmean(epochs), "epochs_std": statistics.pstdev(epochs), "epochs_total": sum(epochs),
            "best_val_acc": best["value"] if best else None, "best_params": best["params"] if best else None,
            "best_val_acc_any_epoch": max(seen) if seen else None, "wall_seconds": seconds,
            "cpu_seconds": cpu_seconds,  # this process's CPU time: the cost measure on a shared CPU
            "trials_with_alert": alert_trials, "tevid_windows": tevid_labels,
            "cusum_max": max(cusum) if cusum else None}


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def table(result: dict) -> str:
    cfg, arms = result["config"], result["arms"]
    lines = [f"# Hyperband with and without early-stopping detectors (paper App. M at CPU scale)", "",
             f"{cfg['trials']} trials per arm, {cfg['arch']} on {cfg['dataset']} ({cfg['image_size']}px), "
             f"{cfg['optimizer']}, lr log-uniform [{cfg['lr_min']:g}, {cfg['lr_max']:g}], weight decay log-uniform "
             f"[{cfg['wd_min']:g}, {cfg['wd_max']:g}]; up to {cfg['epochs']} epochs of {cfg['epoch_steps']} steps "
             f"(batch {cfg['batch_size']}); Hyperband(min {cfg['min_resource']}, max {cfg['epochs']}, eta {cfg['reduction_factor']}); "
             f"TPE seed {cfg['seed']}.", "",
             f"Monitor: {result['monitor_mode']}; prunes on {', '.join(cfg['prune_on'])}. "
             f"CUSUM: k {cfg['cusum']['k']:.3g}{' two-sided' if cfg['cusum']['two_sided'] else ''}, threshold "
             f"{cfg['cusum_threshold']:.4g} for {cfg['consecutive']} frames "
             f"(a frame every {cfg['cadence']} steps).", "",
             "| arm | trials | complete | pruned by Hyperband | pruned by detector | epochs / trial (mean ± sd) | "
             "epochs total | best val acc (complete) | best val acc (any epoch) | wall s | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        s = a["summary"]
        detector = "-" if name == "hyperband" else str(s["pruned_detector"])
        lines.append(f"| {name} | {s['trials']} | {s['complete']} | {s['pruned_hyperband']} | {detector} | "
                     f"{s['epochs_mean']:.2f} ± {s['epochs_std']:.2f} | {s['epochs_total']:.1f} | {_fmt(s['best_val_acc'])} | "
                     f"{_fmt(s['best_val_acc_any_epoch'])} | {s['wall_seconds']:.0f} | {s['cpu_seconds']:.0f} |")
    for name, a in arms.items():
        s = a["summary"]
        if name == "hyperband+tevid":
            names = ", ".join(f"{k} {v}" for k, v in s["trials_with_alert"].items()) or "none"
            windows = ", ".join(f"{k} {v}" for k, v in s["tevid_windows"].items()) or "none (no checkpoint, or no trial "\
                "reached a full window)"
            lines += ["", f"{name}: trials with a monitor alert of each name (pruning or not): {names}. "
                      f"TEViD windows by label: {windows}."]
        if name == "hyperband+cusum":
            lines += ["", f"{name}: highest CUSUM frame score of any trial {_fmt(s['cusum_max'], '.1f')} "
                      f"(threshold {cfg['cusum_threshold']:g})."]
    lines += ["", "## Trials", "", "| arm | # | lr | weight decay | state | pruned by | epochs | last val acc |",
              "|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        for t in a["trials"]:
            last = t["val_acc"][-1] if t.get("val_acc") else None
            by = (t["pruned_by"] or "-") + (f" ({t['pruned_on']['name']}, step {t['pruned_on']['step']})" if t.get("pruned_on") else "")
            lines.append(f"| {name} | {t['number']} | {t['params']['lr']:.3g} | {t['params']['weight_decay']:.2g} | "
                         f"{t['state'].lower()} | {by} | {t['epochs_run']:.2f} | {_fmt(last)} |")
    return "\n".join(lines) + "\n"


def run(cfg: HPOConfig, out: Path) -> dict:
    """Run every arm of `cfg` and write config.json, hpo.json and hpo.md under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    save_config(cfg, out)
    torch.set_num_threads(cfg.threads)
    data = cached_dataset(cfg.dataset, cfg.image_size, cfg.max_train, cfg.max_val, None)
    if data.modality != "image":
        raise ValueError(f"dataset {cfg.dataset!r} is {data.modality}: the HPO task needs an image dataset")
    mode = (f"TEViD ({checkpoint}) + rule symptoms" if checkpoint else
            "rule symptoms only (no TEViD checkpoint" + (": --checkpoint none)" if cfg.checkpoint == "none" else
                                                        f": {DEFAULT_CHECKPOINT} not found)"))
    result = {"config": asdict(cfg), "checkpoint": checkpoint, "monitor_mode": mode, "study_name": STUDY_NAME,
              "optuna": optuna.__version__, "arms": {}}
    verbosity, tevid_level = optuna.logging.get_verbosity(), logging.getLogger("tevid").level
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("tevid").setLevel(logging.ERROR)  # alerts are kept in each trial's user attrs
    try:
        for arm in cfg.arms:
            summary, trials = run_arm(arm, cfg, checkpoint, data)
            result["arms"][arm] = {"summary": summary, "trials": trials}
            print(f"{arm}: {summary['trials']} trials, {summary['epochs_total']:.1f} epochs, best "
                  f"{_fmt(summary['best_val_acc'])}, {summary['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    finally:
        optuna.logging.set_verbosity(verbosity)
        logging.getLogger("tevid").setLevel(tevid_level)
    (out / "hpo.json").write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    (out / "hpo.md").write_text(table(result))
    return result


def main(argv: list[str] | None = None) -> int:
    p = cli_parser(__doc__.split("\n")[0], checkpoint=True)
    p.add_argument("--trials", type=int, help="trials per arm (= trials=N)")
    p.add_argument("--epochs", type=int, help="max epochs per trial (= epochs=E)")
    p.add_argument("--seed", type=int, help="sampler and training seed (= seed=S)")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    for key in ("trials", "epochs", "seed", "checkpoint"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    cfg = load_config(HPOConfig, args.config, overrides)
    result = run(cfg, Path(args.out))
    print(table(result).split("\n## Trials")[0].rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
