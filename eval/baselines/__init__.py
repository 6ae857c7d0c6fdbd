"""Scalar and readout baselines of the evaluation, each a streaming `eval.replay.Diagnoser` that sees
only the past (docs/architecture.md §9; paper Sec. 5.1 "Baselines", Table 3). Rules and choices:
docs/evaluation_baselines.md.

| name       | module    | kind    | score                                                        |
|------------|-----------|---------|--------------------------------------------------------------|
| cusum      | cusum     | scalar  | CUSUM of standardised loss residuals (residuals)             |
| bocpd      | bocpd     | scalar  | P(change within `recent` steps), Adams & MacKay 2007         |
| head_grad  | readout   | readout | deviation of log head-gradient norm from the run's start     |
| gwa        | readout   | readout | drop of GWA from the run's start                             |
| tcn_scalar | tcn       | scalar  | 1 - p(healthy) of a TCN over scalar telemetry (trained)      |
| hessian_tcn| hessian_tcn | scalar | the same TCN over the top-Hessian-eigenvalue series (trained) |

`make_baseline(name, cfg)` builds the untrained ones; the TCNs come from `train_tcn` / `TCNDetector.load`
and `train_hessian_tcn` / `load_hessian_tcn` (runs need the per-frame array `hessian_top`).
"""
from __future__ import annotations

from eval.baselines.bocpd import BOCPD, BocpdConfig, BocpdDetector
from eval.baselines.cusum import CusumConfig, CusumDetector, cusum
from eval.baselines.hessian_tcn import MissingHessianError, load_hessian_tcn, require_hessian, train_hessian_tcn
from eval.baselines.readout import ReadoutConfig, ReadoutDetector, deviation_scores, gwa_config, head_grad_config
from eval.baselines.residuals import LossResiduals, ResidualConfig
from eval.baselines.tcn import ScalarTCN, TCNConfig, TCNDetector, telemetry_features, train_tcn

CONFIGS = {"cusum": CusumConfig, "bocpd": BocpdConfig, "head_grad": head_grad_config, "gwa": gwa_config}


def make_baseline(name: str, cfg=None):
    """An untrained baseline by name with its config (default config if None)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown baseline {name!r}; untrained baselines: {sorted(CONFIGS)} "
                         f"(tcn_scalar: train_tcn; hessian_tcn: train_hessian_tcn)")
    cfg = cfg if cfg is not None else CONFIGS[name]()
    if name == "cusum":
        return CusumDetector(cfg)
    if name == "bocpd":
        return BocpdDetector(cfg)
    return ReadoutDetector(cfg, name)


__all__ = [
    "BOCPD", "BocpdConfig", "BocpdDetector", "CusumConfig", "CusumDetector", "cusum", "ReadoutConfig", "ReadoutDetector",
    "deviation_scores", "gwa_config", "head_grad_config", "LossResiduals", "ResidualConfig", "ScalarTCN", "TCNConfig",
    "TCNDetector", "telemetry_features", "train_tcn", "make_baseline", "CONFIGS", "MissingHessianError", "load_hessian_tcn",
    "require_hessian", "train_hessian_tcn",
]
