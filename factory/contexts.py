"""Randomised training contexts: each run of a drawn split draws its own model family and size, dataset,
optimizer, learning rate, batch size, weight decay, schedule, label smoothing, augmentation and run length
(docs/factory.md, "Drawn corpora"). A split is drawn when its `runs` > 0; a config whose splits are all
drawn is expanded by `expand_drawn` (grid configs by `factory.spec.expand`).

    cfg = load_config(FactoryConfig, "configs/factory/cpu.yaml")
    specs = plan(cfg)                       # factory.generate.plan: every RunSpec, drawn ones included
    specs[0].context                        # {"width": 32, "depth": 2, ..., "lr": 0.0012, "max_steps": 190}

Draws are deterministic: run i of split s uses the generator `numpy.random.default_rng([seed, s, i])`, so
adding runs to a split appends specs and leaves the earlier ones as they were. The order of draws within a
run is dataset -> family (among the split's families that take the dataset's modality) -> size -> optimizer
(among the split's optimizers not excluded for the family) -> learning rate (the optimizer's range x the
family's `lr_scale` x the pair's factor), weight decay -> perturbation (among the split's presets that
apply to the modality and family; healthy presets with probability `healthy_share`) -> batch size,
schedule, warm-up, label smoothing, augmentation -> run length.

Folds: the train and validation runs carry a fold id in [0, folds): the fold of the run's family, families
dealt round-robin in sorted order over train + validation. Leaving fold k out leaves out whole families,
the unit of shift a user's job brings (cross-fitted calibration, issue 20).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from capture.config import FieldError, at_least, within
from factory.perturbations import SCHEDULES, make_perturbation
from factory.spec import SPLITS, RunSpec, SplitConfig, SplitError, overlap_problems



@dataclass
class ContextConfig:
    """The ranges every drawn run samples from (one section, `contexts:`, shared by the splits)."""

    seed: int = 0  # the draw's base seed: another value gives another corpus of the same shape
    steps: list[int] = field(default_factory=lambda: [80, 320])  # run length, log-uniform in [lo, hi]
    long_steps: list[int] = field(default_factory=lambda: [640, 1600])  # the same for a split's `long_runs`
    epochs: int = 16  # validation points per run: a run of n steps evaluates every n // epochs steps
    batch_sizes: list[int] = field(default_factory=lambda: [16, 32, 64])
    long_healthy_batch_sizes: list[int] = field(default_factory=lambda: [16])  # a split's `long_healthy_runs`
    schedules: list[str] = field(default_factory=lambda: list(SCHEDULES))
    warmup: list[float] = field(default_factory=lambda: [0.0, 0.1])  # warm-up fraction, uniform
    long_warmup: list[float] = field(default_factory=lambda: [0.15, 0.3])  # the same for the "warmup" schedule
    label_smoothing: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.1])  # one drawn uniformly
    augment_prob: float = 0.5
    # learning rate per optimizer, log-uniform in [lo, hi] times the family's `lr_scale`: the stable range
    lr: dict[str, list[float]] = field(default_factory=lambda: {
        "adamw": [1e-3, 5e-3], "adam": [1e-3, 5e-3], "nadam": [1e-3, 5e-3], "radam": [1e-3, 5e-3],
        "sgd": [0.02, 0.1], "rmsprop": [3e-4, 2e-3], "adagrad": [1e-2, 5e-2], "lamb": [2e-3, 1e-2],
        "lion": [8e-4, 4e-3], "adafactor": [5e-3, 3e-2]})
    # "family/optimizer": a factor on that pair's drawn rate, on top of the family's `lr_scale`. From
    # `python -m factory.lr_probe --optimizer O`: at the optimizer's rate x lr_scale these pairs learned
    # slowly or not at all in 150 steps (docs/factory.md, "Learning rates per optimizer")
    lr_pair_scale: dict[str, float] = field(default_factory=lambda: {
        "mlp/sgd": 0.3, "conv1d/sgd": 2.0, "regnet/sgd": 3.0,
        "mlp/adam": 0.5, "mlp/adamw": 0.5, "mlp/nadam": 0.5, "conv1d/adam": 2.0, "conv1d/adamw": 2.0,
        "gru/adam": 2.0, "gru/adamw": 2.0, "regnet/adamw": 2.5, "regnet/nadam": 2.5,
        "conv1d/rmsprop": 2.0, "gru/rmsprop": 2.0, "transformer/rmsprop": 2.0, "regnet/rmsprop": 3.0,
        "deit/adafactor": 4.0, "swin/adafactor": 4.0, "rnn/adafactor": 4.0, "lstm/adafactor": 2.0,
        "mlp/radam": 0.5, "conv1d/radam": 2.0, "gru/radam": 2.0,  # as Adam
        "mlp/lamb": 0.3, "conv1d/lamb": 2.0, "gru/lamb": 2.0, "vit/lamb": 0.5,
        "mlp/adagrad": 0.3, "conv1d/adagrad": 2.0, "gru/adagrad": 2.0, "vit/adagrad": 0.5})
    # "family/optimizer" pairs never drawn: the family learned nothing with that optimizer at 0.25-4x its rate
    excluded_pairs: list[str] = field(default_factory=lambda: ["vit/sgd", "convnext/sgd", "convnext/lamb", "convnext/adagrad"])
    # weight decay per optimizer, log-uniform in [lo, hi]; a list starting at 0 ([0, hi]) draws 0 half the time
    weight_decay: dict[str, list[float]] = field(default_factory=lambda: {
        "adamw": [1e-3, 0.1], "adam": [0.0, 1e-4], "nadam": [0.0, 1e-4], "radam": [0.0, 1e-4],
        "sgd": [1e-5, 1e-3], "rmsprop": [0.0, 1e-4], "adagrad": [0.0, 1e-4], "lamb": [1e-3, 0.1],
        "lion": [1e-2, 0.5], "adafactor": [0.0, 1e-3]})
    folds: int = 4

    def __post_init__(self):
        for name in ("steps", "long_steps", "warmup", "long_warmup"):
            pair = getattr(self, name)
            if len(pair) != 2 or not pair[0] <= pair[1]:
                raise FieldError(f"contexts.{name}", f"must be [lo, hi] with lo <= hi, got {pair!r}")
        for name in ("steps", "long_steps"):
            if getattr(self, name)[0] < 1:
                raise FieldError(f"contexts.{name}", f"must be >= 1, got {getattr(self, name)!r}")
        at_least(self, 1, "epochs", "folds")
        within(self, 0.0, 1.0, "augment_prob")
        for name in ("batch_sizes", "long_healthy_batch_sizes"):
            sizes = getattr(self, name)
            if not sizes or min(sizes) < 1:
                raise FieldError(f"contexts.{name}", f"must be a non-empty list of sizes >= 1, got {sizes!r}")
        unknown = sorted(set(self.schedules) - set(SCHEDULES))
        if unknown or not self.schedules:
            raise FieldError("contexts.schedules", f"unknown schedules {unknown}; known: {list(SCHEDULES)}")
        for name in ("lr", "weight_decay"):
            for opt, pair in getattr(self, name).items():
                if len(pair) != 2 or pair[0] < 0 or pair[0] > pair[1] or (name == "lr" and pair[0] <= 0):
                    raise FieldError(f"contexts.{name}.{opt}", f"must be [lo, hi] with 0 {'<' if name == 'lr' else '<='} lo <= hi, got {pair!r}")
        for pair, factor in self.lr_pair_scale.items():
            if pair.count("/") != 1 or not factor > 0:
                raise FieldError(f"contexts.lr_pair_scale.{pair}", f"must map 'family/optimizer' to a factor > 0, got {factor!r}")
        bad = [pair for pair in self.excluded_pairs if pair.count("/") != 1]
        if bad:
            raise FieldError("contexts.excluded_pairs", f"entries must be 'family/optimizer', got {bad}")

    def optimizers_for(self, family: str, optimizers: list[str]) -> list[str]:
        """The optimizers of `optimizers` a run of `family` may draw (those not in `excluded_pairs`)."""
        return [o for o in optimizers if f"{family}/{o}" not in self.excluded_pairs]

    def pair_scale(self, family: str, optimizer: str) -> float:
        """The factor on the drawn learning rate of `family` with `optimizer` (1 unless `lr_pair_scale` has it)."""
        return self.lr_pair_scale.get(f"{family}/{optimizer}", 1.0)


class ContextError(ValueError):
    """A drawn split that cannot be drawn: names the split, the factor and why."""


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else float(lo)


def _decay(rng: np.random.Generator, lo: float, hi: float) -> float:
    if lo == 0.0:  # [0, hi]: no decay half the time, else log-uniform over two decades below hi
        return 0.0 if rng.random() < 0.5 or hi == 0.0 else _log_uniform(rng, hi / 100, hi)
    return _log_uniform(rng, lo, hi)


def fold_of(splits: dict[str, SplitConfig], folds: int) -> dict[str, int]:
    """Each train/validation family's fold: families of train + val in sorted order, dealt round-robin."""
    names = sorted(set(splits["train"].families) | set(splits["val"].families))
    return {name: i % folds for i, name in enumerate(names)}


def check_held_out(splits: dict[str, SplitConfig], novel: set[str]) -> None:
    """A drawn config's splits: test shares no family, dataset or optimizer with train or validation;
    validation holds out at least one of each that train lacks; novel perturbations only in test.
    Raises `factory.spec.SplitError` naming every overlap."""
    problems = overlap_problems(splits, ("families", "datasets", "optimizers"), novel)
    for axis, one in (("families", "family"), ("datasets", "dataset"), ("optimizers", "optimizer")):
        if splits["val"].runs and not set(getattr(splits["val"], axis)) - set(getattr(splits["train"], axis)):
            problems.append(f"val holds out no {one} that train lacks (val {sorted(getattr(splits['val'], axis))})")
    if problems:
        raise SplitError("splits overlap on held-out factors: " + "; ".join(problems))


def expand_drawn(splits: dict[str, SplitConfig], novel: set[str], contexts: ContextConfig) -> list[RunSpec]:
    """All run specs of a drawn config (every split has `runs` > 0), after the held-out check."""
    drawn = [name for name in SPLITS if splits[name].runs]
    if len(drawn) != len(SPLITS):
        raise SplitError(f"splits {drawn} are drawn (runs > 0) and the others are grids: draw all three or none")
    check_held_out(splits, novel)
    folds = fold_of(splits, contexts.folds)
    specs = [spec for name in SPLITS for spec in draw_split(name, splits[name], contexts, folds)]
    if len({s.run_id for s in specs}) != len(specs):
        raise SplitError("two drawn runs have the same spec: change contexts.seed or check the lists")
    return specs


def draw_split(split: str, s: SplitConfig, cc: ContextConfig, folds: dict[str, int]) -> list[RunSpec]:
    """The `s.runs` + `s.long_runs` + `s.long_healthy_runs` drawn specs of one split (see the module docstring for
    the order of draws; the long runs, indices `s.runs` on, draw their length from `cc.long_steps`; the long healthy
    runs after them draw the same way but take a healthy preset and a batch size from `cc.long_healthy_batch_sizes`).
    Raises `ContextError` when a dataset has no family, an optimizer no learning-rate range, or a
    modality no perturbation; a family's size check (`Family.check`) failing is a `FamilyError`."""
    from factory.datasets import dataset_info
    from factory.families import FAMILIES, InputShape

    for axis in ("families", "datasets", "optimizers", "perturbations"):
        if not getattr(s, axis):
            raise ContextError(f"split {split}: `runs: {s.runs}` draws runs but `{axis}` is empty")
    unknown = [f for f in s.families if f not in FAMILIES]
    if unknown:
        raise ContextError(f"split {split}: unknown families {unknown}; known: {sorted(FAMILIES)}")
    named = [pair.split("/") for pair in [*cc.lr_pair_scale, *cc.excluded_pairs]]
    unknown = sorted({f"{f}/{o}" for f, o in named if f not in FAMILIES or o not in cc.lr})  # cc.lr: the drawable optimizers
    if unknown:
        raise ContextError(f"contexts.lr_pair_scale / excluded_pairs: unknown family or optimizer in {unknown}")
    no_lr = [o for o in s.optimizers if o not in cc.lr or o not in cc.weight_decay]
    if no_lr:
        raise ContextError(f"split {split}: optimizers {no_lr} have no contexts.lr / contexts.weight_decay range")
    stranded = [f for f in s.families if not cc.optimizers_for(f, s.optimizers)]
    if stranded:
        raise ContextError(f"split {split}: families {stranded} have no optimizer: contexts.excluded_pairs leaves out "
                           f"every one of {s.optimizers}")
    infos = {d: dataset_info(d) for d in s.datasets}
    presets = {p: make_perturbation(p, 100) for p in s.perturbations}
    by_modality: dict[str, list[str]] = {}
    for d, info in infos.items():
        fams = [f for f in s.families if info.modality in FAMILIES[f].modalities]
        if not fams:
            raise ContextError(f"split {split}: dataset {d!r} ({info.modality}) fits none of the families {s.families}")
        by_modality[info.modality] = fams

    specs = []
    split_index = SPLITS.index(split)
    long_healthy = s.runs + s.long_runs  # the first index of the long healthy runs
    for i in range(long_healthy + s.long_healthy_runs):
        rng = np.random.default_rng([cc.seed, split_index, i])
        dataset = s.datasets[rng.integers(len(s.datasets))]
        info = infos[dataset]
        family = FAMILIES[by_modality[info.modality][rng.integers(len(by_modality[info.modality]))]]
        size = family.draw_size(rng)
        shape = InputShape(info.modality, tuple(info.dims), info.num_classes)
        family.check(shape, size)
        optimizers = cc.optimizers_for(family.name, s.optimizers)
        optimizer = optimizers[rng.integers(len(optimizers))]
        lr = _log_uniform(rng, *cc.lr[optimizer]) * family.lr_scale * cc.pair_scale(family.name, optimizer)
        weight_decay = _decay(rng, *cc.weight_decay[optimizer])
        fits = [p for p, pert in presets.items() if pert.applies(info.modality, family.name)]
        healthy = [p for p in fits if presets[p].kind == "healthy"]
        faulty = [p for p in fits if presets[p].kind != "healthy"]
        pool = healthy if (rng.random() < s.healthy_share and healthy) or not faulty else faulty
        if i >= long_healthy and healthy:
            pool = healthy
        if not pool:
            raise ContextError(f"split {split}: no perturbation of {s.perturbations} applies to {info.modality} data")
        perturbation = pool[rng.integers(len(pool))]
        sizes = cc.long_healthy_batch_sizes if i >= long_healthy else cc.batch_sizes
        context = {
            "width": size.width, "depth": size.depth, "norm": size.norm, "act": size.act, "residual": size.residual,
            "lr": float(f"{lr:.4g}"), "weight_decay": float(f"{weight_decay:.4g}"),
            "batch_size": int(sizes[rng.integers(len(sizes))]),
            "schedule": (schedule := cc.schedules[rng.integers(len(cc.schedules))]),
            "warmup_frac": round(float(rng.uniform(*(cc.long_warmup if schedule == "warmup" else cc.warmup))), 3),
            "label_smoothing": float(cc.label_smoothing[rng.integers(len(cc.label_smoothing))]),
            "augment": bool(rng.random() < cc.augment_prob),
            "max_steps": int(round(_log_uniform(rng, *(cc.long_steps if i >= s.runs else cc.steps)))),
        }
        specs.append(RunSpec(split, family.name, dataset, optimizer, perturbation, i,
                             context=tuple(sorted(context.items())), fold=folds.get(family.name, -1) if split != "test" else -1))
    return specs
