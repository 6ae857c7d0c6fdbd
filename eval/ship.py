"""Ship a fine-tuned TEViD checkpoint as the default model (`diagnose/default_checkpoint/`), with a
manifest that says which corpus config, which commit and which commands made it.

    python -m eval.ship --checkpoint outputs/finetune/ship/ens0 --corpus outputs/corpus/cpu \
        [--report outputs/report/ship/metrics.json] [--out diagnose/default_checkpoint]

Copies the weights (`model.safetensors`), `config.json`, `state.json` and `calibration.json` (no pickle),
and the familiarity bank (`familiarity.safetensors`) when the checkpoint has one,
checks that the copy loads (`diagnose.tevid.load_tevid`), and writes `MANIFEST.json`: the corpus's
config (as saved by the factory) and its label counts, the git commit and whether the tree was dirty,
the pipeline commands (`make reproduce` runs the same ones), sha256 and size of every file, and the
test-split headline figures when a report's metrics.json is given.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from capture.corpus import corpus_runs
from diagnose.monitor import DEFAULT_CHECKPOINT
from diagnose.tevid import file_sha256

FILES = ("model.safetensors", "config.json", "state.json", "calibration.json")
OPTIONAL_FILES = ("familiarity.safetensors",)  # a bank for Unknown (diagnose.familiarity), when calibrated with one
# the pipeline behind the shipped model (Makefile target `reproduce` runs exactly these)
PIPELINE = (
    "accelerate launch (2 CPU processes) factory/generate.py --config configs/factory/cpu.yaml --out outputs/corpus/cpu",
    "python -m factory.stats --corpus outputs/corpus/cpu",
    "for s in 0 .. 8: python -m diagnose.finetune --config configs/finetune/cpu_dynamics.yaml --corpus outputs/corpus/cpu "
    "--out outputs/finetune/ship/s$s seed=$s threads=1",
    "for e in 0 1 2: python -m diagnose.recalibrate --corpus outputs/corpus/cpu --out outputs/finetune/ship/ens$e "
    "--familiarity --familiarity-reads inputs --known-first --members outputs/finetune/ship/s{3e,3e+1,3e+2}/final",
    "python -m eval.report --corpus outputs/corpus/cpu --checkpoint outputs/finetune/ship/ens0 --out outputs/report/ship "
    "'methods=[tevid,cusum,bocpd,head_grad,gwa,tcn_scalar]' (ensembles 1 and 2 as tevid_e1, tevid_e2; seed group tevid_3ensembles)",
    "python -m eval.fingerprint --corpus outputs/corpus/cpu --checkpoint outputs/finetune/ship/ens0 --out outputs/probes/ship",
    "python -m eval.ship --checkpoint outputs/finetune/ship/ens0 --corpus outputs/corpus/cpu --report outputs/report/ship/metrics.json",
)
HEADLINE = ("event_auprc", "event_auprc_ci", "event_base_rate", "median_lead_epochs", "far", "detection_rate", "macro_f1", "unknown_auroc")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def manifest(checkpoint: Path, corpus: Path, report: Path | None, out: Path) -> dict:
    cfg = json.loads((corpus / "config.json").read_text()) if (corpus / "config.json").exists() else None
    labels: dict[str, Counter] = {}
    if (corpus / "manifest.jsonl").exists():
        for rec in corpus_runs(corpus):  # the usable runs: the ones the model could train and calibrate on
            labels.setdefault(rec["split"], Counter())[rec["label"]] += 1
    headline = None
    if report is not None:
        metrics = json.loads(report.read_text())
        entry = metrics.get("tevid") or next((v for v in metrics.values() if isinstance(v, dict) and v.get("kind") == "tevid"), None)
        headline = {k: entry.get(k) for k in HEADLINE} if entry else None
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_checkpoint": str(checkpoint),
        "corpus": str(corpus),
        "corpus_config": cfg,
        "corpus_labels": {split: dict(sorted(c.items())) for split, c in sorted(labels.items())},
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "pipeline": list(PIPELINE),
        "report": str(report) if report else None,
        "test_split": headline,
        "files": {name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size}
                  for name in FILES + OPTIONAL_FILES if (out / name).exists()},
    }


def ship(checkpoint: str | Path, corpus: str | Path, out: str | Path = DEFAULT_CHECKPOINT, report: str | Path | None = None) -> Path:
    checkpoint, corpus, out = Path(checkpoint), Path(corpus), Path(out)
    missing = [name for name in FILES if not (checkpoint / name).exists()]
    if missing:
        raise FileNotFoundError(f"{checkpoint}: not a calibrated fine-tuning output, missing {missing}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in FILES + tuple(n for n in OPTIONAL_FILES if (checkpoint / n).exists()):
        shutil.copy2(checkpoint / name, tmp / name)
    from diagnose.tevid import load_tevid

    load_tevid(tmp)  # the copy must load before it replaces anything
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest(checkpoint, corpus, Path(report) if report else None, tmp), indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a calibrated fine-tuning output dir (out/final)")
    p.add_argument("--corpus", required=True, help="the corpus it was trained on")
    p.add_argument("--report", default=None, help="the report's metrics.json (test-split figures for the manifest)")
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINT))
    args = p.parse_args(argv)
    out = ship(args.checkpoint, args.corpus, args.out, args.report)
    print(f"shipped {args.checkpoint} -> {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
