"""Familiarity (issue 20): how far a window is from every window TEViD was trained on.

Dirichlet vacuity says how little evidence the head collected, which a confident head on an unseen model
does not show. The Unknown score here is a distance on TEViD's fused window features
(`TEViD.forward_features`): the mean Euclidean distance to the k nearest rows of a bank of training-window
features, mapped to [0, 1) as d / (d + scale), where `scale` is the median of the same distance between
bank rows (each row left out of its own neighbours). A window as far from the bank as a typical training
window is from the others scores 0.5.

    bank  (N, D)  training windows' features, at most `max_bank` rows (a seeded subsample)
    x     (B, D)  -> cdist -> k smallest (B, k) -> mean d (B,) -> d / (d + scale) (B,)

A model trained not to know what it watches also cannot tell that it has never seen something: its features
keep what separates the known classes, and an input no training window had (a share of frozen weight tensors,
`capture.weights`) moves them little. The bank can instead read the window's run-relative inputs themselves
(`reads="inputs"`: every scalar of `capture.relative.RELATIVE_FEATURES`, their mean over the window and their
last value), each standardised by the bank's median and spread (the 16-84% range / 2, at least `floor`, so a
scalar that is constant in training counts in units of `floor`), or both side by side (`reads="both"`, the
features standardised the same way).

    rows  features (B, D) | inputs (B, T, F) -> (B, 2F) | both -> (B, D + 2F)   -> (x - center) / spread

`load_tevid` attaches `familiarity.safetensors` from the model's directory when it is there; `predict`
then reports this score as `vacuity` (what the decision rule's Unknown gate, tau and the Unknown AUROC read)
and the head's own vacuity as `evidential_vacuity`. The file holds the bank (standardised), the center and
spread when it has them and, as one metadata entry of sorted JSON, k, scale and what it reads (safetensors: no pickle;
one entry, so one bank saves to the same bytes every time).

    python -m diagnose.recalibrate --checkpoint O/final --corpus D --out O/final --familiarity   # bank from train, then tau
    python -m diagnose.recalibrate ... --familiarity --familiarity-reads inputs --no-gate       # the inputs, no gate
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

FAMILIARITY_FILE = "familiarity.safetensors"
READS = ("features", "inputs", "both")  # what a bank row is: the fused features, the pooled inputs, or both


def window_inputs(readouts: torch.Tensor) -> torch.Tensor:
    """A window's run-relative scalars `(B, T, F)` -> `(B, 2F)`: each one's mean over the window and its last value."""
    if readouts is None or readouts.ndim != 3:
        raise ValueError(f"familiarity: reading the inputs needs the window's scalars (B, T, F), got "
                         f"{None if readouts is None else tuple(readouts.shape)}")
    x = readouts.float()
    return torch.cat([x.mean(1), x[:, -1]], dim=1)


def familiarity_rows(reads: str, features: torch.Tensor | None, readouts: torch.Tensor | None) -> torch.Tensor:
    """The rows a bank of kind `reads` compares: the fused features `(B, D)`, the pooled inputs, or both."""
    if reads == "features":
        return features
    if reads == "inputs":
        return window_inputs(readouts)
    if reads == "both":
        return torch.cat([features.float(), window_inputs(readouts)], dim=1)
    raise ValueError(f"familiarity: reads must be one of {READS}, got {reads!r}")


@dataclass
class Familiarity:
    bank: torch.Tensor  # (N, D) float32, standardised when center / spread are set
    k: int
    scale: float
    reads: str = "features"  # READS: what a row is (familiarity_rows)
    center: torch.Tensor | None = None  # (D,) subtracted, then divided by spread (D,), before the distance
    spread: torch.Tensor | None = None

    def __post_init__(self):
        if self.reads not in READS:
            raise ValueError(f"Familiarity: reads must be one of {READS}, got {self.reads!r}")
        if (self.center is None) != (self.spread is None) or (
                self.center is not None and not self.center.shape == self.spread.shape == self.bank.shape[1:]):
            raise ValueError(f"Familiarity: center and spread must both be (D,) = {tuple(self.bank.shape[1:])} or both None")
        if self.bank.ndim != 2 or len(self.bank) <= self.k or self.k < 1:
            raise ValueError(f"Familiarity: bank must be (N, D) with N > k >= 1, got {tuple(self.bank.shape)} and k={self.k}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"Familiarity: scale must be a finite number > 0, got {self.scale}")

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B,) mean distance to the k nearest bank rows."""
        d = torch.cdist(features.float(), self.bank.to(features.device))  # (B, N)
        return d.topk(self.k, dim=1, largest=False).values.mean(1)

    def standardise(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.float()
        if self.center is None:
            return rows
        return (rows - self.center.to(rows.device)) / self.spread.to(rows.device)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) rows (`familiarity_rows`) -> (B,) in [0, 1): d / (d + scale); non-finite rows score 1."""
        x = self.standardise(features)
        d = self.distance(torch.nan_to_num(x, nan=1e6, posinf=1e6, neginf=-1e6))
        return torch.where(torch.isfinite(x).all(1), d / (d + self.scale), torch.ones_like(d))

    def score_window(self, features: torch.Tensor | None, readouts: torch.Tensor | None) -> torch.Tensor:
        """A window batch's fused features `(B, D)` and scalars `(B, T, F)` -> (B,): the score of what it reads."""
        return self.score(familiarity_rows(self.reads, features, readouts))


def fit_familiarity(features: torch.Tensor, k: int = 10, max_bank: int = 4096, seed: int = 0, reads: str = "features",
                    standardise: bool | None = None, floor: float = 0.1) -> Familiarity:
    """A bank of at most `max_bank` rows of `features` (`familiarity_rows(reads, ...)`; seeded subsample) and its
    leave-one-out median k-NN distance as the scale. With `standardise` (default: unless `reads` is "features")
    each column is first centred on its median and divided by half its 16-84% range, at least `floor`."""
    features = features.float()
    keep = torch.isfinite(features).all(1)
    features = features[keep]
    if len(features) > max_bank:
        g = torch.Generator().manual_seed(seed)
        features = features[torch.randperm(len(features), generator=g)[:max_bank]]
    if len(features) <= k + 1:
        raise ValueError(f"fit_familiarity: {len(features)} finite feature rows; need more than k + 1 = {k + 1}")
    center = spread = None
    if standardise is None:
        standardise = reads != "features"
    if standardise:
        q = torch.quantile(features, torch.tensor([0.16, 0.5, 0.84]), dim=0)  # (3, D)
        center, spread = q[1], ((q[2] - q[0]) / 2).clamp_min(floor)
        features = (features - center) / spread
    d = torch.cdist(features, features)
    d.fill_diagonal_(math.inf)  # a row is not its own neighbour
    scale = float(d.topk(k, dim=1, largest=False).values.mean(1).median())
    return Familiarity(features.contiguous(), k, max(scale, 1e-12), reads, center, spread)


def save_familiarity(f: Familiarity, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(directory) / FAMILIARITY_FILE
    tmp = path.with_name(f".{FAMILIARITY_FILE}.tmp-{os.getpid()}")
    tensors = {"bank": f.bank.contiguous()}
    if f.center is not None:
        tensors.update(center=f.center.contiguous(), spread=f.spread.contiguous())
    # one metadata entry: safetensors writes its metadata map in hash order, so three entries came out in a
    # different order on every save and two fits of one bank differed in bytes
    meta = json.dumps({"k": f.k, "scale": f.scale, "reads": f.reads}, sort_keys=True)
    save_file(tensors, str(tmp), metadata={"familiarity": meta})
    os.replace(tmp, path)
    return path


def load_familiarity(directory: str | Path) -> Familiarity | None:
    """The directory's familiarity bank, or None when it has none; a damaged file is an error naming it."""
    from safetensors import safe_open

    path = Path(directory) / FAMILIARITY_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            meta = json.loads(meta["familiarity"]) if "familiarity" in meta else meta  # banks saved before: three entries
            stats = [f.get_tensor(n) if n in f.keys() else None for n in ("center", "spread")]
            return Familiarity(f.get_tensor("bank"), int(meta["k"]), float(meta["scale"]), meta.get("reads", "features"), *stats)
    except Exception as err:  # noqa: BLE001 - header, missing keys, shapes
        raise ValueError(f"{path}: not a familiarity bank ({type(err).__name__}: {err})") from None
