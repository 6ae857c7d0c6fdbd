"""Attach capture to a model: hooks -> frames + readouts every `cadence` optimizer steps.

    with capture.attach(model, cadence=50, frame_size=32) as cap:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            cap.step(loss, lr=sched.get_last_lr()[0])   # once per optimizer step
            opt.step(); opt.zero_grad()
    cap.frames  # list of Frame(step, frame (6, S, S) bf16, readouts {name: float}, levels (6,), patterns (6, P, P))

Cost model (issue 2): between capture steps the three block hooks return after one attribute
test (no copies, no device syncs). At a capture step they reduce each activation and each
gradient to an `(S, S)` map right away, keeping only that and the small native map (H x W) from
which the frame's level and `(P, P)` pattern are made (capture.frames.summarise_maps), so nothing large
is kept alive. The head hook runs every
step when `gwa_window="frame"` (GWA over all samples since the previous frame, docs/architecture.md §4); it
adds a few `N x C` element-wise ops that stay on the device. At a frame, a fixed strided sample of the
watched layers' weights (at most 4,096 entries a tensor) is copied and compared with the previous frame's
(capture.weights: the `weight_step` and `weight_still` readouts). At a capture step a forward pre-hook on the
model fingerprints its input and the head's gradient gives each row's label, for `batch_repeat`
(capture.batches) and `confident_miss` (capture.readouts). Each part is synced once per frame.

Nothing here raises inside the user's forward or backward pass: a fault is recorded in
`cap.faults`, warned about once, and that frame's affected maps/readouts come out as zeros/NaN.

`release=` (DP telemetry, `diagnose.privacy.DPTelemetry`): at a capture step the hooks keep each
sample's maps and the head's inputs (`PerSample`) instead of batch means, and the frame's maps and
readouts are whatever `release(per_sample)` returns; per-step losses are withheld (NaN to the sink).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn

from capture.checks import check_choice, check_int, check_names
from capture.frames import (
    CHANNELS,
    LAYOUTS,
    LEVEL_FLOOR,
    PATTERN_RESIZE,
    PATTERN_SIZE,
    NativeMap,
    Projection,
    RobustNormalizer,
    native_map,
    resize_map,
    summarise_maps,
)
from capture.batches import BatchRecurrence
from capture.hooks import forward_hook, forward_pre_hook
from capture.hookpoints import HookPoint, find_head, find_hook_points, resolve_layout
from capture.readouts import (
    HEAD_READOUTS,
    READOUT_NAMES,
    SOFTMAX_READOUTS,
    gwa_aggregate,
    gwa_alignments,
    head_gradient_scores,
    label_readouts,
    output_stats,
    softmax_gradient,
)
from capture.weights import WeightStep


@dataclass
class CaptureConfig:
    cadence: int = 50  # one frame every `cadence` optimizer steps (step 0 included)
    frame_size: int = 32  # S; 224 in the paper configuration
    pattern_size: int = PATTERN_SIZE  # P: side of each map's standardised spatial pattern (Frame.patterns)
    groups: int = 8  # G channel groups before the shared 1x1 projection
    norm_warmup: int = 1  # captures whose statistics make up the frozen robust z-score
    gwa_window: str = "frame"  # "frame": all samples since the last frame; "step": the capture batch only
    modules: list[str] | None = None  # explicit hook points: 3 names, or 1 fnmatch pattern
    layouts: list[str] | None = None  # their output layouts ("bchw", "bhwc", "bnd"), when not inferable

    def __post_init__(self):
        check_int("cadence", self.cadence, 1)
        check_int("frame_size", self.frame_size, 2)
        check_int("pattern_size", self.pattern_size, 2)
        check_int("groups", self.groups, 1)
        check_int("norm_warmup", self.norm_warmup, 1)
        check_choice("gwa_window", self.gwa_window, ("frame", "step"))
        check_names("modules", self.modules)
        check_names("layouts", self.layouts)
        if self.layouts is not None:
            for lay in self.layouts:
                check_choice("layouts[...]", lay, (*LAYOUTS, "auto"))


@dataclass
class Frame:
    step: int
    frame: torch.Tensor  # (6, S, S) bfloat16, on the CPU
    readouts: dict[str, float]
    complete: bool = True  # all six maps came from forward / backward pairs of this step (else zeros stand in)
    # per map, from its native (H, W) batch-mean map before any normalisation (capture.frames.map_summary):
    levels: torch.Tensor | None = None  # (6,) float32 log10 RMS (>= LEVEL_FLOOR; NaN: map missing)
    patterns: torch.Tensor | None = None  # (6, P, P) bfloat16 per-frame standardised map (zeros: map missing)
    num_classes: int | None = None  # the logits' last axis (classes, or an LM's vocabulary); None: not seen
    # the training loss of every optimizer step since the previous frame, this frame's step last (what the sink's
    # per-step losses hold; capture.relative's step-loss features); None: not known (a released frame)
    step_losses: list[float] | None = None


@dataclass
class PerSample:
    """What a capture step saw, per sample (for `release`): B = samples of the capture batch."""

    maps: list[torch.Tensor | None]  # 6 maps (B, H, W) before the batch mean, in CHANNELS order (None: not captured)
    nonfinite: torch.Tensor | None  # (B,) non-finite values per sample in the captured tensors and logits
    z: torch.Tensor | None = None  # the head's input (B, ..., d), detached
    grad_logits: torch.Tensor | None = None  # dL/dlogits (B, ..., C)
    logits: torch.Tensor | None = None  # (B, ..., C) (the model's output when there is no linear head)
    weight: torch.Tensor | None = None  # the head's weight (C, d)


Release = Callable[[PerSample], tuple[list, dict]]  # -> 6 maps (H, W) or None, readouts {name: float}


class Sink(Protocol):
    """Where frames go; `capture.store.RunWriter` is one, `FrameBuffer` keeps them in memory."""

    def append_frame(self, frame: Frame) -> None: ...

    def append_steps(self, loss: list[float], lr: list[float]) -> None: ...


@dataclass
class FrameBuffer:
    frames: list[Frame] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    def append_frame(self, frame: Frame) -> None:
        self.frames.append(frame)

    def append_steps(self, loss: list[float], lr: list[float]) -> None:
        self.train_loss += loss
        self.lr += lr


def _first_tensor(x):
    """The main tensor of a module's output: itself, the first element of a tuple / list (an RNN's
    `(output, h_n)`, a Hugging Face layer's `(hidden_states, ...)`, a PackedSequence's data), or the
    first tensor value of a mapping or dataclass (a Hugging Face `ModelOutput`), else None."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        return x[0] if x and isinstance(x[0], torch.Tensor) else None
    if isinstance(x, Mapping):
        values = x.values()
    elif is_dataclass(x) and not isinstance(x, type):
        values = (getattr(x, f.name, None) for f in fields(x))
    else:
        return None
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


class Capture:
    """The handle `attach()` returns: `step()`, `remove()`, context manager."""

    def __init__(
        self,
        model: nn.Module,
        config: CaptureConfig,
        head: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        projection: Projection | None = None,
        sink: Sink | None = None,
        release: Release | None = None,
    ):
        if release is not None and config.gwa_window != "step":
            raise ValueError("capture with release= (DP telemetry) needs gwa_window='step': GWA over all samples "
                             "since the last frame would draw one release from `cadence` batches")
        if not isinstance(model, nn.Module):
            raise TypeError(f"capture attaches to a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")
        self.config = config
        self.release = release
        self.head = head if head is not None else find_head(model)
        self.points: list[HookPoint] = find_hook_points(model, config.modules, config.layouts, head=self.head)
        self.optimizer = optimizer
        self.projection = projection or Projection.mean(config.groups)
        if self.projection.groups != config.groups:
            raise ValueError(f"projection has {self.projection.groups} groups, config.groups is {config.groups}")
        self.buffer = FrameBuffer()
        self.sink: Sink = sink if sink is not None else self.buffer
        self.normalizer = RobustNormalizer(config.norm_warmup)
        self.faults: list[str] = []
        self.missing: set[str] = set()
        self.num_classes: int | None = None  # the logits' last axis, once a capture has seen them
        self.native_hw: list[tuple[int, int] | None] = [None] * 6  # each map's native (H, W), first seen
        self.native_cells: list[int | None] = [None] * 6  # its data cells (frames.grid_cells)
        self.native_varies: set[str] = set()  # maps whose native shape changed during the run
        self.step_count = 0
        self.last_frame: Frame | None = None
        self._handles: list = []
        self._warned: set[str] = set()
        # accumulated since the previous frame; synced and handed to the sink once per frame
        self._losses: list[torch.Tensor] = []
        self._lrs: list[float] = []
        self._alignments: list[torch.Tensor] = []
        self._reset_step()
        self._armed = True  # step 0 is a capture step
        if self.head is None:
            self.missing.update(HEAD_READOUTS)
            self._warn_once("no_head", f"no linear classifier head found on {type(model).__name__}: "
                            f"readouts {list(HEAD_READOUTS)} are marked missing (pass head=... to attach)")
        self._weights = WeightStep([p.module for p in self.points] + ([self.head] if self.head is not None else []))
        self._batches = BatchRecurrence()
        self._handles.append(forward_pre_hook(model, self._input_hook))
        for i, p in enumerate(self.points):
            self._handles.append(forward_hook(p.module, self._block_hook(i)))
        if self.head is not None:
            self._handles.append(forward_hook(self.head, self._head_hook))
        else:  # output statistics from the model's own output, when it is a tensor of logits
            self._handles.append(forward_hook(model, self._output_hook))

    # ---------------------------------------------------------------- hooks (user's forward/backward)
    def _reset_step(self) -> None:
        self._maps: list[torch.Tensor | None] = [None] * 6
        self._natives: list[torch.Tensor | None] = [None] * 6  # native (H, W) maps: levels and patterns at the frame
        self._cells: list[int | None] = [None] * 6  # data cells of each map
        self._bad: dict[str, torch.Tensor] = {}  # non-finite counts per captured tensor ("act0", "grad3", "logits")
        self._reset_pairs()

    def _reset_pairs(self) -> None:
        """A point's activation map is that of its latest forward until a gradient of that very forward
        arrives (the pair is then fixed for the step): a validation forward with grad between training
        steps, or an extra forward, never pairs its activations with another forward's gradient."""
        self._paired = [False] * 3  # a gradient arrived for the point's latest forward
        self._generation = [0] * 3  # forwards seen per point this step
        self._head_paired = False
        self._head_generation = 0
        self._head: dict[str, torch.Tensor] = {}
        self._per_sample: dict[str, torch.Tensor] = {}  # release only: z, grad_logits, logits, weight

    def _fault(self, where: str, err: BaseException) -> None:
        self.faults.append(f"step {self.step_count}, {where}: {type(err).__name__}: {err}")
        self._warn_once(where, f"capture fault in {where} (recorded, training continues): {err}")

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _block_hook(self, i: int):
        point = self.points[i]

        def hook(module, args, output):
            if not self._armed or self._paired[i]:
                return  # the whole cost between capture steps
            try:
                t = _first_tensor(output)
                if t is None or not t.requires_grad:
                    return  # eval / no_grad forward: nothing to pair with a gradient
                layout = resolve_layout(point.layout, t.ndim)
                if layout is None:
                    raise ValueError(f"output of rank {t.ndim} (shape {tuple(t.shape)}); expected 2, 3 or 4")
                self._generation[i] += 1
                self._keep_map(i, self._native(t, layout, point.prefix_tokens))
                self._maps[i + 3] = self._natives[i + 3] = None  # a gradient of an earlier forward does not pair with these activations
                self._bad.pop(f"grad{i}", None)
                t.register_hook(self._grad_hook(i, layout, point.prefix_tokens, self._generation[i]))
            except Exception as err:  # noqa: BLE001 - never break the user's forward
                self._fault(f"forward hook {point.name}", err)

        return hook

    def _grad_hook(self, i: int, layout: str, prefix: int, generation: int):
        def hook(grad):
            if self._paired[i] or generation != self._generation[i] or not self._armed:
                return  # another forward's gradient, or one arriving after the step
            try:
                self._paired[i] = True
                self._keep_map(i + 3, self._native(grad, layout, prefix))
            except Exception as err:  # noqa: BLE001 - never break the user's backward
                self._fault(f"gradient hook {CHANNELS[i + 3]}", err)

        return hook

    def _native(self, x: torch.Tensor, layout: str, prefix: int) -> NativeMap:
        per_sample = self.release is not None
        return native_map(x, layout, self.projection, prefix, per_sample, None if per_sample else self.config.frame_size)

    def _keep_map(self, c: int, native: NativeMap) -> None:
        """Map `c` of this step: its `(S, S)` map right away (no sync) and its native `(H, W)` map for the
        frame's level and pattern; with `release`, the per-sample `(B, H, W)` maps as they are."""
        self._bad[f"act{c}" if c < 3 else f"grad{c - 3}"] = native.nonfinite
        hw = tuple(native.map.shape[-2:])
        if self.native_hw[c] is None:
            self.native_hw[c], self.native_cells[c] = hw, native.cells
        elif (self.native_hw[c], self.native_cells[c]) != (hw, native.cells):
            self.native_varies.add(CHANNELS[c])
        self._cells[c] = native.cells
        if self.release is not None:
            self._maps[c] = native.map  # (B, H, W)
            return
        self._maps[c], self._natives[c] = native.resized, native.map

    def _summaries(self, natives: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame's `(6,)` float32 levels and `(6, P, P)` bfloat16 patterns from its native maps (CPU)."""
        levels, patterns = summarise_maps(natives, self.config.pattern_size, self._cells)
        return levels, patterns.to(torch.bfloat16)

    def _input_hook(self, module, args):
        """The model's input at a capture step, for the batch's fingerprint (capture.batches)."""
        if not self._armed or self.release is not None or not torch.is_grad_enabled():
            return
        try:
            x = _first_tensor(args)
            if x is not None:
                self._batches.observe("input", x)
        except Exception as err:  # noqa: BLE001
            self._fault("input hook", err)

    def _head_hook(self, module, args, output):
        capture_step = self._armed
        if (not capture_step and self.config.gwa_window == "step") or self._head_paired:
            return
        try:
            logits = _first_tensor(output)
            z = _first_tensor(args)
            if logits is None or z is None or not logits.requires_grad:
                return
            self._head_generation += 1
            self.num_classes = int(logits.shape[-1])
            z = z.detach()
            if capture_step and self.release is not None:
                self._per_sample.update(z=z, logits=logits.detach())
                self._bad["logits"] = (~torch.isfinite(logits.detach())).flatten(1).sum(1)
            elif capture_step:
                self._head.update(output_stats(logits))
                self._bad["logits"] = (~torch.isfinite(logits.detach())).sum()
            logits.register_hook(self._head_grad_hook(z, logits.detach(), capture_step, self._head_generation))
        except Exception as err:  # noqa: BLE001
            self._fault("head forward hook", err)

    def _head_grad_hook(self, z: torch.Tensor, logits: torch.Tensor, capture_step: bool, generation: int):
        def hook(grad):
            if self._head_paired or generation != self._head_generation:
                return  # another forward's gradient (see _reset_pairs)
            self._head_paired = True
            try:
                if self.release is not None:  # per-sample terms go to the release at the frame
                    self._per_sample.update(grad_logits=grad.detach(), weight=self.head.weight.detach().clone())
                    return
                w = self.head.weight.detach().float()
                g, zf = grad.float(), z.float()
                self._alignments.append(gwa_alignments(zf, g, w))
                if capture_step:
                    self._head.update(head_gradient_scores(zf, g, w))
                    self._head["softmax_loss"] = softmax_gradient(grad, logits)
                    labels, self._head["confident_miss"] = label_readouts(grad, logits)
                    self._batches.observe("labels", labels)
            except Exception as err:  # noqa: BLE001
                self._fault("head gradient hook", err)

        return hook

    def _output_hook(self, module, args, output):
        if not self._armed:
            return
        try:
            logits = _first_tensor(output)
            if logits is not None and logits.is_floating_point() and logits.ndim >= 2 and logits.requires_grad:
                self.num_classes = int(logits.shape[-1])
                if self.release is not None:
                    self._per_sample["logits"] = logits.detach()
                else:
                    self._head.update(output_stats(logits))
        except Exception as err:  # noqa: BLE001
            self._fault("output hook", err)

    # ---------------------------------------------------------------- the training loop's call
    def step(self, loss: torch.Tensor | float | None = None, lr: float | None = None) -> Frame | None:
        """Call once per optimizer step, after backward. Returns the frame built at this step, if any."""
        try:
            if lr is None and self.optimizer is not None:
                lr = self.optimizer.param_groups[0]["lr"]
            lr = float("nan") if lr is None else float(lr)
            if loss is None:
                loss = torch.tensor(float("nan"))
            self._losses.append(loss.detach().float().mean() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss)))
            self._lrs.append(lr)
            frame = self._finish_frame() if self._armed else None
        except Exception as err:  # noqa: BLE001
            self._fault("step", err)
            frame = None
        finally:
            self.step_count += 1
            self._armed = self.step_count % self.config.cadence == 0
            self._head_paired, self._head_generation = False, 0
            if self._armed:
                self._reset_pairs()
                self._batches.start()
        return frame

    def _finish_frame(self) -> Frame:
        s = self.config.frame_size
        zeros = torch.zeros(s, s)
        absent = [CHANNELS[c] for c, m in enumerate(self._maps) if m is None]
        if absent:
            self._warn_once("absent_maps", f"no capture for {absent} at step {self.step_count} "
                            "(no forward/backward with grad through those modules?): zero maps used")
        if self.release is not None:
            return self._finish_released_frame(zeros, complete=not absent)
        maps = torch.stack([zeros if m is None else m.float().cpu() for m in self._maps])  # (6, S, S)
        frame = self.normalizer(maps).to(torch.bfloat16)

        losses = torch.stack([l.float().cpu() for l in self._losses]).tolist()  # the one sync per frame
        readouts = {k: float(v) for k, v in self._head.items()}
        if readouts.pop("softmax_loss", 1.0) < 0.5:  # MSE, BCE, a 1-logit head: softmax statistics would mislead
            readouts = {k: v for k, v in readouts.items() if k not in SOFTMAX_READOUTS}
            self._batches.discard("labels")  # not labels: a gradient that moves with the weights
            self._warn_once("not_softmax", f"the loss on the head's output is not a softmax loss (dL/dlogits rows do "
                            f"not sum to 0: MSE, BCE, a single logit, ...): readouts {list(SOFTMAX_READOUTS)} are "
                            f"marked missing; the head-gradient readouts hold for any loss")
        if self._alignments:
            readouts["gwa"] = float(gwa_aggregate(torch.cat([a.cpu() for a in self._alignments])))
        readouts["loss"] = losses[-1]
        readouts["lr"] = self._lrs[-1]
        readouts["nonfinite"] = float(sum(int(b) for b in self._bad.values()))
        try:
            readouts.update(self._weights.readouts(self.step_count))  # NaN at the first frame
        except Exception as err:  # noqa: BLE001 - the frame keeps its other readouts
            self._fault("weight_step", err)
        try:
            readouts["batch_repeat"] = self._batches.readout()
        except Exception as err:  # noqa: BLE001
            self._fault("batch_repeat", err)
        missing = [k for k in READOUT_NAMES if k not in readouts or (k in self.missing)]
        levels, patterns = self._summaries(self._natives)
        out = Frame(self.step_count, frame, {k: (math.nan if k in missing else readouts[k]) for k in READOUT_NAMES},
                    complete=not absent, levels=levels, patterns=patterns, num_classes=self.num_classes, step_losses=losses)
        return self._emit(out, losses)

    def _finish_released_frame(self, zeros: torch.Tensor, complete: bool = True) -> Frame:
        """The frame from `release(per-sample terms)`: maps and readouts as released, nothing else."""
        bad = [b for b in self._bad.values() if b.ndim == 1]
        nonfinite = torch.stack([b.to(bad[0].device) for b in bad]).sum(0) if bad and len({b.shape for b in bad}) == 1 else None
        maps, readouts = self.release(PerSample(maps=list(self._maps), nonfinite=nonfinite, **self._per_sample))
        frame = self.normalizer(torch.stack([zeros if m is None else resize_map(m.float(), self.config.frame_size).cpu()
                                             for m in maps])).to(torch.bfloat16)  # (6, S, S)
        levels, patterns = self._summaries(maps)  # from the released maps, like the frame
        readouts = {k: float(v) for k, v in readouts.items()}
        readouts["lr"] = self._lrs[-1]
        missing = [k for k in READOUT_NAMES if k not in readouts or (k in self.missing)]
        out = Frame(self.step_count, frame, {k: (math.nan if k in missing else readouts[k]) for k in READOUT_NAMES},
                    complete=complete, levels=levels, patterns=patterns, num_classes=self.num_classes)
        return self._emit(out, [math.nan] * len(self._lrs))  # per-step losses are not released

    def _emit(self, out: Frame, losses: list[float]) -> Frame:
        self.sink.append_steps(losses, self._lrs)
        self.sink.append_frame(out)
        self.last_frame = out
        self._losses, self._lrs, self._alignments = [], [], []
        self._reset_step()
        return out

    def flush_steps(self) -> None:
        """Hand per-step losses/lrs logged since the last frame to the sink (call at the end of a run)."""
        if self._lrs:
            losses = ([math.nan] * len(self._lrs) if self.release is not None
                      else torch.stack([l.float().cpu() for l in self._losses]).tolist())
            self.sink.append_steps(losses, self._lrs)
            self._losses, self._lrs = [], []

    # ---------------------------------------------------------------- results and lifetime
    @property
    def frames(self) -> list[Frame]:
        """Frames kept in memory (only when no other sink was given)."""
        return self.buffer.frames

    def metadata(self) -> dict:
        """What a run store records about how its frames were made."""
        return {
            "config": asdict(self.config),
            "points": [{"position": p.position, "name": p.name, "layout": p.layout, "prefix_tokens": p.prefix_tokens} for p in self.points],
            "head": None if self.head is None else type(self.head).__name__,
            "projection": self.projection.to_dict(),
            "projection_digest": self.projection.digest(),
            "normalizer": self.normalizer.state_dict(),
            "summaries": {  # how Frame.levels and Frame.patterns were made (capture.frames.map_summary)
                "pattern_size": self.config.pattern_size,
                "level": "log10 RMS of the native batch-mean map's data cells, before any normalisation",
                "level_floor": LEVEL_FLOOR,
                "pattern_resize": PATTERN_RESIZE,
                "native_hw": [None if hw is None else list(hw) for hw in self.native_hw],  # per map, in CHANNELS order
                "native_cells": list(self.native_cells),
                "native_varies": sorted(self.native_varies),
            },
            "readouts_missing": sorted(self.missing),
            "faults": self.faults[:100],
        }

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.flush_steps()
        self.remove()


def attach(
    model: nn.Module,
    config: CaptureConfig | None = None,
    *,
    head: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    projection: Projection | None = None,
    sink: Sink | None = None,
    release: Release | None = None,
    **overrides,
) -> Capture:
    """Attach capture hooks to `model`. `overrides` set `CaptureConfig` fields (`cadence=10`)."""
    config = config or CaptureConfig()
    if overrides:
        valid = set(CaptureConfig.__dataclass_fields__)
        unknown = set(overrides) - valid
        if unknown:
            raise TypeError(f"unknown capture option(s) {sorted(unknown)}; valid: {sorted(valid)}")
        config = CaptureConfig(**{**asdict(config), **overrides})
    return Capture(model, config, head=head, optimizer=optimizer, projection=projection, sink=sink, release=release)
