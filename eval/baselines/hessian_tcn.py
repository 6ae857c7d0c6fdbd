"""A TCN on the top-Hessian-eigenvalue ("sharpness") series of a run (paper Sec. 5.1 "Baselines", Table 3;
docs/architecture.md §9). The series comes from the run store's public per-frame array `hessian_top`, computed during
the run by the factory at every `training.hessian_every`-th frame on the step's training batch (Lanczos on
Hessian-vector products, capture/hessian.py); NaN at the frames in between. A corpus generated without
it (hessian_every = 0, the default) cannot be used: the method then raises `MissingHessianError`
naming the corpus and the config key.

Per-frame features, from frames <= t only (the last value is carried forward between measurements):

    log_top     signed log1p of the latest eigenvalue (sign(l) log(1 + |l|): scales range over 1-10^4
                across architectures and datasets; the largest algebraic eigenvalue can be negative)
    dlog_top    its change from the previous measurement (a sharpening / flattening rate)
    fresh       1 at a frame where a value was measured (the phase of the measurement cadence)
    missing     1 before the first finite value (non-finite values, e.g. of a diverged loss, are skipped)
    log_top_rel (cfg.relative) log_top minus the run's first log_top (runs differ in curvature scale)

then the TCN of `eval/baselines/tcn.py` unchanged (same `TCNConfig`, window of 10 frames, training on
the train split's window targets, standardisation with train statistics, the same optuna space in
eval/tune.py). As a Diagnoser: kind "scalar", probs over CLASSES, score = 1 - p(healthy), vacuity None.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.baselines.tcn import FeatureSet, TCNConfig, TCNDetector, train_tcn
from eval.replay import LoadedRun

NAME = "hessian_tcn"
HESSIAN_ARRAY = "hessian_top"
CONFIG_KEY = "training.hessian_every"
HOW = (f"generate the corpus with {CONFIG_KEY} > 0 (configs/factory/cpu_hessian.yaml, or the override "
       f"{CONFIG_KEY}=3 to python -m factory.generate)")
BASE_FEATURES = ("log_top", "dlog_top", "fresh", "missing")


class MissingHessianError(ValueError):
    pass


def feature_names(relative: bool = True) -> list[str]:
    return [*BASE_FEATURES, *(("log_top_rel",) if relative else ())]


def hessian_features(hessian_top: np.ndarray, relative: bool = True) -> np.ndarray:
    """(T, F) float32 features of every frame from the (T,) series (NaN = not measured); row t uses <= t."""
    h = np.asarray(hessian_top, dtype=np.float64)
    out = np.zeros((len(h), len(feature_names(relative))), dtype=np.float32)
    first = last = prev = None
    for t, v in enumerate(h):
        if np.isfinite(v):
            prev, last = last, float(np.sign(v) * np.log1p(abs(v)))
            first = last if first is None else first
            out[t, 2] = 1.0
        if last is None:
            out[t, 3] = 1.0
            continue
        out[t, 0] = last
        out[t, 1] = 0.0 if prev is None else last - prev
        if relative:
            out[t, 4] = last - first
    return out


def _series(src) -> np.ndarray:
    arrays = getattr(src, "frame_arrays", None) or {}
    if HESSIAN_ARRAY not in arrays:
        where = f"run {src.run_id} ({src.source})" if isinstance(src, LoadedRun) else "this run"
        raise MissingHessianError(f"{NAME}: {where} has no per-frame array {HESSIAN_ARRAY!r} "
                                  f"(it has {sorted(arrays) or 'none'}); {HOW}")
    return arrays[HESSIAN_ARRAY]


HESSIAN = FeatureSet("hessian", lambda src, relative: hessian_features(_series(src), relative), feature_names)


def require_hessian(runs: list[LoadedRun], what: str = "") -> None:
    """Raise MissingHessianError naming the corpus (or corpora) when any run lacks `hessian_top`."""
    missing = [r for r in runs if HESSIAN_ARRAY not in r.frame_arrays]
    if not missing:
        return
    corpora = sorted({str(Path(r.source).parent.parent) if r.source else "?" for r in missing})
    examples = ", ".join(r.run_id for r in missing[:3])
    raise MissingHessianError(
        f"{NAME}: {len(missing)} of {len(runs)} {what + ' ' if what else ''}runs of corpus {', '.join(corpora)} have no "
        f"per-frame array {HESSIAN_ARRAY!r} (e.g. {examples}); {HOW}")


def train_hessian_tcn(train_runs: list[LoadedRun], cfg: TCNConfig | None = None, val_runs: list[LoadedRun] | None = None,
                      progress: bool = True) -> tuple[TCNDetector, dict]:
    """The TCN of eval/baselines/tcn.py trained on the Hessian features of `train_runs`."""
    require_hessian(list(train_runs), "training")
    if val_runs:
        require_hessian(list(val_runs), "validation")
    return train_tcn(list(train_runs), cfg, val_runs, progress, features=HESSIAN, name=NAME)


def load_hessian_tcn(path: str | Path) -> TCNDetector:
    return TCNDetector.load(path, NAME, HESSIAN)
