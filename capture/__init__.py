"""Capture: hooks on three blocks -> 6-channel bf16 frames + scalar readouts -> zarr run stores.

The base package of TEViD (docs/architecture.md): every other stage reads and writes runs through it.
The public API below is imported on first use (`capture.lazy`), so `import capture.schema` (the shared
names) does not load torch or zarr. A run's privileged group (validation signals, labelling statistics)
is read with `capture.store.read_privileged`, by the factory and the evaluation only: it is not part of
this API.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from capture.lazy import lazy_exports

__all__ = [
    "CHANNELS", "READOUT_NAMES", "Capture", "CaptureConfig", "Frame", "FrameBuffer", "HookPoint",
    "HookPointError", "Projection", "RobustNormalizer", "RunStore", "RunStoreError", "RunWriter",
    "attach", "find_head", "find_hook_points",
]
__getattr__, __dir__ = lazy_exports(__name__, {
    "CHANNELS": "frames", "Projection": "frames", "RobustNormalizer": "frames",
    "HookPoint": "hookpoints", "HookPointError": "hookpoints", "find_head": "hookpoints", "find_hook_points": "hookpoints",
    "READOUT_NAMES": "readouts",
    "Capture": "recorder", "CaptureConfig": "recorder", "Frame": "recorder", "FrameBuffer": "recorder", "attach": "recorder",
    "RunStore": "store", "RunStoreError": "store", "RunWriter": "store",
})

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from capture.frames import CHANNELS, Projection, RobustNormalizer
    from capture.hookpoints import HookPoint, HookPointError, find_head, find_hook_points
    from capture.readouts import READOUT_NAMES
    from capture.recorder import Capture, CaptureConfig, Frame, FrameBuffer, attach
    from capture.store import RunStore, RunStoreError, RunWriter
