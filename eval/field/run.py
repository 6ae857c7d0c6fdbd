"""Run the field benchmark: every job x fault x seed, each in a worker process, then results.json and tables.md.

    python -m eval.field --out outputs/field                 # the full benchmark (docs/benchmark/field.md)
    python -m eval.field --out outputs/field_quick --quick   # 2 jobs x 3 faults x 1 seed x 120 steps

Each finished run is written to `<out>/runs/<job>__<fault>__<seed>.json` at once, and a rerun skips the
runs already there (a killed benchmark resumes, and a finished one rewrites its tables); `results.json`
(every run, with its alerts: name, source, step, probability, where, remedy; the wall time of this
invocation, the sum of the runs' own times and the load average at start and end) and `tables.md` are
written at the end.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
import multiprocessing as mp

FAULT_NAMES = ["healthy", "lr_raise", "task_switch", "memorise", "watermark", "label_noise", "optimizer_reset"]
JOB_NAMES = ["cnn_digits", "resmlp_tabular", "torchvision_digits", "gru_text", "lightning_mlp", "bert_text"]
# slowest first, so that two workers finish together
COST_ORDER = ["torchvision_digits", "bert_text", "gru_text", "cnn_digits", "lightning_mlp", "resmlp_tabular"]


@dataclass
class FieldConfig:
    jobs: list[str] = field(default_factory=lambda: list(JOB_NAMES))
    faults: list[str] = field(default_factory=lambda: list(FAULT_NAMES))
    seeds: int = 2  # seeds 0 .. seeds-1 per job x fault
    steps: int = 1500  # optimizer steps per run
    onset: float = 0.5  # fault onset, as a fraction of `steps`
    workers: int = 2  # worker processes (one torch thread each)
    watch: dict = field(default_factory=dict)  # options for diagnose.watch / the adapters; {} = the defaults

    def __post_init__(self):
        from eval.field.faults import FAULTS

        bad = sorted(set(self.jobs) - set(JOB_NAMES))
        if bad:
            raise ValueError(f"jobs: unknown job(s) {bad}; known: {JOB_NAMES}")
        bad = sorted(set(self.faults) - set(FAULTS))
        if bad:
            raise ValueError(f"faults: unknown fault(s) {bad}; known: {sorted(FAULTS)}")
        if self.seeds < 1 or self.steps < 2 or self.workers < 1:
            raise ValueError(f"seeds, workers must be >= 1 and steps >= 2, got {self.seeds}, {self.workers}, {self.steps}")
        if not isinstance(self.watch, dict):
            raise ValueError(f"watch must be a mapping of diagnose.watch options, got {self.watch!r}")
        if not 0.0 < self.onset < 1.0:
            raise ValueError(f"onset must be a fraction in (0, 1), got {self.onset}")

    @property
    def onset_step(self) -> int:
        return int(round(self.steps * self.onset))


QUICK = {"jobs": ["resmlp_tabular", "gru_text"], "faults": ["healthy", "lr_raise", "watermark"], "seeds": 1,
         "steps": 120, "workers": 1}


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _loss_summary(losses: list[float], onset: int, span: int = 50) -> dict:
    def mean(part):
        vals = [v for v in part if math.isfinite(v)]
        return sum(vals) / len(vals) if vals else None

    return {"before": mean(losses[max(0, onset - span):onset]), "after": mean(losses[onset:onset + span]),
            "last": mean(losses[-span:]), "nonfinite_steps": sum(not math.isfinite(v) for v in losses)}


def record(job: str, fault, seed: int, steps: int, result, seconds: float) -> dict:
    """The JSON record of one run: what ran, every alert, TEViD's per-frame labels, the monitor's state,
    the probes and a summary of the training loss."""
    m = result.monitor
    alerts = [{"name": a.name, "source": a.source, "step": int(a.step), "probability": _finite(a.probability),
               "where": getattr(a, "where", None), "remedy": getattr(a, "remedy", None), "message": a.message}
              for a in m.alerts]
    preds = [{"step": int(p["step"]), "label": p["label"], "vacuity": round(float(p["vacuity"]), 4),
              "anomaly": None if p.get("anomaly") is None else round(float(p["anomaly"]), 4),  # score mode's alarm score
              "probs": {k: round(float(v), 4) for k, v in p["probs"].items()}} for p in m.predictions]
    cap = m.capture
    losses = [r.get("loss", math.nan) for r in m.readouts]
    return {
        "job": job, "fault": fault.name, "seed": seed, "steps": steps, "onset": fault.onset,
        "fault_description": fault.describe(), "seconds": round(seconds, 2),
        "alerts": alerts, "predictions": preds,
        "monitor": {"frames": len(m.readouts), "tevid": m.tevid is not None, "checkpoint": m.checkpoint,
                    "cadence": m.config.cadence, "window": m.window, "disabled_reason": m.disabled_reason,
                    "capture_faults": list(cap.faults) if cap is not None else [],
                    "hook_points": [p.name for p in cap.points] if cap is not None else [],
                    "hook_rule": getattr(cap.points[0], "rule", None) if cap is not None and cap.points else None,
                    "head": type(cap.head).__name__ + f"({cap.head.in_features}->{cap.head.out_features})"
                    if cap is not None and cap.head is not None else None,
                    "loss_known_fraction": sum(math.isfinite(v) for v in losses) / max(1, len(losses))},
        "probes": result.probes,
        "loss_summary": _loss_summary(result.train_loss, fault.onset),
        "train_loss_every10": [round(v, 4) if math.isfinite(v) else None for v in result.train_loss[::10]],
    }


def run_one(job: str, fault_name: str, seed: int, steps: int, onset: int, watch: dict | None = None) -> dict:
    """One run in this process (one torch thread): the job with the fault, its record."""
    import torch

    from eval.field.faults import make_fault
    from eval.field.jobs import JOBS

    torch.set_num_threads(1)
    fault = make_fault(fault_name, onset, seed)
    t0 = time.perf_counter()
    result = JOBS[job].run(fault, seed, steps, watch)
    return {**record(job, fault, seed, steps, result, time.perf_counter() - t0), "watch": dict(watch or {})}


def _quiet_worker() -> None:
    """Worker set-up: alerts go to results, not to the log; framework chatter off."""
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("tevid").setLevel(logging.ERROR)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")


def _worker(args: tuple) -> dict:
    _quiet_worker()
    return run_one(*args)


def run_field(cfg: FieldConfig, out: str | Path, log=print) -> list[dict]:
    """Every job x fault x seed of `cfg` (runs already in `out/runs` are read, not rerun), then
    `out/results.json` and `out/tables.md`. Returns the run records."""
    from eval.field.score import summary, tables

    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    onset = cfg.onset_step
    order = sorted(cfg.jobs, key=COST_ORDER.index)
    plan = [(j, f, s) for j in order for s in range(cfg.seeds) for f in cfg.faults]
    runs: dict[tuple, dict] = {}
    todo = []
    for j, f, s in plan:
        path = out / "runs" / f"{j}__{f}__{s}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            if rec["steps"] == cfg.steps and rec["onset"] == onset and rec.get("watch", {}) == cfg.watch:
                runs[(j, f, s)] = rec
                continue
        todo.append((j, f, s))
    log(f"field benchmark: {len(plan)} runs ({len(plan) - len(todo)} already done), {cfg.steps} steps, onset {onset}, "
        f"{cfg.workers} worker(s)")
    t0 = time.perf_counter()
    load_start = os.getloadavg()

    def done(rec: dict) -> None:
        key = (rec["job"], rec["fault"], rec["seed"])
        runs[key] = rec
        (out / "runs" / f"{key[0]}__{key[1]}__{key[2]}.json").write_text(json.dumps(rec) + "\n")
        names = ", ".join(f"{a['source'][0]}:{a['name']}@{a['step']}" for a in rec["alerts"]) or "no alert"
        log(f"[{len(runs)}/{len(plan)} {time.perf_counter() - t0:6.0f}s] {key[0]} {key[1]} seed {key[2]} "
            f"({rec['seconds']:.0f}s): {names}")

    if cfg.workers == 1:
        _quiet_worker()
        for j, f, s in todo:
            done(run_one(j, f, s, cfg.steps, onset, cfg.watch))
    else:
        with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_worker, (j, f, s, cfg.steps, onset, cfg.watch)) for j, f, s in todo]
            for fut in as_completed(futures):
                done(fut.result())
    records = [runs[k] for k in plan]
    seconds = time.perf_counter() - t0
    results = {"config": asdict(cfg), "onset": onset, "seconds": round(seconds, 1), "runs_trained": len(todo),
               "run_seconds_sum": round(sum(r["seconds"] for r in records), 1),
               "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "summary": summary(records, cfg.faults), "runs": records}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "tables.md").write_text(tables(records, cfg.jobs, cfg.faults))
    log(f"wrote {out / 'results.json'} and {out / 'tables.md'} ({seconds:.0f}s)")
    return records


def main(argv: list[str] | None = None) -> int:
    import argparse

    from capture.config import load_config, save_config

    parser = argparse.ArgumentParser(description="Field benchmark: user-written jobs x injected faults, monitored "
                                                 "with diagnose.watch's defaults (docs/benchmark/field.md)")
    parser.add_argument("--config", default=None, help="yaml file with FieldConfig values")
    parser.add_argument("--out", default="outputs/field", help="output directory (default outputs/field)")
    parser.add_argument("--quick", action="store_true", help="2 jobs x 3 faults x 1 seed x 120 steps, 1 worker")
    parser.add_argument("overrides", nargs="*", help="FieldConfig overrides, key=value (e.g. seeds=3 'jobs=[gru_text]')")
    args = parser.parse_args(argv)
    overrides = [f"{k}={json.dumps(v)}" for k, v in QUICK.items()] if args.quick else []
    cfg = load_config(FieldConfig, args.config, overrides + list(args.overrides))
    save_config(cfg, args.out)
    run_field(cfg, args.out, log=lambda s: print(s, flush=True))
    print((Path(args.out) / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
