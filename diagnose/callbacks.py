"""Monitor callbacks: the base class, the dispatcher that keeps one callback's fault from the others, and
the JSON-lines log (`watch(log_dir=...)`).

A callback is a function `f(alert)` or an object with any of `on_alert(alert)`, `on_frame(frame)`,
`close()` (`MonitorCallback` has them as no-ops, like a Lightning `Callback`). `CallbackList` calls them in
order. An exception in one is reported once per callback on the "tevid" logger (later ones are counted
in `CallbackList.faults`) and skipped: it never stops the rule symptoms, the other callbacks, or later
alerts.
"""
from __future__ import annotations

import json
import logging
import math
import os
import traceback
from pathlib import Path

import numpy as np

logger = logging.getLogger("tevid")


def jsonable(obj):
    """Strict-JSON form: non-finite floats -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


class MonitorCallback:
    """Base class of monitor callbacks (a Lightning `Callback` in shape): override what you need.
    The monitor calls `on_frame` at every frame (rank 0, and ranks with `other_ranks="capture"`),
    `on_alert` at every alert, and `close` once at `monitor.remove()`."""

    def on_alert(self, alert) -> None:
        """An alert (`diagnose.symptoms.Alert`), as it is raised."""

    def on_frame(self, frame) -> None:
        """A frame (`capture.Frame`: `.step`, `.frame` (6, S, S) bf16 on the CPU, `.readouts` {name: float, NaN if unknown})."""

    def close(self) -> None:
        """Flush and release what the callback holds (called by `monitor.remove()`)."""


def check_callbacks(callbacks) -> list:
    """`watch(callbacks=...)` as a list, or a TypeError naming what is wrong (nothing is attached yet)."""
    if callbacks is None:
        return []
    if callable(callbacks) or isinstance(callbacks, MonitorCallback) or hasattr(callbacks, "on_alert"):
        callbacks = [callbacks]
    if isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise TypeError(f"watch(callbacks=...) takes a list of callables f(alert) or objects with on_alert / on_frame, "
                        f"got {type(callbacks).__name__} {callbacks!r}")
    out = list(callbacks)
    for i, cb in enumerate(out):
        if not (callable(cb) or any(callable(getattr(cb, m, None)) for m in ("on_alert", "on_frame", "close"))):
            raise TypeError(f"watch(callbacks=...): item {i} is {type(cb).__name__} {cb!r}, neither a callable f(alert) "
                            f"nor an object with on_alert / on_frame / close")
    return out


class CallbackList:
    """The monitor's callbacks, each call guarded: a fault is reported once per callback and skipped."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)
        self.faults: dict[int, int] = {}  # callback position -> exceptions so far
        self._closed = False

    def insert(self, callback) -> None:
        self.callbacks.insert(0, callback)
        self.faults = {i + 1: n for i, n in self.faults.items()}

    def on_frame(self, frame) -> None:
        for i, cb in enumerate(self.callbacks):
            fn = getattr(cb, "on_frame", None)
            if callable(fn):
                self._call(i, cb, fn, frame)

    def on_alert(self, alert) -> None:
        for i, cb in enumerate(self.callbacks):
            fn = getattr(cb, "on_alert", None)
            fn = fn if callable(fn) else (cb if callable(cb) and not isinstance(cb, MonitorCallback) else None)
            if fn is not None:
                self._call(i, cb, fn, alert)

    def close(self) -> None:
        """`close()` of each callback, once; a failure is logged, the others still close."""
        if self._closed:
            return
        self._closed = True
        for cb in self.callbacks:
            close = getattr(cb, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as err:  # noqa: BLE001 - training is over; closing the rest matters more
                    logger.warning("callback %s: close() at remove() failed: %s: %s", _name(cb), type(err).__name__, err)

    def _call(self, i: int, cb, fn, arg) -> None:
        try:
            fn(arg)
        except Exception as err:  # noqa: BLE001 - a user's callback never stops the monitor or the job
            n = self.faults.get(i, 0) + 1
            self.faults[i] = n
            if n == 1:
                summary = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-3))
                logger.warning("callback %s raised %s: %s (skipped; the monitor, the other callbacks and later calls "
                               "go on; later exceptions of this callback are counted, not logged)\n%s",
                               _name(cb), type(err).__name__, err, summary)


def _name(cb) -> str:
    return getattr(cb, "__qualname__", None) or type(cb).__name__


class JsonlSink(MonitorCallback):
    """`log_dir/alerts.jsonl` and `log_dir/readouts.jsonl`, appended one JSON line per alert / frame."""

    def __init__(self, log_dir: str | os.PathLike):
        self.log_dir = Path(log_dir)

    def _append(self, name: str, obj: dict) -> None:
        with open(self.log_dir / name, "a") as f:
            f.write(json.dumps(jsonable(obj)) + "\n")

    def on_frame(self, frame) -> None:
        self._append("readouts.jsonl", {"step": frame.step, **frame.readouts})

    def on_alert(self, alert) -> None:
        self._append("alerts.jsonl", alert.to_dict())
