"""Capture demo, the project's main job until the later stages exist.

A small timm ResNet trains on scikit-learn's digits (built in: nothing to download) with capture
on, writes one run store, and prints what was captured.

    python -m capture.demo [--config FILE (default: configs/capture/demo.yaml)] [--out outputs/demo] [key=value ...]
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import configs
from capture.config import cli_parser, load_config, save_config
from capture.recorder import CaptureConfig, attach
from capture.store import RunStore, RunWriter


@dataclass
class DemoConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 0.05
    seed: int = 0
    image_size: int = 32
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    capture: CaptureConfig = field(default_factory=lambda: CaptureConfig(cadence=10, frame_size=32))


def digits_dataset(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), upsampled to `image_size`, standardised."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x - x.mean()) / x.std(), torch.tensor(d.target)


def small_resnet(widths: list[int], num_classes: int = 10, in_chans: int = 1) -> torch.nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, in_chans=in_chans, channels=tuple(widths), stem_width=widths[0])


def run(cfg: DemoConfig, out: Path) -> Path:
    torch.manual_seed(cfg.seed)
    x, y = digits_dataset(cfg.image_size)
    model = small_resnet(cfg.widths)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    store_path = out / "demo_run.zarr"
    writer = RunWriter(store_path, cfg.capture.frame_size, spec={"arch": "resnet-small", "dataset": "digits"}, overwrite=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    with writer, attach(model, cfg.capture, optimizer=opt, sink=writer) as cap:
        print("hook points:", ", ".join(f"{p.position}={p.name} ({p.layout})" for p in cap.points))
        bar = tqdm(range(cfg.steps), desc="training with capture", unit="step")
        n_frames = 0
        for _ in bar:
            idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            frame = cap.step(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if frame is not None:
                n_frames += 1
                bar.set_postfix(loss=f"{frame.readouts['loss']:.3f}", frames=n_frames)
    cap.flush_steps()
    writer.finalize(label=None, onset_step=None, trigger_step=None, capture=cap.metadata())
    return store_path


def describe(path: Path) -> str:
    store = RunStore(path)
    frames, steps, readouts = store.frames(), store.frame_step(), store.readouts()
    names = store.readout_names
    lines = [
        f"run store: {path}",
        f"frames: {tuple(frames.shape)} {frames.dtype} at steps {steps[0].item()}..{steps[-1].item()} (every {int(steps[1] - steps[0])})",
        f"per-step train_loss/lr: {len(store.train_loss())} steps",
        "frame channels (mean / std over the run): " + ", ".join(
            f"{c}={frames[:, i].float().mean():.2f}/{frames[:, i].float().std():.2f}" for i, c in enumerate(store.attrs["frame_channels"])),
        "readouts (first, middle, last frame):",
        "  " + "".join(f"{n:>15}" for n in ["step"] + names),
    ]
    for t in (0, len(steps) // 2, len(steps) - 1):
        vals = [f"{int(steps[t]):>15}"] + [f"{v:>15.4g}" if not math.isnan(v) else f"{'missing':>15}" for v in readouts[t].tolist()]
        lines.append("  " + "".join(vals))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    args = cli_parser(__doc__.splitlines()[0], default_config=str(configs.path("capture/demo"))).parse_args(argv)
    cfg = load_config(DemoConfig, args.config, args.overrides)
    out = Path(args.out or "outputs/demo")
    save_config(cfg, out)
    print(describe(run(cfg, out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
