"""Capture overhead benchmark (issue 2 §4): step time with capture against without, side by side.

    python -m capture.bench --out outputs/bench [--rounds 5] [--steps 50]

For a small ResNet and a small ViT at 32x32, batch 64, the same model and batch alternate, in
one process, between blocks of `steps` optimizer steps without capture and with capture at
cadence 1, 10 and 50 (and 50 with GWA over the capture batch only). The order of the modes
is shuffled every round, and each round's ratio is taken against that round's plain block, so
drift of the machine cancels. Reported: median ratio over rounds with its min-max. Then frames per
second written to a run store (6x32x32 bf16). Writes `bench.json` and `bench.md` to `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from capture.readouts import READOUT_NAMES
from capture.recorder import Frame, attach
from capture.store import RunStore, RunWriter

MODES = {  # name -> capture options (None = no capture attached)
    "plain": None,
    "cadence 1": {"cadence": 1},
    "cadence 10": {"cadence": 10},
    "cadence 50": {"cadence": 50},
    "cadence 50, GWA on capture batch": {"cadence": 50, "gwa_window": "step"},
}


def bench_models() -> dict:
    import timm
    from timm.models.resnet import BasicBlock, ResNet

    return {
        "resnet (1-1-1-1 blocks, widths 32-256)": lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, channels=(32, 64, 128, 256), stem_width=32),
        "vit (patch 4, dim 96, depth 4)": lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10),
    }


def _block(model, opt, x, y, steps: int, options: dict | None) -> float:
    """Seconds per optimizer step over `steps` steps, capture attached iff `options`."""
    cap = attach(model, frame_size=32, optimizer=opt, **options) if options is not None else None
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if cap is not None:
            cap.step(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    if cap is not None:
        cap.remove()
    return elapsed / steps


def interleaved_rounds(blocks: dict, rounds: int, rng: random.Random, desc: str = "") -> dict[str, list[float]]:
    """Run every block once per round, in an order shuffled each round (so drift of a shared machine
    hits every mode alike). `blocks`: mode -> callable returning seconds per step of one block.
    Returns mode -> its seconds per step, one entry per round."""
    times = {m: [] for m in blocks}
    for _ in tqdm(range(rounds), desc=desc, unit="round"):
        order = list(blocks)
        rng.shuffle(order)
        for mode in order:
            times[mode].append(blocks[mode]())
    return times


def ratio_summary(times: dict[str, list[float]], baseline: str = "plain") -> dict[str, dict[str, float]]:
    """Per mode other than `baseline`: median, min and max over rounds of its step time divided by the
    same round's `baseline` step time (the ratio is taken within a round, never across rounds)."""
    base = times[baseline]
    out = {}
    for mode, t in times.items():
        if mode == baseline:
            continue
        r = [a / b for a, b in zip(t, base)]
        out[mode] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    return out


def step_time_ratios(rounds: int, steps: int, batch: int = 64, seed: int = 0) -> dict:
    rng = random.Random(seed)
    results = {}
    for name, make in bench_models().items():
        torch.manual_seed(seed)
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        _block(model, opt, x, y, 5, None)  # warm-up
        blocks = {m: (lambda o=opts: _block(model, opt, x, y, steps, o)) for m, opts in MODES.items()}
        times = interleaved_rounds(blocks, rounds, rng, desc=name)
        results[name] = {"plain_ms_per_step": 1000 * statistics.median(times["plain"]), "ratios": ratio_summary(times)}
    return results


def store_write_rate(n_frames: int = 4096, size: int = 32) -> dict:
    frames = torch.randn(n_frames, 6, size, size).to(torch.bfloat16)
    readouts = {k: 0.5 for k in READOUT_NAMES}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.zarr"
        start = time.perf_counter()
        writer = RunWriter(path, size)
        for i in range(n_frames):
            writer.append_frame(Frame(i, frames[i], readouts))
        writer.finalize()
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        back = RunStore(path).frames()
        read_s = time.perf_counter() - start
        assert torch.equal(back.view(torch.int16), frames.view(torch.int16))
    return {"frames": n_frames, "frame_shape": [6, size, size], "write_frames_per_s": n_frames / write_s, "read_frames_per_s": n_frames / read_s}


def to_markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine']}; torch {res['torch']}; {res['rounds']} rounds x {res['steps']} steps per mode, batch 64, 32x32.", ""]
    lines += ["| model | plain ms/step | mode | ratio median | min | max |", "|---|---|---|---|---|---|"]
    for model, r in res["step_time"].items():
        for mode, q in r["ratios"].items():
            lines.append(f"| {model} | {r['plain_ms_per_step']:.1f} | {mode} | {q['median']:.3f} | {q['min']:.3f} | {q['max']:.3f} |")
    w = res["store"]
    lines += ["", f"Run store: {w['frames']} frames of {'x'.join(map(str, w['frame_shape']))} bf16: "
              f"{w['write_frames_per_s']:,.0f} frames/s written, {w['read_frames_per_s']:,.0f} frames/s read back."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/bench")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=50, help="steps per block (a multiple of 50 keeps cadence 50 fair)")
    args = p.parse_args(argv)
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "rounds": args.rounds,
        "steps": args.steps,
        "step_time": step_time_ratios(args.rounds, args.steps),
        "store": store_write_rate(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2) + "\n")
    md = to_markdown(res)
    (out / "bench.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
