"""Top Hessian eigenvalue of the training loss on one batch, by Lanczos on Hessian-vector products
(the "sharpness" series of the Hessian baseline: docs/architecture.md §9, issue 5; paper Sec. 5.1 "Baselines").

    lambda_max = max eig of H = d^2 L(theta; x, y) / d theta^2,   theta = the trainable parameters

`scipy.sparse.linalg.eigsh(LinearOperator(matvec=HVP), k=1, which="LA")` (ARPACK's implicitly
restarted Lanczos) with the HVP by double backward: one forward and one backward with
`create_graph=True` build g(theta) = dL/dtheta once; each matvec is then a second backward,
Hv = d(g . v)/dtheta (Pearlmutter 1994), fp32 on the model's device. The graph is kept between matvecs,
so every product sees the same batch, the same batch-norm statistics and the same dropout masks:
a fixed symmetric operator, as Lanczos needs.

The measurement does not perturb training:
- mode: the model's current mode (the factory measures in train mode: batch-norm normalises with the
  batch's statistics, exactly as in the loss the optimizer descends; in eval mode it would be the
  Hessian of a different function, that of the running averages);
- state: the forward is a `torch.func.functional_call` with detached parameters and *clones* of the
  buffers, so batch-norm running statistics (and `num_batches_tracked`) are untouched;
- randomness: the global torch RNG is forked (`torch.random.fork_rng`) around the forward, so dropout or
  drop-path inside it consumes nothing from the training stream; the Lanczos start vector comes from
  its own numpy generator (`v0_seed`);
- gradients: `torch.autograd.grad` returns the products without touching any `.grad`.
Forward hooks on `model` (e.g. `capture.attach`'s) do run: hand in a hook-free copy when that matters
(the factory measures on a shadow copy made before capture is attached). Attention runs through the
math kernel of `scaled_dot_product_attention` (the fused CPU kernel has no double backward).

    python -m capture.hessian --corpus DIR [--without DIR]   # what the series cost each run of a corpus
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class LanczosSettings:
    """ARPACK settings. `maxiter` counts restarts, each costing about `ncv - 1` Hessian-vector
    products; `tol` is relative to the eigenvalue. A run that hits `maxiter` keeps its best Ritz value
    (a lower bound of lambda_max) and is counted as not converged."""

    maxiter: int = 20
    # 1e-2: ARPACK's bound is loose; on the factory's architectures the value is then within 3e-4 of a
    # tol=1e-8 reference after ~11 products (16-31 at tol=1e-3)
    tol: float = 1e-2
    ncv: int = 10  # Lanczos basis size (scipy's default for k=1 is 20: twice the products per restart)


@dataclass
class TopEigen:
    value: float  # NaN when the loss or the products are not finite
    converged: bool
    matvecs: int
    seconds: float  # wall clock


def hvp_operator(model: nn.Module, loss_fn: Callable, x, y
                 ) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, torch.Tensor]:
    """(hvp(v) for a flat fp32 v of the trainable parameters, their count, the loss). See module doc."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach().float().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # batch-norm updates land on the clones
    if not params:
        raise ValueError(f"top Hessian eigenvalue: {type(model).__name__} has no trainable parameters")
    device = next(iter(params.values())).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), sdpa_kernel([SDPBackend.MATH]):
        loss = loss_fn(functional_call(model, {**params, **frozen, **buffers}, (x,)), y)
    flat = [params[n] for n in names]
    grads = torch.autograd.grad(loss, flat, create_graph=True, allow_unused=True)  # None: a parameter the loss ignores
    sizes = [p.numel() for p in flat]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        pieces = [piece.view_as(p) for piece, p in zip(v.split(sizes), flat)]
        dot = sum((g * piece).sum() for g, piece in zip(grads, pieces) if g is not None and g.requires_grad)
        if not isinstance(dot, torch.Tensor):  # the loss is at most linear in the parameters: H = 0
            return torch.zeros_like(v)
        hv = torch.autograd.grad(dot, flat, retain_graph=True, allow_unused=True)
        return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, flat)])

    return hvp, sum(sizes), loss.detach()


def lanczos_top_eigenvalue(model: nn.Module, loss_fn: Callable, x, y, settings: LanczosSettings | None = None,
                           v0_seed: int = 0) -> TopEigen:
    """Largest algebraic eigenvalue of the Hessian of `loss_fn(model(x), y)` w.r.t. the trainable
    parameters, with the cost of computing it. NaN (not an error) when the loss or a product is not
    finite: diverging runs are data."""
    s = settings or LanczosSettings()
    t0 = time.perf_counter()
    hvp, n, loss = hvp_operator(model, loss_fn, x, y)
    device = next(model.parameters()).device
    count = [0]

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        hv = hvp(torch.as_tensor(np.ravel(v), dtype=torch.float32, device=device))
        if not torch.isfinite(hv).all():
            raise FloatingPointError("non-finite Hessian-vector product")
        return hv.double().cpu().numpy()

    if not torch.isfinite(loss):
        return TopEigen(float("nan"), False, 0, time.perf_counter() - t0)
    if n == 1:  # eigsh needs k < n: the 1x1 Hessian is its own eigenvalue
        return TopEigen(float(matvec(np.ones(1))[0]), True, count[0], time.perf_counter() - t0)
    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(v0_seed).standard_normal(n)
    try:
        value = eigsh(op, k=1, which="LA", v0=v0, ncv=min(n, max(s.ncv, 3)), maxiter=s.maxiter, tol=s.tol,
                      return_eigenvectors=False)[0]
        converged = True
    except ArpackNoConvergence as err:
        value, converged = (err.eigenvalues.max() if len(err.eigenvalues) else np.nan), False
    except (FloatingPointError, ArpackError):
        value, converged = np.nan, False
    return TopEigen(float(value), converged, count[0], time.perf_counter() - t0)


def top_hessian_eigenvalue(model: nn.Module, loss_fn: Callable, x, y, *, maxiter: int = LanczosSettings.maxiter,
                           tol: float = LanczosSettings.tol, ncv: int = LanczosSettings.ncv, v0_seed: int = 0) -> float:
    """lambda_max of the Hessian of the training loss on the batch (x, y); see `lanczos_top_eigenvalue`."""
    return lanczos_top_eigenvalue(model, loss_fn, x, y, LanczosSettings(maxiter, tol, ncv), v0_seed).value


class HessianTracker:
    """The top-eigenvalue series of one run, one entry per captured frame (NaN where not computed):
    computed at every `every`-th frame (frame 0 included), with its cost. `probe` is the model
    measured: a hook-free copy of the trained model, refreshed from it before each measurement."""

    def __init__(self, model: nn.Module, every: int, settings: LanczosSettings | None = None, seed: int = 0):
        if every < 1:
            raise ValueError(f"HessianTracker: every must be >= 1 (0 = off is the caller's business), got {every}")
        self.model, self.every, self.settings, self.seed = model, every, settings or LanczosSettings(), seed
        with torch.random.fork_rng():  # deepcopy draws nothing today; keep it that way for the training stream
            self.probe = _hook_free_copy(model)
        self.values: list[float] = []
        self.seconds, self.cpu_seconds, self.matvecs, self.computed, self.unconverged = 0.0, 0.0, 0, 0, 0
        self._cpu0 = time.process_time()  # the run's own CPU time from here, to put the cost in proportion

    def on_frame(self, loss_fn: Callable, x, y) -> float:
        """Call once per captured frame, after backward and before the optimizer step (the parameters
        the frame's gradients were taken at)."""
        frame = len(self.values)
        if frame % self.every:
            self.values.append(float("nan"))
            return float("nan")
        t0, c0 = time.perf_counter(), time.process_time()
        self.probe.load_state_dict(self.model.state_dict())
        self.probe.train(self.model.training)
        top = lanczos_top_eigenvalue(self.probe, loss_fn, x, y, self.settings, v0_seed=self.seed + frame)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        self.matvecs += top.matvecs
        self.computed += 1
        self.unconverged += not top.converged
        self.values.append(top.value)
        return top.value

    def series(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float32)

    def metadata(self) -> dict:
        """What a run store records about the series: settings and cost. `seconds` (wall) and `cpu_seconds`
        (process CPU time, all threads) spent in the measurements; `run_cpu_seconds`: the process CPU time
        since the tracker was made (the whole run when made at its start). On a shared machine the CPU
        ratio run_cpu_seconds / (run_cpu_seconds - cpu_seconds) is the cost factor of the measurement."""
        return {"every": self.every, "lanczos": asdict(self.settings), "seconds": round(self.seconds, 3),
                "cpu_seconds": round(self.cpu_seconds, 3), "run_cpu_seconds": round(time.process_time() - self._cpu0, 3),
                "frames_computed": self.computed, "unconverged": self.unconverged, "matvecs": self.matvecs}


def _hook_free_copy(model: nn.Module) -> nn.Module:
    import copy

    probe = copy.deepcopy(model)
    for m in probe.modules():  # a copy made after capture.attach would carry its hooks along
        for hooks in (m._forward_hooks, m._forward_hooks_with_kwargs, m._forward_hooks_always_called,
                      m._forward_pre_hooks, m._forward_pre_hooks_with_kwargs, m._backward_hooks, m._backward_pre_hooks):
            hooks.clear()
    return probe


# ---------------------------------------------------------------- what the series cost a corpus

def cost_table(corpus: str | Path, without: str | Path | None = None) -> str:
    """Markdown table of the measurement's cost per run of a corpus made with hessian_every > 0, from the
    stores' `hessian` attrs: CPU factor = run CPU / (run CPU - Hessian CPU); with `without` (the same
    specs generated with hessian_every = 0) also the wall-clock ratio of the same run with and without."""
    from capture.corpus import corpus_runs
    from capture.store import RunStore

    def records(d):
        return {r["run_id"]: r for r in corpus_runs(d)}

    runs, base = records(corpus), records(without) if without else {}
    rows = ["| run | frames measured | products | Hessian CPU s | run CPU s | CPU factor | wall s | wall s without "
            "| wall ratio |", "|---|---|---|---|---|---|---|---|---|"]
    factors = []
    for rid, r in runs.items():
        h = RunStore(Path(corpus) / r["store"]).attrs.get("hessian")
        if h is None:
            raise ValueError(f"{corpus}: run {rid} has no `hessian` attrs (made with training.hessian_every = 0)")
        factors.append(h["run_cpu_seconds"] / max(h["run_cpu_seconds"] - h["cpu_seconds"], 1e-9))
        off = base.get(rid, {}).get("seconds")
        ratio = f"{r['seconds'] / off:.2f}" if off else "–"
        rows.append(f"| {rid} | {h['frames_computed']} | {h['matvecs']} | {h['cpu_seconds']:.1f} | "
                    f"{h['run_cpu_seconds']:.1f} | {factors[-1]:.2f} | {r['seconds']:.1f} | {off if off else '–'} | {ratio} |")
    rows.append(f"\nCPU factor over {len(factors)} runs: median {np.median(factors):.2f}, "
                f"range {min(factors):.2f}-{max(factors):.2f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Cost of the hessian_top series in a corpus (per run, from the store attrs)")
    p.add_argument("--corpus", required=True, help="corpus generated with training.hessian_every > 0")
    p.add_argument("--without", default=None, help="the same specs generated with training.hessian_every=0 (wall ratio)")
    args = p.parse_args(argv)
    print(cost_table(args.corpus, args.without))
    return 0


if __name__ == "__main__":
    sys.exit(main())
