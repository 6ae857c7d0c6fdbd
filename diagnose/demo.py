"""The live demo (the README's main command): two short training jobs on built-in data with the
monitor attached, one healthy and one with learning-rate spikes, alerts printed as they happen and a
timeline figure written at the end.

    python -m diagnose.demo [--out outputs/demo] [--config FILE] [key=value ...]

Each job is the factory's small ResNet on scikit-learn's digits (nothing to download), AdamW at the
factory's recipe; the perturbed job multiplies the learning rate by `spike_factor` for one step,
`spike_bursts` times from `spike_onset` (the factory's `LRSpike`). `diagnose.watch` attaches to
model and optimizer with nothing else changed in the loop (the loss is handed over with
`monitor.observe`, as a user would). The monitor uses the shipped default TEViD model
(`diagnose/default_checkpoint/`) when it exists, else rule symptoms only; `checkpoint=DIR` picks
another. Writes `<out>/timeline.png`, `<out>/<job>/alerts.jsonl` (the monitor's log) and
`<out>/summary.json`.
"""
from __future__ import annotations

import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from capture.config import load_config, save_config


@dataclass
class DemoConfig:
    steps: int = 300
    batch_size: int = 32
    cadence: int = 10  # one frame every `cadence` optimizer steps (the factory's cadence)
    arch: str = "resnet"
    dataset: str = "digits"
    lr: float = 2e-3
    weight_decay: float = 0.05
    spike_onset: int = 120
    spike_factor: float = 50.0
    spike_bursts: int = 4
    spike_gap: int = 12
    seed: int = 0
    checkpoint: str | None = None  # None: the shipped default model if present; "none": rules only
    threads: int = 1


def _job(name: str, cfg: DemoConfig, data, out: Path, checkpoint) -> dict:
    import diagnose
    from factory.archs import build_arch
    from factory.perturbations import LRSpike
    from factory.train import lr_schedule

    torch.manual_seed(cfg.seed)
    model, modules = build_arch(cfg.arch, data.num_classes, data.x_train.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    spike = LRSpike(onset=cfg.spike_onset, factor=cfg.spike_factor, length=1, bursts=cfg.spike_bursts, gap=cfg.spike_gap)

    def announce(alert) -> None:
        prob = "" if alert.probability is None else f" p={alert.probability:.2f}"
        print(f"  [{name}] step {alert.step:4d}  ALERT {alert.name} ({alert.source}{prob}): {alert.message}", flush=True)

    options = {"modules": modules} if modules else {}
    monitor = diagnose.watch(model, opt, checkpoint=checkpoint, cadence=cfg.cadence, callbacks=[announce],
                             log_dir=out / name, **options)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, lrs = [], []
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(data.x_train), (cfg.batch_size,), generator=gen)
        lr = cfg.lr * lr_schedule(step, cfg.steps, 0.05) * (spike.lr_factor(step) if name == "lr_spike" else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        monitor.observe(loss=loss)
        opt.step()
        losses.append(float(loss.detach()))
        lrs.append(lr)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = float((model(data.x_val).argmax(1) == data.y_val).float().mean())
    result = {"job": name, "final_val_acc": acc, "seconds": seconds, "tevid": monitor.tevid is not None,
              "alerts": [a.to_dict() for a in monitor.alerts], "predictions": list(monitor.predictions),
              "frames": [{"step": f.step, "frame": f.frame.float()} for f in monitor.frames],
              "loss": losses, "lr": lrs, "disabled_reason": monitor.disabled_reason}
    monitor.remove()
    return result


def timeline(results: list[dict], path: Path) -> Path:
    """One row per job: a strip of frames (channel 0), the training loss with the learning rate, and
    TEViD's class probabilities and vacuity per frame, alerts as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 3, figsize=(16, 3.4 * len(results)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.2, 1.4, 1.4]})
    for row, res in zip(axes, results):
        strip = [f["frame"][0] for f in res["frames"][:: max(1, len(res["frames"]) // 6)][:6]]
        if strip:
            row[0].imshow(torch.cat(strip, dim=1).numpy(), cmap="magma", aspect="auto")
        row[0].set_title(f"{res['job']}: frames (channel 0)", fontsize=9)
        row[0].axis("off")
        ax = row[1]
        ax.plot(res["loss"], lw=0.8, color="tab:blue")
        ax.set_ylabel("training loss")
        ax.set_title(f"{res['job']}: final val acc {res['final_val_acc']:.2f}", fontsize=9)
        lr_ax = ax.twinx()
        lr_ax.plot(res["lr"], lw=0.6, color="tab:gray", alpha=0.6)
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate", color="tab:gray")
        ax = row[2]
        if res["predictions"]:
            steps = [p["step"] for p in res["predictions"]]
            for cls in res["predictions"][0]["probs"]:
                ax.plot(steps, [p["probs"][cls] for p in res["predictions"]], label=cls, lw=1.2)
            ax.plot(steps, [p["vacuity"] for p in res["predictions"]], "k--", lw=1, label="vacuity")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7, loc="upper left", ncol=2)
            ax.set_title("TEViD per frame", fontsize=9)
        else:
            ax.text(0.5, 0.5, "no TEViD model: rule symptoms only", ha="center", va="center", transform=ax.transAxes)
            ax.set_title("TEViD", fontsize=9)
        for a in res["alerts"]:
            for target in (row[1], row[2]):
                target.axvline(a["step"], color="tab:red" if a["source"] == "tevid" else "tab:orange", lw=0.8, alpha=0.7)
        ax.set_xlim(0, len(res["loss"]))
        row[1].set_xlabel("optimizer step")
        ax.set_xlabel("optimizer step (red: TEViD alert, orange: rule alert)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="output directory (default outputs/demo)")
    parser.add_argument("--config", default=None, help="yaml config file (DemoConfig)")
    parser.add_argument("--checkpoint", default=None, help="a TEViD checkpoint dir, or 'none' for rule symptoms only")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. steps=200)")
    args = parser.parse_args(argv)
    cfg = load_config(DemoConfig, args.config, args.overrides)
    if args.checkpoint is not None:
        cfg.checkpoint = args.checkpoint
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    torch.set_num_threads(cfg.threads)
    logging.getLogger("tevid").setLevel(logging.ERROR)  # alerts are printed by the demo's own callback
    from diagnose.monitor import DEFAULT_CHECKPOINT
    from factory.train import cached_dataset

    checkpoint = False if cfg.checkpoint == "none" else cfg.checkpoint
    which = ("rule symptoms only" if checkpoint is False or (checkpoint is None and not DEFAULT_CHECKPOINT.exists())
             else f"TEViD from {checkpoint or DEFAULT_CHECKPOINT}")
    data = cached_dataset(cfg.dataset, 32, 3000, 256, None)
    print(f"TEViD demo: {cfg.arch} on {cfg.dataset}, {cfg.steps} steps per job, a frame every {cfg.cadence} steps; "
          f"monitor: {which}", flush=True)
    results = []
    for name in ("healthy", "lr_spike"):
        extra = (f" (learning rate x{cfg.spike_factor:g} for one step, {cfg.spike_bursts} times from step "
                 f"{cfg.spike_onset})" if name == "lr_spike" else "")
        print(f"job {name}{extra}:", flush=True)
        res = _job(name, cfg, data, out, checkpoint)
        first = {a["source"]: a["step"] for a in reversed(res["alerts"])}
        print(f"  [{name}] done in {res['seconds']:.1f} s: final val acc {res['final_val_acc']:.2f}, "
              f"{len(res['alerts'])} alert(s)" + (f", first TEViD alert at step {first['tevid']}" if "tevid" in first else ""),
              flush=True)
        results.append(res)
    fig = timeline(results, out / "timeline.png")
    summary = {"config": asdict(cfg), "monitor": which,
               "jobs": [{k: r[k] for k in ("job", "final_val_acc", "seconds", "tevid", "alerts", "disabled_reason")} for r in results]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"timeline: {fig}\nsummary: {out / 'summary.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
