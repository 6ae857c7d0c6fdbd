"""Layer and gradient statistics for the rule symptoms, gathered without a host sync until the frame.

`LayerStats` hooks sit on ReLU-like and bounded activation modules and on the capture's hook points,
only around capture steps (between them the modules keep torch's hook-free call path). `GradStats` reads
the optimizer's gradients every `grad_every` steps with `torch._foreach_norm`, keeping the positions of
the parameters it names (largest, smallest, non-finite gradient) on the device until the frame maps them
to parameter names. Both are synced once per frame (`sync`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from capture.hooks import forward_hook
from capture.frames import count_nonfinite
from capture.recorder import _first_tensor
from diagnose.symptoms import GradStats, LayerStats


def activation_modules(model: nn.Module, limit: int) -> list[tuple[str, nn.Module, str]]:
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


def layer_stats(kind: str, module: nn.Module, args, output, inactivity: float, bound: float) -> torch.Tensor | None:
    """On-device statistics of one module's forward at a capture step (None: an eval / no-grad forward).
    relu: (dead fraction, zero fraction); bounded: (saturated fraction,); block: (max |x|, non-finite count)."""
    out = _first_tensor(output)
    if out is None or not out.requires_grad or not out.is_floating_point():
        return None
    with torch.no_grad(), torch.autocast(device_type=out.device.type, enabled=False):
        if kind == "relu":
            x = out.detach()
            # = (x != 0).float() bit for bit (NaN, inf and denormals count as active), ~4x cheaper on CPU
            active = x.abs().clamp_(max=1.0).ceil_().nan_to_num_(nan=1.0).float()
            unit_dim = 1 if x.ndim >= 4 else x.ndim - 1  # channels of a conv map, else the last axis
            activity = active.mean(dim=[d for d in range(x.ndim) if d != unit_dim]) if x.ndim > 1 else active
            return torch.stack([(activity < inactivity).float().mean(), 1 - active.mean()])
        if kind == "bounded":
            x = _first_tensor(args).detach().float()
            sat = (x <= module.min_val) | (x >= module.max_val) if isinstance(module, nn.Hardtanh) else x.abs() >= bound
            return sat.float().mean().reshape(1)
        x = out.detach().float().abs()  # a new tensor: cleaned in place
        bad, finite = count_nonfinite(x)  # where a nan_inf alert points: the first hook point with some
        if not finite:
            x.nan_to_num_(nan=0.0, posinf=0.0)
        return torch.stack([x.amax(), bad.float()])


def sync_layers(layers: dict[tuple[str, str], torch.Tensor]) -> dict[str, LayerStats]:
    """{(kind, module name): on-device stats} -> {module name: LayerStats}, one host sync."""
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


class GradStatsReader:
    """Gradient statistics of the optimizer's parameters: `read(step)` stacks them on the device (no sync),
    `sync()` turns every pending step into `GradStats` with parameter names."""

    def __init__(self, model: nn.Module, optimizer):
        self.model, self.optimizer = model, optimizer
        self.pending: list[tuple[int, torch.Tensor]] = []
        self._params: dict[int, list] = {}  # step -> the parameters whose norms were stacked at that step
        self._names: dict[int, str] = {}

    def read(self, step: int) -> None:
        row = self.tensor(step)
        if row is not None:
            self.pending.append((step, row))

    def tensor(self, step: int) -> torch.Tensor | None:
        """(norm, mean |g|, first weight norm, last weight norm, i_largest, i_smallest, i_nonfinite) on the
        gradients' device, no sync. The i_ are positions in this step's list of parameters with a gradient:
        the largest gradient norm (non-finite counts as largest), the smallest among the weights, the last
        non-finite (-1: none)."""
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
            self._params[step] = params
            return torch.stack([torch.linalg.vector_norm(l2), l1.sum() / numel, l2[weights[0]], l2[weights[-1]],
                                l2.argmax().float(), torch.stack([norms[i] for i in weights]).argmin().float(),
                                last_bad.float()])

    def stats(self, v: list[float], params: list | None) -> GradStats:
        """`GradStats` from a synced `tensor` row, its parameter positions mapped to parameter names."""
        if not params:
            return GradStats(*v[:4])
        weights = [i for i, p in enumerate(params) if p.ndim >= 2] or [0, len(params) - 1]  # as `tensor`
        at = {"largest": int(v[4]), "smallest": weights[int(v[5])], "first": weights[0], "nonfinite": int(v[6])}
        at = {k: params[i] for k, i in at.items() if 0 <= i < len(params)}
        if any(id(p) not in self._names for p in at.values()):  # first frame, or parameters added since
            self._names = {id(p): n for n, p in self.model.named_parameters()}
        return GradStats(*v[:4], **{k: self._names.get(id(p)) for k, p in at.items()})

    def params_at(self, step: int) -> list | None:
        return self._params.pop(step, None)

    def sync(self) -> dict[int, GradStats]:
        """{step: GradStats} of every pending step (one host sync)."""
        if not self.pending:
            return {}
        dev = self.pending[0][1].device
        values = torch.stack([g.to(dev) for _, g in self.pending]).tolist()  # one sync
        out = {s: self.stats(v, self._params.pop(s, None)) for (s, _), v in zip(self.pending, values)}
        self.pending, self._params = [], {}
        return out


class LayerStatsHooks:
    """Forward hooks that gather `layer_stats` of `modules` [(name, module, kind)] at capture steps only:
    `arm(True)` registers them, `arm(False)` removes them, so between capture steps the modules keep torch's
    hook-free call path. Each hook runs inside `guard(where, fn, *args)` (the monitor's fault guard)."""

    def __init__(self, modules, inactivity: float, bound: float, guard):
        self.modules, self.inactivity, self.bound, self.guard = list(modules), inactivity, bound, guard
        self.pending: dict[tuple[str, str], torch.Tensor] = {}  # (kind, module name) -> stats on the device
        self._seen: set[tuple[str, str]] = set()
        self._handles: list = []

    def arm(self, on: bool) -> None:
        if on and not self._handles:
            self._handles = [forward_hook(m, self._hook(name, kind)) for name, m, kind in self.modules]
        elif not on and self._handles:
            for h in self._handles:
                h.remove()
            self._handles = []

    def take(self) -> dict[tuple[str, str], torch.Tensor]:
        """The statistics gathered since the last call (one capture step's)."""
        out, self.pending = self.pending, {}
        self._seen.clear()
        return out

    def _hook(self, name: str, kind: str):
        def hook(module, args, output):
            if (kind, name) not in self._seen:
                self.guard(f"activation hook {name}", self._record, name, kind, module, args, output)

        return hook

    def _record(self, name: str, kind: str, module: nn.Module, args, output) -> None:
        stats = layer_stats(kind, module, args, output, self.inactivity, self.bound)
        if stats is not None:
            self._seen.add((kind, name))
            self.pending[(kind, name)] = stats
