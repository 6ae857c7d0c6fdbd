"""Sinks: the monitor's frames, readouts and alerts in the tools people already watch.

    from diagnose.sinks import TensorBoardSink, WandbSink
    monitor = diagnose.watch(model, optimizer, callbacks=[TensorBoardSink("runs/exp1"), WandbSink(project="exp")])
    ...
    monitor.remove()                                   # closes (flushes) the sinks

A sink is a monitor callback (`MonitorCallback`: no-op `on_alert`, `on_frame`, `close`, shaped like a
Lightning `Callback`). At every frame it logs the finite readouts as scalars and the six frame channels
as grayscale images; at every alert a scalar (the TEViD probability, 1.0 for a rule) and the alert's
text, each at the optimizer step it belongs to. `Monitor.remove()` calls `close()` on every callback
that has one.

A sink never stops the training job: an exception inside it (disk full, an unwritable directory, a
wandb hiccup) is caught, logged once on the "tevid" logger and recorded in `sink.faults`; the next
call tries again. Mistakes in the call itself (wrong argument types, wandb not installed) raise at
construction.
"""
from __future__ import annotations

import logging
import math
import os
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import repeat

from capture.frames import CHANNELS
from capture.recorder import Frame
from diagnose.callbacks import MonitorCallback
from diagnose.symptoms import Alert

logger = logging.getLogger("tevid")
ALERT_COLUMNS = ("step", "name", "source", "probability", "message")


@dataclass
class SinkConfig:
    """What a sink logs and how frames become images."""

    prefix: str = "tevid/"  # every key starts with it: <prefix>readouts/<name>, <prefix>frames/<channel>, <prefix>alerts...
    images: bool = True  # the six frame channels as images
    image_every: int = 1  # images at every n-th frame only (each frame is six PNGs; readouts go at every frame)
    image_range: float = 4.0  # frame values (signed log1p robust z-scores) in [-r, r] -> black..white, 0 mid-gray
    # small frames are upscaled (nearest neighbour, integer factor) to at least this side; None: the sink's
    # default (TensorBoard: none, its image cards draw pixels sharp at any size; wandb: 128)
    image_size: int | None = None

    def __post_init__(self):
        if not isinstance(self.prefix, str):
            raise TypeError(f"SinkConfig.prefix must be a str, got {type(self.prefix).__name__}")
        if self.image_every < 1:
            raise ValueError(f"SinkConfig.image_every must be >= 1, got {self.image_every}")
        if not self.image_range > 0:
            raise ValueError(f"SinkConfig.image_range must be > 0, got {self.image_range}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"SinkConfig.image_size must be >= 1, got {self.image_size}")


def frame_images(frame: torch.Tensor, image_range: float = 4.0, image_size: int = 1) -> np.ndarray:
    """A `(6, S, S)` frame as six grayscale uint8 images `(6, kS, kS)`: values in [-r, r] map linearly to
    0..255 (0 -> 128, clipped beyond; a fixed range, so brightness is comparable across steps), each pixel
    repeated k = ceil(image_size / S) times per side so that small frames stay sharp when displayed."""
    x = frame.detach().float().cpu().nan_to_num(nan=0.0)
    x = ((x.clamp(-image_range, image_range) / image_range + 1) * 127.5).round().to(torch.uint8)
    k = max(1, -(-image_size // x.shape[-1]))
    return repeat(x, "c h w -> c (h k1) (w k2)", k1=k, k2=k).numpy()


def finite_readouts(readouts: dict) -> dict[str, float]:
    """The readouts that are finite numbers (NaN marks a readout the capture could not compute)."""
    out = {}
    for name, value in readouts.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            out[name] = value
    return out


def alert_text(alert: Alert) -> str:
    """One line of markdown for an alert: name, source, probability, step and message."""
    p = "" if alert.probability is None else f", p = {alert.probability:.3f}"
    return f"**{alert.name}** ({alert.source}{p}) at step {alert.step}: {alert.message}"


def _rank() -> int:
    from diagnose.wrappers import dist_info as _dist_info

    return _dist_info()[0]


class _GuardedSink(MonitorCallback):
    """A sink whose work runs in a guard: an exception is logged once per place and kept in `faults`."""

    image_size = 1  # the default of SinkConfig.image_size for this sink

    def __init__(self, config: SinkConfig | None):
        if config is not None and not isinstance(config, SinkConfig):
            raise TypeError(f"config must be a diagnose.sinks.SinkConfig, got {type(config).__name__}")
        self.config = config or SinkConfig()
        self.faults: list[str] = []
        self._warned: set[str] = set()
        self._frames_seen = 0

    def _images(self, frame: Frame) -> np.ndarray:
        c = self.config
        return frame_images(frame.frame, c.image_range, self.image_size if c.image_size is None else c.image_size)

    def _guard(self, where: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - a sink must never stop the training job
            self.faults.append(f"{where}: {type(err).__name__}: {err}")
            if where not in self._warned:
                self._warned.add(where)
                summary = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-3))
                logger.warning("%s could not log (%s; training continues, later failures here are not logged): "
                               "%s: %s\n%s", type(self).__name__, where, type(err).__name__, err, summary)

    def on_alert(self, alert: Alert) -> None:
        self._guard("on_alert", self._log_alert, alert)

    def on_frame(self, frame: Frame) -> None:
        images = self.config.images and self._frames_seen % self.config.image_every == 0
        self._frames_seen += 1
        self._guard("on_frame", self._log_frame, frame, images)

    def close(self) -> None:
        self._guard("close", self._close)

    def _log_alert(self, alert: Alert) -> None:
        raise NotImplementedError

    def _log_frame(self, frame: Frame, images: bool) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class TensorBoardSink(_GuardedSink):
    """Frames, readouts and alerts as TensorBoard events in `log_dir` (`tensorboard --logdir <log_dir>`),
    through `torch.utils.tensorboard.SummaryWriter`, each at its optimizer step:

    - `<prefix>readouts/<name>`: scalar, the finite readouts of each frame
    - `<prefix>frames/<channel>`: grayscale image per channel of `capture.CHANNELS` (`frame_images`)
    - `<prefix>alerts/<name>`: scalar, the TEViD probability (1.0 for a rule), and `<prefix>alerts/text_summary`:
      one line of text per alert (`alert_text`; `add_text` appends "/text_summary" to the tag)

    The writer opens at the first event (ranks where the monitor is off create nothing); on a rank > 0
    it writes to `log_dir/rank<r>`, like the monitor's own `log_dir`. Alerts are flushed at once,
    frames every `flush_secs`, everything at `close()`."""

    def __init__(self, log_dir: str | os.PathLike, config: SinkConfig | None = None, *, flush_secs: int = 30):
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"TensorBoardSink(log_dir=...) takes a directory path, got {type(log_dir).__name__}")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("TensorBoardSink needs the tensorboard package: pip install tensorboard") from err
        super().__init__(config)
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self._writer = None

    @property
    def writer(self):
        """The `SummaryWriter` (opened on first use)."""
        if self._writer is None:
            rank = _rank()
            d = self.log_dir if rank == 0 else self.log_dir / f"rank{rank}"
            self._writer = self._writer_class(log_dir=str(d), flush_secs=self.flush_secs)
        return self._writer

    def _log_frame(self, frame: Frame, images: bool) -> None:
        w, p = self.writer, self.config.prefix
        for name, value in finite_readouts(frame.readouts).items():
            w.add_scalar(f"{p}readouts/{name}", value, frame.step)
        if images:
            for channel, img in zip(CHANNELS, self._images(frame)):
                w.add_image(f"{p}frames/{channel}", img, frame.step, dataformats="HW")

    def _log_alert(self, alert: Alert) -> None:
        w, p = self.writer, self.config.prefix
        value = 1.0 if alert.probability is None else float(alert.probability)
        w.add_scalar(f"{p}alerts/{alert.name}", value, alert.step)
        w.add_text(f"{p}alerts", alert_text(alert), alert.step)
        w.flush()

    def _close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()  # flushes; a later event opens a new writer (a new event file in the same directory)


class WandbSink(_GuardedSink):
    """Frames, readouts and alerts in a Weights & Biases run (needs `wandb`).

    run: a run to log into (left running at `close()`); None: a new run `wandb.init(**init_kwargs)` when
    arguments are given or no run is active, else the active `wandb.run`. A new run is started here,
    before training, so that a login problem shows at once, and finished at `close()`.
    Every row carries `<prefix>step`, the optimizer step, declared as the x axis of the `<prefix>*` keys
    (`run.define_metric(..., step_metric=...)`), rather than wandb's own `step=`: that step must only
    grow, so alerts (whose step precedes the frame just logged) and a run the user also logs to with
    their own step would be dropped. Keys: `<prefix>readouts/<name>` (finite readouts),
    `<prefix>frames/<channel>` (`wandb.Image`), `<prefix>alerts/<name>` (probability, 1.0 for a rule)
    and `<prefix>alerts` (a `wandb.Table` of every alert so far: step, name, source, probability, message).
    Frames are upscaled to 128 pixels a side by default (`SinkConfig.image_size`)."""

    image_size = 128

    def __init__(self, run=None, *, config: SinkConfig | None = None, **init_kwargs):
        try:
            import wandb
        except ImportError as err:
            raise ImportError("WandbSink needs the wandb package: pip install wandb") from err
        super().__init__(config)
        if not self.config.prefix:
            raise ValueError("WandbSink needs a non-empty SinkConfig.prefix: its step key and the x axis it declares "
                             "for '<prefix>*' would otherwise take over every key of the run")
        if run is not None and init_kwargs:
            raise TypeError(f"WandbSink: give either run= or wandb.init arguments, not both (got {sorted(init_kwargs)})")
        if run is not None and not callable(getattr(run, "log", None)):
            raise TypeError(f"WandbSink(run=...) takes a wandb run (wandb.init()'s result), got {type(run).__name__}")
        self._wandb = wandb
        self._owned = run is None and (bool(init_kwargs) or wandb.run is None)
        self.run = wandb.init(**init_kwargs) if self._owned else (run or wandb.run)
        self.alerts: list[list] = []  # rows of the alert table
        p = self.config.prefix
        self.run.define_metric(f"{p}step")
        self.run.define_metric(f"{p}*", step_metric=f"{p}step")

    def _log(self, step: int, values: dict) -> None:
        self.run.log({f"{self.config.prefix}step": int(step), **values})

    def _log_frame(self, frame: Frame, images: bool) -> None:
        p = self.config.prefix
        values = {f"{p}readouts/{k}": v for k, v in finite_readouts(frame.readouts).items()}
        if images:
            imgs = self._images(frame)
            values.update({f"{p}frames/{c}": self._wandb.Image(img, mode="L", caption=f"{c}, step {frame.step}")
                           for c, img in zip(CHANNELS, imgs)})
        self._log(frame.step, values)

    def _log_alert(self, alert: Alert) -> None:
        p = self.config.prefix
        value = 1.0 if alert.probability is None else float(alert.probability)
        self.alerts.append([alert.step, alert.name, alert.source, alert.probability, alert.message])
        table = self._wandb.Table(columns=list(ALERT_COLUMNS), data=[list(r) for r in self.alerts])
        self._log(alert.step, {f"{p}alerts/{alert.name}": value, f"{p}alerts": table})

    def _close(self) -> None:
        if self._owned and self.run is not None:
            run, self.run = self.run, None
            run.finish()
