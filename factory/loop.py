"""The one step loop of a training job (`factory.job.Job`), with Lightning-style hooks.

Per step, in this order (the factory's runs, the HPO trials and the privacy-curve jobs all run it):

    x, y = job.batch(step)                     the perturbation's pool, a draw, the perturbation's batch
    lr = job.lr(step); set on every group      schedule x the perturbation's factor
    on_step_start(loop)                        (the Lyapunov probe forks here, before the update)
    loss = job.loss(model(x), y)               reported as is; perturbation.scale_loss(step, loss) is back-propagated
    on_after_backward(loop)                    gradients are there: capture, the monitor's loss
    perturbation.before_step(step, model, optimizer)
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
    on_step_end(loop)                          evaluation, pruning, divergence; may set loop.should_stop

`on_train_start` runs before the first step, `on_train_end` after the last one (or the one that
stopped the loop), `on_exception` when a step or hook raises (the exception then propagates: a pruned
trial stops this way). Callbacks run in the order given, each hook in turn for all of them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from factory.job import Job

__all__ = ["JobCallback", "MonitorLoss", "StepLoop", "run_job"]


class JobCallback:
    """Base of the step loop's hooks: every method is a no-op; override the ones you need."""

    def on_train_start(self, loop: StepLoop) -> None:
        pass

    def on_step_start(self, loop: StepLoop) -> None:
        pass

    def on_after_backward(self, loop: StepLoop) -> None:
        pass

    def on_step_end(self, loop: StepLoop) -> None:
        pass

    def on_train_end(self, loop: StepLoop) -> None:
        pass

    def on_exception(self, loop: StepLoop, error: BaseException) -> None:
        pass


@dataclass
class StepLoop:
    """The loop's state, as the hooks see it: the step being run (0-based) and its batch, learning rate
    and loss; `steps_done` optimizer steps taken so far. A hook sets `should_stop` to end the loop after
    the current step."""

    job: Job
    callbacks: list[JobCallback] = field(default_factory=list)
    step: int = 0
    steps_done: int = 0
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    lr: float = 0.0
    loss: torch.Tensor | None = None
    should_stop: bool = False

    def _call(self, hook: str) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self)

    def run(self, steps: int | None = None) -> StepLoop:
        """Run `steps` (default `job.training.steps`) optimizer steps of the job; returns this loop, whose
        state (`steps_done`, ...) the caller can also read after an exception."""
        job = self.job
        model, optimizer, pert = job.model, job.optimizer, job.perturbation
        try:
            self._call("on_train_start")
            model.train()
            for step in range(job.training.steps if steps is None else steps):
                self.step = step
                self.x, self.y = job.batch(step)
                self.lr = job.lr(step)
                for group in optimizer.param_groups:
                    group["lr"] = self.lr
                self._call("on_step_start")
                self.loss = job.loss(model(self.x), self.y)
                pert.scale_loss(step, self.loss).backward()  # identity but under an fp16 loss scaler
                self._call("on_after_backward")
                pert.before_step(step, model, optimizer)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self.steps_done = step + 1
                self._call("on_step_end")
                if self.should_stop:
                    break
            self._call("on_train_end")
        except BaseException as err:
            for cb in self.callbacks:
                try:
                    cb.on_exception(self, err)
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
            raise
        return self


def run_job(job: Job, callbacks: Sequence[JobCallback] = (), steps: int | None = None) -> StepLoop:
    """Run `steps` (default `job.training.steps`) optimizer steps of `job` with `callbacks`; returns the
    loop's final state (`StepLoop(job, callbacks).run(steps)`)."""
    return StepLoop(job, list(callbacks)).run(steps)


class MonitorLoss(JobCallback):
    """Hands each step's loss to a `diagnose.watch` monitor (`monitor.observe`), after backward and
    before the optimizer step, as a user's loop does; the monitor's own hooks see the rest."""

    def __init__(self, monitor):
        self.monitor = monitor

    def on_after_backward(self, loop: StepLoop) -> None:
        self.monitor.observe(loss=loop.loss)
