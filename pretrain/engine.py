"""The one model-training engine: the epoch loop every trained model of the project goes through, its
learning-rate schedule and its CSV log.

    step = train_one_epoch(model, loader, optimizer, forward, criterion, accelerator=accelerator,
                           scheduler=scheduler, clip_grad=1.0, step=step, on_step=on_step).step

Users: Dynamics-MAE pretraining (`pretrain.train`), TEViD fine-tuning (`diagnose.finetune`), the video
and TCN baselines (`eval.baselines.video`, `eval.baselines.tcn`) and the regressibility probes
(`eval.probes`). The factory's perturbed jobs have their own step loop (`factory.loop`): they draw
batches, bend the step with a perturbation and capture frames, which a classifier's epoch does not;
they share the schedule (`warmup_cosine`).

It lives here, beside the Dynamics-MAE it first trained, because both sides of the import rule use it:
`diagnose.finetune` may not import `factory` or `eval`, while those may import `pretrain`. It is a
training tool, not part of what a user's job imports (`diagnose.watch` never trains).

With an `accelerate.Accelerator` (pretraining, fine-tuning) it does what MAE's `train_one_epoch` does:
gradient accumulation (`accelerator.accumulate`), `forward` under `accelerator.autocast()`, the loss
gathered from every process before backward (a non-finite loss raises on all of them at once, none is
left waiting in an all-reduce), gradient clipping at the synchronising micro-batch, the scheduler
stepped once per optimizer step. Without one (`accelerator=None`: the baselines and probes, one
process) the same loop runs as plain PyTorch, with no accumulation.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = ["CsvLog", "EpochResult", "NonFiniteLossError", "train_one_epoch", "warmup_cosine"]


class NonFiniteLossError(FloatingPointError):
    """A training loss was NaN or infinite (raised before its backward pass)."""


# ------------------------------------------------------------------ the schedule

def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) over the peak: linear warm-up to 1 over
    `warmup` steps, then half-cosine down to `min_ratio` at `total` (`min_ratio` 1: constant after the
    warm-up). The one schedule of the project: pretraining (`min_ratio` = min_lr / lr), fine-tuning,
    and every factory job and experiment on a factory recipe (`factory.job.lr_schedule`: 0.1, or 1 for
    a run without annealing)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------ the log

class CsvLog:
    """A CSV log written one row at a time (opened in append mode per row: a killed run loses at most
    the row being written).

    Fresh start (`resume_step` None): a new file holding the header. Resume: the rows up to
    `resume_step` (column `step_key`) stay and new rows are appended after them; rows past it were
    written after the last checkpoint of a killed run and will be written again, so they are dropped
    first (the file is then rewritten through a temporary file and `os.replace`, never left half
    written). `enabled=False` (processes other than the main one) writes nothing."""

    def __init__(self, path: str | os.PathLike, fields: list[str] | tuple[str, ...], resume_step: int | None = None,
                 enabled: bool = True, step_key: str = "step"):
        self.path, self.fields, self.enabled = Path(path), list(fields), enabled
        if not enabled:
            return
        if step_key not in self.fields:
            raise ValueError(f"CsvLog {self.path}: step_key {step_key!r} is not one of the fields {self.fields}")
        if resume_step is None or not self.path.exists():
            self._rewrite([])
            return
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames, list(reader)
        keep = [r for r in rows if r.get(step_key) not in (None, "") and float(r[step_key]) <= resume_step]
        if header != self.fields or len(keep) != len(rows):
            self._rewrite(keep)

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        """Append one row (missing fields are left empty)."""
        if self.enabled:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.fields).writerow({k: row.get(k, "") for k in self.fields})


# ------------------------------------------------------------------ the epoch loop

class _OneProcess:
    """The few `accelerate.Accelerator` members the loop uses, for a plain single-process loop."""

    num_processes = 1
    sync_gradients = True

    @staticmethod
    def accumulate(model):
        return contextlib.nullcontext()

    @staticmethod
    def autocast():
        return contextlib.nullcontext()

    @staticmethod
    def gather(t: torch.Tensor) -> torch.Tensor:
        return t

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    @staticmethod
    def clip_grad_norm_(params, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


@dataclass
class EpochResult:
    """What one pass returned: the optimizer step reached and every micro-batch's loss (each a
    `(processes,)` tensor: the loss of that micro-batch on every process)."""

    step: int
    losses: list[torch.Tensor] = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        """Mean over micro-batches and processes (NaN for an empty pass)."""
        return float(torch.cat(self.losses).mean()) if self.losses else math.nan


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    forward: Callable[[nn.Module, Any], Any], criterion: Callable[[Any, Any], torch.Tensor] | None = None, *,
                    accelerator=None, scheduler=None, clip_grad: float | None = None, step: int = 0,
                    max_steps: int | None = None,
                    on_step: Callable[[int, list[torch.Tensor], list], None] | None = None,
                    what: str = "training", hint: str | Callable[[Any], str] = "") -> EpochResult:
    """One pass over `loader` (or until optimizer step `max_steps`).

    Per micro-batch: `out = forward(model, batch)` under autocast, `loss = criterion(out, batch)`
    outside it (`criterion` None: `out` is the loss), a check that the loss is finite on every process
    (else `NonFiniteLossError` naming `what`, the optimizer step and `hint` / `hint(batch)`), backward,
    gradient clipping to `clip_grad` (when set), `optimizer.step()`, `optimizer.zero_grad(set_to_none=True)`.
    After each optimizer step: `scheduler.step()` (when given), then `on_step(step, losses, batches)`
    with the step count reached and the micro-batches of that step and their `(processes,)` losses.
    `model` is put in training mode first. Returns the step reached and all micro-batch losses."""
    acc = accelerator if accelerator is not None else _OneProcess()
    model.train()
    result = EpochResult(step)
    losses, batches = [], []
    for batch in loader:
        with acc.accumulate(model):
            with acc.autocast():
                out = forward(model, batch)
            loss = out if criterion is None else criterion(out, batch)
            gathered = acc.gather(loss.detach().float().reshape(1))  # (processes,)
            if not torch.isfinite(gathered).all():
                detail = hint(batch) if callable(hint) else hint
                raise NonFiniteLossError(f"non-finite {what} loss {gathered.tolist()} (one per process) at optimizer step "
                                         f"{result.step + 1}" + (f": {detail}" if detail else ""))
            acc.backward(loss)
            if clip_grad and acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(gathered)
        batches.append(batch)
        if acc.sync_gradients:
            if scheduler is not None:
                scheduler.step()  # stepped here, not by accelerate: the schedule counts optimizer steps
            result.step += 1
            result.losses += losses
            if on_step is not None:
                on_step(result.step, losses, batches)
            losses, batches = [], []
            if max_steps is not None and result.step >= max_steps:
                break
    result.losses += losses  # micro-batches after the last synchronising one (none with a prepared loader)
    return result
