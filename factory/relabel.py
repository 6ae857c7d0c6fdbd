"""Relabel a corpus from its stored signals, optionally after calibrating on its reference runs.

    python -m factory.relabel --corpus outputs/corpus/cpu [--calibrate] [key=value label overrides]

Every signal a rule reads is in the run store (public per-step loss and readouts, privileged
validation curves and Lyapunov windows), so labels can be recomputed without training again.

`--calibrate` (paper Appendix A, "Healthy"; Table 10) sets, from the corpus's own reference runs
(perturbation `healthy`: the default recipe, every split):
  - floors: 85% of the median final validation accuracy of the reference runs of each
    `arch/dataset` pair (and of each dataset, the fallback);
  - the Lyapunov margins, one per window position: the 95th percentile of the window means of the
    train split's healthy runs (`healthy`, `healthy_lr_low`) at that position (the finite-difference
    proxy stays above 0 and shrinks as the learning rate anneals), and the same per architecture
    over its healthy runs of every split (`lyapunov_arch_margin`: a small ViT's healthy copies
    separate several times faster than a ResNet's).
It writes them to `calibration.json` in the corpus, then relabels every run and rewrites the
manifest and summary.

`--calibration FILE` applies a calibration made before instead (e.g. the `cpu` corpus's, to label
`cpu_hessian`, whose runs are a subset of it, with the same floors and margins) and copies it into
the corpus.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import zarr
from tqdm import tqdm

from capture.config import load_config, save_config
from capture.store import RunStore, read_privileged
from factory.config import FactoryConfig, LabelConfig
from factory.generate import plan, store_path, summary, write_manifest
from factory.labeler import label_run
from factory.perturbations import make_perturbation
from factory.spec import RunSpec

HEALTHY_REFERENCE = "healthy"
HEALTHY_INJECTED = ("healthy", "healthy_lr_low")


def load_signals(path: Path) -> tuple[dict, dict]:
    """The labeler's input for one run, read back from its store, and the store's attributes."""
    store = RunStore(path)
    priv = read_privileged(path)
    names = store.readout_names
    sig = {
        "train_loss": store.train_loss().double().numpy(),
        "frame_step": store.frame_step().numpy(),
        "gwa": store.readouts()[:, names.index("gwa")].double().numpy(),
        "epoch_step": priv["epoch_step"],
        "val_loss": priv["val_loss"],
        "val_acc": priv["val_acc"],
        "val_correct": priv["val_correct"],
        "poison_correct": priv.get("poison_correct"),
        "counter_correct": priv.get("counter_correct"),
        "val_labels": priv.get("val_labels"),
        "lyapunov": list(zip(priv["lyapunov_start"].tolist(), priv["lyapunov_log_alpha"])) if "lyapunov_start" in priv else [],
        "lyapunov_reference": priv.get("lyapunov_reference"),
    }
    return sig, store.attrs


def calibrate(runs: list[tuple[Path, dict, dict]], fraction: float = 0.85, quantile: float = 0.95) -> dict:
    pair_acc, ds_acc, windows, arch_windows = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(lambda: defaultdict(list))
    for _, sig, attrs in runs:
        spec = attrs["spec"]
        if spec["perturbation"] == HEALTHY_REFERENCE and attrs.get("status") == "complete" and len(sig["val_acc"]):
            acc = float(sig["val_acc"][-1])
            if np.isfinite(acc):
                pair_acc[f"{spec['arch']}/{spec['dataset']}"].append(acc)
                ds_acc[spec["dataset"]].append(acc)
        if spec["perturbation"] in HEALTHY_INJECTED:
            for k, (_, a) in enumerate(sig["lyapunov"]):
                if np.isfinite(a).all():
                    arch_windows[spec["arch"]][k].append(float(np.mean(a)))
                    if spec["split"] == "train":
                        windows[k].append(float(np.mean(a)))
    floors = {k: round(fraction * float(np.median(v)), 4) for k, v in {**ds_acc, **pair_acc}.items()}
    # one margin per window position: the proxy shrinks with the annealed learning rate
    margins = [round(float(np.quantile(windows[k], quantile)), 4) for k in sorted(windows)]
    arch_margins = {arch: [round(float(np.quantile(w[k], quantile)), 4) for k in sorted(w)] for arch, w in sorted(arch_windows.items())}
    return {"floors": floors, "lyapunov_margin": margins or 0.0, "lyapunov_arch_margin": arch_margins, "reference_runs": sum(len(v) for v in pair_acc.values()),
            "healthy_windows": sum(len(v) for v in windows.values()), "fraction": fraction, "quantile": quantile}


def _read_calibration(path: Path) -> dict:
    try:
        cal = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--calibration {path}: cannot read a calibration.json ({e})") from None
    missing = [k for k in ("floors", "lyapunov_margin", "lyapunov_arch_margin") if k not in cal]
    if missing:
        raise SystemExit(f"--calibration {path}: not a factory.relabel calibration (missing {', '.join(missing)})")
    return cal


def relabel_run(path: Path, sig: dict, attrs: dict, lc: LabelConfig) -> dict:
    spec = RunSpec.from_dict(attrs["spec"])
    pert = make_perturbation(spec.perturbation, attrs["training"]["steps"])
    label = label_run(sig, spec, pert, SimpleNamespace(num_classes=attrs["num_classes"]), lc, len(sig["train_loss"]))
    root = zarr.open_group(str(path), mode="r+")
    root.attrs.update({k: label[k] for k in ("label", "onset_step", "trigger_step", "online_label")})
    root["privileged/labeling"].attrs["rules"] = json.loads(json.dumps(label["rules"], default=float))
    return label


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--calibrate", action="store_true")
    how.add_argument("--calibration", default=None, help="apply this calibration.json (of another corpus) instead of calibrating")
    p.add_argument("--config", default=None, help="take the label settings from this factory config (yaml) instead of "
                   "the corpus's saved config.json (which holds those of its generation)")
    p.add_argument("overrides", nargs="*", help="label config overrides, e.g. labels.spike_z=4")
    args = p.parse_args(argv)
    corpus = Path(args.corpus)
    cfg = load_config(FactoryConfig, corpus / "config.json" if (corpus / "config.json").exists() else None, args.overrides)
    if args.config:
        cfg.labels = load_config(FactoryConfig, args.config, args.overrides).labels
    if args.config or args.overrides:
        save_config(cfg, corpus)  # the corpus's config names the rules its labels now come from
    specs = plan(cfg)
    runs = []
    for spec in tqdm(specs, desc="reading runs", unit="run"):
        path = store_path(corpus, spec)
        try:
            sig, attrs = load_signals(path)
        except Exception:  # noqa: BLE001 - missing or failed runs are reported by the manifest
            continue
        runs.append((path, sig, attrs))
    if args.calibrate or args.calibration:
        cal = calibrate(runs) if args.calibrate else _read_calibration(Path(args.calibration))
        cfg.labels.floors.update(cal["floors"])
        cfg.labels.lyapunov_margin = cal["lyapunov_margin"]
        cfg.labels.lyapunov_arch_margin = cal["lyapunov_arch_margin"]
        (corpus / "calibration.json").write_text(json.dumps(cal, indent=1) + "\n")
        how = f"calibrated on {cal['reference_runs']} reference runs" if args.calibrate else f"calibration of {args.calibration}"
        print(f"{how}: Lyapunov margin {cal['lyapunov_margin']}, {len(cal['floors'])} floors -> {corpus / 'calibration.json'}")
    changed = 0
    for path, sig, attrs in tqdm(runs, desc="relabeling", unit="run"):
        changed += relabel_run(path, sig, attrs, cfg.labels)["label"] != attrs.get("label")
    records = write_manifest(specs, corpus)
    table = summary(records)
    (corpus / "summary.md").write_text(table + "\n")
    print(f"relabeled {len(runs)} runs ({changed} changed label)\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
