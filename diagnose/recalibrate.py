"""(Re)calibrate a fine-tuned TEViD on a corpus's validation split: predict every validation window,
fit temperature, vacuity threshold and alert thresholds (`diagnose.calibrate.calibrate`) and write
`calibration.json` (docs/tevid.md, "Calibration").

    python -m diagnose.recalibrate --checkpoint outputs/finetune/cpu/final --corpus outputs/corpus/cpu \
        --out outputs/finetune/cpu/final [--config FILE] [key=value ...]
    python -m diagnose.recalibrate --members O/s0/final O/s1/final O/s2/final --corpus D --out O/ens   # a seed ensemble

`diagnose.finetune` calibrates at the end of training already; this command redoes it, e.g. with other
`CalibrationConfig` settings, or (`--members`) for several fine-tuned models of one config read as one
(`diagnose.ensemble`: the mean of their outputs; e.g. three seeds), or (`--familiarity`) after fitting a familiarity bank on the train split's
windows, so that Unknown and tau come from the distance to the training windows (diagnose.familiarity). It reads the corpus (`pretrain.clips`), so it is a pipeline stage, kept
apart from `diagnose.calibrate`, which the live monitor loads (docs/architecture.md, "Import rule").
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
from tqdm import tqdm

from capture.config import cli_parser, from_dict, load_config
from capture.relative import model_fields
from capture.schema import CLASSES
from diagnose.calibrate import CalibrationConfig, calibrate, predict_records, save_calibration, streams_from_records, window_metrics
from diagnose.familiarity import READS, familiarity_rows, fit_familiarity, save_familiarity
from diagnose.tevid import load_tevid, save_ensemble
from pretrain.checkpoint import load_checkpoint
from pretrain.clips import ClipConfig, CorpusClips


@torch.no_grad()
def fit_bank(model, dataset, k: int = 10, batch_size: int = 256, reads: str = "features"):
    """A familiarity bank of every window of `dataset`: its fused features, its pooled inputs or both (`reads`)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    rows = []
    for b in tqdm(loader, desc=f"familiarity: training windows' {reads}", unit="batch", file=sys.stderr):
        features = None if reads == "inputs" else model.forward_features(b["frames"] if model.cfg.uses_video else None, b["readouts"])
        rows.append(familiarity_rows(reads, features, b["readouts"]))
    return fit_familiarity(torch.cat(rows), k, reads=reads)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = cli_parser("Calibrate a fine-tuned TEViD on a corpus's validation split", corpus=True, checkpoint=True)
    p.add_argument("--familiarity", action="store_true",
                   help="first fit a familiarity bank on the train split's windows (diagnose.familiarity): Unknown by distance")
    p.add_argument("--familiarity-k", type=int, default=10)
    p.add_argument("--familiarity-reads", choices=READS, default="features",
                   help="what the bank compares: the fused features, the window's run-relative inputs, or both")
    p.add_argument("--known-first", action="store_true",
                   help="score mode: an anomaly class above its threshold is named even when the vacuity is above tau "
                        "(a familiarity score says 'unlike training', not 'cannot name it')")
    p.add_argument("--no-gate", action="store_true",
                   help="with --familiarity: no familiarity gate (the score still drives Unknown and tau)")
    p.add_argument("--members", nargs="+", default=None, metavar="DIR",
                   help="fine-tuned models (out/final) to write to --out as one ensemble, then calibrate it (no --checkpoint)")
    args = p.parse_args(argv)
    if args.members:
        if args.checkpoint is not None or not args.out:
            p.error("--members writes a new model: give --out, and no --checkpoint")
        args.checkpoint = str(save_ensemble(args.members, args.out))
        print(f"wrote the {len(args.members)}-model ensemble to {args.checkpoint}")
    if args.checkpoint is None:
        p.error("--checkpoint DIR (a fine-tuning output, e.g. out/final) is required")
    cfg = load_config(CalibrationConfig, args.config, args.overrides)
    model, _ = load_tevid(args.checkpoint, require_calibration=False)
    saved = load_checkpoint(args.checkpoint).config.get("data", {})
    clip_cfg = from_dict(ClipConfig, {k: saved[k] for k in ("window", "stride", "horizon_epochs") if k in saved}, "data")
    clip_cfg.representation = model.cfg.representation
    clip_cfg = dataclasses.replace(clip_cfg, **model_fields(model.cfg))  # the run-relative transform it was trained with
    if args.familiarity:
        if args.familiarity_reads != "features" and model.cfg.representation != "relative":
            p.error("--familiarity-reads inputs/both needs a model that reads the run-relative inputs")
        bank = fit_bank(model, CorpusClips(args.corpus, "train", clip_cfg), args.familiarity_k, reads=args.familiarity_reads)
        print(f"wrote {save_familiarity(bank, args.checkpoint)}: bank {tuple(bank.bank.shape)} of {bank.reads}, k {bank.k}, "
              f"scale {bank.scale:.4g}")
        model.familiarity = bank
    # every window, as fine-tuning calibrates: the rule's 3 frames in a row are 3 consecutive frames in the live
    # stream and the replay; windows at the training stride would space them `stride` frames apart, and a
    # threshold fitted on those alarms more often on healthy runs than it promised
    val = CorpusClips(args.corpus, "val", dataclasses.replace(clip_cfg, stride=1))
    records = predict_records(model, val, batch_size=64)
    cal = calibrate(streams_from_records(records), cfg, CLASSES[: model.cfg.num_classes])
    if args.familiarity and not args.no_gate:  # vacuity is now the familiarity score: an unfamiliar job mutes TEViD's alerts
        cal.gate = cal.consecutive                                                # (diagnose.decision)
    cal.known_first = args.known_first
    path = save_calibration(cal, args.out)
    print(json.dumps({**window_metrics(records), "temperature": cal.temperature, "tau": cal.tau,
                      "thresholds": cal.thresholds, **cal.report}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
