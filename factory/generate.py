"""The data factory: run every spec of a config, label it, write one run store per run + a manifest.

    accelerate launch factory/generate.py --config configs/factory/smoke.yaml --out outputs/corpus/smoke
    python -m factory.generate --config configs/factory/smoke.yaml --out outputs/corpus/smoke
    python -m factory.generate --config configs/factory/cpu.yaml --out outputs/corpus/cpu --plan   # specs only

Two real CPU processes (plain `--cpu` starts one):
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no factory/generate.py --config ... --out ...

Runs are split deterministically over processes (spec i goes to process i mod world size).
Resumable: a run whose store is complete and whose files match the digests recorded when it was
written (`capture.store.verify_store`) is skipped; a damaged one is redone, with a line naming the
store and the damage; a killed run leaves only a `.tmp-*` directory, removed when that run starts
again. The manifest is rebuilt from the complete stores, so it never lists a run twice.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from capture.config import cli_parser, load_config, save_config
from capture.store import RunStore, RunStoreError, verify_store
from factory.archs import TEXT_ARCHS
from factory.config import FactoryConfig
from factory.contexts import expand_drawn
from factory.datasets import TEXT_DATASETS
from factory.perturbations import NOVEL, make_perturbation
from factory.spec import CONTEXT_KEYS, RunSpec, expand

MANIFEST_KEYS = ("run_id", "split", "arch", "dataset", "optimizer", "perturbation", "seed", "label", "onset_step",
                 "trigger_step", "online_label", "injected", "status", "steps", "n_frames", "seconds", "store")
# drawn runs (factory.contexts) also record their family, fold and drawn context
DRAWN_KEYS = ("family", "fold") + CONTEXT_KEYS


def compatible(spec: RunSpec, steps: int) -> bool:
    """Grid runs: text architectures train on text datasets, image ones on images; a perturbation applies
    only to the modalities it names (no watermark on text). Drawn runs are drawn compatible."""
    if spec.context:
        return True
    modality = "text" if spec.dataset in TEXT_DATASETS else "image"
    if (spec.arch in TEXT_ARCHS) != (modality == "text"):
        return False
    return modality in make_perturbation(spec.perturbation, steps).modalities


def plan(cfg: FactoryConfig) -> list[RunSpec]:
    if cfg.subsample < 1:
        raise ValueError(f"subsample must be >= 1, got {cfg.subsample}")
    if any(split.runs for split in cfg.splits.values()):
        specs = expand_drawn(cfg.splits, NOVEL, cfg.contexts)
    else:
        specs = expand(cfg.splits, NOVEL)
    return [s for s in specs if compatible(s, cfg.training.steps)][:: cfg.subsample]


def plan_record(spec: RunSpec, cfg: FactoryConfig) -> dict:
    """One line of `--plan`: the manifest's fields a spec fixes before it runs (the outcome fields are
    null), its family and fold, the drawn context, and `injected` / `kind` of its perturbation."""
    pert = make_perturbation(spec.perturbation, spec.ctx.get("max_steps", cfg.training.steps))
    rec = {**{k: None for k in MANIFEST_KEYS}, "family": spec.arch, "fold": spec.fold, **spec.to_dict(),
           "injected": pert.injected, "kind": pert.kind}
    rec["store"] = str(Path("runs") / f"{spec.run_id}.zarr")
    return rec


def print_plan(specs: list[RunSpec], cfg: FactoryConfig) -> None:
    for spec in specs:
        print(json.dumps(plan_record(spec, cfg)))


def store_path(corpus: Path, spec: RunSpec) -> Path:
    return corpus / "runs" / f"{spec.run_id}.zarr"


def store_problem(path: Path) -> str | None:
    """None when `path` holds a complete run whose every array file matches its recorded digest; else
    what is wrong, naming the store (missing, unfinished, truncated, damaged, ...)."""
    try:
        verify_store(path)
        return None
    except RunStoreError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - an OS error on a damaged store must not stop the resume
        return f"run store {path}: cannot be checked ({type(err).__name__}: {err})"


def is_complete(path: Path) -> bool:
    return store_problem(path) is None


def run_spec(spec: RunSpec, cfg: FactoryConfig, corpus: Path) -> dict:
    from factory.train import run_one

    path = store_path(corpus, spec)
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a killed attempt at this run
    if path.exists():  # present but not complete (damaged): redo it
        shutil.rmtree(path)
    failed = corpus / "failed" / f"{spec.run_id}.json"
    try:
        record = run_one(spec, cfg, corpus)
        failed.unlink(missing_ok=True)
        return record
    except Exception as err:  # noqa: BLE001 - one broken run must not stop the factory
        failed.parent.mkdir(parents=True, exist_ok=True)
        record = {**spec.to_dict(), "status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        failed.write_text(json.dumps(record, indent=1))
        return record


def record_from_store(path: Path, corpus: Path) -> dict:
    store = RunStore(path)
    attrs = store.attrs
    rec = {**attrs["spec"], **{k: attrs.get(k) for k in ("label", "onset_step", "trigger_step", "online_label", "status")}}
    rec.update(injected=attrs.get("perturbation", {}).get("injected"), steps=len(store.train_loss()),
               n_frames=attrs.get("n_frames"), seconds=attrs.get("seconds"), store=str(path.relative_to(corpus)))
    return manifest_record(rec)


def manifest_record(rec: dict) -> dict:
    """The manifest's fields of a record: MANIFEST_KEYS, and DRAWN_KEYS for a drawn run."""
    keys = MANIFEST_KEYS + (DRAWN_KEYS if "family" in rec else ())
    return {k: rec.get(k) for k in keys}


def write_manifest(specs: list[RunSpec], corpus: Path) -> list[dict]:
    records = []
    for spec in specs:
        path = store_path(corpus, spec)
        failed = corpus / "failed" / f"{spec.run_id}.json"
        if is_complete(path):
            records.append(record_from_store(path, corpus))
        elif failed.exists():
            rec = json.loads(failed.read_text())
            records.append({**manifest_record(rec), "error": rec.get("error")})
    tmp = corpus / "manifest.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, corpus / "manifest.jsonl")
    return records


def summary(records: list[dict]) -> str:
    """Runs per split x label, and injected perturbation class x rule label."""
    labels = sorted({str(r.get("label")) for r in records})
    lines = ["| split | " + " | ".join(labels) + " | total |", "|---" * (len(labels) + 2) + "|"]
    for split in ("train", "val", "test"):
        c = Counter(str(r.get("label")) for r in records if r["split"] == split)
        lines.append(f"| {split} | " + " | ".join(str(c[l]) for l in labels) + f" | {sum(c.values())} |")
    injected = sorted({str(r.get("injected")) for r in records})
    lines += ["", "injected \\ label: | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for inj in injected:
        c = Counter(str(r.get("label")) for r in records if str(r.get("injected")) == inj)
        lines.append(f"| {inj} | " + " | ".join(str(c[l]) for l in labels) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="print one JSON line per run spec and exit (trains nothing)")
    args = parser.parse_args(argv)
    cfg = load_config(FactoryConfig, args.config, args.overrides)
    corpus = Path(args.out)
    specs = plan(cfg)
    if args.plan:
        print_plan(specs, cfg)
        return 0

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        corpus.mkdir(parents=True, exist_ok=True)
        save_config(cfg, corpus)
        print(f"factory {cfg.name}: {len(specs)} runs, world size {world}", flush=True)
    accelerator.wait_for_everyone()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    mine = [s for i, s in enumerate(specs) if i % world == rank]
    todo = []
    for spec in mine:
        path = store_path(corpus, spec)
        problem = store_problem(path)
        if problem is not None:
            todo.append(spec)
            if path.exists():  # finished once, damaged since: run_spec removes it and runs it again
                print(f"[rank {rank}/{world}] redoing {spec.run_id}: {problem}", flush=True)
    start, done, failed = time.time(), 0, 0
    bar = tqdm(todo, desc=f"[{rank}/{world}] runs", position=rank, unit="run", disable=not sys.stderr.isatty() and rank > 0)
    for spec in bar:
        rec = run_spec(spec, cfg, corpus)
        done += 1
        failed += rec.get("status") == "failed"
        bar.set_postfix(last=f"{spec.perturbation}->{rec.get('label')}", failed=failed)
    elapsed = time.time() - start
    print(f"[rank {rank}/{world}] {done} runs ({len(mine) - len(todo)} already complete, {failed} failed) in {elapsed:.0f} s"
          + (f": {3600 * done / elapsed:.0f} runs/hour" if done and elapsed > 0 else ""), flush=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        records = write_manifest(specs, corpus)
        table = summary(records)
        (corpus / "summary.md").write_text(table + "\n")
        print(f"manifest: {corpus / 'manifest.jsonl'} ({len(records)} runs)\n{table}", flush=True)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
