"""The live monitor: one call attaches TEViD and the rule symptoms to a running training job.

    monitor = diagnose.watch(model, optimizer)            # nothing else changes in the loop
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        if monitor.should_stop: break                      # only if stop_on=... was given
    monitor.alerts                                         # [Alert(name, step, source, probability, message)]
    monitor.remove()                                       # or `with diagnose.watch(...) as monitor:`

DESIGN.md §1 (use 3: a streaming hook in live jobs) and §8 (the streaming rule). The capture hooks
(`capture.attach`, one code path with the factory) build a frame every `cadence` optimizer steps; an
optimizer step post-hook drives them, so only real optimizer steps count (gradient accumulation,
GradScaler-skipped steps). At each frame the monitor runs the rule symptoms (`diagnose.symptoms`) on
the steps since the previous frame and, with a checkpoint, TEViD on the last T frames followed by the
calibrated decision rule (`diagnose.decision.decide`). Everything is moved to the host once per frame.

The loss is what hooks cannot see: `monitor.observe(loss=...)` gives it; otherwise it is recovered from
the classifier head's logits and their gradient (`loss_from_logits_grad`, exact for mean-reduced
softmax cross-entropy, NaN for other losses).

A fault inside the monitor never reaches the training job: it is caught, logged once on the "tevid"
logger, and the monitor removes its hooks (`disabled_reason` says why). Mistakes in the call itself
(unknown options, a model with no hook points, a checkpoint that does not load) raise at `watch()`.
See docs/monitor.md for DDP behaviour and the symptom rules.
"""
from __future__ import annotations

import json
import logging
import math
import os
import traceback
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from capture.recorder import CaptureConfig, Frame, _first_tensor, attach
from diagnose.symptoms import (SYMPTOM_NAMES, TEVID_REMEDIES, Alert, DeadUnits, GradStats, LayerStats, Observation,
                               SaturatedActivations, Symptom, SymptomTracker, advise, overfitting_remedy, place)

# the shipped model, used by checkpoint=None; TEVID_DEFAULT_CHECKPOINT points it elsewhere (tests of the
# rules-only monitor point it at nothing)
DEFAULT_CHECKPOINT = Path(os.environ.get("TEVID_DEFAULT_CHECKPOINT") or Path(__file__).resolve().parent / "default_checkpoint")
WINDOW = 10  # T frames per TEViD window (DESIGN.md §3), unless the checkpoint's data config says otherwise
DEFER_NUMEL = 1 << 22  # logits elements kept for the once-per-frame loss recovery before it runs early
logger = logging.getLogger("tevid")


@dataclass
class MonitorConfig:
    cadence: int = 50  # one frame (and one round of checks) every `cadence` optimizer steps
    frame_size: int | None = None  # S; None: the checkpoint's encoder size, else 32
    grad_every: int | None = None  # gradient statistics every n optimizer steps; None: = cadence
    other_ranks: str = "off"  # ranks > 0 under DDP: "off" (no hooks) | "capture" (capture their shard only)
    tevid_device: str = "cpu"  # where TEViD runs: "cpu" | "model" (the watched model's device)
    loss_from_head: bool = True  # recover the loss from the head's logits gradient when not observed
    max_activation_modules: int = 32  # ReLU / tanh / sigmoid modules hooked for dead / saturated units

    def __post_init__(self):
        if self.other_ranks not in ("off", "capture"):
            raise ValueError(f"other_ranks must be 'off' or 'capture', got {self.other_ranks!r}")
        if self.tevid_device not in ("cpu", "model"):
            raise ValueError(f"tevid_device must be 'cpu' or 'model', got {self.tevid_device!r}")
        if self.grad_every is not None and self.grad_every < 1:
            raise ValueError(f"grad_every must be >= 1, got {self.grad_every}")


class _CallbackRaised(Exception):
    """A user callback raised: its exception is the user's, so it is re-raised, not treated as a fault."""

    def __init__(self, error: BaseException):
        self.error = error


class _RingSink:
    """Capture sink that keeps the last `maxlen` frames (the monitor keeps its own per-step losses)."""

    def __init__(self, maxlen: int):
        self.frames: deque[Frame] = deque(maxlen=maxlen)

    def append_frame(self, frame: Frame) -> None:
        self.frames.append(frame)

    def append_steps(self, loss: list[float], lr: list[float]) -> None:
        pass


def _dist_info() -> tuple[int, int]:
    """(rank, world size): torch.distributed when initialised, else the launcher's RANK / WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP / DataParallel / torch.compile wrappers (hooks go on it)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def unwrap_optimizer(optimizer):
    """The torch optimizer whose `step` really runs (accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer wrap one; their own `step` may skip it, e.g. while accumulating gradients)."""
    for attr in ("optimizer", "_optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            return unwrap_optimizer(inner)
    return optimizer


@torch.no_grad()
def loss_from_logits_grad(logits: torch.Tensor, grad: torch.Tensor, tol: float = 0.02) -> torch.Tensor:
    """Mean softmax cross-entropy recovered from logits `(..., C)` and dL/dlogits, as a 0-d tensor, no sync.

    For mean-reduced cross-entropy over the n rows that carry a label, `G = (P - Y) / n` on those rows
    and 0 on ignored ones (ignore_index, padding). The label of a row is its only negative entry
    (argmin G), n = (p_y - 1) / G_y (the median over rows with p_y < 0.999), and the loss is the mean of
    -log p_y. The reconstruction `Y = P - n G` must be one-hot within `tol` on every informative row,
    else NaN (other losses, label smoothing, extra terms on the logits). Any scaling of the loss
    (GradScaler, 1/accumulation) changes n, not the value returned. Non-finite logits give NaN.
    """
    return recover_loss(logits, grad, tol)[0]


@torch.no_grad()
def recover_loss(logits: torch.Tensor, grad: torch.Tensor, tol: float = 0.02,
                 batched: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, known) as 0-d tensors: `known` is False when the loss cannot be recovered (not a mean
    cross-entropy, or non-finite gradients with finite logits); non-finite logits are a known NaN loss.
    `batched`: the first axis indexes K independent losses (stacked steps) -> (K,) and (K,)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        lf, g = logits.detach().float(), grad.detach().float()
        if not batched:
            lf, g = lf[None], g[None]
        k = lf.shape[0]
        lf = lf.reshape(k, -1, lf.shape[-1])  # (K, N, C)
        g = g.reshape(k, -1, g.shape[-1])  # (K, N, C)
        bad_logits, bad_grad = ~torch.isfinite(lf).flatten(1).all(1), ~torch.isfinite(g).flatten(1).all(1)  # (K,)
        logp = torch.log_softmax(lf, dim=-1)
        p = logp.exp()
        active = g.abs().amax(dim=2) > 0  # (K, N) rows that are part of the loss
        y = g.argmin(dim=2, keepdim=True)  # (K, N, 1)
        g_y, p_y = g.gather(2, y).squeeze(2), p.gather(2, y).squeeze(2)  # (K, N)
        informative = active & (p_y < 0.999) & (g_y < 0)
        n_row = torch.where(informative, (p_y - 1) / torch.where(g_y < 0, g_y, -1.0), torch.nan)
        n = (torch.nanmedian(n_row, dim=1).values if n_row.shape[1]
             else torch.full((k,), float("nan"), device=lf.device))  # (K,)
        onehot = torch.zeros_like(p).scatter_(2, y, 1.0)
        err = ((p - n[:, None, None] * g) - onehot).abs().amax(dim=2)  # (K, N)
        ok = ~(informative & ~(err <= tol)).any(1) & active.any(1) & (torch.isfinite(n) | ~informative.any(1))
        loss = -(logp.gather(2, y).squeeze(2) * active).sum(1) / active.sum(1).clamp_min(1)  # (K,)
        # a softmax loss has gradient rows summing to 0 (see capture.readouts.softmax_gradient): MSE, BCE
        # and single-logit heads do not, and their "loss" read as cross-entropy would be silently wrong
        # (rows with a nearly one-hot softmax are not judged: their gradient is as small as its rounding error)
        rtol = max(1e-3, 4 * torch.finfo(grad.dtype).eps)
        zero_sum = g.sum(2).abs() <= rtol * g.abs().sum(2) + 1e-30  # (K, N)
        softmax = (zero_sum | ~(p.amax(2) < 0.999)).all(1) & (g.shape[-1] >= 2)  # (K,)
        ok = ok & ~bad_grad & ~bad_logits & softmax
        loss, known = torch.where(ok, loss, torch.full_like(loss, float("nan"))), ok | bad_logits
        return (loss, known) if batched else (loss[0], known[0])


def _activation_modules(model: nn.Module, limit: int) -> list[tuple[str, nn.Module, str]]:
    """ReLU-like ("relu") and bounded ("bounded": tanh, sigmoid, hardtanh) modules, at most `limit`,
    evenly spaced in module order. ReLU6 is a Hardtanh subclass but counts as ReLU-like."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            found.append((name, m, "relu"))
        elif isinstance(m, (nn.Tanh, nn.Sigmoid, nn.Hardtanh)):
            found.append((name, m, "bounded"))
    if len(found) > limit:
        found = [found[i] for i in sorted(set(np.linspace(0, len(found) - 1, limit).round().astype(int)))]
    return found


def _jsonable(obj):
    """Strict-JSON form: non-finite floats -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


class Monitor:
    """The handle `watch()` returns. Public: `alerts`, `should_stop`, `observe()`, `remove()`,
    `readouts` (one dict per frame), `predictions` (TEViD, per frame), `frames` (the last T),
    `disabled_reason`, `role` ("diagnose" | "capture" | "off"), `rank`, `world_size`."""

    def __init__(self, model: nn.Module, optimizer, checkpoint=None, *, config: MonitorConfig,
                 capture_options: dict | None = None, callbacks=(), stop_on=None, log_dir=None,
                 symptoms: list[Symptom] | None = None, head: nn.Module | None = None, dp=None):
        self.config = config
        self.dp = None  # DP telemetry (diagnose.privacy.DPTelemetry): the capture's release, when dp= is given
        self._dp_reported = False
        self.alerts: list[Alert] = []
        self.readouts: list[dict] = []
        self.predictions: list[dict] = []
        self.should_stop = False
        self.disabled_reason: str | None = None
        self.step_count = 0
        self.log_dir: Path | None = None
        self.rank, self.world_size = _dist_info()
        self.role = "diagnose" if self.rank == 0 else config.other_ranks
        self.model = unwrap_model(model)
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.callbacks = list(callbacks)
        self.tracker = SymptomTracker(symptoms)
        self.capture = None
        self.tevid = self.calibration = self.checkpoint = None
        self._off = self.role == "off"
        self._in_opt_hook = False
        self._handles: list = []
        self._opt_handles: list = []
        self._stat_hooks: list = []  # (module, hook) of the layer statistics, registered around capture steps only
        self._stat_handles: list = []
        self._janitor = None
        self._armed = True  # step 0 is a capture step
        self._seen: set[tuple[str, str]] = set()
        self._layer_pending: dict[tuple[str, str], torch.Tensor] = {}  # (kind, module name) -> stats, on device
        self._pending_grads: list[tuple[int, torch.Tensor]] = []
        self._observed: list = []
        # the loss recovered from the head runs once per frame over all steps since the last one (one
        # batched `recover_loss`), not as ~25 small ops every step: the steps' logits and dL/dlogits wait here
        self._head_pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, logits, grad) per micro-batch
        self._head_numel = 0
        self._head_step = -1  # the last step a head gradient arrived for
        self._head_results: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []  # (steps, losses, known) recovered
        self._head_losses: dict[int, list] = {}  # step -> [sum of losses, micro-batches, known] on the host
        self._step_losses: list[tuple[int, object, object]] = []  # (step, loss, known) since the last frame;
        # loss None = recovered from the head at the next frame; known: bool or a 0-d bool tensor
        self._unknown_streak = 0
        self._loss_warned = False  # the one warning that the loss cannot be recovered from the head
        self._decision = None
        self.stop_on = frozenset(stop_on or ())
        self._check_stop_on()
        if self.role == "off":
            return
        if self.role == "diagnose":
            self._load_tevid(checkpoint)
        s = config.frame_size or 32
        self.window = WINDOW if self.tevid is None else self._window
        options = dict(capture_options or {})
        if dp is not None:
            from diagnose.privacy import DPTelemetry

            options["gwa_window"] = "step"  # one release = one batch (watch() rejects an explicit "frame")
            self.dp = DPTelemetry(dp)
        self.capture_config = CaptureConfig(cadence=config.cadence, frame_size=s, **options)
        self._sink = _RingSink(self.window)
        self.capture = attach(self.model, self.capture_config, head=head, optimizer=self.optimizer, sink=self._sink,
                              release=self.dp)
        self._grad_every = config.grad_every or config.cadence
        self._register_hooks()
        if log_dir is not None:
            self._guard("opening the log directory", self._open_log, Path(log_dir))

    # ---------------------------------------------------------------- setup
    def _check_stop_on(self) -> None:
        from pretrain.clips import CLASSES

        valid = set(SYMPTOM_NAMES) | {s.name for s in self.tracker.symptoms} | set(CLASSES) | {"unknown"}
        unknown = sorted(set(self.stop_on) - valid)
        if unknown:
            raise ValueError(f"stop_on: unknown alert name(s) {unknown}; valid: {sorted(valid)}")

    def _load_tevid(self, checkpoint) -> None:
        if checkpoint is False:
            return  # asked for readouts and rule symptoms only, even where a default model ships
        default = checkpoint is None
        path = DEFAULT_CHECKPOINT if default else Path(checkpoint)
        if default and not (path / "config.json").is_file():
            return  # no shipped model yet: readouts and rule symptoms only
        try:
            try:
                from diagnose.tevid import load_tevid
            except ImportError:  # where the brief placed it
                from diagnose.calibrate import load_tevid  # type: ignore[attr-defined,no-redef]
            with torch.random.fork_rng(devices=[]):  # building TEViD must not move the user's seeded RNG stream
                model, cal = load_tevid(path)
        except Exception as err:
            if not default:
                raise
            logger.warning("default TEViD checkpoint %s did not load (%s); rule symptoms only", path, err)
            return
        enc = getattr(model, "encoder", None)
        if enc is not None:
            if self.config.frame_size not in (None, enc.cfg.img_size):
                raise ValueError(f"frame_size={self.config.frame_size} but the TEViD checkpoint {path} reads "
                                 f"{enc.cfg.img_size}x{enc.cfg.img_size} frames: leave frame_size unset or match it")
            self.config.frame_size = enc.cfg.img_size
        config = json.loads((path / "config.json").read_text())
        self._window = int((config.get("data") or {}).get("window", WINDOW))
        device = "cpu" if self.config.tevid_device == "cpu" else next(self.model.parameters()).device
        self.tevid = model.to(device).eval().requires_grad_(False)
        self.calibration, self._tevid_device, self.checkpoint = cal, device, str(path)
        from diagnose.decision import DecisionState

        self._decision = DecisionState.start(len(cal.classes))

    def _register_hooks(self) -> None:
        if self.optimizer is not None:
            self._opt_handles.append(self.optimizer.register_step_post_hook(self._post_step))
        if self.role != "diagnose" or self.dp is not None:
            return  # under DP the monitor reads only the released frames: no per-step loss, no layer statistics
        head = self.capture.head
        if head is not None and self.config.loss_from_head:
            self._handles.append(head.register_forward_hook(self._head_forward))
        self._stat_hooks = [(m, self._stats_hook(name, kind))
                            for name, m, kind in _activation_modules(self.model, self.config.max_activation_modules)]
        self._stat_hooks += [(p.module, self._stats_hook(p.name, "block")) for p in self.capture.points]
        self._arm_stats(self._armed)
        self._inactivity = next((s for s in self.tracker.symptoms if isinstance(s, DeadUnits)), DeadUnits()).inactivity
        self._bound = next((s for s in self.tracker.symptoms if isinstance(s, SaturatedActivations)), SaturatedActivations()).bound

    def _arm_stats(self, on: bool) -> None:
        """The layer-statistics hooks sit on the model only for capture steps: between them the activation
        modules keep torch's hook-free call path."""
        if on and not self._stat_handles:
            self._stat_handles = [m.register_forward_hook(h) for m, h in self._stat_hooks]
        elif not on and self._stat_handles:
            for h in self._stat_handles:
                h.remove()
            self._stat_handles = []

    def _open_log(self, log_dir: Path) -> None:
        d = log_dir if self.rank == 0 else log_dir / f"rank{self.rank}"
        d.mkdir(parents=True, exist_ok=True)
        info = {"monitor": asdict(self.config), "capture": asdict(self.capture_config), "symptoms": self.tracker.config(),
                "dp": None if self.dp is None else asdict(self.dp.config),
                "checkpoint": getattr(self, "checkpoint", None), "role": self.role, "rank": self.rank,
                "world_size": self.world_size, "stop_on": sorted(self.stop_on)}
        tmp = d / f".monitor.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(_jsonable(info), indent=1) + "\n")
        os.replace(tmp, d / "monitor.json")
        self.log_dir = d

    # ---------------------------------------------------------------- fault handling
    def _guard(self, where: str, fn, *args):
        """Run monitor code; any exception switches the monitor off instead of reaching the training job."""
        if self._off:
            return None
        try:
            return fn(*args)
        except _CallbackRaised as user:
            raise user.error
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
        self._arm_stats(False)
        if self._in_opt_hook and self._opt_handles:
            # torch iterates the optimizer's hook dict while calling it: removing our handle now would
            # break that loop inside the user's optimizer.step(); the next forward removes it instead
            if self._janitor is None:
                self._janitor = self.model.register_forward_pre_hook(self._janitor_hook)
        else:
            self._remove_optimizer_hooks()

    def _janitor_hook(self, module, args) -> None:
        self._remove_optimizer_hooks()

    def _remove_optimizer_hooks(self) -> None:
        for h in self._opt_handles:
            h.remove()
        self._opt_handles.clear()
        if self._janitor is not None:
            self._janitor.remove()
            self._janitor = None

    # ---------------------------------------------------------------- hooks (the user's forward / backward / step)
    def _head_forward(self, module, args, output) -> None:
        if not self._off:
            self._guard("head forward hook", self._head_forward_impl, output)

    def _head_forward_impl(self, output) -> None:
        logits = _first_tensor(output)
        if logits is None or not logits.requires_grad or not logits.is_floating_point():
            return
        detached = logits.detach()
        logits.register_hook(lambda grad: self._guard("head gradient hook", self._head_grad, detached, grad))

    def _head_grad(self, logits: torch.Tensor, grad: torch.Tensor) -> None:
        self._head_pending.append((self.step_count, logits, grad.detach()))
        self._head_step = self.step_count
        self._head_numel += logits.numel()
        if self._head_numel > DEFER_NUMEL:  # large logits (a language model's): recover now, keep nothing
            self._recover_pending()

    def _recover_pending(self) -> None:
        """The losses of the waiting micro-batches, one batched `recover_loss` per run of equal shapes."""
        pending, self._head_pending, self._head_numel = self._head_pending, [], 0
        i = 0
        while i < len(pending):
            key = lambda e: (e[1].shape, e[1].dtype, e[1].device, e[2].shape, e[2].dtype)  # noqa: E731
            j = i + 1
            while j < len(pending) and key(pending[j]) == key(pending[i]):
                j += 1
            group = pending[i:j]
            losses, known = recover_loss(torch.stack([e[1] for e in group]), torch.stack([e[2] for e in group]), batched=True)
            self._head_results.append(([e[0] for e in group], losses, known))
            i = j

    def _sync_heads(self) -> None:
        """Recovered head losses to the host (one sync), summed per step over its micro-batches."""
        self._recover_pending()
        results, self._head_results = self._head_results, []
        if not results:
            return
        dev = results[0][1].device
        flat = torch.cat([t.to(dev).float() for _, losses, known in results for t in (losses, known)]).tolist()
        i = 0
        for steps, losses, _ in results:
            k = len(steps)
            for step, loss, ok in zip(steps, flat[i: i + k], flat[i + k: i + 2 * k]):
                acc = self._head_losses.setdefault(step, [0.0, 0, True])
                acc[0], acc[1], acc[2] = acc[0] + loss, acc[1] + 1, acc[2] and bool(ok)
            i += 2 * k

    def _stats_hook(self, name: str, kind: str):
        def hook(module, args, output):
            if self._off or not self._armed or (kind, name) in self._seen:
                return  # the whole cost between capture steps
            self._guard(f"activation hook {name}", self._layer_stats, name, kind, module, args, output)

        return hook

    def _layer_stats(self, name: str, kind: str, module: nn.Module, args, output) -> None:
        out = _first_tensor(output)
        if out is None or not out.requires_grad or not out.is_floating_point():
            return  # eval / no_grad forward
        self._seen.add((kind, name))
        with torch.no_grad(), torch.autocast(device_type=out.device.type, enabled=False):
            if kind == "relu":
                x = out.detach()
                active = (x != 0).float()
                unit_dim = 1 if x.ndim >= 4 else x.ndim - 1  # channels of a conv map, else the last axis
                activity = active.mean(dim=[d for d in range(x.ndim) if d != unit_dim]) if x.ndim > 1 else active
                stats = torch.stack([(activity < self._inactivity).float().mean(), 1 - active.mean()])
            elif kind == "bounded":
                x = _first_tensor(args).detach().float()
                if isinstance(module, nn.Hardtanh):
                    sat = (x <= module.min_val) | (x >= module.max_val)
                else:
                    sat = x.abs() >= self._bound
                stats = sat.float().mean().reshape(1)
            else:
                x = out.detach().float().abs()  # a new tensor: cleaned in place
                bad = (~torch.isfinite(x)).sum()  # where a nan_inf alert points: the first hook point with some
                stats = torch.stack([x.nan_to_num_(nan=0.0, posinf=0.0).amax(), bad.float()])
        self._layer_pending[(kind, name)] = stats

    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._off:
            return
        self._in_opt_hook = True
        try:
            self._guard("optimizer step hook", self._on_step)
        finally:
            self._in_opt_hook = False

    # ---------------------------------------------------------------- the monitor's own work
    def observe(self, loss=None) -> None:
        """Add what hooks cannot see: the training loss of this optimizer step (a tensor or a float).
        Call it before `optimizer.step()`; with gradient accumulation, once per micro-batch (the mean
        is used). Without it the loss is recovered from the head's gradient (`loss_from_logits_grad`)."""
        if loss is not None and not self._off:
            self._guard("observe", self._observed.append, loss.detach() if isinstance(loss, torch.Tensor) else float(loss))

    def step(self) -> None:
        """Count one optimizer step by hand: only for `watch(model, optimizer=None)`."""
        if self.optimizer is not None:
            raise RuntimeError("Monitor.step(): the optimizer's step hook already counts steps; do not call step() too")
        self._guard("step", self._on_step)

    def _take_loss(self) -> None:
        """Record this step's loss: observed > recovered from the head (at the next frame) > unknown (NaN,
        known False). An unknown loss is a missing readout, not NaN."""
        s = self.step_count
        if self._observed:
            vals = [v.float().mean().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(v) for v in self._observed]
            entry = (s, torch.stack([v.to(vals[0].device) for v in vals]).mean(), True)
        elif self._head_step == s:
            entry = (s, None, None)
        else:
            entry = (s, float("nan"), False)
        self._observed = []
        self._step_losses.append(entry)

    def _loss_now(self):
        """The loss of the step just recorded, for the frame's readout (syncs the recovered head losses)."""
        s, loss, known = self._step_losses[-1]
        if loss is None:
            self._sync_heads()
            total, n, _ = self._head_losses[s]
            return total / n
        return loss

    def _take_step_losses(self) -> list[tuple[int, float | None]]:
        """(step, loss or None when unknown) of every step since the last frame (one host sync each for
        the recovered and the observed losses)."""
        self._sync_heads()
        entries, self._step_losses = self._step_losses, []
        heads, self._head_losses = self._head_losses, {}
        observed = [loss for _, loss, _ in entries if isinstance(loss, torch.Tensor)]
        synced = iter(torch.stack([v.to(observed[0].device).float() for v in observed]).tolist() if observed else [])
        out = []
        for s, loss, known in entries:
            if loss is None:  # recovered from the head
                total, n, known = heads[s]
                loss = total / n
            elif isinstance(loss, torch.Tensor):
                loss = next(synced)
            out.append((s, loss if known else None))
        if any(loss is None for _, loss in out) and not self._loss_warned and self.config.loss_from_head:
            self._loss_warned = True
            logger.warning("the training loss is not recoverable from the head's gradient (not a mean softmax "
                           "cross-entropy on %s's output: MSE, BCE, label smoothing, extra terms, no head, or non-finite gradients): "
                           "loss readouts and loss symptoms are missing; call monitor.observe(loss=loss) each step "
                           "to give it", type(self.model).__name__)
        return out

    def _grad_tensor(self) -> torch.Tensor | None:
        """(norm, mean |g|, first weight norm, last weight norm, i_largest, i_smallest, i_nonfinite) on the
        gradients' device, no sync. The i_ are positions in this step's list of parameters with a gradient
        (kept in `_grad_params()` under the step, named at the frame by `_grad_stats`): the largest
        gradient norm (non-finite counts as largest), the smallest among the weights, the last non-finite (-1: none)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]
                  if p.grad is not None and not p.grad.is_sparse]
        if not params:
            return None
        grads = [p.grad for p in params]
        dev = grads[0].device
        with torch.no_grad():
            norms = [n.to(dev) for n in torch._foreach_norm(grads, 2, dtype=torch.float32)]
            l2 = torch.stack(norms)  # (P,)
            l1 = torch.stack([n.to(dev) for n in torch._foreach_norm(grads, 1, dtype=torch.float32)])
            weights = [i for i, g in enumerate(grads) if g.ndim >= 2] or [0, len(grads) - 1]
            numel = sum(g.numel() for g in grads)
            bad = ~torch.isfinite(l2)
            last_bad = torch.where(bad.any(), len(grads) - 1 - bad.flip(0).int().argmax(), -1)
            self._grad_params()[self.step_count] = params
            return torch.stack([torch.linalg.vector_norm(l2), l1.sum() / numel, l2[weights[0]], l2[weights[-1]],
                                l2.argmax().float(), torch.stack([norms[i] for i in weights]).argmin().float(),
                                last_bad.float()])

    def _grad_params(self) -> dict[int, list]:
        """step -> the parameters whose gradient norms `_grad_tensor` stacked at that step (until the frame)."""
        if not hasattr(self, "_pending_grad_params"):
            self._pending_grad_params: dict[int, list] = {}
        return self._pending_grad_params

    def _grad_stats(self, v: list[float], params: list | None) -> GradStats:
        """`GradStats` from a synced `_grad_tensor` row, its parameter positions mapped to parameter names."""
        if not params:
            return GradStats(*v[:4])
        weights = [i for i, p in enumerate(params) if p.ndim >= 2] or [0, len(params) - 1]  # as `_grad_tensor`
        at = {"largest": int(v[4]), "smallest": weights[int(v[5])], "first": weights[0], "nonfinite": int(v[6])}
        at = {k: params[i] for k, i in at.items() if 0 <= i < len(params)}
        names = getattr(self, "_param_names", {})
        if any(id(p) not in names for p in at.values()):  # first frame, or parameters added since
            names = self._param_names = {id(p): n for n, p in self.model.named_parameters()}
        return GradStats(*v[:4], **{k: names.get(id(p)) for k, p in at.items()})

    def _on_step(self) -> None:
        s, armed = self.step_count, self._armed
        private = self.dp is not None
        if private:
            self._observed = []  # not released under DP: the frame's loss readout is released from the head
        else:
            self._take_loss()
        if not private and self.role == "diagnose" and self.optimizer is not None and s % self._grad_every == 0:
            g = self._grad_tensor()
            if g is not None:
                self._pending_grads.append((s, g))
        # the capture needs the loss only for the frame's readout; the monitor keeps the per-step ones
        frame = self.capture.step(self._loss_now() if armed and not private else math.nan)
        self.step_count += 1
        self._armed = self.step_count % self.config.cadence == 0
        if self._stat_hooks:
            self._arm_stats(self._armed)
        self._seen.clear()
        layers, self._layer_pending = self._layer_pending, {}
        if frame is not None:
            self._on_frame(frame, layers if armed else {})

    def _on_frame(self, frame: Frame, layers: dict) -> None:
        record = {"step": frame.step, **frame.readouts}
        self.readouts.append(record)
        alerts: list[Alert] = []
        if self.role == "diagnose" and self.dp is not None:
            alerts += self._run_private_symptoms(frame)
            if self.tevid is not None:
                alerts += self._run_tevid(frame)
        elif self.role == "diagnose":
            stats = self._sync_layers(layers)
            alerts += self._run_symptoms(self._take_step_losses(), frame, stats)
            if self.tevid is not None:
                alerts += self._run_tevid(frame)
        else:
            self._step_losses = []
        if self.log_dir is not None:
            self._append("readouts.jsonl", record)
        for cb in self.callbacks:
            on_frame = getattr(cb, "on_frame", None)
            if callable(on_frame):
                self._call_user(cb, on_frame, frame)
        for a in alerts:
            self._emit(a)

    def _sync_layers(self, layers: dict) -> dict[str, LayerStats]:
        if not layers:
            return {}
        keys = list(layers)
        dev = layers[keys[0]].device
        flat = torch.cat([layers[k].to(dev) for k in keys]).tolist()  # one sync
        out, i = {}, 0
        for kind, n in keys:
            if kind == "relu":
                out[n], i = LayerStats(kind, dead_fraction=flat[i], zero_fraction=flat[i + 1]), i + 2
            elif kind == "bounded":
                out[n], i = LayerStats(kind, saturated_fraction=flat[i]), i + 1
            else:
                out[n], i = LayerStats(kind, max_abs=flat[i], nonfinite=flat[i + 1]), i + 2
        return out

    def _run_symptoms(self, losses: list[tuple[int, float | None]], frame: Frame | None,
                      layers: dict[str, LayerStats]) -> list[Alert]:
        """Symptom checks of the steps since the last frame: `losses` = (step, loss or None if unknown)."""
        grads = {}
        if self._pending_grads:
            dev = self._pending_grads[0][1].device
            values = torch.stack([g.to(dev) for _, g in self._pending_grads]).tolist()  # one sync
            params = self._grad_params()
            grads = {s: self._grad_stats(v, params.pop(s, None)) for (s, _), v in zip(self._pending_grads, values)}
            self._pending_grads = []
            params.clear()
        alerts = []
        for st, loss in losses:
            at_frame = frame is not None and st == frame.step
            obs = Observation(st, loss=loss, grads=grads.pop(st, None), layers=layers if at_frame else None,
                              nonfinite=frame.readouts.get("nonfinite") if at_frame else None)
            alerts += self.tracker.update(obs)
        for st in sorted(grads):  # a gradient check whose loss never reached the capture (should not happen)
            alerts += self.tracker.update(Observation(st, grads=grads[st]))
        return alerts

    def _run_private_symptoms(self, frame: Frame) -> list[Alert]:
        """Under DP the rule symptoms see the released frame only: its (private) loss, and non-finite values
        when the released count says more than half of the capture batch had some (the count is noisy)."""
        loss, nonfinite = frame.readouts.get("loss", math.nan), frame.readouts.get("nonfinite", math.nan)
        flagged = math.isfinite(nonfinite) and nonfinite > (self.dp.batch or 0) / 2
        obs = Observation(frame.step, loss=loss if math.isfinite(loss) else None, nonfinite=nonfinite if flagged else 0.0)
        return self.tracker.update(obs)

    def _run_tevid(self, frame: Frame) -> list[Alert]:
        from diagnose.decision import Reason, decide
        from pretrain.clips import CLIP_READOUTS

        ring = list(self._sink.frames)
        if len(ring) < self.window:
            return []  # windows are causal and unpadded (DESIGN.md §7): the first T-1 frames get no prediction
        cal, dev = self.calibration, self._tevid_device
        frames = torch.stack([f.frame for f in ring])[None]  # (1, T, 6, S, S) bf16
        readouts = torch.tensor([[f.readouts.get(k, math.nan) for k in CLIP_READOUTS] for f in ring],
                                dtype=torch.float32)[None]  # (1, T, 8) raw
        with torch.inference_mode(), torch.autocast(device_type=torch.device(dev).type, enabled=False):
            out = self.tevid.predict(frames.to(dev), readouts.to(dev), temperature=cal.temperature)
        probs = out["probs"][0].double().tolist()
        u = float(out["vacuity"][0])
        self._decision, d = decide(self._decision, probs, u, cal.thresholds, cal.tau, cal.consecutive)
        label = "unknown" if d.unknown else cal.classes[d.label]
        self.predictions.append({"step": frame.step, "probs": dict(zip(cal.classes, probs)), "vacuity": u,
                                 "label": label, "reason": d.reason.value})
        found = [(cal.classes[c], probs[c], f"TEViD: {cal.classes[c]} (p = {probs[c]:.2f} > {cal.thresholds[c - 1]:.2f} "
                  f"for {cal.consecutive} frames in a row, vacuity {u:.2f})") for c in d.new_alerts]
        self._unknown_streak = self._unknown_streak + 1 if d.reason == Reason.VACUITY else 0
        if self._unknown_streak == cal.consecutive:
            found.append(("unknown", None, f"TEViD: unknown (vacuity {u:.2f} > tau {cal.tau:.2f} for {cal.consecutive} "
                                           f"frames in a row)"))
        if not found:
            return []
        where, change = self._moved_channel(frames[0])
        alerts = []
        for name, p, message in found:
            remedy = self._tevid_remedy(name)
            alerts.append(Alert(name, frame.step, "tevid", p, advise(message, where, remedy),
                                {"vacuity": u, "probs": probs, "channel_change": change}, where, remedy))
        return alerts

    def _moved_channel(self, window: torch.Tensor) -> tuple[str | None, dict[str, float]]:
        """Where a TEViD alert points: the channel (act / grad x early / mid / late) whose map moved most over
        the window, as "<hook point module> (activations|gradients)", and every channel's move. Move = RMS
        over pixels of (mean map of the last half of the window - mean map of the first half); the maps are
        robust z-scores per channel (`capture.RobustNormalizer`), so the channels are on one scale."""
        from capture.frames import CHANNELS

        x = window.float()  # (T, 6, S, S)
        h = max(1, x.shape[0] // 2)
        move = (x[-h:].mean(0) - x[:h].mean(0)).square().mean(dim=(1, 2)).sqrt()  # (6,)
        change = dict(zip(CHANNELS, move.tolist()))
        c = int(move.argmax())
        if not move[c] > 0:
            return None, change  # nothing moved (or no maps): no place to name
        kind, position = CHANNELS[c].split("_")
        point = next((p for p in self.capture.points if p.position == position), None)
        name = point.name if point is not None else position
        return place(name, "activations" if kind == "act" else "gradients"), change

    def _tevid_remedy(self, name: str) -> str | None:
        """The first remedy of a TEViD alert; for overfitting it names the step head-gradient selection
        (`diagnose.selection.select_checkpoint` over this run's frames so far, score_w) picks."""
        if name != "overfitting":
            return TEVID_REMEDIES.get(name)
        from diagnose.selection import select_checkpoint

        steps = [r["step"] for r in self.readouts]
        scores = [r.get("score_w", math.nan) for r in self.readouts]
        known = any(math.isfinite(v) for v in scores)
        return overfitting_remedy(select_checkpoint(steps, scores, tail_frac=1.0) if known else None)

    def _emit(self, alert: Alert) -> None:
        self.alerts.append(alert)
        logger.warning("alert %s (%s) at step %d: %s", alert.name, alert.source, alert.step, alert.message)
        if alert.name in self.stop_on:
            self.should_stop = True
        if self.log_dir is not None:
            self._append("alerts.jsonl", alert.to_dict())
        for cb in self.callbacks:
            on_alert = getattr(cb, "on_alert", None)
            fn = on_alert if callable(on_alert) else cb
            if callable(fn):
                self._call_user(cb, fn, alert)

    def _call_user(self, cb, fn, arg) -> None:
        try:
            fn(arg)
        except Exception as err:  # the user's own exception (e.g. optuna.TrialPruned) goes to the user
            raise _CallbackRaised(err) from err

    def _append(self, name: str, obj: dict) -> None:
        with open(self.log_dir / name, "a") as f:
            f.write(json.dumps(_jsonable(obj)) + "\n")

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
        losses = self._take_step_losses()
        if self.role == "diagnose" and (losses or self._pending_grads):
            for a in self._run_symptoms(losses, None, {}):
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
                    info = _jsonable({**self.privacy, "report": text})
                    (self.log_dir / "privacy.json").write_text(json.dumps(info, indent=1) + "\n")
                except OSError as err:
                    logger.warning("could not write %s: %s", self.log_dir / "privacy.json", err)
        self._close_callbacks()

    def _close_callbacks(self) -> None:
        """`close()` of each callback, once per monitor; a failure is logged, the others still close."""
        if getattr(self, "_callbacks_closed", False):
            return
        self._callbacks_closed = True
        for cb in self.callbacks:
            close = getattr(cb, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as err:  # noqa: BLE001 - training is over; closing the rest matters more
                    logger.warning("callback %s: close() at remove() failed: %s: %s", type(cb).__name__,
                                   type(err).__name__, err)

    @property
    def privacy(self) -> dict | None:
        """Under DP: {epsilon, delta, releases, mechanism, noise_multiplier, sample_rate, clip} so far; else None."""
        return None if self.dp is None else self.dp.privacy()

    def state_dict(self) -> dict:
        d = self._decision
        return {"step_count": self.step_count, "should_stop": self.should_stop, "alerts": [a.to_dict() for a in self.alerts],
                "symptoms": self.tracker.state_dict(), "unknown_streak": self._unknown_streak,
                "decision": None if d is None else {"streaks": list(d.streaks), "frames": d.frames},
                "dp": None if self.dp is None else self.dp.state_dict()}

    def load_state_dict(self, state: dict, frames: list[Frame] | None = None) -> None:
        """Restore the step count, alerts, stop request, symptom histories and TEViD streaks (the capture
        restarts its normaliser warm-up, and the first step after loading is a capture step). `frames`:
        a previous monitor's `frames` (its last T), so TEViD predicts at the next frame instead of
        waiting for T new ones."""
        if frames and self.capture is not None:
            self._sink.frames.extend(frames)
        self.step_count = int(state["step_count"])
        if self.capture is not None:
            self.capture.step_count = self.step_count
        self.should_stop = bool(state["should_stop"])
        self.alerts = [Alert(**a) for a in state["alerts"]]
        self.tracker.load_state_dict(state["symptoms"])
        self._unknown_streak = int(state.get("unknown_streak", 0))
        if state.get("dp") and self.dp is not None:
            self.dp.load_state_dict(state["dp"])
        if state.get("decision") and self._decision is not None:
            from diagnose.decision import DecisionState

            self._decision = DecisionState(tuple(state["decision"]["streaks"]), int(state["decision"]["frames"]))

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "off: " + self.disabled_reason if self.disabled_reason else ("active" if self.active else "inactive")
        return (f"Monitor(role={self.role!r}, rank={self.rank}/{self.world_size}, step={self.step_count}, "
                f"alerts={len(self.alerts)}, tevid={self.tevid is not None}, {state})")


def watch(model: nn.Module, optimizer=None, checkpoint=None, *, cadence: int = 50, frame_size: int | None = None,
          callbacks=(), stop_on=None, log_dir=None, symptoms: list[Symptom] | None = None,
          head: nn.Module | None = None, dp=None, **options) -> Monitor:
    """Attach the monitor to `model` and `optimizer` (torch, accelerate- or Lightning-wrapped).

    checkpoint: a fine-tuned TEViD directory (weights + calibration.json, `diagnose.tevid.load_tevid`);
      None: `DEFAULT_CHECKPOINT` when it exists, else readouts and rule symptoms only; False: never TEViD.
    cadence, frame_size: one frame every `cadence` optimizer steps, S x S (S from the checkpoint).
    callbacks: callables `f(alert)` or objects with `on_alert(alert)` (and optionally `on_frame(frame)`).
    stop_on: alert names that set `monitor.should_stop` (e.g. {"nan_inf", "instability"}).
    log_dir: writes monitor.json (the resolved config), alerts.jsonl and readouts.jsonl there.
    symptoms: rule symptoms (default `diagnose.symptoms.default_symptoms()`; [] for none).
    dp: `diagnose.privacy.DPConfig`: DP telemetry (docs/selection_privacy.md). Every frame (maps and
      readouts) is one clipped + noised release of the capture batch's per-sample terms; `monitor.privacy`
      gives epsilon over the releases made, printed at `remove()`. Per-step losses, gradient and layer
      statistics are not released, so the rule symptoms see only the frames.
    options: `MonitorConfig` fields (grad_every, other_ranks, tevid_device, loss_from_head,
      max_activation_modules) and `capture.CaptureConfig` fields (modules, layouts, groups, ...).
    """
    mon_fields = {f.name for f in fields(MonitorConfig)} - {"cadence", "frame_size"}
    cap_fields = {f.name for f in fields(CaptureConfig)} - {"cadence", "frame_size"}
    unknown = set(options) - mon_fields - cap_fields
    if unknown:
        raise TypeError(f"watch(): unknown option(s) {sorted(unknown)}; valid: {sorted(mon_fields | cap_fields)}")
    config = MonitorConfig(cadence=cadence, frame_size=frame_size, **{k: v for k, v in options.items() if k in mon_fields})
    if dp is not None:
        from diagnose.privacy import DPConfig

        if not isinstance(dp, DPConfig):
            raise TypeError(f"watch(dp=...) takes a diagnose.privacy.DPConfig, got {type(dp).__name__}")
        if options.get("gwa_window", "step") != "step":
            raise ValueError("watch(dp=...) needs gwa_window='step': GWA over all samples since the last frame would "
                             "draw one release from `cadence` batches")
    if callable(callbacks) or hasattr(callbacks, "on_alert"):
        callbacks = (callbacks,)
    if isinstance(stop_on, str):
        stop_on = (stop_on,)
    return Monitor(model, optimizer, checkpoint, config=config,
                   capture_options={k: v for k, v in options.items() if k in cap_fields}, callbacks=callbacks,
                   stop_on=stop_on, log_dir=log_dir, symptoms=symptoms, head=head, dp=dp)
