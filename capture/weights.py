"""How far the watched layers' weights moved per optimizer step between two frames: the `weight_step` and
`weight_still` readouts.

A frame's activations and gradients say what the network computes; how fast its weights move says how
hard the optimizer pushes it. A learning rate raised 30x moves the weights 30x faster per step even when
the loss barely shows it, and a schedule's decay slows them; the run-relative inputs read this as a ratio
to the run's own earlier frames (`capture.relative`), so neither the size of the network nor the optimizer
(Adam, Lion, SGD, ...) sets its scale. It reads the model's parameters only, never the optimizer's state or
its learning rate.

    weight_step = ||w_t - w_prev|| / (||w_t|| * steps)    over a fixed sample of the weights' entries

A frozen part of the network (a backbone freeze meant for a fine-tune and never undone, parameters left out of
the optimizer) barely changes that pace when the rest moves faster; it shows as tensors that stopped moving while
the others move:

    weight_still = the share of sampled tensors whose relative movement ||w_t - w_prev|| / ||w_t|| is below
                   `still_ratio` (1e-6) times the fastest tensor's

Healthy layers' paces lie within a few orders of magnitude of each other, so this counts the tensors that did
not move. 0 when nothing moved at all (a learning rate of 0, skipped steps): the pace says that. The fastest
tensor, not the median: when half the network is frozen the median tensor may be one of them. A share, not a
size, so the network's width and depth do not set it. Parameters frozen before the capture attached
(`requires_grad` False) are not in the sample: a fine-tune of a head on a frozen backbone reads 0.

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
    (NaN at the first frame, or when the sample is empty); `still` is then that frame's `weight_still`
    (`readouts(step)` gives both by name)."""

    def __init__(self, modules: list[nn.Module], per_tensor: int = 4096, still_ratio: float = 1e-6):
        seen: set[int] = set()
        self.params: list[tuple[nn.Parameter, int]] = []  # (parameter, stride of its sampled entries)
        for m in modules:
            for p in m.parameters():
                if id(p) in seen or not p.requires_grad or p.numel() == 0:
                    continue
                seen.add(id(p))
                self.params.append((p, max(1, math.ceil(p.numel() / per_tensor))))
        sizes = torch.tensor([math.ceil(p.numel() / stride) for p, stride in self.params], dtype=torch.long)
        self._tensor_of = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # (entries,) -> its tensor
        self.still_ratio = still_ratio
        self.still = math.nan  # the last frame's weight_still
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
            self.still = math.nan
            return math.nan
        diff = now - previous  # once, for both readouts
        pace = torch.linalg.vector_norm(diff) / (torch.linalg.vector_norm(now) + 1e-12) / (step - last)
        pace, self.still = torch.stack([pace.double(), self._still(diff, now)]).tolist()  # the one sync
        return pace

    def readouts(self, step: int) -> dict[str, float]:
        """`frame(step)` as the recorder's readouts: {weight_step, weight_still}."""
        pace = self.frame(step)
        return {"weight_step": pace, "weight_still": self.still}

    def _still(self, diff: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
        """The share of sampled tensors moving less than `still_ratio` x the fastest tensor's relative movement,
        a 0-d float64 tensor on the sample's device (0 when no tensor moved or the movement is not finite)."""
        if self._tensor_of.device != now.device:  # moved to the parameters' device once
            self._tensor_of = self._tensor_of.to(now.device)
        n = len(self.params)
        moved_sq = now.new_zeros(n).index_add_(0, self._tensor_of, diff ** 2)
        size_sq = now.new_zeros(n).index_add_(0, self._tensor_of, now ** 2)
        moved = moved_sq.sqrt() / (size_sq.sqrt() + 1e-12)  # (tensors,) relative movement
        fastest = moved.max()
        share = (moved < self.still_ratio * fastest).double().mean()
        return torch.where(torch.isfinite(fastest) & (fastest > 0), share, torch.zeros_like(share))

__all__ = ["WeightStep"]
