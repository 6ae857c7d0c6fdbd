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
never special-cases one callback type). The two framework classes are built on first access (module
`__getattr__`): importing Lightning takes seconds, and users of the optuna or accelerate adapters should
not pay for it. When a framework is missing, its adapter is a stub whose constructor raises an
ImportError that names the package to install. Tested against lightning 2.6 and transformers 5.23
(tests/test_adapters_frameworks.py).
"""
from __future__ import annotations

import math

import torch.nn as nn

from diagnose.monitor import Monitor
from diagnose.api import watch
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


# ---------------------------------------------------------------- shared by the framework adapters


def find_head(model: nn.Module) -> nn.Linear | None:
    """The classifier head of a framework's model, where `capture.find_head(model)` sees none: the
    `get_classifier()` of the first submodule that has one (a LightningModule holding a timm model),
    else a Hugging Face model's `get_output_embeddings()` (its LM head) when that is a Linear."""
    from capture.hookpoints import find_head as capture_find_head

    for module in model.modules():
        head = capture_find_head(module)
        if head is not None:
            return head
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


def _watch(model, optimizer, checkpoint, watch_kwargs: dict) -> Monitor:
    return watch(model, optimizer, checkpoint, **{"head": find_head(model), **watch_kwargs})


def _any_rank(flag: bool, device) -> bool:
    """True if `flag` is True on any process (one all-reduce when torch.distributed is initialised)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _lightning():
    """`lightning.pytorch`, else `pytorch_lightning`, else None."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl  # type: ignore[no-redef]
        except ImportError:
            return None
    return pl


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


# ---------------------------------------------------------------- Lightning (optional)


def _lightning_callback() -> type:
    pl = _lightning()
    if pl is None:
        class TEViDLightningCallback:
            def __init__(self, *args, **kwargs):
                raise ImportError("TEViDLightningCallback needs Lightning: neither `lightning` nor `pytorch_lightning` "
                                  "imports here (pip install lightning). Without it, call diagnose.watch(model, optimizer) "
                                  "in your own loop.")

        return TEViDLightningCallback

    class TEViDLightningCallback(pl.Callback):
        """Attach at `on_fit_start` to the LightningModule and its first optimizer (`monitor` is the
        `Monitor`; each fit attaches a new one, removed at `on_fit_end` or `on_exception`). The loss of
        each micro-batch comes from `on_before_backward`, undoing what Lightning did to it first: the
        1/accumulate_grad_batches of automatic optimisation and a "16-mixed" GradScaler's scale.
        `should_stop` becomes `trainer.should_stop`, agreed by all ranks through
        `trainer.strategy.reduce_boolean_decision` (as Lightning's EarlyStopping does); Lightning stops
        after that batch unless `min_epochs` / `min_steps` are not met yet. `state_dict` (the monitor's)
        is saved in Lightning checkpoints and restored on resume."""

        def __init__(self, checkpoint=None, **watch_kwargs):
            self.checkpoint, self.watch_kwargs = checkpoint, watch_kwargs
            self.monitor: Monitor | None = None
            self._state: dict | None = None
            self._attached = False

        def on_fit_start(self, trainer, pl_module):
            if self._attached:
                return
            self.monitor = _watch(pl_module, trainer.optimizers[0], self.checkpoint, self.watch_kwargs)
            self._attached = True
            if self._state:
                self.monitor.load_state_dict(self._state)
            self._state = None

        def on_before_backward(self, trainer, pl_module, loss):
            if not self._attached:
                return
            loss = loss.detach()
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None and scaler.is_enabled():
                scale = getattr(scaler, "_scale", None)  # a tensor: dividing by it needs no host sync
                loss = loss / (scale.to(loss.device) if scale is not None else scaler.get_scale())
            if pl_module.automatic_optimization:
                loss = loss * trainer.accumulate_grad_batches
            self.monitor.observe(loss=loss)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self._attached:
                stop = trainer.strategy.reduce_boolean_decision(self.monitor.should_stop, all=False)
                trainer.should_stop = trainer.should_stop or stop

        def on_fit_end(self, trainer, pl_module):
            self._detach()

        def on_exception(self, trainer, pl_module, exception):
            self._detach()

        def _detach(self) -> None:
            if self._attached:
                self.monitor.remove()
                self._attached = False

        def state_dict(self):
            return self.monitor.state_dict() if self.monitor is not None else {}

        def load_state_dict(self, state_dict):
            if state_dict and self._attached:  # strategies that restore after setup (e.g. DeepSpeed)
                self.monitor.load_state_dict(state_dict)
            elif state_dict:
                self._state = state_dict

    return TEViDLightningCallback


# ---------------------------------------------------------------- Hugging Face transformers (optional)


def _trainer_callback() -> type:
    hf = _transformers()
    if hf is None:
        class TEViDTrainerCallback:
            def __init__(self, *args, **kwargs):
                raise ImportError("TEViDTrainerCallback needs Hugging Face `transformers`, which does not import here "
                                  "(pip install transformers). Without it, call diagnose.watch(model, optimizer) in your "
                                  "own loop.")

        return TEViDTrainerCallback

    class TEViDTrainerCallback(hf.TrainerCallback):
        """Attach at `on_train_begin` to the Trainer's model and optimizer (accelerate's wrapper: its inner
        torch optimizer steps only at the end of each gradient-accumulation cycle, so only optimizer steps
        count); each `train()` attaches a new `monitor`, removed at `on_train_end`. The Trainer hands no
        per-step loss to callbacks: the loss is recovered from the head's gradient (`find_head`: a
        `get_classifier()`, else the model's output embeddings; pass `head=` otherwise). `should_stop`
        becomes `control.should_training_stop` on every rank (one all-reduce per step under DDP)."""

        def __init__(self, checkpoint=None, **watch_kwargs):
            self.checkpoint, self.watch_kwargs = checkpoint, watch_kwargs
            self.monitor: Monitor | None = None
            self._attached = False

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if not self._attached and model is not None and optimizer is not None:
                self.monitor = _watch(model, optimizer, self.checkpoint, self.watch_kwargs)
                self._attached = True

        def on_step_end(self, args, state, control, **kwargs):
            if self._attached and _any_rank(self.monitor.should_stop, args.device):
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if self._attached:
                self.monitor.remove()
                self._attached = False

    return TEViDTrainerCallback


_LAZY = {"TEViDLightningCallback": _lightning_callback, "TEViDTrainerCallback": _trainer_callback,
         "_pl": _lightning, "_hf": _transformers}


def __getattr__(name: str):
    """The framework adapters (and `_pl` / `_hf`, the frameworks or None), imported on first access."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _LAZY[name]()
    globals()[name] = value
    return value
