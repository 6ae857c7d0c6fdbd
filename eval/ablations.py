"""TEViD ablations as one command (paper App. C.2 and C.4: Tables 5 and 12, Fig. 3b; docs/architecture.md §7-§9).

    python -m eval.ablations --corpus outputs/corpus/cpu --out outputs/ablations/cpu \
        --config configs/finetune/cpu.yaml --pretrained outputs/pretrain/cpu/final \
        [--variants full,acts_only,...] [--n-resamples 2000] [key=value ...]

Each variant is the shared fine-tuning config (`--config` + the `key=value` overrides: the same seed,
epochs, lr, batch, ... for all) plus the few overrides that define it (`VARIANTS`). For each variant:
`diagnose.finetune.finetune` on the train split (validation for the calibration, resuming from
`variants/<name>/last` when there), then the report's protocol on the test split
(`eval.report.evaluate_method`: streaming replay, the calibrated rule, `eval.metrics.summarize` with
BCa intervals over runs).

| variant | differs from `full` by | paper |
|---|---|---|
| full | (reference: 6 channels, readouts fused, Dynamics-MAE init, W = 10, 100% of labels) | Table 3 row |
| acts_only / grads_only | `model.channels` = the 3 activation / the 3 gradient channels (capture.frames.CHANNELS) | Table 12 |
| video_only | `model.inputs=video`: the readouts are not fused | (fusion ablation) |
| scratch | encoder from scratch instead of the `--pretrained` Dynamics-MAE checkpoint | Fig. 3a |
| window5 / window20 | `data.window` 5 / 20 (window 20 also `num_frames=20`: the MAE time embedding is resampled) | Table 5 |
| labels25 | `data.label_fraction=0.25`: a seeded per-label 25% of the training runs | Fig. 3b |
| readouts_only, scratch_labels25 | (on request) readouts alone; scratch with 25% of labels | |

Without `--pretrained` every variant starts from scratch and the `scratch*` variants are left out.

Outputs in --out: `ablation_config.json` (this AblationConfig, with the shared FinetuneConfig),
`variants/<name>/` (the fine-tuning outputs: config.json, epochs.csv, final/, ...; `result.json`: the
variant's overrides, init, window, GFLOPs per clip and test metrics), and `ablations.json` + `ablations.md`
(Table 12 and Table 5 shaped) gathering every finished variant under --out. A rerun skips variants whose
`result.json` is there (an interrupted one resumes from its `last/`); a variant directory made with other
settings (`request.json`: shared config, overrides, init, bootstrap) is an error rather than mixed. Two
processes may share one --out with disjoint `--variants` lists (each rewrites the summary from all
finished variants).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from capture.config import load_config, save_config, to_dict
from capture.frames import CHANNELS
from diagnose.finetune import FinetuneConfig, finetune
from eval import tables as TAB
from eval.replay import SCORE_FROM, TEViDDiagnoser, load_runs
from eval.report import ReportConfig, jsonable, evaluate_method


@dataclass(frozen=True)
class Variant:
    """A named TEViD variant: FinetuneConfig `key=value` overrides over the shared config, and whether its
    encoder starts from the Dynamics-MAE checkpoint (`--pretrained`)."""

    name: str
    label: str  # what differs from the reference, for the table
    group: str  # reference | inputs | fusion | init | window | labels
    overrides: tuple[str, ...] = ()
    pretrained: bool = True


_ACTS, _GRADS = ", ".join(CHANNELS[:3]), ", ".join(CHANNELS[3:])
VARIANTS = {v.name: v for v in (
    Variant("full", "A+G, readouts fused, Dynamics-MAE, W=10, 100% labels", "reference"),
    Variant("acts_only", "activations only (A)", "inputs", (f"model.channels=[{_ACTS}]",)),
    Variant("grads_only", "gradients only (G)", "inputs", (f"model.channels=[{_GRADS}]",)),
    Variant("video_only", "readouts not fused (video only)", "fusion", ("model.inputs=video",)),
    Variant("readouts_only", "readouts only (no video)", "fusion", ("model.inputs=readouts",)),
    Variant("scratch", "no Dynamics-MAE (from scratch)", "init", pretrained=False),
    Variant("window5", "window W=5", "window", ("data.window=5",)),
    Variant("window20", "window W=20", "window", ("data.window=20", "model.encoder_overrides.num_frames=20")),
    Variant("labels25", "25% of labels", "labels", ("data.label_fraction=0.25",)),
    Variant("scratch_labels25", "25% of labels, from scratch", "labels", ("data.label_fraction=0.25",), pretrained=False),
)}
DEFAULT_VARIANTS = ("full", "acts_only", "grads_only", "video_only", "scratch", "window5", "window20", "labels25")


@dataclass
class AblationConfig:
    variants: list = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    pretrained: str | None = None  # Dynamics-MAE checkpoint dir (pretrain/train.py's out/final)
    config: str | None = None  # the fine-tuning yaml shared by every variant
    overrides: list = field(default_factory=list)  # FinetuneConfig key=value, shared by every variant
    n_resamples: int = 2000  # BCa bootstrap over test runs
    seed: int = 0  # of the bootstrap
    test_split: str = "test"
    score_from: int = SCORE_FROM  # first scored frame, the same for every variant (and the report)
    threads: int | None = None  # torch threads of the evaluation; fine-tuning uses FinetuneConfig.threads

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"AblationConfig.variants: unknown {unknown or 'empty list'}; choose from {list(VARIANTS)}")
        if self.pretrained is None:
            needs = [v for v in self.variants if not VARIANTS[v].pretrained]
            if needs:
                raise ValueError(f"variants {needs} differ from 'full' by the Dynamics-MAE init: give --pretrained CKPT")


def variant_config(cfg: AblationConfig, variant: Variant) -> FinetuneConfig:
    """The shared fine-tuning config with the variant's overrides applied last."""
    return load_config(FinetuneConfig, cfg.config, [*cfg.overrides, *variant.overrides])


def gflops_per_clip(final: Path, window: int) -> float:
    """Forward FLOPs of one window through the fine-tuned model (torch FlopCounterMode via pretrain.flops;
    the readout GRU has no FLOP formula there and is not counted: the encoder dominates)."""
    from diagnose.tevid import load_tevid
    from pretrain.clips import CLIP_READOUTS
    from pretrain.flops import count_flops

    model, _ = load_tevid(final)
    s = model.encoder.cfg.img_size if model.encoder is not None else 1
    frames = torch.zeros(1, window, len(CHANNELS), s, s)
    with torch.no_grad():
        return count_flops(model, frames, torch.zeros(1, window, len(CLIP_READOUTS))) / 1e9


def steps_per_frame(runs) -> float:
    """Capture cadence of the test runs: the median gap between frame steps."""
    gaps = np.concatenate([np.diff(r.frame_step) for r in runs if len(r) > 1] or [np.zeros(0)])
    return float(np.median(gaps)) if len(gaps) else float("nan")


def run_variant(name: str, cfg: AblationConfig, corpus: Path, out: Path, runs: dict, progress: bool = True) -> dict:
    """Fine-tune (or resume) and evaluate one variant; returns and writes variants/<name>/result.json."""
    variant = VARIANTS[name]
    ft = variant_config(cfg, variant)
    vdir = out / "variants" / name
    init = "none (no encoder)" if not ft.model.uses_video else "dynamics-mae" if cfg.pretrained and variant.pretrained else "scratch"
    request = {"name": name, "overrides": [*cfg.overrides, *variant.overrides], "config": cfg.config, "finetune": to_dict(ft),
               "init": init, "pretrained": cfg.pretrained if init == "dynamics-mae" else None,
               "n_resamples": cfg.n_resamples, "seed": cfg.seed, "test_split": cfg.test_split, "score_from": cfg.score_from}
    request = jsonable(request)
    done, asked = vdir / "result.json", vdir / "request.json"
    if asked.is_file() and json.loads(asked.read_text()) != request:
        raise ValueError(f"{vdir} holds variant {name!r} fine-tuned with other settings ({asked}); resuming it would mix "
                         f"them: use another --out or remove {vdir}")
    if done.is_file():
        print(f"{name}: reusing {done}", file=sys.stderr)
        return json.loads(done.read_text())
    vdir.mkdir(parents=True, exist_ok=True)
    _atomic_write(asked, json.dumps(request, indent=1) + "\n")
    t0 = time.time()
    final = finetune(ft, corpus, vdir, request["pretrained"])
    train_s = time.time() - t0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    diagnoser = TEViDDiagnoser.from_checkpoint(final, name=name)
    rcfg = ReportConfig(methods=[], tevid_checkpoints={name: str(final)}, test_split=cfg.test_split, n_resamples=cfg.n_resamples,
                        seed=cfg.seed, score_from=cfg.score_from, horizon_epochs=ft.data.horizon_epochs, figures=False)
    _, summary, _ = evaluate_method(name, diagnoser, runs, rcfg, progress)
    result = {"name": name, "label": variant.label, "group": variant.group, "init": init,
              "overrides": list(variant.overrides), "window": ft.data.window, "channels": list(ft.model.channels),
              "inputs": ft.model.inputs, "label_fraction": ft.data.label_fraction, "checkpoint": str(final),
              "gflops_per_clip": gflops_per_clip(final, ft.data.window), "steps_per_frame": steps_per_frame(runs["test"]),
              "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - t0 - train_s, 1),
              "metrics": summary, "request": request}
    result = jsonable(result)
    _atomic_write(done, json.dumps(result, indent=1, allow_nan=False) + "\n")
    return result


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def collect(out: Path, corpus: Path, cfg: AblationConfig) -> dict:
    """Every finished variant under out/variants, in VARIANTS order: ablations.json's content."""
    found = {}
    for name in VARIANTS:
        f = out / "variants" / name / "result.json"
        if f.is_file():
            found[name] = {k: v for k, v in json.loads(f.read_text()).items() if k != "request"}
    return {"corpus": str(corpus), "pretrained": cfg.pretrained, "config": cfg.config, "overrides": list(cfg.overrides),
            "test_split": cfg.test_split, "n_resamples": cfg.n_resamples, "variants": found}


def ablations_md(ablations: dict) -> str:
    shared = " ".join(ablations["overrides"]) or "(none)"
    return "\n".join([
        "# TEViD ablations\n",
        f"corpus `{ablations['corpus']}`, test split `{ablations['test_split']}`; shared fine-tuning config "
        f"`{ablations['config']}` with overrides {shared}; Dynamics-MAE `{ablations['pretrained']}`; "
        f"{ablations['n_resamples']} bootstrap resamples over runs, 95% BCa.\n",
        "## Table 12 (shape): ablations\n", TAB.table12(ablations), "",
        "## Table 5 (shape): window length\n", TAB.table5(ablations), ""]) + "\n"


def run_ablations(corpus: str | Path, out: str | Path, cfg: AblationConfig, progress: bool = True) -> dict:
    """Fine-tune and evaluate every variant of `cfg`; writes and returns ablations.json's content."""
    corpus, out = Path(corpus), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, "ablation_config.json")
    # fail early on a bad override, before hours of fine-tuning
    configs = {n: variant_config(cfg, VARIANTS[n]) for n in cfg.variants}
    horizons = {c.data.horizon_epochs for c in configs.values()}
    if len(horizons) > 1:
        raise ValueError(f"variants disagree on data.horizon_epochs {sorted(horizons)}: their metrics would not be comparable")
    runs = {"test": load_runs(corpus, cfg.test_split, progress=progress), "val": [], "train": [], "corpus": corpus}
    for name in tqdm(cfg.variants, desc="ablation variants", unit="variant", file=sys.stderr, disable=not progress):
        r = run_variant(name, cfg, corpus, out, runs, progress)
        m = r["metrics"]
        print(f"{name}: AUPRC {TAB.fmt(m['event_auprc'])}, macro F1 {TAB.fmt(m['macro_f1'])}, lead "
              f"{TAB.fmt(m['median_lead_epochs'], 2)}, FAR {TAB.fmt(m['far'], 2)} (train {r['train_seconds']} s)", file=sys.stderr)
        ablations = collect(out, corpus, cfg)  # after every variant: partial results survive an interruption
        _atomic_write(out / "ablations.json", json.dumps(ablations, indent=1, allow_nan=False) + "\n")
        _atomic_write(out / "ablations.md", ablations_md(ablations))
    return ablations


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = argparse.ArgumentParser(description="TEViD ablations: fine-tune each variant, score it on the test split "
                                            "(paper Tables 5 and 12)")
    p.add_argument("--corpus", required=True, help="corpus directory (train / val / test splits)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", default=None, help="fine-tuning yaml shared by every variant (e.g. configs/finetune/cpu.yaml)")
    p.add_argument("--pretrained", default=None, help="Dynamics-MAE checkpoint dir (without: every variant from scratch)")
    p.add_argument("--variants", default=None, help=f"comma-separated, from {list(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--n-resamples", type=int, default=AblationConfig.n_resamples)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the evaluation")
    p.add_argument("overrides", nargs="*", help="FinetuneConfig overrides shared by every variant, key=value (e.g. epochs=6)")
    args = p.parse_args(argv)
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    else:  # the defaults; without a Dynamics-MAE checkpoint the init ablation is not possible
        variants = [v for v in DEFAULT_VARIANTS if args.pretrained or VARIANTS[v].pretrained]
    cfg = AblationConfig(variants=variants, pretrained=args.pretrained, config=args.config, overrides=list(args.overrides),
                         n_resamples=args.n_resamples, threads=args.threads)
    ablations = run_ablations(args.corpus, args.out, cfg)
    print(ablations_md(ablations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
