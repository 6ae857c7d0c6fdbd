"""The live demo (the README's main command): two short training jobs on built-in data with the
monitor attached, one healthy and one with learning-rate spikes, alerts printed as they happen and a
timeline figure written at the end.

    python -m diagnose.demo [--out outputs/demo] [--config FILE] [key=value ...]

Written as a user would write it, with the public API only (`diagnose.watch`): its own small model
(a timm ResNet with one BasicBlock per stage, widths 16-128), scikit-learn's digits (nothing to
download; upsampled to 32 x 32, three channels, standardised), AdamW with a linear warm-up then a
cosine from 1 to 0.1 of the learning rate, all in its own loop. The perturbed job multiplies the
learning rate by `spike_factor` for one step, `spike_bursts` times, `spike_gap` steps apart, from
`spike_onset`. The loss is handed over with `monitor.observe`. The monitor uses the shipped default
TEViD model (`diagnose/default_checkpoint/`) when it exists, else rule symptoms only; `checkpoint=DIR`
picks another. Writes `<out>/timeline.png`, `<out>/<job>/alerts.jsonl` (the monitor's log) and
`<out>/summary.json`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import diagnose
from diagnose.monitor import default_cadence
from capture.config import load_config, save_config


@dataclass
class DemoConfig:
    steps: int = 600
    batch_size: int = 32
    cadence: int | None = None  # one frame every `cadence` optimizer steps; None: the model's own (`diagnose.watch`)
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05  # linear warm-up over this fraction of the steps, then cosine to 0.1 x lr
    spike_onset: int = 360
    spike_factor: float = 50.0
    spike_bursts: int = 4
    spike_gap: int = 12  # steps between two one-step spikes
    seed: int = 0
    checkpoint: str | None = None  # None: the shipped default model if present; "none": rules only
    threads: int = 1


@dataclass
class Digits:
    """scikit-learn's 8 x 8 digits as 3 x 32 x 32 images: 80% train / 20% validation, stratified."""

    x_train: torch.Tensor  # (N, 3, 32, 32) float32, standardised with the train split's channel mean / std
    y_train: torch.Tensor  # (N,) int64
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int = 10


def load_digits(seed: int = 0, size: int = 32) -> Digits:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = torch.from_numpy(d.images.astype("float32") / 16.0)[:, None]  # (N, 1, 8, 8), pixel values 0..16
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    y = torch.from_numpy(d.target.astype("int64"))
    it, iv = train_test_split(range(len(y)), test_size=0.2, stratify=d.target, random_state=seed)
    std, mean = torch.std_mean(x[it], dim=(0, 2, 3), keepdim=True)

    def standardise(images: torch.Tensor) -> torch.Tensor:
        return ((images - mean) / std).contiguous()

    return Digits(standardise(x[it]), y[it], standardise(x[iv]), y[iv])


def small_resnet(num_classes: int) -> nn.Module:
    """A ResNet with one BasicBlock per stage, widths 16-128 (a training step at batch 32 on 32 x 32
    inputs takes tens of milliseconds on a CPU)."""
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, channels=(16, 32, 64, 128), stem_width=16)


def lr_factor(step: int, steps: int, warmup_frac: float) -> float:
    """Linear warm-up, then a cosine from 1 to 0.1."""
    warm = max(1, int(warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def spike(step: int, cfg: DemoConfig) -> bool:
    """Whether `step` is one of the perturbed job's one-step learning-rate spikes."""
    k, offset = divmod(step - cfg.spike_onset, cfg.spike_gap + 1)
    return step >= cfg.spike_onset and k < cfg.spike_bursts and offset == 0


def _job(name: str, cfg: DemoConfig, data: Digits, out: Path, checkpoint) -> dict:
    torch.manual_seed(cfg.seed)
    model = small_resnet(data.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def announce(alert) -> None:
        prob = "" if alert.probability is None else f" p={alert.probability:.2f}"
        print(f"  [{name}] step {alert.step:4d}  ALERT {alert.name} ({alert.source}{prob}): {alert.message}", flush=True)

    monitor = diagnose.watch(model, opt, checkpoint=checkpoint, cadence=cfg.cadence, callbacks=[announce], log_dir=out / name)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, lrs = [], []
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(data.x_train), (cfg.batch_size,), generator=gen)
        lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_frac) * (cfg.spike_factor if name == "lr_spike" and spike(step, cfg) else 1.0)
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
              "monitor": f"TEViD from {monitor.checkpoint}" if monitor.tevid is not None else "rule symptoms only",
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
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
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
    checkpoint = False if cfg.checkpoint == "none" else cfg.checkpoint
    data = load_digits(cfg.seed)
    cadence = cfg.cadence or default_cadence(checkpoint)
    print(f"TEViD demo: a small ResNet on scikit-learn's digits, {cfg.steps} steps per job, a frame every "
          f"{cadence} steps", flush=True)
    results = []
    for name in ("healthy", "lr_spike"):
        extra = (f" (learning rate x{cfg.spike_factor:g} for one step, {cfg.spike_bursts} times from step "
                 f"{cfg.spike_onset})" if name == "lr_spike" else "")
        print(f"job {name}{extra}:", flush=True)
        res = _job(name, cfg, data, out, checkpoint)
        first = {a["source"]: a["step"] for a in reversed(res["alerts"])}
        print(f"  [{name}] done in {res['seconds']:.1f} s ({res['monitor']}): final val acc {res['final_val_acc']:.2f}, "
              f"{len(res['alerts'])} alert(s)" + (f", first TEViD alert at step {first['tevid']}" if "tevid" in first else ""),
              flush=True)
        results.append(res)
    fig = timeline(results, out / "timeline.png")
    summary = {"config": asdict(cfg), "monitor": results[0]["monitor"],
               "jobs": [{k: r[k] for k in ("job", "final_val_acc", "seconds", "tevid", "alerts", "disabled_reason")} for r in results]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"timeline: {fig}\nsummary: {out / 'summary.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
