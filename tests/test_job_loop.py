"""The training-job engine: a job built once (`factory.job.build_job`) and the one step loop with hooks
(`factory.loop`), checked against the loops the HPO trials and the privacy-curve jobs had before."""
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from factory.archs import build_arch
from factory.config import TrainingConfig
from factory.job import OPTIMIZERS, Batches, build_job, cached_dataset, loss_fn, lr_schedule, make_optimizer, run_settings, step_lr
from factory.loop import JobCallback, StepLoop, run_job
from factory.perturbations import Perturbation, RunSettings, make_perturbation

TC = TrainingConfig(steps=6, batch_size=8, warmup_frac=0.3)


@pytest.fixture(scope="module")
def digits():
    return cached_dataset("digits", 32, 96, 32, None)


@dataclass
class Recording(Perturbation):
    """Records where `before_step` runs: whether the gradients are there."""

    calls: list = field(default_factory=list)

    def before_step(self, step, model, optimizer):
        self.calls.append((step, all(p.grad is not None for p in model.parameters())))


class Recorder(JobCallback):
    def __init__(self, stop_at: int | None = None, fail_at: int | None = None):
        self.events, self.stop_at, self.fail_at, self.errors = [], stop_at, fail_at, []

    def on_train_start(self, loop):
        self.events.append("start")

    def on_step_start(self, loop):
        self.events.append(("step_start", loop.step, loop.lr))

    def on_after_backward(self, loop):
        grads = all(p.grad is not None for p in loop.job.model.parameters())
        self.events.append(("after_backward", loop.step, grads, loop.loss.item()))

    def on_step_end(self, loop):
        grads = any(p.grad is not None for p in loop.job.model.parameters())
        self.events.append(("step_end", loop.step, loop.steps_done, grads))
        if loop.step == self.fail_at:
            raise RuntimeError("hook failed")
        if loop.step == self.stop_at:
            loop.should_stop = True

    def on_train_end(self, loop):
        self.events.append("end")

    def on_exception(self, loop, error):
        self.errors.append(str(error))


def test_hooks_run_in_step_order_and_the_perturbation_steps_between(digits):
    pert = Recording()
    job = build_job("resnet", digits, "adamw", pert, TC, seed=3)
    rec = Recorder(stop_at=3)
    loop = run_job(job, [rec])
    assert loop.steps_done == 4 and rec.events[0] == "start" and rec.events[-1] == "end"
    steps = [e for e in rec.events if isinstance(e, tuple)]
    assert [e[0] for e in steps] == ["step_start", "after_backward", "step_end"] * 4
    assert all(e[2] for e in steps if e[0] == "after_backward")  # gradients there after backward
    assert not any(e[3] for e in steps if e[0] == "step_end")  # and zeroed (None) after the optimizer step
    assert pert.calls == [(s, True) for s in range(4)]  # before_step: every step, after backward
    assert [e[2] for e in steps if e[0] == "step_start"] == [step_lr(job.settings, TC, pert, s) for s in range(4)]


def test_a_failing_hook_reaches_every_callback_and_the_caller(digits):
    job = build_job("resnet", digits, "adamw", Perturbation(), TC, seed=3)
    rec, other = Recorder(fail_at=1), Recorder()
    loop = StepLoop(job, [rec, other])
    with pytest.raises(RuntimeError, match="hook failed"):
        loop.run()
    assert loop.steps_done == 2 and rec.errors == other.errors == ["hook failed"] and "end" not in rec.events


def test_an_hpo_trial_trains_as_its_own_loop_did(digits):
    """eval.hpo's trial loop before the engine (no perturbation, no augmentation, uniform batches,
    warm-up + cosine over the budget): the same weights, bit for bit."""
    seed, lr, wd = 7, 0.3, 1e-4
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, _ = build_arch("resnet", digits.num_classes, 32)
    opt = make_optimizer("sgd", model.parameters(), lr, wd)
    for step in range(TC.steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_schedule(step, TC.steps, TC.warmup_frac)
        idx = torch.randint(0, len(digits.x_train), (TC.batch_size,), generator=gen)
        loss = F.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    job = build_job("resnet", digits, "sgd", Perturbation(), TC, seed, RunSettings(lr=lr, weight_decay=wd, augment=False))
    run_job(job)
    for a, b in zip(model.parameters(), job.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("preset", ["instability_spike", "grad_clip", "forgetting"])
def test_a_privacy_curve_job_trains_as_its_own_loop_did(digits, preset):
    """eval.privacy_curve's job loop before the engine (the factory recipe, the preset's pool, batch,
    learning-rate factor and before_step): the same weights, bit for bit."""
    seed = 11
    pert = make_perturbation(preset, TC.steps)
    torch.manual_seed(seed)
    pert.bind(digits.y_train, digits.num_classes, seed)
    settings = run_settings(pert, TC, "resnet", "adamw")
    model, _ = build_arch("resnet", digits.num_classes, 32)
    optimizer = make_optimizer("adamw", model.parameters(), settings.lr, settings.weight_decay)
    batches = Batches(digits, settings, TC, seed)
    model.train()
    for step in range(TC.steps):
        x, y = pert.batch(step, *batches.draw(pert.pool(step, batches.pool)))
        lr = step_lr(settings, TC, pert, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(model(x), y)
        loss.backward()
        pert.before_step(step, model, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    job = build_job("resnet", digits, "adamw", make_perturbation(preset, TC.steps), TC, seed)
    run_job(job)
    for a, b in zip(model.parameters(), job.model.parameters()):
        assert torch.equal(a, b)


def test_a_perturbation_that_does_not_fit_the_data_is_refused(digits):
    with pytest.raises(ValueError, match="does not apply to image data"):
        build_job("resnet", digits, "adamw", Perturbation(name="text_only", modalities=("text",)), TC, seed=0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps(name):
    """Each optimizer a config may name builds from `make_optimizer` and moves the weights by a finite step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(name, model.parameters(), 1e-3, 1e-4)
    loss = F.cross_entropy(model(torch.randn(16, 4)), torch.randint(0, 3, (16,)))
    loss.backward()
    opt.step()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'.*lamb"):
        make_optimizer("adamm", torch.nn.Linear(2, 2).parameters(), 1e-3, 0.0)
