"""Run specs and perturbations: splits are factorially disjoint, ids stable, each perturbation
does what it says."""
import pytest
import torch

from factory.perturbations import (
    NOVEL,
    PERTURBATIONS,
    AugmentationDrift,
    RunSettings,
    make_perturbation,
    watermark,
)
from factory.spec import RunSpec, SplitConfig, SplitError, expand

STEPS = 100


def _splits(**test_overrides):
    test = dict(archs=["mixer"], datasets=["textures"], optimizers=["lion"], perturbations=["healthy", "label_noise"], seeds=1)
    test.update(test_overrides)
    return {
        "train": SplitConfig(["resnet", "vit"], ["digits"], ["adamw", "sgd"], ["healthy", "overfit"], seeds=2),
        "val": SplitConfig(["vit"], ["digits"], ["sgd"], ["overfit"], seeds=1),
        "test": SplitConfig(**test),
    }


def test_expansion_counts_and_stable_ids():
    specs = expand(_splits(), NOVEL)
    assert len(specs) == 2 * 1 * 2 * 2 * 2 + 1 + 2
    again = expand(_splits(), NOVEL)
    assert [s.run_id for s in specs] == [s.run_id for s in again]
    assert len({s.run_id for s in specs}) == len(specs)
    # the id is a hash of the spec alone: known value, independent of process and order
    assert RunSpec("train", "resnet", "digits", "adamw", "healthy", 0).run_id == RunSpec("train", "resnet", "digits", "adamw", "healthy", 0).run_id
    assert RunSpec("train", "resnet", "digits", "adamw", "healthy", 0).run_id != RunSpec("train", "resnet", "digits", "adamw", "healthy", 1).run_id


@pytest.mark.parametrize("axis,value", [("archs", ["resnet"]), ("datasets", ["digits"]), ("optimizers", ["sgd"])])
def test_config_breaking_disjointness_is_refused(axis, value):
    with pytest.raises(SplitError, match=f"{axis}.*appear in both test and"):
        expand(_splits(**{axis: value}), NOVEL)


def test_novel_perturbations_only_in_test():
    splits = _splits()
    splits["train"].perturbations.append("loader_stall")
    with pytest.raises(SplitError, match=r"novel perturbations \['loader_stall'\] appear in train"):
        expand(splits, NOVEL)
    assert NOVEL == {"label_noise", "optimizer_reset", "optimizer_corrupt", "loader_stall", "augmentation_drift", "grad_clip",
                     "repeat_batches", "no_warmup", "frozen_layers", "fp16_overflow"}


def test_unknown_perturbation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown perturbation 'nope'; known:"):
        make_perturbation("nope", STEPS)


def test_overfit_removes_regularisation_and_data():
    s = make_perturbation("overfit", STEPS).configure(RunSettings(lr=0.1, weight_decay=0.05, optimizer="adamw"))
    assert s.weight_decay == 0 and not s.augment and s.train_subset == 32 and s.lr == pytest.approx(0.02) and not s.anneal


@pytest.mark.parametrize("optimizer,scale", [("adamw", 0.2), ("sgd", 0.2), ("lion", 1.0), ("adafactor", 1.0)])
def test_overfit_slows_only_the_fast_optimizers(optimizer, scale):
    s = make_perturbation("overfit", STEPS).configure(RunSettings(lr=0.1, weight_decay=0.05, optimizer=optimizer))
    assert s.lr == pytest.approx(0.1 * scale) and s.weight_decay == 0 and s.train_subset == 32


def test_base_lr_scales_per_arch_and_optimizer():
    from factory.config import TrainingConfig

    tc = TrainingConfig(base_lr={"sgd": 0.05, "adamw": 1e-3}, lr_scale={"alexnet/sgd": 0.2, "vit": 0.5})
    assert tc.lr("alexnet", "sgd") == pytest.approx(0.01)  # arch/optimizer key
    assert tc.lr("alexnet", "adamw") == pytest.approx(1e-3)  # no key: the base rate
    assert tc.lr("vit", "sgd") == pytest.approx(0.025)  # arch key
    with pytest.raises(ValueError, match="no base_lr for optimizer 'lion'"):
        tc.lr("resnet", "lion")


def test_overfit_with_an_onset_narrows_the_pool_at_the_onset():
    from factory.perturbations import Overfit

    p = Overfit(subset=8, onset=10)
    p.bind(None, 10, seed=3)
    assert p.configure(RunSettings(lr=0.1, weight_decay=0.05)).train_subset is None
    pool = torch.arange(100)
    assert torch.equal(p.pool(9, pool), pool)
    narrowed = p.pool(10, pool)
    assert len(narrowed) == 8 and torch.equal(p.pool(50, pool), narrowed) and set(narrowed.tolist()) <= set(range(100))


def test_lr_perturbations_change_the_lr_at_onset():
    spike = make_perturbation("instability_spike", STEPS)
    assert spike.onset == 40
    factors = [spike.lr_factor(t) for t in range(STEPS)]
    assert factors[: spike.onset] == [1.0] * spike.onset and factors[spike.onset] == 50.0
    bursts = sum(1 for t in range(1, STEPS) if factors[t] == 50.0 and factors[t - 1] == 1.0)
    assert bursts == spike.bursts == 4 and factors.count(50.0) == 4 * spike.length == 4
    extreme = make_perturbation("instability_lr", STEPS)
    assert extreme.lr_factor(extreme.onset - 1) == 1.0 and extreme.lr_factor(STEPS - 1) == 30.0
    cyc = make_perturbation("instability_cyclic", STEPS)
    factors = [cyc.lr_factor(t) for t in range(cyc.onset, STEPS)]
    assert max(factors) > 40 and min(factors) < 3 and cyc.lr_factor(cyc.onset - 1) == 1.0


def test_task_switch_changes_the_classes_at_onset():
    p = make_perturbation("forgetting", STEPS)
    labels = torch.arange(10).repeat(20)
    p.bind(labels, num_classes=10, seed=0)
    pool = torch.arange(len(labels))
    assert set(labels[p.pool(p.onset - 1, pool)].tolist()) == {0, 1, 2, 3, 4}
    assert set(labels[p.pool(p.onset, pool)].tolist()) == {5, 6, 7, 8, 9}


def test_watermark_predicts_the_label_in_train_only():
    p = make_perturbation("concept_bias", STEPS)
    p.bind(None, num_classes=10, seed=0)
    x, y = torch.zeros(400, 3, 32, 32), torch.arange(10).repeat(40)
    xm, _ = p.batch(0, x, y)
    marked = (xm != 0).flatten(1).any(1)
    assert 0.8 < marked.float().mean() < 0.97  # prob 0.9
    # the stamp's position identifies the class: one distinct pattern per class, same within a class
    patterns = {c: {tuple(xm[i].flatten().nonzero().flatten()[:3].tolist()) for i in range(400) if y[i] == c and marked[i]} for c in range(10)}
    assert all(len(v) == 1 for v in patterns.values()) and len({next(iter(v)) for v in patterns.values()}) == 10
    # the clean validation set carries no mark; the poisoned one carries the true class's mark
    assert torch.equal(watermark(x[:10], y[:10], 10)[3], xm[[i for i in range(400) if y[i] == 3 and marked[i]][0]])
    late = make_perturbation("concept_bias_late", STEPS)
    late.bind(None, num_classes=10, seed=0)
    assert torch.equal(late.batch(late.onset - 1, x, y)[0], x)


def test_label_noise_corrupts_a_quarter_after_onset():
    p = make_perturbation("label_noise", STEPS)
    p.bind(None, num_classes=10, seed=0)
    y = torch.randint(0, 10, (4000,))
    assert torch.equal(p.batch(p.onset - 1, None, y)[1], y)
    changed = (p.batch(p.onset, None, y)[1] != y).float().mean()
    assert 0.19 < changed < 0.26  # 25% replaced, a tenth of those by the same label


def test_loader_stall_repeats_the_batch():
    p = make_perturbation("loader_stall", STEPS)
    a = (torch.randn(4, 3), torch.tensor([1, 2, 3, 4]))
    b = (torch.randn(4, 3), torch.tensor([5, 6, 7, 8]))
    assert p.batch(p.onset - 1, *a)[0] is a[0]
    first = p.batch(p.onset, *a)
    again = p.batch(p.onset + 5, *b)
    assert torch.equal(first[0], again[0]) and torch.equal(again[1], a[1])


def test_augmentation_drift_grows():
    p = make_perturbation("augmentation_drift", STEPS)
    assert isinstance(p, AugmentationDrift)
    p.bind(None, num_classes=0, seed=0)
    x = torch.zeros(64, 3, 8, 8)
    early = p.batch(p.onset, x, None)[0].std()
    late = p.batch(STEPS - 1, x, None)[0].std()
    assert torch.equal(p.batch(p.onset - 1, x, None)[0], x) and late > 5 * early


def _model_and_opt(kind="adamw"):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1) if kind == "adamw" else torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    model(torch.randn(8, 4)).sum().backward()
    return model, opt


def test_optimizer_state_reset_and_corruption():
    model, opt = _model_and_opt()
    reset = make_perturbation("optimizer_reset", STEPS)
    reset.before_step(reset.onset - 1, model, opt)
    assert opt.state
    reset.before_step(reset.onset, model, opt)
    assert not opt.state
    model, opt = _model_and_opt()
    corrupt = make_perturbation("optimizer_corrupt", STEPS)
    before = opt.state[model.weight]["exp_avg_sq"].clone()
    corrupt.before_step(corrupt.onset, model, opt)
    torch.testing.assert_close(opt.state[model.weight]["exp_avg_sq"], before * 1e-4)


def test_excessive_clipping():
    model, opt = _model_and_opt("sgd")
    p = make_perturbation("grad_clip", STEPS)
    p.before_step(p.onset, model, opt)
    norm = torch.sqrt(sum((q.grad**2).sum() for q in model.parameters()))
    assert norm <= 1e-3 * 1.0001


def test_every_preset_builds():
    for name in PERTURBATIONS:
        p = make_perturbation(name, STEPS)
        assert p.name == name and 0 <= p.onset < STEPS and p.kind in ("healthy", "known", "novel")
