"""Capture: hooks on three blocks -> 6-channel bf16 frames + scalar readouts -> zarr run stores.

The base package of TEViD (DESIGN.md §2-§5): every other stage reads and writes runs through it.
"""
from capture.frames import CHANNELS, Projection, RobustNormalizer
from capture.hookpoints import HookPoint, HookPointError, find_head, find_hook_points
from capture.readouts import READOUT_NAMES
from capture.recorder import Capture, CaptureConfig, Frame, FrameBuffer, attach
from capture.store import RunStore, RunStoreError, RunWriter, read_privileged

__all__ = [
    "CHANNELS", "READOUT_NAMES", "Capture", "CaptureConfig", "Frame", "FrameBuffer", "HookPoint",
    "HookPointError", "Projection", "RobustNormalizer", "RunStore", "RunStoreError", "RunWriter",
    "attach", "find_head", "find_hook_points", "read_privileged",
]
