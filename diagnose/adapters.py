"""Thin, import-guarded adapters of the live monitor (`diagnose.watch`) to the loops people use.

- `AccelerateLogger(accelerator)`: a monitor callback that sends alerts and frame readouts to
  `accelerator.log` (whatever trackers the Accelerator was built with), and `stop_all_ranks`, the
  DDP-safe way to act on `monitor.should_stop` (accelerate's `set_trigger` / `check_trigger`).
- `prune_on_alert(trial, monitor, step, value)`: reports to an optuna trial and raises
  `optuna.TrialPruned` on a confirmed alert.
- `TEViDLightningCallback`: a Lightning `Callback` (needs `lightning` or `pytorch_lightning`).
- `TEViDTrainerCallback`: a Hugging Face `TrainerCallback` (needs `transformers`).

The adapters only attach, feed the loss where the framework exposes it, and turn `should_stop` into
the framework's own stop request; all monitoring lives in `diagnose.monitor` (STYLE.md 6: the loop
never special-cases one callback type). When a framework is missing, its adapter is a stub whose
constructor raises an ImportError that names the package to install.
"""
from __future__ import annotations

import math

from diagnose.monitor import Monitor, watch
from diagnose.symptoms import Alert

# ---------------------------------------------------------------- accelerate (a dependency of the project)


class AccelerateLogger:
    """Monitor callback: `accelerator.log` of each alert (`<prefix>alert/<name>`: its probability, or 1.0
    for rules) and of each frame's readouts (`<prefix><readout>`), at the optimizer step they belong to.
    `accelerator.log` only logs on the main process, like every accelerate tracker."""

    def __init__(self, accelerator, prefix: str = "tevid/", readouts: bool = True):
        self.accelerator, self.prefix, self.readouts = accelerator, prefix, readouts

    def on_alert(self, alert: Alert) -> None:
        value = 1.0 if alert.probability is None else float(alert.probability)
        self.accelerator.log({f"{self.prefix}alert/{alert.name}": value}, step=alert.step)

    def on_frame(self, frame) -> None:
        if self.readouts:
            values = {f"{self.prefix}{k}": float(v) for k, v in frame.readouts.items() if math.isfinite(v)}
            self.accelerator.log(values, step=frame.step)


def stop_all_ranks(accelerator, monitor: Monitor) -> bool:
    """True on every process once the main process's monitor asked to stop. Call it on EVERY rank at
    the same point of each step (it is a collective: one all-reduce). Breaking out of the loop on rank
    0 alone would leave the other ranks waiting in their next all-reduce."""
    if monitor.should_stop:
        accelerator.set_trigger()
    return bool(accelerator.check_trigger())


# ---------------------------------------------------------------- optuna (a dependency of the project)


def prune_on_alert(trial, monitor: Monitor, step: int, value: float | None = None, names=None) -> None:
    """Report `value` (if given) to `trial` at `step`; if the monitor has a confirmed alert (any, or one
    of `names`), record the alerts in the trial's user attrs and raise `optuna.TrialPruned`."""
    import optuna

    if value is not None:
        trial.report(float(value), step)
    hits = [a for a in monitor.alerts if names is None or a.name in set(names)]
    if hits:
        trial.set_user_attr("tevid_alerts", [{"name": a.name, "step": a.step, "source": a.source} for a in hits])
        first = hits[0]
        raise optuna.TrialPruned(f"TEViD alert {first.name!r} ({first.source}) at step {first.step}: {first.message}")


# ---------------------------------------------------------------- Lightning (optional)

try:
    import lightning.pytorch as _pl
except ImportError:
    try:
        import pytorch_lightning as _pl  # type: ignore[no-redef]
    except ImportError:
        _pl = None

if _pl is not None:

    class TEViDLightningCallback(_pl.Callback):
        """Attach at `on_fit_start` to the module and its first optimizer; the loss comes from
        `on_before_backward`; `should_stop` becomes `trainer.should_stop`, agreed by all ranks through
        `trainer.strategy.reduce_boolean_decision` (as Lightning's EarlyStopping does)."""

        def __init__(self, checkpoint=None, **watch_kwargs):
            self.checkpoint, self.watch_kwargs = checkpoint, watch_kwargs
            self.monitor: Monitor | None = None
            self._state: dict | None = None

        def on_fit_start(self, trainer, pl_module):
            if self.monitor is None:
                self.monitor = watch(pl_module, trainer.optimizers[0], self.checkpoint, **self.watch_kwargs)
                if self._state:
                    self.monitor.load_state_dict(self._state)

        def on_before_backward(self, trainer, pl_module, loss):
            if self.monitor is not None:
                self.monitor.observe(loss=loss)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.monitor is not None:
                stop = trainer.strategy.reduce_boolean_decision(self.monitor.should_stop, all=False)
                trainer.should_stop = trainer.should_stop or stop

        def on_fit_end(self, trainer, pl_module):
            if self.monitor is not None:
                self.monitor.remove()

        def state_dict(self):
            return self.monitor.state_dict() if self.monitor is not None else {}

        def load_state_dict(self, state_dict):
            self._state = state_dict

else:

    class TEViDLightningCallback:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError("TEViDLightningCallback needs Lightning: neither `lightning` nor `pytorch_lightning` "
                              "imports here (pip install lightning). Without it, call diagnose.watch(model, optimizer) "
                              "in your own loop.")


# ---------------------------------------------------------------- Hugging Face transformers (optional)

try:
    import transformers as _hf
except ImportError:
    _hf = None


def _any_rank(flag: bool, device) -> bool:
    """True if `flag` is True on any process (one all-reduce when torch.distributed is initialised)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


if _hf is not None:

    class TEViDTrainerCallback(_hf.TrainerCallback):
        """Attach at `on_train_begin` to the Trainer's model and optimizer (the loss is recovered from the
        head's gradient: the Trainer does not hand per-step losses to callbacks); `should_stop` becomes
        `control.should_training_stop` on every rank (one all-reduce per step under DDP)."""

        def __init__(self, checkpoint=None, **watch_kwargs):
            self.checkpoint, self.watch_kwargs = checkpoint, watch_kwargs
            self.monitor: Monitor | None = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if self.monitor is None and model is not None and optimizer is not None:
                self.monitor = watch(model, optimizer, self.checkpoint, **self.watch_kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            if self.monitor is not None and _any_rank(self.monitor.should_stop, args.device):
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if self.monitor is not None:
                self.monitor.remove()

else:

    class TEViDTrainerCallback:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError("TEViDTrainerCallback needs Hugging Face `transformers`, which does not import here "
                              "(pip install transformers). Without it, call diagnose.watch(model, optimizer) in your "
                              "own loop.")
