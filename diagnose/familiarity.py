"""Familiarity (issue 20): how far a window is from every window TEViD was trained on.

Dirichlet vacuity says how little evidence the head collected, which a confident head on an unseen model
does not show. The Unknown score here is a distance on TEViD's fused window features
(`TEViD.forward_features`): the mean Euclidean distance to the k nearest rows of a bank of training-window
features, mapped to [0, 1) as d / (d + scale), where `scale` is the median of the same distance between
bank rows (each row left out of its own neighbours). A window as far from the bank as a typical training
window is from the others scores 0.5.

    bank  (N, D)  training windows' features, at most `max_bank` rows (a seeded subsample)
    x     (B, D)  -> cdist -> k smallest (B, k) -> mean d (B,) -> d / (d + scale) (B,)

`load_tevid` attaches `familiarity.safetensors` from the model's directory when it is there; `predict`
then reports this score as `vacuity` (what the decision rule's Unknown gate, tau and the Unknown AUROC read)
and the head's own vacuity as `evidential_vacuity`. The file holds the bank and, as metadata, k and scale
(safetensors: no pickle).

    python -m diagnose.recalibrate --checkpoint O/final --corpus D --out O/final --familiarity   # bank from train, then tau
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

FAMILIARITY_FILE = "familiarity.safetensors"


@dataclass
class Familiarity:
    bank: torch.Tensor  # (N, D) float32
    k: int
    scale: float

    def __post_init__(self):
        if self.bank.ndim != 2 or len(self.bank) <= self.k or self.k < 1:
            raise ValueError(f"Familiarity: bank must be (N, D) with N > k >= 1, got {tuple(self.bank.shape)} and k={self.k}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"Familiarity: scale must be a finite number > 0, got {self.scale}")

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B,) mean distance to the k nearest bank rows."""
        d = torch.cdist(features.float(), self.bank.to(features.device))  # (B, N)
        return d.topk(self.k, dim=1, largest=False).values.mean(1)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B,) in [0, 1): d / (d + scale); non-finite features score 1."""
        d = self.distance(torch.nan_to_num(features.float(), nan=1e6, posinf=1e6, neginf=-1e6))
        return torch.where(torch.isfinite(features).all(1), d / (d + self.scale), torch.ones_like(d))


def fit_familiarity(features: torch.Tensor, k: int = 10, max_bank: int = 4096, seed: int = 0) -> Familiarity:
    """A bank of at most `max_bank` rows of `features` (seeded subsample) and its leave-one-out median
    k-NN distance as the scale."""
    features = features.float()
    keep = torch.isfinite(features).all(1)
    features = features[keep]
    if len(features) > max_bank:
        g = torch.Generator().manual_seed(seed)
        features = features[torch.randperm(len(features), generator=g)[:max_bank]]
    if len(features) <= k + 1:
        raise ValueError(f"fit_familiarity: {len(features)} finite feature rows; need more than k + 1 = {k + 1}")
    d = torch.cdist(features, features)
    d.fill_diagonal_(math.inf)  # a row is not its own neighbour
    scale = float(d.topk(k, dim=1, largest=False).values.mean(1).median())
    return Familiarity(features.contiguous(), k, max(scale, 1e-12))


def save_familiarity(f: Familiarity, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(directory) / FAMILIARITY_FILE
    tmp = path.with_name(f".{FAMILIARITY_FILE}.tmp-{os.getpid()}")
    save_file({"bank": f.bank.contiguous()}, str(tmp), metadata={"k": str(f.k), "scale": repr(f.scale)})
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
            return Familiarity(f.get_tensor("bank"), int(meta["k"]), float(meta["scale"]))
    except Exception as err:  # noqa: BLE001 - header, missing keys, shapes
        raise ValueError(f"{path}: not a familiarity bank ({type(err).__name__}: {err})") from None
