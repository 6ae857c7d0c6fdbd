"""The recipe shapes of issue 19 (`RunSettings`: schedule, warm-up, label smoothing, batch size; per-modality
augmentation), the healthy-shape presets, the novel perturbations (repeat_batches, no_warmup, frozen_layers,
fp16_overflow) on a tiny model in the real step loop, and the watermark / task switch on tabular rows and
sequences."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from capture.config import FieldError
from capture.recorder import attach
from factory.config import TrainingConfig
from factory.datasets import TaskData
from factory.job import Batches, Job, evaluate, loss_fn, lr_schedule, make_optimizer, step_lr
from factory.loop import JobCallback, run_job
from factory.perturbations import (FP16_MAX, LABELLED, NOVEL, PERTURBATIONS, LossScaleOverflow, Perturbation, RunSettings,
                                   TaskSwitch, Watermark, degrade, make_perturbation, watermark)
from factory.train import validation_sets

HEALTHY_SHAPES = ("healthy_warmup", "healthy_restarts", "healthy_step", "healthy_small_batch", "healthy_slow",
                  "healthy_plateau", "healthy_smooth")
NEW_NOVEL = ("repeat_batches", "no_warmup", "frozen_layers", "fp16_overflow")
K = 4  # classes of the synthetic data


def _data(modality: str, n: int = 96, seed: int = 0) -> TaskData:
    """Labelled synthetic data of one modality: tabular (N, 6), sequence (N, 10, 3), image (N, 3, 8, 8);
    text a token stream over 11 symbols."""
    g = torch.Generator().manual_seed(seed)
    if modality == "text":
        return TaskData("tokens", "text", 11, torch.randint(0, 11, (2000,), generator=g), None,
                        torch.randint(0, 11, (400,), generator=g), None)
    shape = {"tabular": (6,), "sequence": (10, 3), "image": (3, 8, 8)}[modality]
    y, y_val = torch.arange(n) % K, torch.arange(32) % K
    x = torch.randn(n, *shape, generator=g) + y.view(-1, *[1] * len(shape)).float()
    x_val = torch.randn(32, *shape, generator=g) + y_val.view(-1, *[1] * len(shape)).float()
    return TaskData(f"syn_{modality}", modality, K, x, y, x_val, y_val)


def _job(pert: Perturbation, settings: RunSettings | None = None, steps: int = 20, data: TaskData | None = None,
         seed: int = 0) -> Job:
    """A factory job on tabular data with a small MLP, assembled as `factory.job.build_job` does
    (seed, bind, configure, model, optimizer, batches)."""
    data = data or _data("tabular")
    tc = TrainingConfig(steps=steps, batch_size=8, warmup_frac=0.1)
    torch.manual_seed(seed)
    pert.bind(data.y_train, data.num_classes, seed)
    settings = pert.configure(settings or RunSettings(lr=1e-2, weight_decay=0.01, optimizer="adamw"))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, K))
    opt = make_optimizer("adamw", model.parameters(), settings.lr, settings.weight_decay)
    return Job(arch="mlp", optimizer_name="adamw", data=data, training=tc, perturbation=pert, settings=settings, seed=seed,
               model=model, modules=None, optimizer=opt, batches=Batches(data, settings, tc, seed))


class Trace(JobCallback):
    """Per step: the batch (x, y), the reported loss, the largest gradient after backward, and the
    parameters before and after the optimizer step."""

    def __init__(self):
        self.x, self.y, self.loss, self.grad_peak, self.before, self.after = [], [], [], [], [], []

    def on_step_start(self, loop):
        self.x.append(loop.x.clone())
        self.y.append(loop.y.clone())
        self.before.append([p.detach().clone() for p in loop.job.model.parameters()])

    def on_after_backward(self, loop):
        self.loss.append(loop.loss.detach().clone())
        self.grad_peak.append(max(float(p.grad.abs().max()) for p in loop.job.model.parameters()))

    def on_step_end(self, loop):
        self.after.append([p.detach().clone() for p in loop.job.model.parameters()])


def _moved(trace: Trace, step: int) -> list[bool]:
    return [not torch.equal(a, b) for a, b in zip(trace.before[step], trace.after[step])]


# ------------------------------------------------------------------ schedules
def _curve(schedule: str, steps: int = 200, warmup: float = 0.05, **kw) -> list[float]:
    return [lr_schedule(s, steps, warmup, schedule=schedule, **kw) for s in range(steps)]


def test_cosine_is_the_factory_default_and_constant_is_flat_after_the_warmup():
    assert _curve("cosine") == [lr_schedule(s, 200, 0.05) for s in range(200)]
    f = _curve("cosine")
    assert f[9] == 1.0 and f[-1] == pytest.approx(0.1, abs=1e-3)
    assert _curve("constant")[:10] == f[:10] and set(_curve("constant")[10:]) == {1.0}


def test_step_drops_tenfold_at_three_quarters_and_nine_tenths():
    f = _curve("step", steps=200)
    assert f[149] == 1.0 and f[150] == pytest.approx(0.1) and f[179] == pytest.approx(0.1) and f[180] == pytest.approx(0.01)
    assert f[10:150] == [1.0] * 140 and f[-1] == pytest.approx(0.01)


@pytest.mark.parametrize("steps", [80, 200, 320])
def test_restarts_have_three_peaks_each_falling_to_a_tenth(steps):
    f = _curve("restarts", steps=steps)
    high = [v >= 0.99 for v in f]
    peaks = sum(1 for i, h in enumerate(high) if h and (i == 0 or not high[i - 1]))
    assert peaks == 3
    jumps = [i for i in range(1, steps) if f[i] - f[i - 1] > 0.5]  # the warm restarts: back to 1 at once
    assert len(jumps) == 2 and all(f[i - 1] < 0.15 and f[i] == 1.0 for i in jumps)
    assert min(f[10:]) >= 0.1 and f[-1] < 0.15


def test_warmup_bump_peaks_above_the_base_rate_then_settles_to_it():
    tc = TrainingConfig(steps=200, warmup_frac=0.05)
    pert = make_perturbation("healthy_warmup", 200)
    s = pert.configure(RunSettings(lr=1e-3, weight_decay=0.0))
    lrs = [step_lr(s, tc, pert, k) for k in range(200)]
    peak = max(range(200), key=lambda k: lrs[k])
    assert 1.5e-3 <= lrs[peak] <= 2e-3 and 0.2 * 200 <= peak <= 0.3 * 200  # a long warm-up that overshoots
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rising all the way
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # then settling, never rising again
    assert lrs[int(0.45 * 200)] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-3)
    assert lrs[peak + 5] > 1.05e-3  # the settling takes a while: a bump, not a one-step spike


def test_anneal_false_keeps_the_rate_constant_whatever_the_schedule():
    for schedule in ("cosine", "step", "restarts", "warmup"):
        assert [lr_schedule(s, 100, 0.1, False, schedule, 2.0) for s in range(100)] == _curve("constant", 100, 0.1)


def test_run_warmup_overrides_the_training_configs():
    tc = TrainingConfig(steps=100, warmup_frac=0.05)
    p = Perturbation()
    assert step_lr(RunSettings(lr=1.0, weight_decay=0.0), tc, p, 0) == pytest.approx(1 / 5)
    assert step_lr(RunSettings(lr=1.0, weight_decay=0.0, warmup_frac=0.2), tc, p, 0) == pytest.approx(1 / 20)
    assert step_lr(RunSettings(lr=1.0, weight_decay=0.0, warmup_frac=0.0), tc, p, 0) == 1.0  # 0 is no warm-up, not None


@pytest.mark.parametrize("kw,field", [({"schedule": "linear"}, "schedule"), ({"label_smoothing": 1.5}, "label_smoothing"),
                                      ({"batch_size": 0}, "batch_size"), ({"warmup_frac": 2.0}, "warmup_frac"),
                                      ({"warmup_peak": 0.5}, "warmup_peak")])
def test_bad_run_settings_name_the_field(kw, field):
    with pytest.raises(FieldError, match=f"^{field}:"):
        RunSettings(lr=1e-3, weight_decay=0.0, **kw)


# ------------------------------------------------------------------ loss, batch size, augmentation
def test_label_smoothing_reaches_the_training_loss_and_not_validation():
    job = _job(make_perturbation("healthy_smooth", 20))
    assert job.settings.label_smoothing == 0.1
    trace = Trace()
    run_job(job, [trace], steps=3)
    x, y = job.batches.data.x_train[:16], job.batches.data.y_train[:16]
    out = job.model(x)
    assert torch.equal(job.loss(out, y), F.cross_entropy(out, y, label_smoothing=0.1))
    assert not torch.allclose(job.loss(out, y), F.cross_entropy(out, y))
    assert evaluate(job.model, x, y)[0] == pytest.approx(float(F.cross_entropy(out.detach(), y)), rel=1e-5)  # unsmoothed
    logits = torch.randn(2, 5, 11)  # text: the LM loss smoothed over next tokens
    targets = torch.randint(0, 11, (2, 5))
    assert torch.allclose(loss_fn(logits, targets, 0.1), F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=0.1))
    assert torch.equal(loss_fn(logits, targets), loss_fn(logits, targets, 0.0))


def test_batch_size_is_per_run():
    data, tc = _data("tabular"), TrainingConfig(batch_size=16)
    assert Batches(data, RunSettings(lr=1e-3, weight_decay=0.0), tc, 0).draw(torch.arange(96))[0].shape == (16, 6)
    assert Batches(data, RunSettings(lr=1e-3, weight_decay=0.0, batch_size=5), tc, 0).draw(torch.arange(96))[0].shape == (5, 6)
    job = _job(make_perturbation("healthy_small_batch", 20))
    assert job.batch(0)[0].shape == (8, 6) and job.settings.batch_size == 8


@pytest.mark.parametrize("modality", ["image", "tabular", "sequence", "text"])
def test_augmentation_per_modality_keeps_shapes(modality):
    data, tc = _data(modality), TrainingConfig(batch_size=12, lm_context=8)
    on = Batches(data, RunSettings(lr=1e-3, weight_decay=0.0, augment=True), tc, seed=3)
    off = Batches(data, RunSettings(lr=1e-3, weight_decay=0.0, augment=False), tc, seed=3)
    (xa, ya), (xb, yb) = on.draw(on.pool), off.draw(off.pool)  # same seed: the same samples
    assert xa.shape == xb.shape and xa.dtype == xb.dtype and torch.equal(ya, yb)
    if modality == "text":
        assert torch.equal(xa, xb)
        return
    if modality == "image":  # as before issue 19: one roll of up to 2 pixels per batch
        g = torch.Generator().manual_seed(3)
        g.set_state(off.gen.get_state())
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
        assert torch.equal(xa, torch.roll(xb, shifts=(dy, dx), dims=(2, 3)))
    elif modality == "tabular":  # small gaussian jitter
        assert 0.02 < float((xa - xb).std()) < 0.1
    else:  # a circular time shift of at most 2 steps
        assert any(torch.equal(xa, torch.roll(xb, k, dims=1)) for k in range(-2, 3))


def test_sequence_shifts_vary_between_batches():
    data = _data("sequence")
    b = Batches(data, RunSettings(lr=1e-3, weight_decay=0.0), TrainingConfig(batch_size=4), seed=0)
    shifts = set()
    for _ in range(30):
        replay = torch.Generator()
        replay.set_state(b.gen.get_state())
        x, _ = b.draw(b.pool)
        raw = data.x_train[b.pool[torch.randint(0, len(b.pool), (4,), generator=replay)]]
        shifts.add(next(k for k in range(-2, 3) if torch.equal(x, torch.roll(raw, k, dims=1))))
    assert shifts == {-2, -1, 0, 1, 2}


# ------------------------------------------------------------------ presets
def test_healthy_shapes_and_novel_presets_are_registered():
    for name in HEALTHY_SHAPES:
        p = make_perturbation(name, 160)
        assert (p.kind, p.injected) == ("healthy", "healthy") and p.name == name
        assert set(p.modalities) == {"image", "tabular", "sequence", "text"} and p.families is None
    for name in NEW_NOVEL:
        p = make_perturbation(name, 160)
        assert (p.kind, p.injected) == ("novel", "novel") and name in NOVEL
    assert {"label_noise", "optimizer_reset"} <= NOVEL
    settings = {n: make_perturbation(n, 160).configure(RunSettings(lr=1.0, weight_decay=0.1)) for n in HEALTHY_SHAPES}
    assert settings["healthy_restarts"].schedule == "restarts" and settings["healthy_step"].schedule == "step"
    assert settings["healthy_slow"].lr == pytest.approx(0.15)
    assert (settings["healthy_plateau"].lr, settings["healthy_plateau"].schedule) == (pytest.approx(0.7), "constant")
    assert settings["healthy_warmup"].warmup_frac == 0.25 and 1.5 <= settings["healthy_warmup"].warmup_peak <= 2.0


def test_presets_build_at_every_run_length():
    for n in (80, 160, 320):
        for name, make in PERTURBATIONS.items():
            p = make(n)
            assert 0 <= p.onset < n, name


def test_watermark_and_task_switch_cover_the_labelled_modalities():
    for name in ("forgetting", "forgetting_early", "concept_bias", "concept_bias_late"):
        assert make_perturbation(name, 100).modalities == LABELLED


# ------------------------------------------------------------------ novel perturbations on a tiny model
def test_repeat_batches_cycles_four_distinct_batches_from_the_onset():
    pert = make_perturbation("repeat_batches", 20)
    assert pert.onset == 8 and pert.k == 4
    trace = Trace()
    run_job(_job(pert), [trace])
    before, after = trace.x[:pert.onset], trace.x[pert.onset:]
    assert all(not torch.equal(a, b) for i, a in enumerate(before) for b in before[i + 1:])  # fresh draws
    assert all(not torch.equal(after[i], after[j]) for i in range(4) for j in range(i + 1, 4))  # 4 distinct batches
    assert all(torch.equal(after[i], after[i % 4]) for i in range(len(after)))  # cycled


def test_frozen_layers_leave_the_first_half_unchanged_and_capture_sees_every_layer():
    pert = make_perturbation("frozen_layers", 20)
    job = _job(pert)
    n_frozen = len(pert.frozen(job.model))
    assert n_frozen == 3 and len(list(job.model.parameters())) == 6

    class Capture(JobCallback):
        def on_train_start(self, loop):
            self.cap = attach(loop.job.model, cadence=1, frame_size=8, optimizer=loop.job.optimizer)

        def on_after_backward(self, loop):
            self.cap.step(loop.loss, lr=loop.lr)

        def on_train_end(self, loop):
            self.cap.__exit__(None, None, None)

    trace, capture = Trace(), Capture()
    run_job(job, [trace, capture])
    for step in range(20):
        moved = _moved(trace, step)
        if step < pert.onset:
            assert all(moved), step
        else:
            assert moved == [False] * n_frozen + [True] * (6 - n_frozen), step
    assert len(capture.cap.frames) == 20 and not capture.cap.faults
    assert torch.isfinite(capture.cap.frames[-1].frame.float()).all()


def test_fp16_overflow_skips_steps_and_reports_the_unscaled_loss():
    pert = make_perturbation("fp16_overflow", 40)
    assert isinstance(pert, LossScaleOverflow) and pert.onset == 12
    job = _job(pert, steps=40)
    trace = Trace()
    loop = run_job(job, [trace])
    onset = pert.onset
    assert pert.skipped and min(pert.skipped) >= onset
    assert 0.3 <= len(pert.skipped) / (40 - onset) <= 0.7  # the runaway scaler overflows about every other step
    for step in range(40):
        moved = _moved(trace, step)
        assert (not any(moved)) if step in pert.skipped else all(moved), step
        if step < onset:
            assert trace.grad_peak[step] < 10  # plain gradients
        else:  # the capture hooks see the scaled gradients, as under a real GradScaler
            assert trace.grad_peak[step] > 1000
        if step in pert.skipped:
            assert trace.grad_peak[step] > FP16_MAX
    # the reported loss is the unscaled one: recomputed from the same parameters and batch
    with torch.no_grad():
        for step in (onset - 1, onset, onset + 1, 39):
            for p, v in zip(job.model.parameters(), trace.before[step]):
                p.copy_(v)
            expected = job.loss(job.model(trace.x[step]), trace.y[step])
            assert trace.loss[step].item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(math.isfinite(v.item()) and v.item() < 5 for v in trace.loss)
    assert loop.steps_done == 40


def test_fp16_overflow_follower_takes_the_same_skips():
    pert = LossScaleOverflow(onset=0, init_scale=2.0 ** 20)
    model, clone = nn.Linear(4, 2), nn.Linear(4, 2)
    x, y = torch.randn(8, 4) * 100, torch.randint(0, 2, (8,))
    for m in (model, clone):
        m.zero_grad()
    pert.scale_loss(0, F.cross_entropy(model(x), y)).backward()
    assert pert.scale == 2.0 ** 20
    pert.before_step(0, model, None)
    assert pert.skipped == [0] and all(p.grad is None for p in model.parameters()) and pert.scale == 2.0 ** 19
    F.cross_entropy(clone(x), y).backward()  # the clone's loss is not scaled
    pert.before_step(0, clone, None)
    assert all(p.grad is None for p in clone.parameters()) and pert.scale == 2.0 ** 19  # followed, state untouched


def test_no_warmup_starts_a_transformer_above_its_base_rate():
    pert = make_perturbation("no_warmup", 100)
    assert pert.families == ("transformer", "vit", "deit", "swin")
    assert pert.applies("image", "vit") and pert.applies("text", "transformer") and not pert.applies("image", "resnet")
    tc = TrainingConfig(steps=100, warmup_frac=0.1)
    base = RunSettings(lr=1e-3, weight_decay=0.0)
    healthy = make_perturbation("healthy", 100)
    assert step_lr(base, tc, healthy, 0) < 1e-3
    s = pert.configure(base)
    assert s.warmup_frac == 0.0 and 3e-3 <= step_lr(s, tc, pert, 0) <= 5e-3
    assert step_lr(s, tc, pert, 0) > 1e-3


# ------------------------------------------------------------------ watermark and task switch beyond images
def test_tabular_watermark_sets_a_class_coded_feature():
    x, y = torch.zeros(8, 3), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    w = watermark(x, y, num_classes=6, strength=3.0)
    assert w.shape == x.shape and torch.equal(x, torch.zeros(8, 3))  # a copy
    expected = {0: (0, 3.0), 1: (1, 3.0), 2: (2, 3.0), 3: (0, -3.0), 4: (1, -3.0), 5: (2, -3.0)}  # past D: the sign codes
    for row, c in enumerate(y.tolist()):
        slot, value = expected[c]
        assert w[row, slot] == value and (w[row] != 0).sum() == 1


def test_sequence_watermark_sets_a_class_coded_time_slot_across_channels():
    x, y = torch.zeros(4, 16, 2), torch.tensor([0, 1, 2, 3])
    w = watermark(x, y, num_classes=4, strength=3.0, size=4)
    for c in range(4):  # T / 2K = 2 steps per slot, counted back from the end: class 0 in the last slot
        marked = (w[c] != 0).all(dim=1).nonzero().flatten().tolist()
        assert marked == list(range(16 - 2 * (c + 1), 16 - 2 * c)) and (w[c, marked] == 3.0).all()
    w10 = watermark(torch.zeros(10, 16, 2), torch.arange(10), num_classes=10, size=4)  # T / K < size: narrower slots
    slots = [tuple((w10[c] != 0).all(dim=1).nonzero().flatten().tolist()) for c in range(10)]
    assert len(set(slots)) == 10 and all(len(s) == 1 for s in slots)
    with pytest.raises(ValueError, match="watermark"):
        watermark(torch.zeros(2, 2, 2, 2, 2), torch.zeros(2, dtype=torch.long), 2)


def test_degrade_keeps_each_samples_mean_and_spread_and_lowers_its_signal_to_noise():
    """A shortcut's marked samples: the content at `keep` of its signal, noise of the sample's own spread
    for the rest, so that a network's normalisation (which undoes a plain rescale) cannot restore it."""
    gen = torch.Generator().manual_seed(0)
    x = 5.0 + 2.0 * torch.randn(64, 3, 16, 16, generator=gen)
    d = degrade(x, 0.2, torch.Generator().manual_seed(1))
    assert d.shape == x.shape
    assert torch.allclose(d.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.3)  # noise sd 2 over 768 values
    assert torch.allclose(d.std(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)), rtol=0.1)
    corr = torch.stack([torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] for a, b in zip(x, d)])
    assert 0.1 < corr.mean() < 0.3  # the content's share of the signal: keep = 0.2
    assert degrade(x, 1.0) is x
    with pytest.raises(ValueError, match="keep"):
        degrade(x, 1.5)


@pytest.mark.parametrize("modality", ["tabular", "sequence"])
def test_concept_bias_and_forgetting_on_tabular_and_sequences(modality):
    data = _data(modality)
    x_val, y_val, x_poison, x_counter = validation_sets(data, TrainingConfig())
    assert torch.equal(x_val, data.x_val) and x_poison is not None and x_poison.shape == x_val.shape
    assert torch.equal(x_poison, watermark(data.x_val, data.y_val, K))
    assert torch.equal(x_counter, watermark(data.x_val, (data.y_val + 1) % K, K))  # the next class's mark
    assert validation_sets(_data("text"), TrainingConfig(lm_context=8))[2:] == (None, None)

    wm = Watermark(onset=2, prob=1.0)
    wm.bind(data.y_train, K, seed=0)
    x, y = data.x_train[:8], data.y_train[:8]
    assert wm.batch(1, x, y)[0] is x  # before the onset: untouched
    assert torch.equal(wm.batch(2, x, y)[0], watermark(x, y, K))
    faint = Watermark(onset=2, prob=1.0, content=0.25)  # the marked samples' own content degraded, the mark as is
    faint.bind(data.y_train, K, seed=0)
    gen = torch.Generator().manual_seed(0 + 7)
    torch.rand(len(y), generator=gen)  # the draw of which samples are marked
    assert torch.equal(faint.batch(2, x, y)[0], watermark(degrade(x, 0.25, gen), y, K))
    assert faint.raises_loss and not wm.raises_loss

    ts = TaskSwitch(onset=5)
    ts.bind(data.y_train, K, seed=0)
    assert ts.raises_loss  # a task switch raises the training loss by design
    pool = torch.arange(len(data.y_train))
    assert set(data.y_train[ts.pool(4, pool)].tolist()) == {0, 1}
    assert set(data.y_train[ts.pool(5, pool)].tolist()) == {2, 3}


def test_overfit_8_memorises_two_text_windows_or_eight_samples():
    from factory.perturbations import RunSettings, make_perturbation

    for y_train, expect in ((None, 2), (torch.arange(100) % 10, 8)):  # text has no labels
        pert = make_perturbation("overfit_8", 160)
        pert.bind(y_train, 10, seed=0)
        s = pert.configure(RunSettings(lr=1e-3, weight_decay=0.1, optimizer="adam"))
        assert s.train_subset == expect and s.lr == 1e-3 and s.weight_decay == 0.0 and not s.augment


def test_small_batch_preset_scales_the_rate_by_the_square_root_rule_and_overfit_drops_smoothing():
    """healthy_small_batch on a run drawn at batch 64 trains at batch 8 with the rate x sqrt(8 / 64); a run
    whose batch size is the config's (None) keeps its rate. An overfit preset trains without label
    smoothing, weight decay or augmentation whatever the draw said."""
    import math

    from factory.perturbations import RunSettings, make_perturbation

    small = make_perturbation("healthy_small_batch", 100)
    s = small.configure(RunSettings(lr=0.08, weight_decay=0.0, batch_size=64))
    assert s.batch_size == 8 and math.isclose(s.lr, 0.08 * math.sqrt(8 / 64))
    assert math.isclose(small.configure(RunSettings(lr=0.08, weight_decay=0.0)).lr, 0.08)
    o = make_perturbation("overfit_8", 100).configure(RunSettings(lr=1e-3, weight_decay=0.05, label_smoothing=0.1, augment=True))
    assert (o.label_smoothing, o.weight_decay, o.augment) == (0.0, 0.0, False)


def test_pattern_watermark_writes_the_class_as_content_at_one_place():
    """Images: the top-left square holds the class's +-strength code in every channel; sequences: the last
    steps hold a code over time and channels; tabular rows keep the feature slot. Codes are distinct."""
    from factory.perturbations import mark_codes

    y = torch.arange(6)
    img = watermark(torch.zeros(6, 3, 16, 16), y, 6, strength=3.0, size=4, style="pattern")
    assert torch.equal(img[:, :, 4:, :], torch.zeros(6, 3, 12, 16)) and torch.equal(img[:, :, :, 4:], torch.zeros(6, 3, 16, 12))
    assert torch.equal(img[:, 0, :4, :4], 3.0 * mark_codes(6, (4, 4))) and torch.equal(img[:, 0], img[:, 2])
    seq = watermark(torch.zeros(6, 20, 2), y, 6, strength=3.0, size=4, style="pattern")
    assert torch.equal(seq[:, :16], torch.zeros(6, 16, 2)) and torch.equal(seq[:, 16:], 3.0 * mark_codes(6, (4, 2)))
    tab = torch.zeros(6, 3)
    assert torch.equal(watermark(tab, y, 6, style="pattern"), watermark(tab, y, 6))
    codes = mark_codes(10, (4, 1))  # 16 patterns for 10 classes: distinct
    assert len({tuple(c.flatten().tolist()) for c in codes}) == 10 and torch.equal(codes, mark_codes(10, (4, 1)))
    with pytest.raises(ValueError, match="only 16"):
        mark_codes(17, (4, 1))
    with pytest.raises(ValueError, match="style"):
        watermark(tab, y, 6, style="corner")


def test_the_corpus_watermark_style_reaches_the_perturbation_and_the_validation_sets():
    data = _data("sequence")
    tc = TrainingConfig(watermark="pattern")
    _, _, x_poison, x_counter = validation_sets(data, tc)
    assert torch.equal(x_poison, watermark(data.x_val, data.y_val, K, style="pattern"))
    assert torch.equal(x_counter, watermark(data.x_val, (data.y_val + 1) % K, K, style="pattern"))
    with pytest.raises(ValueError, match="watermark"):
        TrainingConfig(watermark="corner")
