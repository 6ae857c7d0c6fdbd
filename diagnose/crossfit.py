"""Cross-fitted calibration (issue 20): thresholds and tau from out-of-fold predictions over train + val.

One validation split that differs from train only by a few held-out factors cannot foresee the shift of a
user's job, and holds few Healthy runs. The corpus deals its train + val runs into leave-one-context-out
folds (the manifest's `fold`: whole families per fold). Fine-tune once per fold k with
`data.holdout_fold=k` (train on the other folds, predict fold k's windows: `val_predictions.jsonl`), once
on everything (`data.train_splits=[train, val]`), then calibrate the full model on the union of the
out-of-fold predictions: every train + val run is predicted by a model that never saw its family.

    for k in 0 1 2 3; do python -m diagnose.finetune --config C --corpus D --out O/fold$k data.holdout_fold=$k \
        'data.train_splits=[train, val]'; done
    python -m diagnose.finetune --config C --corpus D --out O/all 'data.train_splits=[train, val]'
    python -m diagnose.crossfit --folds O/fold0 O/fold1 O/fold2 O/fold3 --checkpoint O/all/final --out O/all/final

or deploy the predictor that was calibrated, the fold models as one (`diagnose.ensemble`; no full model):

    python -m diagnose.crossfit --folds O/fold0 O/fold1 O/fold2 O/fold3 --ensemble --out O/ensemble

The fold models must share the full model's model config (same inputs, representation, heads). The
calibration written is `diagnose.calibrate.calibrate` on the merged streams; its report adds `crossfit`
(folds, runs, Healthy runs). Reads only the predictions files, configs and (--ensemble) the fold models'
`final` weights, no corpus.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from capture.config import load_config
from capture.schema import CLASSES
from diagnose.calibrate import PREDICTIONS_FILE, CalibrationConfig, calibrate, read_predictions, save_calibration, streams_from_records
from diagnose.tevid import save_ensemble


def _config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --folds takes fine-tuning output directories")
    return json.loads(path.read_text())


def crossfit_records(folds: list[Path], checkpoint: Path) -> tuple[list[dict], list[int]]:
    """The merged out-of-fold prediction records of `folds`, checked: each was trained with a distinct
    `data.holdout_fold`, with the checkpoint's model config, and no run is predicted twice."""
    model = _config(checkpoint).get("model")
    records, seen, fold_ids = [], {}, []
    for d in folds:
        cfg = _config(d)
        k = (cfg.get("data") or {}).get("holdout_fold")
        if k is None:
            raise ValueError(f"{d}: not a cross-fitting run (its config has no data.holdout_fold)")
        if k in fold_ids:
            raise ValueError(f"{d}: fold {k} is given twice")
        if cfg.get("model") != model:
            raise ValueError(f"{d}: its model config differs from {checkpoint}'s; the folds must be the same model")
        fold_ids.append(k)
        fold_records = read_predictions(d / PREDICTIONS_FILE)
        for run_id in {r["run_id"] for r in fold_records}:
            if run_id in seen:
                raise ValueError(f"run {run_id} is predicted by both {seen[run_id]} and {d}: the folds overlap")
            seen[run_id] = d
        records += fold_records
    return records, fold_ids


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folds", nargs="+", required=True, help="fine-tuning output directories, one per held-out fold")
    p.add_argument("--checkpoint", default=None, help="the model trained on every fold (out/final)")
    p.add_argument("--ensemble", action="store_true", help="write the fold models as one model to --out, calibrated")
    p.add_argument("--out", default=None, help="where calibration.json goes (default: --checkpoint)")
    p.add_argument("--config", default=None, help="yaml with CalibrationConfig fields")
    p.add_argument("overrides", nargs="*", help="CalibrationConfig overrides, key=value")
    args = p.parse_args(argv)
    if args.ensemble == (args.checkpoint is not None) or (args.ensemble and not args.out):
        p.error("give --checkpoint (the full model), or --ensemble with --out (the fold models as one model)")
    folds = [Path(f) for f in args.folds]
    checkpoint = folds[0] if args.ensemble else Path(args.checkpoint)  # whose model config the folds must share
    cfg = load_config(CalibrationConfig, args.config, args.overrides)
    records, fold_ids = crossfit_records(folds, checkpoint)
    if args.ensemble:
        checkpoint = save_ensemble([f / "final" for f in folds], Path(args.out))
    num_classes = int((_config(checkpoint).get("model") or {}).get("num_classes", len(CLASSES)))
    streams = streams_from_records(records)
    cal = calibrate(streams, cfg, CLASSES[:num_classes])
    cal.report["crossfit"] = {"folds": sorted(fold_ids), "runs": len(streams),
                              "healthy_runs": sum(s.known and s.label == "healthy" for s in streams)}
    path = save_calibration(cal, args.out or checkpoint)
    print(json.dumps({"temperature": cal.temperature, "tau": cal.tau, "thresholds": cal.thresholds,
                      "score_threshold": cal.score_threshold, **cal.report}, indent=1))
    print(f"wrote {path}" + (f" and the {len(folds)}-model ensemble beside it" if args.ensemble else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
