"""The privacy-utility curve of DP telemetry (issue 6, main paper App. J): epsilon against TEViD's
event-time AUPRC, measured on live jobs with the monitor attached.

    python -m eval.privacy_curve --out DIR [--checkpoint DIR (default: the shipped model)] [key=value ...]

Every job is a factory-recipe run (`arch` on `dataset` with `optimizer`, one factory perturbation
preset, a seed) with `diagnose.watch(model, optimizer, dp=DPConfig(clip, z, dataset_size))` attached
and nothing else changed in the loop. The same jobs run once without DP (epsilon = inf) , once with
per-sample clipping but no noise (z = 0: epsilon = inf, what clipping alone costs) and once per noise
multiplier z: the monitor never touches training, so each job's trajectory is the same in every arm
(paired), and only the released telemetry differs.

Labels are the injections: a job's label is its preset's class with the preset's onset and no
trigger step (the factory's rules need validation curves this loop does not compute), healthy presets
are "healthy". q = batch / (the number of training samples the job draws from): a task switch draws
from half the classes. Presets that train on a tiny subset (`overfit*`) are refused: with q near 1 a
job releases its subset almost unsampled, and its epsilon says nothing about a real job.

Writes `<out>/jobs.jsonl` (per job: preset, seed, z, q's pool, TEViD's per-frame p(healthy), vacuity and
label, alerts, privacy), `<out>/curve.json` (per arm: epsilon, delta, releases, AUPRC with its 95% BCa interval over jobs,
detection and false-alert rates of the confirmed TEViD alerts, Unknown share), `<out>/curve.md` and
`<out>/curve.png`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from capture.config import cli_parser, load_config, save_config


@dataclass
class PrivacyCurveConfig:
    arch: str = "alexnet"  # no BatchNorm: each sample's terms depend on no other sample (docs/selection_privacy.md)
    dataset: str = "digits"
    optimizer: str = "adamw"
    perturbations: list[str] = field(default_factory=lambda: ["healthy", "healthy_lr_low", "instability_spike",
                                                              "instability_lr", "forgetting", "concept_bias"])
    seeds: int = 2
    steps: int = 300
    cadence: int = 10  # the factory's frame cadence (the model was trained on it)
    noise_multipliers: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    clip: float = 1.0
    delta: float = 1e-5
    mechanism: str = "rdp"
    n_resamples: int = 2000  # bootstrap resamples of the AUPRC interval (over jobs)
    checkpoint: str | None = None  # None: the shipped default model
    threads: int = 1


def _injection(name: str, steps: int):
    from factory.perturbations import Overfit, make_perturbation

    pert = make_perturbation(name, steps)
    if pert.kind == "novel":
        raise ValueError(f"perturbation {name!r} is novel: the curve scores known classes (label = injection)")
    if isinstance(pert, Overfit):
        raise ValueError(f"perturbation {name!r} trains on a {pert.subset}-sample subset: q would be ~1 and its "
                         "epsilon meaningless; leave it out of `perturbations`")
    return pert


def run_job(cfg: PrivacyCurveConfig, preset: str, seed: int, noise_multiplier: float | None, checkpoint, data) -> dict:
    """One job with the monitor attached (`noise_multiplier` None: no DP). Returns its TEViD predictions,
    alerts, privacy report and injection."""
    import diagnose
    from diagnose.privacy import DPConfig
    from factory.config import TrainingConfig
    from factory.job import build_job
    from factory.loop import MonitorLoss, StepLoop

    tc = TrainingConfig(steps=cfg.steps, image_size=data.x_train.shape[-1])
    pert = _injection(preset, cfg.steps)
    job = build_job(cfg.arch, data, cfg.optimizer, pert, tc, seed)  # the factory's recipe for this preset
    pool_size = min(len(pert.pool(s, job.batches.pool)) for s in (0, pert.onset, cfg.steps - 1))
    dp = None if noise_multiplier is None else DPConfig(clip=cfg.clip, noise_multiplier=noise_multiplier, delta=cfg.delta,
                                                        dataset_size=pool_size, mechanism=cfg.mechanism, seed=seed)
    options = {"modules": job.modules} if job.modules else {}
    monitor = diagnose.watch(job.model, job.optimizer, checkpoint=checkpoint, cadence=cfg.cadence, dp=dp, **options)
    if monitor.tevid is None:
        monitor.remove()
        raise RuntimeError("no TEViD model: pass --checkpoint DIR (the curve measures TEViD's utility)")
    StepLoop(job, [MonitorLoss(monitor)]).run()  # the monitor's loss after backward, as a user's loop hands it over
    result = {"preset": preset, "seed": seed, "noise_multiplier": noise_multiplier, "injected": pert.injected,
              "onset": pert.onset if pert.kind == "known" else None, "pool_size": pool_size,
              "predictions": list(monitor.predictions), "alerts": [a.to_dict() for a in monitor.alerts],
              "privacy": dict(monitor.privacy) if dp is not None else None, "disabled_reason": monitor.disabled_reason,
              "epoch_steps": tc.eval_every}
    monitor.remove()  # under DP: prints the job's epsilon and delta
    return result


def run_result(job: dict):
    """A job as an `eval.metrics.RunResult`: score = 1 - p(healthy) per frame, alerts = confirmed TEViD
    alerts of known classes."""
    from eval.metrics import CLASSES, RunResult

    preds = job["predictions"]
    probs = np.array([[p["probs"][c] for c in CLASSES] for p in preds]).reshape(-1, len(CLASSES))
    alerts = [(a["step"], a["name"]) for a in job["alerts"] if a["source"] == "tevid" and a["name"] in CLASSES[1:]]
    return RunResult(f"{job['preset']}-s{job['seed']}", "healthy" if job["injected"] == "healthy" else job["injected"],
                     False, job["onset"], None, job["epoch_steps"], [p["step"] for p in preds],
                     1.0 - probs[:, CLASSES.index("healthy")], probs, [p["vacuity"] for p in preds], alerts)


def summarize(jobs: list[dict], n_resamples: int) -> dict:
    """Utility of one arm: AUPRC (95% BCa over jobs), detection (an anomaly job alerts at or after its
    onset), false alerts (a healthy job alerts), Unknown share of the predicted frames; privacy: the
    largest epsilon over the arm's jobs."""
    from eval.metrics import bootstrap_ci, event_auprc

    runs = [run_result(j) for j in jobs]
    ci = bootstrap_ci(runs, event_auprc, n_resamples=n_resamples)
    anomalous = [r for r in runs if r.label != "healthy"]
    healthy = [r for r in runs if r.label == "healthy"]
    labels = [p["label"] for j in jobs for p in j["predictions"]]
    privacy = [j["privacy"] for j in jobs if j["privacy"]]
    return {
        "epsilon": max((p["epsilon"] for p in privacy), default=math.inf),
        "delta": privacy[0]["delta"] if privacy else None,
        "releases": max((p["releases"] for p in privacy), default=0),
        "sample_rate": max((p["sample_rate"] for p in privacy), default=None),
        "event_auprc": event_auprc(runs), "event_auprc_ci": [ci.low, ci.high], "ci_method": ci.method,
        "detection_rate": float(np.mean([any(s >= r.onset for s in r.alert_steps) for r in anomalous])) if anomalous else math.nan,
        "false_alert_rate": float(np.mean([bool(r.alerts) for r in healthy])) if healthy else math.nan,
        "unknown_share": float(np.mean([label == "unknown" for label in labels])) if labels else math.nan,
        "jobs": len(jobs), "disabled": sum(j["disabled_reason"] is not None for j in jobs),
    }


def table(rows: list[dict]) -> str:
    lines = ["| noise multiplier z | epsilon (delta) | releases | q | event AUPRC [95% CI] | detection | false alerts | Unknown share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        z = r["noise_multiplier"]
        z = "no DP" if z is None else ("clip only (z = 0)" if z == 0 else f"{z:g}")
        eps = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.3g} ({r['delta']:g})"
        q = "-" if r["sample_rate"] is None else f"{r['sample_rate']:.3g}"
        lines.append(f"| {z} | {eps} | {r['releases']} | {q} | {r['event_auprc']:.3f} [{r['event_auprc_ci'][0]:.3f}, "
                     f"{r['event_auprc_ci'][1]:.3f}] | {r['detection_rate']:.2f} | {r['false_alert_rate']:.2f} | {r['unknown_share']:.2f} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dp = [r for r in rows if r["noise_multiplier"] is not None and math.isfinite(r["epsilon"])]
    if dp:
        eps = [r["epsilon"] for r in dp]
        auprc = np.array([r["event_auprc"] for r in dp])
        err = np.abs(np.array([r["event_auprc_ci"] for r in dp]).T - auprc)
        ax.errorbar(eps, auprc, yerr=err, marker="o", capsize=3, label="DP telemetry")
        for r in dp:
            ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"], r["event_auprc"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
    for r in rows:
        if r["noise_multiplier"] is None:
            ax.axhline(r["event_auprc"], color="k", ls="--", lw=1, label=f"no DP ({r['event_auprc']:.3f})")
        elif r["noise_multiplier"] == 0:
            ax.axhline(r["event_auprc"], color="tab:gray", ls=":", lw=1, label=f"clip only, z = 0 ({r['event_auprc']:.3f})")
    ax.set_xlabel("epsilon (opacus accountant, per job)")
    ax.set_ylabel("TEViD event-time AUPRC")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Privacy-utility of DP telemetry", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    args = cli_parser(__doc__.splitlines()[0], checkpoint=True).parse_args(argv)
    cfg = load_config(PrivacyCurveConfig, args.config, args.overrides)
    if args.checkpoint is not None:
        cfg.checkpoint = args.checkpoint
    for name in cfg.perturbations:
        _injection(name, cfg.steps)  # a clear error before any job runs
    if any(not z > 0 for z in cfg.noise_multipliers):
        raise ValueError(f"noise_multipliers must be > 0 (the no-DP and clip-only arms always run), got {cfg.noise_multipliers}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    torch.set_num_threads(cfg.threads)
    logging.getLogger("tevid").setLevel(logging.ERROR)
    from factory.job import cached_dataset

    data = cached_dataset(cfg.dataset, 32, 3000, 256, None)
    arms = [None, 0.0, *cfg.noise_multipliers]
    plan = [(z, p, s) for z in arms for p in cfg.perturbations for s in range(cfg.seeds)]
    jobs: dict = {z: [] for z in arms}
    start = time.time()
    with open(out / "jobs.jsonl", "w") as log:
        for z, preset, seed in tqdm(plan, desc="privacy curve jobs", unit="job"):
            job = run_job(cfg, preset, seed, z, cfg.checkpoint, data)
            jobs[z].append(job)
            log.write(json.dumps({**{k: v for k, v in job.items() if k != "predictions"},
                                  "frames": [{k: p[k] for k in ("step", "vacuity", "label")} | {"p_healthy": p["probs"]["healthy"]}
                                             for p in job["predictions"]]}, default=str) + "\n")
            log.flush()
    rows = [{"noise_multiplier": z, **summarize(jobs[z], cfg.n_resamples)} for z in arms]
    report = {"config": asdict(cfg), "seconds": round(time.time() - start, 1), "arms": rows}
    (out / "curve.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "curve.md").write_text(table(rows) + "\n")
    figure(rows, out / "curve.png")
    print(table(rows), flush=True)
    print(f"curve: {out / 'curve.json'}, {out / 'curve.md'}, {out / 'curve.png'} ({report['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
