"""Run specifications: a factory config expands into runs over arch x dataset x optimizer x
perturbation x seed, per split, with factorially disjoint splits (docs/architecture.md §6, paper Table 2).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field

SPLITS = ("train", "val", "test")


@dataclass
class SplitConfig:
    """Allow-lists of one split; every combination is run `seeds` times."""

    archs: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    optimizers: list[str] = field(default_factory=list)
    perturbations: list[str] = field(default_factory=list)
    seeds: int = 1


@dataclass(frozen=True)
class RunSpec:
    split: str
    arch: str
    dataset: str
    optimizer: str
    perturbation: str
    seed: int

    @property
    def run_id(self) -> str:
        """Stable hash of the spec: the same spec gets the same id on every machine and run."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"{self.arch}-{self.dataset}-{self.perturbation}-{hashlib.sha256(blob).hexdigest()[:10]}"

    def to_dict(self) -> dict:
        return {**asdict(self), "run_id": self.run_id}


class SplitError(ValueError):
    pass


def check_disjoint(splits: dict[str, SplitConfig], novel: set[str]) -> None:
    """Test architectures, datasets and optimizers never appear in train/val; novel perturbations
    only in test. Raises `SplitError` naming every violation."""
    problems = []
    test = splits["test"]
    for axis in ("archs", "datasets", "optimizers"):
        for other in ("train", "val"):
            shared = sorted(set(getattr(test, axis)) & set(getattr(splits[other], axis)))
            if shared:
                problems.append(f"{axis} {shared} appear in both test and {other}")
    for name in ("train", "val"):
        leaked = sorted(set(splits[name].perturbations) & novel)
        if leaked:
            problems.append(f"novel perturbations {leaked} appear in {name} (test only)")
    if problems:
        raise SplitError("splits are not factorially disjoint: " + "; ".join(problems))


def expand(splits: dict[str, SplitConfig], novel: set[str]) -> list[RunSpec]:
    """All run specs of a config, in a deterministic order, after the disjointness check."""
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
