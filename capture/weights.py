"""How far the watched layers' weights moved per optimizer step between two frames: the `weight_step` readout.

A frame's activations and gradients say what the network computes; how fast its weights move says how
hard the optimizer pushes it. A learning rate raised 30x moves the weights 30x faster per step even when
the loss barely shows it, and a schedule's decay slows them; the run-relative inputs read this as a ratio
to the run's own earlier frames (`capture.relative`), so neither the size of the network nor the optimizer
(Adam, Lion, SGD, ...) sets its scale. It reads the model's parameters only, never the optimizer's state or
its learning rate.

    weight_step = ||w_t - w_prev|| / (||w_t|| * steps)    over a fixed sample of the weights' entries

The sample: every k-th entry of each parameter of the hook points' modules and the head (at most
`per_tensor` entries a tensor), chosen once when the capture attaches, snapshotted at every frame (a few kB
to a few hundred kB, on the parameters' device). The first frame has no previous snapshot: NaN.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class WeightStep:
    """`frame(step)` at each frame -> the weights' relative movement per step since the previous frame
    (NaN at the first frame, or when the sample is empty)."""

    def __init__(self, modules: list[nn.Module], per_tensor: int = 4096):
        seen: set[int] = set()
        self.params: list[tuple[nn.Parameter, int]] = []  # (parameter, stride of its sampled entries)
        for m in modules:
            for p in m.parameters():
                if id(p) in seen or not p.requires_grad or p.numel() == 0:
                    continue
                seen.add(id(p))
                self.params.append((p, max(1, math.ceil(p.numel() / per_tensor))))
        self._previous: torch.Tensor | None = None
        self._step: int | None = None

    def sample(self) -> torch.Tensor | None:
        """The sampled entries now, float32, one vector (None without parameters)."""
        if not self.params:
            return None
        device = self.params[0][0].device
        with torch.no_grad():  # a strided view of each flattened parameter, copied as float32
            return torch.cat([p.detach().reshape(-1)[::stride].float().to(device) for p, stride in self.params])

    def frame(self, step: int) -> float:
        now = self.sample()
        previous, last = self._previous, self._step
        self._previous, self._step = now, step
        if now is None or previous is None or last is None or step <= last:
            return math.nan
        return float(torch.linalg.vector_norm(now - previous) / (torch.linalg.vector_norm(now) + 1e-12) / (step - last))


__all__ = ["WeightStep"]
