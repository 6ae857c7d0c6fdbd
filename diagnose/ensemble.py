"""The fold models of cross-fitting read as one TEViD (issue 20).

Cross-fitted calibration sets thresholds and tau on out-of-fold predictions: every train + val run scored
by a model that never saw its family. Calibrating those thresholds and then deploying a different model,
the one trained on every fold, did not transfer: that model scores every window lower than the fold models
score their held-out fold, and the FAR-5% threshold (0.975 out of fold) left it almost deaf on the test split
(docs/benchmark/inputs.md). The ensemble deploys the predictor that was calibrated: the K fold models, each
scoring the job as it scored its own held-out families. Measured on the cpu corpus it was as deaf (detection
0.056): the pooled threshold is set by the folds whose held-out families score near 1, so the ensemble fixes
the model mismatch but not the threshold's (per-fold thresholds are the next step).

    members   K TEViD models of one config (the fold models)
    predict   probs (B, K_cls), vacuity (B,), anomaly (B,): the mean over members
    features  (B, K * D): the members' fused features side by side (a familiarity bank reads these)

A checkpoint of an ensemble is one directory as for a single TEViD: `model.safetensors` holds the members'
weights as `members.<i>.<name>`, and `config.json` the shared config plus `ensemble: {members: K, ...}`
(`load_tevid` builds the ensemble when it finds that section).

    python -m diagnose.crossfit --folds O/fold0 O/fold1 O/fold2 O/fold3 --ensemble --out O/ensemble
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TEViDEnsemble(nn.Module):
    """K TEViD models of one config behind TEViD's `predict` / `forward_features`; no training. Takes the
    members built (`diagnose.tevid` imports this module, not the other way round)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("TEViDEnsemble needs at least one member")
        configs = {repr(m.cfg) for m in members}
        if len(configs) != 1:
            raise ValueError(f"TEViDEnsemble members must share one TEViDConfig, got {len(configs)} different ones")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg  # a diagnose.tevid.TEViDConfig
        self.familiarity = None  # over the concatenated features, as for a single TEViD

    @property
    def encoder(self):
        return self.members[0].encoder

    def forward_features(self, frames: torch.Tensor | None, readouts: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([m.forward_features(frames, readouts) for m in self.members], dim=-1)  # (B, K * D)

    @torch.no_grad()
    def predict(self, frames: torch.Tensor | None = None, readouts: torch.Tensor | None = None, temperature: float = 1.0) -> dict:
        """TEViD.predict's keys, each the mean over the members (the head's vacuity as `vacuity`, or the
        familiarity bank's distance on the concatenated features when one is attached)."""
        outs = [m.predict(frames, readouts, temperature=temperature) for m in self.members]
        out = {key: torch.stack([o[key] for o in outs]).mean(dim=0) for key in outs[0]}
        if self.familiarity is not None:
            features = self.forward_features(frames, readouts) if self.familiarity.reads != "inputs" else None
            out["evidential_vacuity"], out["vacuity"] = out["vacuity"], self.familiarity.score_window(features, readouts)
        return out


def ensemble_config(config: dict, k: int, sources: list[str | Path]) -> dict:
    """A member's saved config with the ensemble section `load_tevid` reads."""
    return {**config, "ensemble": {"members": k, "sources": [str(s) for s in sources]}}


def ensemble_members(config: dict, where: str) -> int | None:
    """The number of members a saved config declares (None: a single TEViD); a malformed section is an error."""
    section = config.get("ensemble")
    if section is None:
        return None
    k = section.get("members") if isinstance(section, dict) else None
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{where}: ensemble.members must be an integer >= 1, got {section!r}")
    return k
