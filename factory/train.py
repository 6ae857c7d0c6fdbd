"""One factory run: train a perturbed job with capture on, evaluate it (privileged), label it, and
publish its run store. The capture path is the one a live job uses (`capture.attach`).

`run_one(spec, cfg, corpus_dir)` returns the run's manifest record. The job is built once from the
spec (`factory.job.job_from_spec`) and run by the one step loop (`factory.loop.run_job`) with the
factory's hooks, in this order: `CaptureFrames` (frames into the run store, the top Hessian
eigenvalue), `LyapunovWindows` (the finite-horizon Lyapunov proxy), `DivergenceStop`, `Validation`
(privileged evaluation per "epoch") and `Labelling` (the run's label from all of that, at the end).
A run that diverges is data: it stops after `divergence_patience` non-finite losses and is stored and
labeled like any other.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from capture.hessian import HessianTracker
from capture.readouts import READOUT_NAMES
from capture.recorder import Capture, CaptureConfig, attach
from capture.store import RunWriter
from factory.config import FactoryConfig, LabelConfig, TrainingConfig
from factory.datasets import TaskData
# the job's ingredients, importable from here as before factory.job existed
from factory.job import (Batches, cached_dataset, evaluate, job_from_spec, loss_fn, lr_schedule,  # noqa: F401
                         make_optimizer, run_settings, step_lr)
from factory.labeler import label_run
from factory.loop import JobCallback, StepLoop, run_job
from factory.perturbations import Perturbation, watermark
from factory.spec import RunSpec


class LyapunovProbe:
    """Finite-horizon Lyapunov proxy of the real optimizer update (paper Algorithm 1, by finite
    differences): a clone of model and optimizer state starts `eps` away along a random direction
    and takes the same H steps on the same batches; per step the separation's growth factor is
    logged and the clone is pulled back to distance `eps` (Benettin renormalisation)."""

    def __init__(self, make_model, make_opt, model, optimizer, eps_rel: float, seed: int):
        self.model = model
        self.clone = make_model()
        self.clone.load_state_dict(model.state_dict())
        self.clone.train()
        self.opt = make_opt(self.clone.parameters())
        self.opt.load_state_dict(optimizer.state_dict())
        gen = torch.Generator().manual_seed(seed)
        params = [p for p in model.parameters()]
        norm = torch.sqrt(sum((p.detach().float() ** 2).sum() for p in params))
        self.eps = float(eps_rel * norm) or eps_rel
        direction = [torch.randn(p.shape, generator=gen) for p in params]
        scale = self.eps / float(torch.sqrt(sum((d**2).sum() for d in direction)))
        with torch.no_grad():
            for c, d in zip(self.clone.parameters(), direction):
                c.add_(d * scale)
        self.log_alpha: list[float] = []

    def step(self, x, y, lr: float, perturbation: Perturbation, step: int, label_smoothing: float = 0.0) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss = loss_fn(self.clone(x), y, label_smoothing)  # the job's own loss: the same update map
        loss.backward()
        perturbation.before_step(step, self.clone, self.opt)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            diffs = [c - p for c, p in zip(self.clone.parameters(), self.model.parameters())]
            dist = float(torch.sqrt(sum((d.float() ** 2).sum() for d in diffs)))
            self.log_alpha.append(math.log(max(dist / self.eps, 1e-12)) if math.isfinite(dist) else math.inf)
            if math.isfinite(dist) and dist > 0:
                for c, p, d in zip(self.clone.parameters(), self.model.parameters(), diffs):
                    c.copy_(p + d * (self.eps / dist))


# ------------------------------------------------------------------ the factory's hooks
class CaptureFrames(JobCallback):
    """Capture on the job's model and optimizer (`capture.attach`, the live path) into the run store,
    once per step after backward; with `hessian_every` > 0 also the top Hessian eigenvalue at every
    `hessian_every`-th frame, on a hook-free copy made before capture attaches (same parameters and
    batch as the frame)."""

    def __init__(self, config: CaptureConfig, sink: RunWriter, hessian_every: int = 0):
        self.config, self.sink, self.hessian_every = config, sink, hessian_every
        self.capture: Capture | None = None
        self.hessian: HessianTracker | None = None

    def on_train_start(self, loop: StepLoop) -> None:
        job = loop.job
        if self.hessian_every:
            self.hessian = HessianTracker(job.model, self.hessian_every, seed=job.seed)
        self.capture = attach(job.model, self.config, optimizer=job.optimizer, sink=self.sink)

    def on_after_backward(self, loop: StepLoop) -> None:
        frame = self.capture.step(loop.loss, lr=loop.lr)
        if self.hessian is not None and frame is not None:
            self.hessian.on_frame(loss_fn, loop.x, loop.y)

    def on_train_end(self, loop: StepLoop) -> None:
        self._close()

    def on_exception(self, loop: StepLoop, error: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.capture is not None:  # hand the last steps' losses to the store, remove the hooks
            self.capture.__exit__(None, None, None)


class LyapunovWindows(JobCallback):
    """`LyapunovProbe` windows of `horizon` steps starting at the steps in `starts`: the probe forks at
    the start of its first step (before the update), then follows the job step by step."""

    def __init__(self, starts: list[int], horizon: int, eps: float, reference: int | None = None):
        self.starts, self.horizon, self.eps, self.reference = set(starts), horizon, eps, reference
        self.windows: list[tuple[int, list[float]]] = []  # (start step, log growth factor per step)
        self._probe: LyapunovProbe | None = None
        self._start = 0

    def on_step_start(self, loop: StepLoop) -> None:
        if loop.step in self.starts:
            job = loop.job
            self._probe = LyapunovProbe(job.make_model, job.make_optimizer, job.model, job.optimizer, self.eps, job.seed + loop.step)
            self._start = loop.step

    def on_step_end(self, loop: StepLoop) -> None:
        if self._probe is not None:
            self._probe.step(loop.x, loop.y, loop.lr, loop.job.perturbation, loop.step, loop.job.settings.label_smoothing)
            if len(self._probe.log_alpha) == self.horizon:
                self.windows.append((self._start, self._probe.log_alpha))
                self._probe = None


class DivergenceStop(JobCallback):
    """Stops the job after `patience` non-finite losses in a row (`diverged`)."""

    def __init__(self, patience: int):
        self.patience, self.nonfinite_run, self.diverged = patience, 0, False

    def on_step_end(self, loop: StepLoop) -> None:
        self.nonfinite_run = 0 if math.isfinite(loop.loss.item()) else self.nonfinite_run + 1
        if self.nonfinite_run >= self.patience:
            self.diverged = loop.should_stop = True


class Validation(JobCallback):
    """Privileged evaluation after every `every`-th step (one "epoch") and at the step that stops the
    job: validation loss, accuracy and per-sample correctness, and the correctness on the poisoned
    set `x_poison` (samples stamped with their class's watermark) and on the counterfactual set
    `x_counter` (stamped with another class's watermark); both None for text."""

    def __init__(self, x_val: torch.Tensor, y_val: torch.Tensor, x_poison: torch.Tensor | None, every: int,
                 x_counter: torch.Tensor | None = None):
        self.x_val, self.y_val, self.x_poison, self.x_counter, self.every = x_val, y_val, x_poison, x_counter, every
        self.val_loss, self.val_acc, self.val_correct, self.epoch_step = [], [], [], []
        self.poison_correct, self.counter_correct = [], []

    def on_step_end(self, loop: StepLoop) -> None:
        if (loop.step + 1) % self.every == 0 or loop.should_stop:
            vl, va, vc = evaluate(loop.job.model, self.x_val, self.y_val)
            self.val_loss.append(vl), self.val_acc.append(va), self.val_correct.append(vc), self.epoch_step.append(loop.step + 1)
            if self.x_poison is not None:
                self.poison_correct.append(evaluate(loop.job.model, self.x_poison, self.y_val)[2])
            if self.x_counter is not None:
                self.counter_correct.append(evaluate(loop.job.model, self.x_counter, self.y_val)[2])


class Labelling(JobCallback):
    """At the end of the job: its label from the store's public series and the privileged signals
    (`factory.labeler.label_run`), and those signals written to the store's privileged group."""

    def __init__(self, writer: RunWriter, spec: RunSpec, labels: LabelConfig, validation: Validation, lyapunov: LyapunovWindows):
        self.writer, self.spec, self.labels, self.validation, self.lyapunov = writer, spec, labels, validation, lyapunov
        self.result: dict | None = None

    def on_train_end(self, loop: StepLoop) -> None:
        writer, val, data = self.writer, self.validation, loop.job.data
        ref_start = self.lyapunov.reference
        lyap_windows = [w for w in self.lyapunov.windows if w[0] != ref_start]
        reference = next((np.asarray(a) for s, a in self.lyapunov.windows if s == ref_start), None)
        signals = {
            "train_loss": writer.train_loss,
            "frame_step": writer.frame_steps,
            "gwa": writer.frame_readouts[:, READOUT_NAMES.index("gwa")],
            "epoch_step": np.asarray(val.epoch_step),
            "val_loss": np.asarray(val.val_loss),
            "val_acc": np.asarray(val.val_acc),
            "val_correct": np.asarray(val.val_correct),
            "poison_correct": np.asarray(val.poison_correct, dtype=bool) if val.poison_correct else None,
            "counter_correct": np.asarray(val.counter_correct, dtype=bool) if val.counter_correct else None,
            "val_labels": val.y_val.numpy() if data.modality != "text" else None,
            "lyapunov": lyap_windows,
            "lyapunov_reference": reference,
        }
        self.result = label_run(signals, self.spec, loop.job.perturbation, data, self.labels, loop.steps_done)
        for key in ("epoch_step", "val_loss", "val_acc", "val_correct"):
            writer.write_privileged(key, signals[key])
        if signals["poison_correct"] is not None:
            writer.write_privileged("poison_correct", signals["poison_correct"])
            writer.write_privileged("val_labels", signals["val_labels"])
        if signals["counter_correct"] is not None:
            writer.write_privileged("counter_correct", signals["counter_correct"])
        if lyap_windows:
            writer.write_privileged("lyapunov_start", np.asarray([s for s, _ in lyap_windows]))
            writer.write_privileged("lyapunov_log_alpha", np.asarray([a for _, a in lyap_windows]))
        if reference is not None:
            writer.write_privileged("lyapunov_reference", reference, attrs={"start": int(ref_start)})
        # the rules' statistics come from validation data: privileged, like the signals behind them
        writer.write_privileged("labeling", np.zeros(0), attrs={"rules": self.result["rules"]})


def validation_sets(data: TaskData, tc: TrainingConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x_val, y_val, x_poison, x_counter) of a run (privileged): the clean validation set, the poisoned
    one (`watermark` of the true class, in the corpus's `tc.watermark` style) and the counterfactual one
    (the watermark of the next class, y + 1 mod K);
    or for text non-overlapping windows of the validation stream, at most `max_val`, and neither."""
    if data.modality == "text":
        n_win = min(tc.max_val, (len(data.x_val) - 1) // tc.lm_context)
        starts = torch.arange(n_win) * tc.lm_context
        offs = torch.arange(tc.lm_context)
        return data.x_val[starts[:, None] + offs], data.x_val[starts[:, None] + offs + 1], None, None
    k, style = data.num_classes, tc.watermark
    return (data.x_val, data.y_val, watermark(data.x_val, data.y_val, k, style=style),
            watermark(data.x_val, (data.y_val + 1) % k, k, style=style))


# ------------------------------------------------------------------ one run
def run_one(spec: RunSpec, cfg: FactoryConfig, corpus: Path, overwrite: bool = False) -> dict:
    t0 = time.time()
    job = job_from_spec(spec, cfg)
    tc = job.training  # the config's, or a drawn run's own length, batch size and epoch
    data, pert = job.data, job.perturbation
    x_val, y_val, x_poison, x_counter = validation_sets(data, tc)

    store_path = corpus / "runs" / f"{spec.run_id}.zarr"
    store_path.parent.mkdir(parents=True, exist_ok=True)
    writer = RunWriter(store_path, cfg.capture.frame_size, spec=spec.to_dict(), overwrite=overwrite)
    ccfg = CaptureConfig(cadence=cfg.capture.cadence, frame_size=cfg.capture.frame_size, modules=job.modules)
    lyap_starts = sorted({int(f * tc.steps) for f in np.linspace(0.5, 0.9, tc.lyapunov_windows)}) if tc.lyapunov_windows else []
    reference = int(tc.lyapunov_reference * tc.steps) if tc.lyapunov_windows and tc.lyapunov_reference else None
    capture = CaptureFrames(ccfg, writer, tc.hessian_every)
    lyapunov = LyapunovWindows(lyap_starts + ([reference] if reference is not None else []), tc.lyapunov_horizon,
                               tc.lyapunov_eps, reference=reference)
    divergence = DivergenceStop(tc.divergence_patience)
    validation = Validation(x_val, y_val, x_poison, tc.eval_every, x_counter)
    labelling = Labelling(writer, spec, cfg.labels, validation, lyapunov)
    with writer:  # any exception below removes the temporary store
        loop = run_job(job, [capture, lyapunov, divergence, validation, labelling])
        status = "diverged" if divergence.diverged else "complete"
        label = labelling.result
        extra = {}
        if capture.hessian is not None:  # public: a model quantity on the training batch, no validation data
            writer.set_frame_array("hessian_top", capture.hessian.series())
            extra["hessian"] = capture.hessian.metadata()  # its settings and cost (seconds, included in `seconds`)
        writer.finalize(
            label=label["label"], onset_step=label["onset_step"], trigger_step=label["trigger_step"],
            online_label=label["online_label"], status=status,
            perturbation=pert.describe(), capture=capture.capture.metadata(), training=asdict(tc), epoch_steps=tc.eval_every,
            seconds=round(time.time() - t0, 2), num_classes=data.num_classes, modality=data.modality, **extra,
        )
    return {
        **spec.to_dict(),
        "label": label["label"],
        "onset_step": label["onset_step"],
        "trigger_step": label["trigger_step"],
        "online_label": label["online_label"],
        "injected": pert.injected,
        "status": status,
        "steps": loop.steps_done,
        "n_frames": writer.n_frames,
        "seconds": round(time.time() - t0, 2),
        "store": str(store_path.relative_to(corpus)),
    }
