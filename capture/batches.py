"""Whether a frame's training batch came back: the `batch_repeat` readout.

A data loader that repeats its batches is a bug that no loss curve names: a sampler or shard list cut short
cycles a few batches, an iterator re-created every step (`next(iter(loader))` without shuffling) serves
the first batch for ever, a stuck prefetcher hands out its last one. The model then memorises a handful of
batches while the loss keeps falling, which reads as healthy training. Fresh batches drawn at random
practically never come back in the same order, so an exact repeat of a whole batch says the loader is stuck.

    batch_repeat = 1 if this frame's capture batch equals one of the previous `memory` frames' batches, else 0

A batch is fingerprinted, without copying it, by a few numbers: the model input's sum of absolute values and
its dot product with a fixed pseudo-random vector (when the model is called with a tensor as its first
positional argument), and the same of the labels read from the head's gradient (`readouts.gradient_labels`,
when a softmax loss reads the logits). Two batches match when every number agrees to a relative 1e-6. At
cadence c a cycle of k batches comes back every k / gcd(c, k) frames, so a memory of 32 frames sees every
cycle of up to 32 batches, at any cadence. A loader without shuffling repeats once per epoch, so an epoch
shorter than `memory` frames reads as repeats: it is one. The random vector comes from its own generator
(seed 0), so attaching the capture never moves the user's random state. NaN when the frame saw neither an
input nor labels.
"""
from __future__ import annotations

import math
from collections import deque

import torch

RTOL = 1e-6


class BatchRecurrence:
    """`observe(name, tensor)` at a capture step (no sync), then `readout()` at its frame -> `batch_repeat`."""

    def __init__(self, memory: int = 32, max_entries: int = 1 << 20):
        if memory < 1:
            raise ValueError(f"memory must be >= 1 frame, got {memory}")
        self.max_entries = max_entries
        self._seen: deque[tuple[tuple[str, ...], torch.Tensor]] = deque(maxlen=memory)  # earlier frames' fingerprints
        self._now: dict[str, torch.Tensor] = {}  # this capture step's parts: name -> (2,) float64 on the device
        self._vectors: dict[tuple[int, torch.device], torch.Tensor] = {}  # the fixed random vector per length

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Fingerprint `x` (any shape and dtype) as this capture step's part `name`; the first one of a step stays."""
        if name in self._now:
            return
        with torch.no_grad():
            v = x.detach().reshape(-1)
            if v.numel() > self.max_entries:  # a strided sample of a very large input
                v = v[::math.ceil(v.numel() / self.max_entries)]
            v = v.to(torch.float64) if v.device.type == "cpu" else v.float()
            r = self._vector(v.numel(), v.device).to(v.dtype)
            self._now[name] = torch.stack([v.abs().sum(), v @ r]).double()

    def start(self) -> None:
        """A new capture step: forget parts a step left behind (a frame that faulted before its readout)."""
        self._now = {}

    def discard(self, name: str) -> None:
        """Drop this step's part `name` (one that turned out not to be the batch's own)."""
        self._now.pop(name, None)

    def readout(self) -> float:
        """1.0 when this step's fingerprint matches one of the last `memory` frames', 0.0 if not, NaN when the
        step observed nothing. Then the step's fingerprint joins the memory."""
        now, self._now = self._now, {}
        if not now:
            return math.nan
        names = tuple(sorted(now))
        value = torch.cat([now[n] for n in names]).cpu()  # the one sync
        repeat = any(names == seen_names and bool(torch.all((value - seen).abs() <= RTOL * (value.abs() + seen.abs())))
                     for seen_names, seen in self._seen)
        self._seen.append((names, value))
        return 1.0 if repeat else 0.0

    def _vector(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, device)
        if key not in self._vectors:
            if len(self._vectors) >= 8:  # inputs of varying length (text padded per batch): keep a few
                self._vectors.clear()
            gen = torch.Generator().manual_seed(0)  # its own generator: the user's random state never moves
            self._vectors[key] = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1).to(device)
        return self._vectors[key]


__all__ = ["BatchRecurrence"]
