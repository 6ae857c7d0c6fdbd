"""Run specifications: a factory config expands into runs over arch x dataset x optimizer x
perturbation x seed, per split, with factorially disjoint splits (docs/architecture.md §6, paper Table 2).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field

from capture.config import FieldError, at_least, within

SPLITS = ("train", "val", "test")


@dataclass
class SplitConfig:
    """Allow-lists of one split. A grid split (`runs: 0`) runs every arch x dataset x optimizer x
    perturbation combination `seeds` times; a drawn split (`runs` > 0) draws `runs` contexts from
    `families`, `datasets`, `optimizers` and `perturbations` (factory.contexts), a healthy preset with
    probability `healthy_share`."""

    archs: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    optimizers: list[str] = field(default_factory=list)
    perturbations: list[str] = field(default_factory=list)
    seeds: int = 1
    families: list[str] = field(default_factory=list)  # drawn splits
    runs: int = 0
    healthy_share: float = 0.45
    # drawn splits: this many more runs after the `runs`, drawn the same way but for their length, log-uniform
    # in `contexts.long_steps`: jobs trained long enough to fit their data (docs/factory.md, "Long runs").
    # The first `runs` draws stay as they were, so a corpus made without them resumes into one with them; the long
    # runs take the indices after `runs`, so a change of `runs` redraws them
    long_runs: int = 0
    # drawn splits: this many more after the long runs, drawn as they are but always with a healthy preset and a
    # batch size from `contexts.long_healthy_batch_sizes`: long noisy jobs on data they fit, which a user trains and
    # the drawn runs rarely are (docs/factory.md, "Long healthy small-batch runs"). They take the indices after the
    # long runs, so everything before them keeps its spec
    long_healthy_runs: int = 0

    def __post_init__(self):
        at_least(self, 0, "runs", "long_runs", "long_healthy_runs")
        for name in ("long_runs", "long_healthy_runs"):
            if getattr(self, name) and not self.runs:
                raise FieldError(name, f"draws {name} ({getattr(self, name)}) after the drawn ones: set `runs` > 0 too")
        within(self, 0.0, 1.0, "healthy_share")
        if self.runs and self.archs:
            raise FieldError("archs", f"a drawn split (runs: {self.runs}) draws from `families`; `archs` {self.archs} is for grids")


@dataclass(frozen=True)
class RunSpec:
    """One run. `arch` is the model family of a drawn run; `context` holds its drawn size and recipe as
    sorted (key, value) pairs (empty for grid runs); `fold` its cross-fitting fold (-1: none)."""

    split: str
    arch: str
    dataset: str
    optimizer: str
    perturbation: str
    seed: int
    context: tuple = ()
    fold: int = -1

    @property
    def run_id(self) -> str:
        """Stable hash of the spec: the same spec gets the same id on every machine and run (a grid
        spec hashes as it did before drawn contexts existed)."""
        d = asdict(self)
        if not self.context:
            d.pop("context"), d.pop("fold")
        blob = json.dumps(d, sort_keys=True).encode()
        return f"{self.arch}-{self.dataset}-{self.perturbation}-{hashlib.sha256(blob).hexdigest()[:10]}"

    @property
    def ctx(self) -> dict:
        """The drawn context as a dict ({} for grid runs)."""
        return dict(self.context)

    def to_dict(self) -> dict:
        """The manifest's view: the spec's fields, `family` (= arch), the fold and the context flattened."""
        d = {k: v for k, v in asdict(self).items() if k not in ("context", "fold")}
        if not self.context:  # a grid run: the record it always had
            return {**d, "run_id": self.run_id}
        return {**d, "family": self.arch, "fold": self.fold, **self.ctx, "run_id": self.run_id}

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        """Inverse of `to_dict` (a manifest record or a store's `spec` attrs)."""
        keys = ("split", "arch", "dataset", "optimizer", "perturbation", "seed")
        ctx = {k: d[k] for k in CONTEXT_KEYS if k in d}
        return cls(*(d[k] for k in keys), context=tuple(sorted(ctx.items())), fold=int(d.get("fold", -1)))


CONTEXT_KEYS = ("width", "depth", "norm", "act", "residual", "lr", "weight_decay", "batch_size", "schedule",
                "warmup_frac", "label_smoothing", "augment", "max_steps")


class SplitError(ValueError):
    pass


def overlap_problems(splits: dict[str, SplitConfig], axes: tuple[str, ...], novel: set[str]) -> list[str]:
    """What breaks the held-out design: a value of one of `axes` (SplitConfig list fields) that test shares
    with train or val, and novel perturbations outside test. One message per violation."""
    problems = []
    test = splits["test"]
    for axis in axes:
        for other in ("train", "val"):
            shared = sorted(set(getattr(test, axis)) & set(getattr(splits[other], axis)))
            if shared:
                problems.append(f"{axis} {shared} appear in both test and {other}")
    for name in ("train", "val"):
        leaked = sorted(set(splits[name].perturbations) & novel)
        if leaked:
            problems.append(f"novel perturbations {leaked} appear in {name} (test only)")
    return problems


def check_disjoint(splits: dict[str, SplitConfig], novel: set[str]) -> None:
    """Test architectures, datasets and optimizers never appear in train/val; novel perturbations
    only in test. Raises `SplitError` naming every violation."""
    problems = overlap_problems(splits, ("archs", "datasets", "optimizers"), novel)
    if problems:
        raise SplitError("splits are not factorially disjoint: " + "; ".join(problems))


def expand(splits: dict[str, SplitConfig], novel: set[str]) -> list[RunSpec]:
    """All run specs of a grid config (the product of each split's lists), in a deterministic order,
    after the disjointness check. Drawn configs: `factory.contexts.expand_drawn`."""
    if any(splits[name].runs for name in SPLITS):
        raise SplitError("drawn splits (runs > 0) are expanded by factory.contexts.expand_drawn, not the grid")
    check_disjoint(splits, novel)
    specs = []
    for split in SPLITS:
        s = splits[split]
        for arch, ds, opt, pert, seed in itertools.product(s.archs, s.datasets, s.optimizers, s.perturbations, range(s.seeds)):
            specs.append(RunSpec(split, arch, ds, opt, pert, seed))
    ids = [s.run_id for s in specs]
    if len(set(ids)) != len(ids):
        raise SplitError("duplicate run specs in the config")
    return specs
