"""The live monitor: one call attaches TEViD and the rule symptoms to a running training job.

    monitor = diagnose.watch(model, optimizer)            # nothing else changes in the loop
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        if monitor.should_stop: break                      # only if stop_on=... was given
    monitor.alerts                                         # [Alert(name, step, source, probability, message, ...)]
    monitor.remove()                                       # or `with diagnose.watch(...) as monitor:`

How it works (docs/architecture.md, docs/monitor.md): the capture hooks (`capture.attach`, one code path
with the factory) build a frame every `cadence` optimizer steps; an optimizer step post-hook drives them,
so only real optimizer steps count (gradient accumulation, GradScaler-skipped steps). At each frame the
monitor runs the rule symptoms (`diagnose.symptoms`) on the evidence of the steps since the previous frame
(`diagnose.evidence`) and, with a checkpoint, the TEViD stream (`diagnose.stream`: the last T frames ->
TEViD -> the calibrated decision rule), then hands frame and alerts to the callbacks
(`diagnose.callbacks`). Everything is moved to the host once per frame. The parts:

    diagnose.loss_recovery   the per-step loss: observed, or recovered from the head's gradient
    diagnose.layer_stats     activation and gradient statistics for the rules
    diagnose.evidence        what the rules see, with and without DP telemetry
    diagnose.stream          TEViD over the last T frames + `decide` (shared with eval.replay)
    diagnose.tevid_alerts    TEViD's alerts with where they point and a first remedy
    diagnose.callbacks       callbacks, guarded one by one; the JSON-lines log

This module is the glue: the hooks on the user's model and optimizer, the fault guard, the lifecycle
and the state (a little over 400 lines; each concern it wires lives in one of the parts above).

A fault inside the monitor never reaches the training job: it is caught, logged once on the "tevid"
logger, and the monitor removes its hooks (`disabled_reason` says why). A user callback's exception is
logged once and skipped. Mistakes in the call itself (a wrong argument, a model with no hook points, a
checkpoint that does not load) raise at `watch()`, before any hook is attached.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from capture.checks import check_bool, check_choice, check_int
from capture.hooks import forward_hook, forward_pre_hook, step_post_hook
from capture.recorder import CaptureConfig, Frame, _first_tensor, attach
from diagnose.callbacks import CallbackList, JsonlSink, jsonable
from diagnose.evidence import ReleasedEvidence, StepEvidence
from diagnose.stream import open_stream, trained_cadences
from diagnose.layer_stats import LayerStatsHooks, activation_modules, sync_layers
from diagnose.loss_recovery import loss_from_logits_grad, recover_loss  # noqa: F401 - public from here too
from diagnose.wrappers import dist_info as _dist_info, unwrap_model, unwrap_optimizer  # noqa: F401 - public here too
from diagnose.symptoms import SYMPTOM_NAMES, Alert, DeadUnits, SaturatedActivations, Symptom, SymptomTracker

# the shipped model, used by checkpoint=None; TEVID_DEFAULT_CHECKPOINT points it elsewhere (tests of the
# rules-only monitor point it at nothing)
DEFAULT_CHECKPOINT = Path(os.environ.get("TEVID_DEFAULT_CHECKPOINT") or Path(__file__).resolve().parent / "default_checkpoint")
WINDOW = 10  # T frames per TEViD window, unless the checkpoint's data config says otherwise
DEFAULT_CADENCE = 50  # the cadence of a monitor whose checkpoint does not say what it was trained on (or rules only)
logger = logging.getLogger("tevid")


def default_cadence(checkpoint=None) -> int:
    """The live cadence for `checkpoint` (None: the shipped model; False: none): the coarsest frame cadence the
    model was trained on (its corpus's cadence times its windows' largest frame spacing), so a job is read at a
    pace the model has seen; DEFAULT_CADENCE when there is no model or it does not say."""
    if checkpoint is False:
        return DEFAULT_CADENCE
    try:
        cadences = trained_cadences(DEFAULT_CHECKPOINT if checkpoint is None else checkpoint)
    except ValueError as err:  # loading the model reports a damaged checkpoint; the cadence falls back
        logger.warning("%s; cadence %d", err, DEFAULT_CADENCE)
        return DEFAULT_CADENCE
    return max(cadences) if cadences else DEFAULT_CADENCE


@dataclass
class MonitorConfig:
    cadence: int | None = None  # one frame (and one round of checks) every `cadence` optimizer steps; None: the
    # coarsest cadence the TEViD checkpoint was trained on (`diagnose.stream.trained_cadences`), else DEFAULT_CADENCE
    frame_size: int | None = None  # S; None: the checkpoint's encoder size, else 32
    grad_every: int | None = None  # gradient statistics every n optimizer steps; None: = cadence
    other_ranks: str = "off"  # ranks > 0 under DDP: "off" (no hooks) | "capture" (capture their shard only)
    tevid_device: str = "cpu"  # where TEViD runs: "cpu" | "model" (the watched model's device)
    loss_from_head: bool = True  # recover the loss from the head's logits gradient when not observed
    max_activation_modules: int = 32  # ReLU / tanh / sigmoid modules hooked for dead / saturated units

    def __post_init__(self):
        check_int("cadence", self.cadence, 1, optional=True)
        check_int("frame_size", self.frame_size, 2, optional=True)
        check_int("grad_every", self.grad_every, 1, optional=True)
        check_choice("other_ranks", self.other_ranks, ("off", "capture"))
        check_choice("tevid_device", self.tevid_device, ("cpu", "model"))
        check_bool("loss_from_head", self.loss_from_head)
        check_int("max_activation_modules", self.max_activation_modules, 0)


class _RingSink:
    """Capture sink that keeps the last `maxlen` frames (the monitor keeps its own per-step losses)."""

    def __init__(self, maxlen: int):
        self.frames: deque[Frame] = deque(maxlen=maxlen)

    def append_frame(self, frame: Frame) -> None:
        self.frames.append(frame)

    def append_steps(self, loss: list[float], lr: list[float]) -> None:
        pass


class Monitor:
    """The handle `watch()` returns. Public: `alerts`, `should_stop`, `observe()`, `remove()`,
    `readouts` (one dict per frame), `predictions` (TEViD, per frame), `frames` (the last T),
    `disabled_reason`, `role` ("diagnose" | "capture" | "off"), `rank`, `world_size`."""

    def __init__(self, model: nn.Module, optimizer, checkpoint=None, *, config: MonitorConfig,
                 capture_options: dict | None = None, callbacks=(), stop_on=None, log_dir=None,
                 symptoms: list[Symptom] | None = None, head: nn.Module | None = None, dp=None):
        self.config = config
        self.alerts: list[Alert] = []
        self.readouts: list[dict] = []
        self.predictions: list[dict] = []
        self.should_stop = False
        self.disabled_reason: str | None = None
        self.step_count = 0
        self.log_dir: Path | None = None
        self.rank, self.world_size = _dist_info()
        self.role = "diagnose" if self.rank == 0 else config.other_ranks
        if config.cadence is None:  # resolved on every rank alike, from the checkpoint's files (not its weights)
            config.cadence = default_cadence(checkpoint)
        self.model = unwrap_model(model)
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.callbacks = CallbackList(callbacks)
        self.tracker = SymptomTracker(symptoms)
        self.stop_on = frozenset(stop_on or ())
        self.capture = self.dp = self.stream = None
        self.tevid = self.calibration = self.checkpoint = None
        self.window = WINDOW
        self._off = self.role == "off"
        self._dp_reported = False
        self._handles: list = []
        self._opt_handles: list = []
        self.layers: LayerStatsHooks | None = None  # activation statistics for the rules, at capture steps only
        self._armed = True  # step 0 is a capture step
        self._incomplete_warned = False
        self._check_stop_on()
        if self.role == "off":
            return
        if self.role == "diagnose":
            self._load_tevid(checkpoint)
        options = dict(capture_options or {})
        if dp is not None:
            from diagnose.privacy import DPTelemetry

            options["gwa_window"] = "step"  # one release = one batch (watch() rejects an explicit "frame")
            self.dp = DPTelemetry(dp)
        self.capture_config = CaptureConfig(cadence=config.cadence, frame_size=config.frame_size or 32, **options)
        self._sink = _RingSink(self.window)
        read_grads = self.role == "diagnose"
        self.evidence = (ReleasedEvidence(self.dp) if self.dp is not None else
                         StepEvidence(self.model, self.optimizer, config.grad_every or config.cadence, read_grads,
                                      warn_unknown_loss=config.loss_from_head))
        try:  # all or nothing: a failure while attaching removes whatever was attached
            self.capture = attach(self.model, self.capture_config, head=head, optimizer=self.optimizer,
                                  sink=self._sink, release=self.dp)
            self._register_hooks()
            if log_dir is not None:
                self._open_log(Path(log_dir))
        except BaseException:
            self._detach()
            raise

    # ---------------------------------------------------------------- setup
    def _check_stop_on(self) -> None:
        from capture.schema import CLASSES

        valid = set(SYMPTOM_NAMES) | {s.name for s in self.tracker.symptoms} | set(CLASSES) | {"unknown", "unfamiliar"}
        unknown = sorted(set(self.stop_on) - valid)
        if unknown:
            raise ValueError(f"stop_on: unknown alert name(s) {unknown}; valid: {sorted(valid)}")

    def _load_tevid(self, checkpoint) -> None:
        if checkpoint is False:
            return  # asked for readouts and rule symptoms only, even where a default model ships
        default = checkpoint is None
        path = DEFAULT_CHECKPOINT if default else Path(checkpoint)
        if default and not (path / "config.json").is_file():
            return  # no shipped model: readouts and rule symptoms only
        try:
            with torch.random.fork_rng(devices=[]):  # building TEViD must not move the user's seeded RNG stream
                self.stream = open_stream(path, self.config.frame_size, lambda: next(self.model.parameters()).device
                                          if self.config.tevid_device == "model" else "cpu")
        except Exception as err:
            if not default:
                raise
            logger.warning("default TEViD checkpoint %s did not load (%s); rule symptoms only", path, err)
            return
        self.config.frame_size, self.window = self.stream.frame_size, self.stream.window
        self.tevid, self.calibration, self.checkpoint = self.stream.model, self.stream.calibration, str(path)

    def _register_hooks(self) -> None:
        if self.optimizer is not None:
            self._opt_handles.append(step_post_hook(self.optimizer, self._post_step))
        if self.role != "diagnose" or self.evidence.private:
            return  # under DP the monitor reads only the released frames: no per-step loss, no layer statistics
        head = self.capture.head
        if head is not None and self.config.loss_from_head:
            self._handles.append(forward_pre_hook(self.model, self._count_forward))
            self._handles.append(forward_hook(head, self._head_forward))
        modules = activation_modules(self.model, self.config.max_activation_modules)
        modules += [(p.name, p.module, "block") for p in self.capture.points]
        inactivity = next((s for s in self.tracker.symptoms if isinstance(s, DeadUnits)), DeadUnits()).inactivity
        bound = next((s for s in self.tracker.symptoms if isinstance(s, SaturatedActivations)), SaturatedActivations()).bound
        self.layers = LayerStatsHooks(modules, inactivity, bound, self._guard)
        self.layers.arm(self._armed)

    def _open_log(self, log_dir: Path) -> None:
        d = log_dir if self.rank == 0 else log_dir / f"rank{self.rank}"
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"watch(log_dir=...): cannot create the log directory {d}: {err}") from err
        info = {"monitor": asdict(self.config), "capture": asdict(self.capture_config), "symptoms": self.tracker.config(),
                "dp": None if self.dp is None else asdict(self.dp.config), "checkpoint": self.checkpoint,
                "role": self.role, "rank": self.rank, "world_size": self.world_size, "stop_on": sorted(self.stop_on)}
        tmp = d / f".monitor.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(jsonable(info), indent=1) + "\n")
        os.replace(tmp, d / "monitor.json")
        self.log_dir = d
        self.callbacks.insert(JsonlSink(d))

    # ---------------------------------------------------------------- fault handling
    def _guard(self, where: str, fn, *args):
        """Run monitor code; any exception switches the monitor off instead of reaching the training job."""
        if self._off:
            return None
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - the training job must never see the monitor's faults
            self._fault(where, err)
            return None

    def _fault(self, where: str, err: BaseException) -> None:
        if self._off:
            return
        self.disabled_reason = f"{where}: {type(err).__name__}: {err}"
        summary = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-4))
        logger.warning("TEViD monitor switched itself off after a fault in %s at step %d (training continues): "
                       "%s: %s\n%s", where, self.step_count, type(err).__name__, err, summary)
        self._detach()

    def _detach(self) -> None:
        self._off = True
        if self.capture is not None:
            self.capture.remove()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.layers is not None:
            self.layers.arm(False)
        for h in self._opt_handles:  # safe inside the optimizer's own step (capture.hooks)
            h.remove()
        self._opt_handles.clear()

    # ---------------------------------------------------------------- hooks (the user's forward / backward / step)
    def _count_forward(self, module, args) -> None:
        self.evidence.losses.forward_id += 1

    def _head_forward(self, module, args, output) -> None:
        if not self._off:
            self._guard("head forward hook", self._head_forward_impl, output)

    def _head_forward_impl(self, output) -> None:
        logits = _first_tensor(output)
        if logits is None or not logits.requires_grad or not logits.is_floating_point():
            return
        detached, forward = logits.detach(), self.evidence.losses.forward_id
        logits.register_hook(lambda grad: self._guard("head gradient hook", self._head_grad, detached, grad, forward))

    def _head_grad(self, logits: torch.Tensor, grad: torch.Tensor, forward: int = 0) -> None:
        self.evidence.losses.head_grad(self.step_count, forward, logits, grad)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if not self._off:
            self._guard("optimizer step hook", self._on_step)

    # ---------------------------------------------------------------- the monitor's own work
    def observe(self, loss=None) -> None:
        """Add what hooks cannot see: the training loss of this optimizer step (a tensor with one element, or
        a Python / numpy number). Call it before `optimizer.step()`; with gradient accumulation, once per
        micro-batch (the mean is used). Without it the loss is recovered from the head's gradient
        (`diagnose.loss_recovery`). Anything else is reported once and ignored: it never raises."""
        if loss is None or self._off:
            return
        try:
            accepted = self.evidence.losses.observe(loss)
        except Exception as err:  # noqa: BLE001 - e.g. a tensor whose conversion fails on its device
            accepted, loss = False, f"{loss!r} ({type(err).__name__}: {err})"
        if not accepted and not getattr(self, "_observe_warned", False):
            self._observe_warned = True
            logger.warning("monitor.observe(loss=...) takes one loss value (a tensor with one element or a number); "
                           "got %s %.80r: ignored (reported once)", type(loss).__name__, loss)

    def step(self) -> None:
        """Count one optimizer step by hand: only for `watch(model, optimizer=None)`."""
        if self.optimizer is not None:
            raise RuntimeError("Monitor.step(): the optimizer's step hook already counts steps; do not call step() too")
        self._guard("step", self._on_step)

    def _on_step(self) -> None:
        s, armed = self.step_count, self._armed
        frame_loss = self.evidence.on_step(s, armed)
        frame = self.capture.step(frame_loss)
        self.step_count += 1
        self._armed = self.step_count % self.config.cadence == 0
        layers = {}
        if self.layers is not None:
            layers = self.layers.take()
            self.layers.arm(self._armed)
        if frame is not None:
            self._on_frame(frame, layers if armed else {})

    def _on_frame(self, frame: Frame, layers: dict) -> None:
        record = {"step": frame.step, **frame.readouts}
        self.readouts.append(record)
        alerts: list[Alert] = []
        if self.role == "diagnose":
            alerts += self._run_symptoms(frame, sync_layers(layers))
            # the capture synced only this step's loss; the symptoms' evidence just drained every step's since the
            # last frame (StepEvidence.frame_step_losses): TEViD and the callbacks get those, as a store holds them
            frame = dataclasses.replace(frame, step_losses=self.evidence.frame_step_losses(frame))
            if self.stream is not None:
                alerts += self._run_tevid(frame)
        else:
            self.evidence.discard()
        self.callbacks.on_frame(frame)
        for a in alerts:
            self._emit(a)

    def _run_symptoms(self, frame: Frame | None, layers: dict) -> list[Alert]:
        """The rule symptoms over the evidence of the steps since the last frame."""
        alerts = []
        for obs in self.evidence.observations(frame, layers):
            alerts += self.tracker.update(obs)
        return alerts

    def _run_tevid(self, frame: Frame) -> list[Alert]:
        from diagnose.tevid_alerts import tevid_alerts

        if not getattr(frame, "complete", True):  # its gradient maps did not come from a training backward
            if not self._incomplete_warned:
                self._incomplete_warned = True
                logger.warning("frame at step %d has no gradient maps from a training backward (a forward with "
                               "grad outside training, or a step without backward): such frames are not given "
                               "to TEViD (reported once)", frame.step)
            return []
        pred = self.stream.push(frame.step, frame.frame, frame.readouts, frame.levels, frame.patterns, frame.num_classes,
                                frame.step_losses)
        if pred is None:
            return []  # fewer than T frames so far
        cal = self.calibration
        self.predictions.append({"step": frame.step, "probs": dict(zip(cal.classes, pred.probs)), "vacuity": pred.vacuity,
                                 "anomaly": pred.anomaly, "label": pred.label, "reason": pred.decision.reason.value})
        if not (pred.decision.new_alerts or pred.decision.unknown_alert or pred.decision.unfamiliar_alert):
            return []
        return tevid_alerts(pred, cal, self.stream.window_frames(), self.capture.points, self.readouts)

    def _emit(self, alert: Alert) -> None:
        self.alerts.append(alert)
        logger.warning("alert %s (%s) at step %d: %s", alert.name, alert.source, alert.step, alert.message)
        if alert.name in self.stop_on:
            self.should_stop = True
        self.callbacks.on_alert(alert)

    # ---------------------------------------------------------------- results and lifetime
    @property
    def active(self) -> bool:
        return not self._off

    @property
    def frames(self) -> list[Frame]:
        """The last T frames (the window TEViD reads)."""
        return list(self._sink.frames) if self.capture is not None else []

    def _flush(self) -> None:
        """Checks for the steps after the last frame (at `remove()`)."""
        self.capture.flush_steps()
        if self.role == "diagnose" and self.evidence.pending():
            for a in self._run_symptoms(None, {}):
                self._emit(a)

    def remove(self) -> None:
        """Run the checks of the steps since the last frame, then remove every hook (idempotent). Under DP,
        print and log the privacy spent ("DP telemetry: epsilon=... delta=... after N releases"). Last,
        `close()` every callback that has one (the sinks of `diagnose.sinks` flush there), once."""
        if not self._off and self.capture is not None:
            self._guard("flush at remove", self._flush)
        self._detach()
        if self.dp is not None and not self._dp_reported:
            self._dp_reported = True
            text = self.dp.report()
            if self.log_dir is not None:
                try:
                    info = jsonable({**self.privacy, "report": text})
                    (self.log_dir / "privacy.json").write_text(json.dumps(info, indent=1) + "\n")
                except OSError as err:
                    logger.warning("could not write %s: %s", self.log_dir / "privacy.json", err)
        self.callbacks.close()

    @property
    def privacy(self) -> dict | None:
        """Under DP: {epsilon, delta, releases, mechanism, noise_multiplier, sample_rate, clip} so far; else None."""
        return None if self.dp is None else self.dp.privacy()

    def state_dict(self) -> dict:
        decision = None if self.stream is None else self.stream.state_dict()
        return {"step_count": self.step_count, "should_stop": self.should_stop, "alerts": [a.to_dict() for a in self.alerts],
                "symptoms": self.tracker.state_dict(), "decision": decision,
                "unknown_streak": (decision or {}).get("unknown_streak", 0),
                "dp": None if self.dp is None else self.dp.state_dict()}

    def load_state_dict(self, state: dict, frames: list[Frame] | None = None) -> None:
        """Restore the step count, alerts, stop request, symptom histories and TEViD streaks (the capture
        restarts its normaliser warm-up, and the first step after loading is a capture step). `frames`:
        a previous monitor's `frames` (its last T), so TEViD predicts at the next frame instead of
        waiting for T new ones."""
        if frames and self.capture is not None:
            self._sink.frames.extend(frames)
            if self.stream is not None:
                for f in frames:
                    self.stream.add(f.step, f.frame, f.readouts, f.levels, f.patterns, f.num_classes, f.step_losses)
        self.step_count = int(state["step_count"])
        if self.capture is not None:
            self.capture.step_count = self.step_count
        self.should_stop = bool(state["should_stop"])
        self.alerts = [Alert(**a) for a in state["alerts"]]
        self.tracker.load_state_dict(state["symptoms"])
        if state.get("dp") and self.dp is not None:
            self.dp.load_state_dict(state["dp"])
        if self.stream is not None:
            self.stream.load_state_dict(state.get("decision"), state.get("unknown_streak", 0))

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "off: " + self.disabled_reason if self.disabled_reason else ("active" if self.active else "inactive")
        return (f"Monitor(role={self.role!r}, rank={self.rank}/{self.world_size}, step={self.step_count}, "
                f"alerts={len(self.alerts)}, tevid={self.tevid is not None}, {state})")
