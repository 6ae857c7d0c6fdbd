"""Drawn training contexts (factory.contexts): the cpu plan's coverage, determinism, refused configs, --plan."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from capture.config import load_config
from factory.config import FactoryConfig
from factory.contexts import ContextError
from factory.datasets import dataset_info
from factory.generate import MANIFEST_KEYS, main as generate_main, plan
from factory.perturbations import make_perturbation
from factory.spec import SplitError

CPU = Path(__file__).resolve().parents[1] / "configs" / "factory" / "cpu.yaml"


@pytest.fixture(scope="module")
def cpu_plan():
    cfg = load_config(FactoryConfig, CPU)
    return cfg, plan(cfg)


def test_the_cpu_plan_covers_what_people_train(cpu_plan):
    cfg, specs = cpu_plan
    assert len(specs) >= 1500
    by_split = {s: [x for x in specs if x.split == s] for s in ("train", "val", "test")}
    train = by_split["train"]
    assert len({x.arch for x in train}) >= 12
    assert len({x.dataset for x in train}) >= 5 and len({x.optimizer for x in train}) >= 4
    assert {dataset_info(x.dataset).modality for x in train} == {"image", "tabular", "sequence", "text"}
    image_shapes = {tuple(dataset_info(x.dataset).dims) for x in train if dataset_info(x.dataset).modality == "image"}
    assert len({c for c, _ in image_shapes}) >= 2 and len({s for _, s in image_shapes}) >= 2  # channel counts, sizes
    healthy = lambda rows: [x for x in rows if make_perturbation(x.perturbation, 100).kind == "healthy"]  # noqa: E731
    assert len(healthy(specs)) >= 0.40 * len(specs)
    assert len(healthy(by_split["test"])) >= 100
    shapes = Counter(x.perturbation for x in healthy(train))
    for preset in ("healthy_warmup", "healthy_restarts", "healthy_step", "healthy_small_batch", "healthy_slow",
                   "healthy_plateau", "healthy_smooth"):
        assert shapes[preset] >= 10, preset
    lengths = [x.ctx["max_steps"] for x in specs]
    assert max(lengths) >= 3.5 * min(lengths)  # drawn log-uniform over a 4x range
    assert len({x.ctx["schedule"] for x in train}) == 5 and len({x.ctx["batch_size"] for x in train}) >= 3
    for axis in ("arch", "dataset", "optimizer"):
        val_only = {getattr(x, axis) for x in by_split["val"]} - {getattr(x, axis) for x in train}
        assert val_only, axis
        test_axis = {getattr(x, axis) for x in by_split["test"]}
        assert not test_axis & {getattr(x, axis) for x in train + by_split["val"]}, axis
    folds = Counter(x.fold for x in train + by_split["val"])
    assert set(folds) == set(range(cfg.contexts.folds)) and cfg.contexts.folds >= 4
    assert all(x.fold == -1 for x in by_split["test"])
    assert {make_perturbation(x.perturbation, 100).kind for x in by_split["test"]} >= {"novel"}


def test_draws_are_deterministic_and_appending_runs_keeps_earlier_ones(cpu_plan):
    cfg, specs = cpu_plan
    again = plan(load_config(FactoryConfig, CPU))
    assert [s.run_id for s in again] == [s.run_id for s in specs]
    more = plan(load_config(FactoryConfig, CPU, [f"train.runs={cfg.splits['train'].runs + 10}"]))
    train = [s.run_id for s in specs if s.split == "train"][: cfg.splits["train"].runs]  # the long runs follow: they move
    assert [s.run_id for s in more if s.split == "train"][: len(train)] == train
    other = plan(load_config(FactoryConfig, CPU, ["contexts.seed=1"]))
    assert len({s.run_id for s in other} & {s.run_id for s in specs}) == 0


def test_long_runs_follow_the_drawn_ones_and_only_their_length_range_differs(cpu_plan):
    cfg, specs = cpu_plan
    n = cfg.splits["train"].runs
    longer = plan(load_config(FactoryConfig, CPU, [f"train.long_runs={cfg.splits['train'].long_runs + 30}",
                                                   "contexts.long_steps=[700, 900]", "train.long_healthy_runs=0"]))
    train = [s for s in specs if s.split == "train"]
    extra = [s for s in longer if s.split == "train"]
    assert [s.run_id for s in extra[:n]] == [s.run_id for s in train[:n]]  # the drawn runs are untouched
    tail = extra[n:]
    assert len(tail) == cfg.splits["train"].long_runs + 30
    assert all(700 <= s.ctx["max_steps"] <= 900 for s in tail)
    assert max(s.ctx["max_steps"] for s in train[:n]) <= cfg.contexts.steps[1]
    # the same draw as a plain run of that index but for its length
    plain = plan(load_config(FactoryConfig, CPU, [f"train.runs={n + 1}", "train.long_runs=0", "train.long_healthy_runs=0"]))
    a, b = [s for s in plain if s.split == "train"][n], tail[0]
    assert (a.arch, a.dataset, a.optimizer, a.perturbation) == (b.arch, b.dataset, b.optimizer, b.perturbation)
    assert {k: v for k, v in a.ctx.items() if k != "max_steps"} == {k: v for k, v in b.ctx.items() if k != "max_steps"}
    for bad, match in ((["train.runs=0", "val.runs=0", "test.runs=0", "train.long_runs=5"], "long_runs"),
                       (["contexts.long_steps=[900, 700]"], "long_steps")):
        with pytest.raises(ValueError, match=match):
            plan(load_config(FactoryConfig, CPU, bad))


def test_long_healthy_runs_follow_the_long_ones_healthy_and_at_their_batch_sizes(cpu_plan):
    cfg, specs = cpu_plan
    first = cfg.splits["train"].runs + cfg.splits["train"].long_runs  # the long healthy runs' first index
    train = [s for s in specs if s.split == "train"]
    more = plan(load_config(FactoryConfig, CPU, ["train.long_healthy_runs=40", "contexts.long_healthy_batch_sizes=[16, 24]"]))
    extra = [s for s in more if s.split == "train"]
    assert [s.run_id for s in extra[:first]] == [s.run_id for s in train[:first]]  # everything before them is untouched
    tail = extra[first:]
    assert len(tail) == 40
    assert all(make_perturbation(s.perturbation, 100).kind == "healthy" for s in tail)
    assert {s.ctx["batch_size"] for s in tail} == {16, 24}
    lo, hi = cfg.contexts.long_steps
    assert all(lo <= s.ctx["max_steps"] <= hi for s in tail)
    assert len({s.dataset for s in tail}) > 1 and len({s.arch for s in tail}) > 1  # drawn like the others otherwise
    for bad, match in ((["train.runs=0", "train.long_runs=0", "val.runs=0", "test.runs=0", "train.long_healthy_runs=5"], "long_healthy_runs"),
                       (["contexts.long_healthy_batch_sizes=[]"], "long_healthy_batch_sizes")):
        with pytest.raises(ValueError, match=match):
            plan(load_config(FactoryConfig, CPU, bad))


def test_a_config_whose_splits_overlap_on_a_held_out_factor_is_refused():
    with pytest.raises(SplitError, match=r"families \['resnet'\] appear in both test and train"):
        plan(load_config(FactoryConfig, CPU, ["test.families=[densenet,resnet]"]))
    with pytest.raises(SplitError, match="val holds out no optimizer"):
        plan(load_config(FactoryConfig, CPU, ["val.optimizers=[adamw,sgd]"]))
    with pytest.raises(SplitError, match=r"novel perturbations \['label_noise'\] appear in train"):
        plan(load_config(FactoryConfig, CPU, ["train.perturbations=[healthy,label_noise]"]))


def test_a_dataset_no_family_can_take_is_refused_at_plan_time():
    with pytest.raises(ContextError, match=r"split train: dataset 'tabular_blobs' \(tabular\) fits none of the families"):
        plan(load_config(FactoryConfig, CPU, ["train.families=[resnet,vit,convnext]"]))


def test_excluded_pairs_are_never_drawn_and_pair_factors_scale_the_rate(cpu_plan):
    cfg, specs = cpu_plan
    pairs = {f"{x.arch}/{x.optimizer}" for x in specs}
    assert cfg.contexts.excluded_pairs and not pairs & set(cfg.contexts.excluded_pairs)
    assert {"vit/adamw", "convnext/rmsprop"} <= pairs  # the families still draw their other optimizers
    mlp_sgd = [x.ctx["lr"] for x in specs if x.arch == "mlp" and x.optimizer == "sgd"]
    lo, hi = cfg.contexts.lr["sgd"]
    factor = cfg.contexts.lr_pair_scale["mlp/sgd"]
    assert mlp_sgd and all(lo * factor * 0.999 <= lr <= hi * factor * 1.001 for lr in mlp_sgd)
    unscaled = plan(load_config(FactoryConfig, CPU, ["contexts.lr_pair_scale={}", "contexts.excluded_pairs=[]"]))
    assert any(x.arch == "vit" and x.optimizer == "sgd" for x in unscaled)


def test_a_family_left_without_optimizers_or_an_unknown_pair_is_refused():
    with pytest.raises(ContextError, match=r"split val: families \['vit'\] have no optimizer"):
        plan(load_config(FactoryConfig, CPU, ["contexts.excluded_pairs=[vit/adamw,vit/sgd,vit/nadam]"]))
    with pytest.raises(ContextError, match=r"unknown family or optimizer in \['vit/sgdd'\]"):
        plan(load_config(FactoryConfig, CPU, ["contexts.excluded_pairs=[vit/sgdd]"]))
    with pytest.raises(ValueError, match="lr_pair_scale"):
        load_config(FactoryConfig, CPU, ["contexts.lr_pair_scale={mlp/sgd: 0}"])


def test_a_family_that_cannot_run_at_a_drawn_size_is_refused_at_plan_time(monkeypatch):
    import dataclasses

    from factory.families import FAMILIES, FamilyError

    # a width no head count divides: the family's own check must refuse it when the plan is made
    monkeypatch.setitem(FAMILIES, "transformer", dataclasses.replace(FAMILIES["transformer"], widths=(37,)))
    with pytest.raises(FamilyError, match="width"):
        plan(load_config(FactoryConfig, CPU))


def test_plan_prints_one_json_line_per_spec_with_family_and_fold(capsys, tmp_path):
    assert generate_main(["--config", str(CPU), "--out", str(tmp_path / "never"), "--plan", "subsample=50"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    cfg = load_config(FactoryConfig, CPU, ["subsample=50"])
    assert [r["run_id"] for r in lines] == [s.run_id for s in plan(cfg)]
    for r in lines:
        assert set(MANIFEST_KEYS) <= set(r) and {"family", "fold", "max_steps", "lr", "schedule"} <= set(r)
        assert r["label"] is None and r["family"] == r["arch"]
    assert not (tmp_path / "never").exists()  # --plan trains nothing and writes nothing


def test_stats_prints_the_plan_distribution(capsys):
    from factory.stats import main as stats_main

    assert stats_main(["--config", str(CPU), "subsample=10"]) == 0
    out = capsys.readouterr().out
    for split in ("train", "val", "test"):
        assert f"### {split}:" in out
    assert "- family (" in out and "- dataset (" in out and "- optimizer (" in out and "- perturbation (" in out


def test_a_small_drawn_corpus_generates_end_to_end(tmp_path):
    """Five drawn runs of the cpu config, one of its long runs and one long healthy run, shortened: each is stored
    complete with its family, fold and context in the manifest, levels and patterns in the store, and a label."""
    from capture.corpus import read_manifest
    from capture.store import RunStore

    out = tmp_path / "drawn"
    overrides = ["train.runs=2", "train.long_runs=1", "train.long_healthy_runs=1", "val.runs=1", "test.runs=2", "contexts.steps=[24,32]",
                 "contexts.long_steps=[40,48]", "contexts.epochs=4",
                 "training.lyapunov_windows=2", "training.lyapunov_horizon=3", "training.max_train=200", "training.max_val=64"]
    assert generate_main(["--config", str(CPU), "--out", str(out), *overrides]) == 0
    records = read_manifest(out)
    assert len(records) == 7 and all(r["status"] in ("complete", "diverged") for r in records), records
    train = [r for r in records if r["split"] == "train"]
    assert all(40 <= r["max_steps"] <= 48 for r in train[-2:])  # the long run and the long healthy one follow the drawn ones
    assert train[-1]["batch_size"] == 16 and train[-1]["injected"] == "healthy"
    for r in records:
        assert r["family"] == r["arch"] and r["label"] is not None
        assert 24 <= r["max_steps"] <= 32 or r in train[-2:]
        assert (r["fold"] >= 0) == (r["split"] != "test")
        store = RunStore(out / r["store"])
        assert store.levels().shape == (store.attrs["n_frames"], 6) and store.patterns().shape[1:] == (6, 8, 8)
        assert store.attrs["training"]["steps"] == r["max_steps"]  # the run's own length, not the config's


def test_lr_probe_centres_on_the_drawn_rate_and_skips_excluded_pairs(capsys):
    import math

    from factory.contexts import ContextConfig
    from factory.families import FAMILIES
    from factory.lr_probe import lr_probe

    lr_probe(["vit", "mlp"], steps=2, optimizer="sgd")
    out = capsys.readouterr().out.splitlines()
    cc = ContextConfig()
    assert "vit            not drawn with sgd (contexts.excluded_pairs)" in out
    mlp = [line for line in out if line.startswith("mlp")]
    assert len(mlp) == len(FAMILIES["mlp"].modalities)
    centre = math.sqrt(cc.lr["sgd"][0] * cc.lr["sgd"][1]) * FAMILIES["mlp"].lr_scale * cc.lr_pair_scale["mlp/sgd"]
    assert all(f"sgd lr {centre:.3g} " in line and line.count(" x") == 5 for line in mlp)
