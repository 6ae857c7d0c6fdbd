"""`diagnose.api.watch`: the one call that attaches the live monitor (`diagnose.monitor.Monitor`) to a training job.

Every argument is checked here, before any hook is attached, and each error names the argument, what it
got and what it takes; the monitor then attaches all or nothing.
"""
from __future__ import annotations

import os
from dataclasses import fields

import torch
import torch.nn as nn

from capture.recorder import CaptureConfig
from diagnose.callbacks import check_callbacks
from diagnose.monitor import Monitor, MonitorConfig
from diagnose.symptoms import Symptom
from diagnose.wrappers import unwrap_model, unwrap_optimizer


def _check_watch_args(model, optimizer, head, stop_on, log_dir, symptoms) -> None:
    """What `watch()` checks before anything is attached; each error names the argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"watch(model=...) takes a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")
    if optimizer is not None and not isinstance(unwrap_optimizer(optimizer), torch.optim.Optimizer):
        raise TypeError(f"watch(optimizer=...) takes a torch.optim.Optimizer (or an accelerate / Lightning wrapper of "
                        f"one) or None, got {type(optimizer).__name__}")
    if head is not None:
        if not isinstance(head, nn.Module):
            raise TypeError(f"watch(head=...) takes the head module itself (e.g. head=model.fc), got "
                            f"{type(head).__name__} {head!r}")
        if not any(m is head for m in unwrap_model(model).modules()):
            raise ValueError(f"watch(head=...): the {type(head).__name__} given is not a module of "
                             f"{type(model).__name__} (pass the model's own head, e.g. head=model.fc)")
    if not isinstance(stop_on, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in stop_on):
        raise TypeError(f"watch(stop_on=...) takes alert names (a str or a list of str), got {stop_on!r}")
    if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"watch(log_dir=...) takes a directory path (str or os.PathLike) or None, got "
                        f"{type(log_dir).__name__} {log_dir!r}")
    if symptoms is not None and (isinstance(symptoms, (str, Symptom)) or not all(isinstance(s, Symptom) for s in symptoms)):
        raise TypeError(f"watch(symptoms=...) takes a list of diagnose.symptoms.Symptom instances (e.g. "
                        f"default_symptoms()) or None, got {symptoms!r}")


def watch(model: nn.Module, optimizer=None, checkpoint=None, *, cadence: int | None = None, frame_size: int | None = None,
          callbacks=(), stop_on=None, log_dir=None, symptoms: list[Symptom] | None = None,
          head: nn.Module | None = None, dp=None, **options) -> Monitor:
    """Attach the monitor to `model` and `optimizer` (torch, accelerate- or Lightning-wrapped).

    checkpoint: a fine-tuned TEViD directory (weights + calibration.json, `diagnose.tevid.load_tevid`);
      None: `DEFAULT_CHECKPOINT` when it exists, else readouts and rule symptoms only; False: never TEViD.
    cadence, frame_size: one frame every `cadence` optimizer steps, S x S (S from the checkpoint). cadence None:
      the coarsest cadence the checkpoint was trained on (`diagnose.monitor.default_cadence`; 20 for the
      shipped model), 50 without one.
    callbacks: callables `f(alert)` or objects with `on_alert(alert)` / `on_frame(frame)` / `close()`
      (`diagnose.callbacks.MonitorCallback`; the sinks of `diagnose.sinks`).
    stop_on: alert names that set `monitor.should_stop` (e.g. {"nan_inf", "instability"}).
    log_dir: writes monitor.json (the resolved config), alerts.jsonl and readouts.jsonl there.
    symptoms: rule symptoms (default `diagnose.symptoms.default_symptoms()`; [] for none).
    dp: `diagnose.privacy.DPConfig`: DP telemetry (docs/selection_privacy.md). Every frame (maps and
      readouts) is one clipped + noised release of the capture batch's per-sample terms; `monitor.privacy`
      gives epsilon over the releases made, printed at `remove()`. Per-step losses, gradient and layer
      statistics are not released, so the rule symptoms see only the frames.
    options: `MonitorConfig` fields (grad_every, other_ranks, tevid_device, loss_from_head,
      max_activation_modules) and `capture.CaptureConfig` fields (modules, layouts, groups, ...).

    Every argument is checked before any hook is attached; if attaching fails halfway, whatever was
    attached is removed again.
    """
    mon_fields = {f.name for f in fields(MonitorConfig)} - {"cadence", "frame_size"}
    cap_fields = {f.name for f in fields(CaptureConfig)} - {"cadence", "frame_size"}
    unknown = set(options) - mon_fields - cap_fields
    if unknown:
        raise TypeError(f"watch(): unknown option(s) {sorted(unknown)}; valid: {sorted(mon_fields | cap_fields)}")
    config = MonitorConfig(cadence=cadence, frame_size=frame_size, **{k: v for k, v in options.items() if k in mon_fields})
    capture_options = {k: v for k, v in options.items() if k in cap_fields}
    CaptureConfig(cadence=cadence or 1, frame_size=frame_size or 32, **capture_options)  # checks the capture options now
    if dp is not None:
        from diagnose.privacy import DPConfig

        if not isinstance(dp, DPConfig):
            raise TypeError(f"watch(dp=...) takes a diagnose.privacy.DPConfig, got {type(dp).__name__}")
        if options.get("gwa_window", "step") != "step":
            raise ValueError("watch(dp=...) needs gwa_window='step': GWA over all samples since the last frame would "
                             "draw one release from `cadence` batches")
    if checkpoint is not None and checkpoint is not False and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"watch(checkpoint=...) takes a directory path, None (the shipped model) or False (rules "
                        f"only), got {type(checkpoint).__name__} {checkpoint!r}")
    callbacks = check_callbacks(callbacks)
    stop_on = (stop_on,) if isinstance(stop_on, str) else (() if stop_on is None else stop_on)
    _check_watch_args(model, optimizer, head, stop_on, log_dir, symptoms)
    return Monitor(model, optimizer, checkpoint, config=config, capture_options=capture_options, callbacks=callbacks,
                   stop_on=stop_on, log_dir=log_dir, symptoms=symptoms, head=head, dp=dp)
