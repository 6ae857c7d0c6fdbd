"""What the rule symptoms see at each frame: two kinds of evidence, one per privacy setting.

`StepEvidence` (the default): the loss of every optimizer step (`diagnose.loss_recovery.LossTracker`),
gradient statistics every `grad_every` steps (`diagnose.layer_stats.GradStatsReader`) and the layer
statistics of the capture step, all synced once per frame.

`ReleasedEvidence` (`watch(dp=...)`): only what the frame's one DP release carries: its (private) loss,
and non-finite values when the released count says more than half of the capture batch had some (the
count is noisy). Per-step losses, gradient and layer statistics are never read.
"""
from __future__ import annotations

import logging
import math

from capture.recorder import Frame
from diagnose.layer_stats import GradStatsReader
from diagnose.loss_recovery import LossTracker
from diagnose.symptoms import LayerStats, Observation

logger = logging.getLogger("tevid")


class StepEvidence:
    private = False

    def __init__(self, model, optimizer, grad_every: int, read_grads: bool, warn_unknown_loss: bool = True):
        self.model_name = type(model).__name__
        self.losses = LossTracker()
        self.grads = GradStatsReader(model, optimizer) if optimizer is not None and read_grads else None
        self.grad_every = grad_every
        self.warn_unknown_loss = warn_unknown_loss
        self.step_losses: list[float] = []  # the losses of the steps the last `observations` drained (NaN: unknown)

    def on_step(self, step: int, armed: bool):
        """At optimizer step `step`: record its loss and gradient statistics; the loss for a frame built now."""
        self.losses.take(step)
        if self.grads is not None and step % self.grad_every == 0:
            self.grads.read(step)
        return self.losses.now() if armed else math.nan

    def observations(self, frame: Frame | None, layers: dict[str, LayerStats]) -> list[Observation]:
        """The observations of every step since the last frame (`frame` None: the steps after the last one)."""
        losses = self.losses.drain()
        self._warn_if_unknown(losses)
        self.step_losses = [math.nan if loss is None else float(loss) for _, loss in losses]
        grads = self.grads.sync() if self.grads is not None else {}
        out = []
        for st, loss in losses:
            at_frame = frame is not None and st == frame.step
            out.append(Observation(st, loss=loss, grads=grads.pop(st, None), layers=layers if at_frame else None,
                                   nonfinite=frame.readouts.get("nonfinite") if at_frame else None))
        out += [Observation(st, grads=grads[st]) for st in sorted(grads)]  # a gradient check with no loss entry
        return out

    def frame_step_losses(self, frame: Frame) -> list | None:
        """The losses of the steps since the previous frame, up to and including `frame`'s, as a store's
        `train_loss` holds them (`capture.relative.interval_losses`): the capture only syncs the frame's own
        step, so its `step_losses` are NaN before it; the ones `observations` drained for this frame are
        the steps' real losses (observed, or recovered from the head). Call after `observations(frame, ...)`."""
        n = len(frame.step_losses or ())
        return self.step_losses[-n:] if n and len(self.step_losses) >= n else frame.step_losses

    def pending(self) -> bool:
        return self.losses.pending() or bool(self.grads is not None and self.grads.pending)

    def discard(self) -> None:
        self.losses.discard()

    def _warn_if_unknown(self, losses) -> None:
        if self.warn_unknown_loss and not self.losses.warned and any(loss is None for _, loss in losses):
            self.losses.warned = True
            logger.warning("the training loss is not recoverable from the head's gradient (not a mean softmax "
                           "cross-entropy on %s's output: MSE, BCE, label smoothing, extra terms, no head, or "
                           "non-finite gradients): loss readouts and loss symptoms are missing; call "
                           "monitor.observe(loss=loss) each step to give it", self.model_name)


class ReleasedEvidence:
    private = True

    def __init__(self, dp):
        self.dp = dp  # diagnose.privacy.DPTelemetry, the capture's release
        self.losses = LossTracker()  # observe() is accepted but not released

    def on_step(self, step: int, armed: bool):
        self.losses.discard()
        return math.nan  # the frame's loss readout is released from the head

    def observations(self, frame: Frame | None, layers: dict) -> list[Observation]:
        if frame is None:
            return []
        loss, nonfinite = frame.readouts.get("loss", math.nan), frame.readouts.get("nonfinite", math.nan)
        flagged = math.isfinite(nonfinite) and nonfinite > (self.dp.batch or 0) / 2
        return [Observation(frame.step, loss=loss if math.isfinite(loss) else None, nonfinite=nonfinite if flagged else 0.0)]

    def frame_step_losses(self, frame: Frame) -> list | None:
        """Per-step losses are not released: the frame's own (NaN), as a released run's store holds them."""
        return frame.step_losses

    def pending(self) -> bool:
        return False

    def discard(self) -> None:
        pass
