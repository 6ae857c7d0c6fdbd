"""The training loss of each optimizer step, without the user's help where the maths allows.

`monitor.observe(loss=...)` gives it. Otherwise it is recovered from the classifier head's logits and
their gradient in the user's own backward pass (`recover_loss`, exact for a mean-reduced softmax
cross-entropy, missing for any other loss). The recovery runs once per frame over all steps since the
last one (one batched `recover_loss`), not as ~25 small ops every step: the steps' logits and
dL/dlogits wait in `LossTracker` until then.

Per step: a head called several times in one forward (two heads, a head shared by two losses) adds its
terms; several forwards before one optimizer step (gradient accumulation) are averaged, like the
`loss / accumulation` a user backpropagates.
"""
from __future__ import annotations

import logging
import math
import numbers

import numpy as np
import torch

from capture.readouts import softmax_rows

DEFER_NUMEL = 1 << 22  # logits elements kept for the once-per-frame loss recovery before it runs early
logger = logging.getLogger("tevid")


@torch.no_grad()
def loss_from_logits_grad(logits: torch.Tensor, grad: torch.Tensor, tol: float = 0.02) -> torch.Tensor:
    """Mean softmax cross-entropy recovered from logits `(..., C)` and dL/dlogits, as a 0-d tensor, no sync.

    For mean-reduced cross-entropy over the n rows that carry a label, `G = (P - Y) / n` on those rows
    and 0 on ignored ones (ignore_index, padding). The label of a row is its only negative entry
    (argmin G), n = (p_y - 1) / G_y (the median over rows with p_y < 0.999), and the loss is the mean of
    -log p_y. The reconstruction `Y = P - n G` must be one-hot within `tol` on every informative row,
    else NaN (other losses, label smoothing, extra terms on the logits). Any scaling of the loss
    (GradScaler, 1/accumulation) changes n, not the value returned. Non-finite logits give NaN.
    """
    return recover_loss(logits, grad, tol)[0]


@torch.no_grad()
def recover_loss(logits: torch.Tensor, grad: torch.Tensor, tol: float = 0.02,
                 batched: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, known) as 0-d tensors: `known` is False when the loss cannot be recovered (not a mean
    cross-entropy, or non-finite gradients with finite logits); non-finite logits are a known NaN loss.
    `batched`: the first axis indexes K independent losses (stacked steps) -> (K,) and (K,)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        lf, g = logits.detach().float(), grad.detach().float()
        if not batched:
            lf, g = lf[None], g[None]
        k = lf.shape[0]
        lf = lf.reshape(k, -1, lf.shape[-1])  # (K, N, C)
        g = g.reshape(k, -1, g.shape[-1])  # (K, N, C)
        bad_logits, bad_grad = ~torch.isfinite(lf).flatten(1).all(1), ~torch.isfinite(g).flatten(1).all(1)  # (K,)
        logp = torch.log_softmax(lf, dim=-1)
        p = logp.exp()
        active = g.abs().amax(dim=2) > 0  # (K, N) rows that are part of the loss
        y = g.argmin(dim=2, keepdim=True)  # (K, N, 1)
        g_y, p_y = g.gather(2, y).squeeze(2), p.gather(2, y).squeeze(2)  # (K, N)
        informative = active & (p_y < 0.999) & (g_y < 0)
        n_row = torch.where(informative, (p_y - 1) / torch.where(g_y < 0, g_y, -1.0), torch.nan)
        n = (torch.nanmedian(n_row, dim=1).values if n_row.shape[1]
             else torch.full((k,), float("nan"), device=lf.device))  # (K,)
        onehot = torch.zeros_like(p).scatter_(2, y, 1.0)
        err = ((p - n[:, None, None] * g) - onehot).abs().amax(dim=2)  # (K, N)
        ok = ~(informative & ~(err <= tol)).any(1) & active.any(1) & (torch.isfinite(n) | ~informative.any(1))
        loss = -(logp.gather(2, y).squeeze(2) * active).sum(1) / active.sum(1).clamp_min(1)  # (K,)
        # only a softmax loss: MSE, BCE and single-logit heads read as cross-entropy would be silently wrong
        softmax = softmax_rows(g, p, grad.dtype).all(1)  # (K,)
        ok = ok & ~bad_grad & ~bad_logits & softmax
        loss, known = torch.where(ok, loss, torch.full_like(loss, float("nan"))), ok | bad_logits
        return (loss, known) if batched else (loss[0], known[0])


def as_loss(value) -> torch.Tensor | float | None:
    """`observe(loss=...)`'s value as a detached 0-d tensor or a float; None when it is not one loss value
    (documented: a tensor with one element, or a Python / numpy real number)."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(()) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, np.ndarray):
        return float(value.reshape(())) if value.size == 1 and np.issubdtype(value.dtype, np.number) else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


class LossTracker:
    """Per-step losses since the last frame: observed > recovered from the head (at the next frame) >
    unknown. Hooks call `head_logits` / `head_grad`; the monitor calls `take` once per optimizer step
    and `drain` once per frame."""

    def __init__(self):
        self.observed: list = []
        self.forward_id = 0  # forwards of the watched model so far (a root forward pre-hook counts them)
        self._pending: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (step, forward, logits, grad)
        self._numel = 0
        self._head_step = -1  # the last step a head gradient arrived for
        self._results: list[tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]] = []
        self._heads: dict[int, dict[int, list]] = {}  # step -> forward -> [sum of losses, known]
        self._steps: list[tuple[int, object, object]] = []  # (step, loss, known); loss None: from the head
        self.warned = False

    def observe(self, value) -> bool:
        """Record an observed loss; False (nothing recorded) when `value` is not one loss value."""
        loss = as_loss(value)
        if loss is None:
            return False
        self.observed.append(loss)
        return True

    def head_grad(self, step: int, forward: int, logits: torch.Tensor, grad: torch.Tensor) -> None:
        self._pending.append((step, forward, logits, grad.detach()))
        self._head_step = step
        self._numel += logits.numel()
        if self._numel > DEFER_NUMEL:  # large logits (a language model's): recover now, keep nothing
            self._recover_pending()

    def take(self, step: int) -> None:
        """Record step `step`'s loss (called at its optimizer step). An unknown loss is missing, not NaN."""
        if self.observed:
            vals = [v if isinstance(v, torch.Tensor) else torch.tensor(v) for v in self.observed]
            entry = (step, torch.stack([v.to(vals[0].device) for v in vals]).mean(), True)
        elif self._head_step == step:
            entry = (step, None, None)
        else:
            entry = (step, math.nan, False)
        self.observed = []
        self._steps.append(entry)

    def now(self):
        """The loss of the step just recorded, for the frame's readout (syncs the recovered head losses)."""
        s, loss, _ = self._steps[-1]
        if loss is None:
            self._sync_heads()
            return self._head_loss(s)[0]
        return loss

    def drain(self) -> list[tuple[int, float | None]]:
        """(step, loss or None when unknown) of every step since the last frame (one host sync each for
        the recovered and the observed losses)."""
        self._sync_heads()
        entries, self._steps = self._steps, []
        observed = [loss for _, loss, _ in entries if isinstance(loss, torch.Tensor)]
        synced = iter(torch.stack([v.to(observed[0].device).float() for v in observed]).tolist() if observed else [])
        out = []
        for s, loss, known in entries:
            if loss is None:
                loss, known = self._head_loss(s)
            elif isinstance(loss, torch.Tensor):
                loss = next(synced)
            out.append((s, loss if known else None))
        self._heads = {}
        return out

    def pending(self) -> bool:
        """Steps recorded since the last `drain`."""
        return bool(self._steps)

    def discard(self) -> None:
        self._steps, self.observed = [], []

    # ---------------------------------------------------------------- the batched recovery
    def _head_loss(self, step: int) -> tuple[float, bool]:
        """Terms of one forward add up; forwards (micro-batches) are averaged."""
        forwards = self._heads.get(step, {})
        if not forwards:
            return math.nan, False
        known = all(k for _, k in forwards.values())
        return sum(v for v, _ in forwards.values()) / len(forwards), known

    def _recover_pending(self) -> None:
        """The losses of the waiting micro-batches, one batched `recover_loss` per run of equal shapes."""
        pending, self._pending, self._numel = self._pending, [], 0
        key = lambda e: (e[2].shape, e[2].dtype, e[2].device, e[3].shape, e[3].dtype)  # noqa: E731
        i = 0
        while i < len(pending):
            j = i + 1
            while j < len(pending) and key(pending[j]) == key(pending[i]):
                j += 1
            group = pending[i:j]
            losses, known = recover_loss(torch.stack([e[2] for e in group]), torch.stack([e[3] for e in group]), batched=True)
            self._results.append(([(e[0], e[1]) for e in group], losses, known))
            i = j

    def _sync_heads(self) -> None:
        """Recovered head losses to the host (one sync), per step and forward."""
        self._recover_pending()
        results, self._results = self._results, []
        if not results:
            return
        dev = results[0][1].device
        flat = torch.cat([t.to(dev).float() for _, losses, known in results for t in (losses, known)]).tolist()
        i = 0
        for keys, _, _ in results:
            k = len(keys)
            for (step, forward), loss, ok in zip(keys, flat[i: i + k], flat[i + k: i + 2 * k]):
                acc = self._heads.setdefault(step, {}).setdefault(forward, [0.0, True])
                acc[0], acc[1] = acc[0] + loss, acc[1] and bool(ok)
            i += 2 * k
