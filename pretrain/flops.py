"""FLOPs per clip of each encoder variant, and batch-1 latency (issue 4; paper Table 3 / App. K).

    python -m pretrain.flops                 # FLOPs table of every variant (counted on the meta device: no compute)
    python -m pretrain.flops --latency       # plus batch-1 encoder latency of tiny and cpu on 1 and 2 threads

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one forward pass of one clip
(T = num_frames frames): 2 FLOPs per multiply-add, convolutions, linear layers and the attention
matmuls (attention runs the math SDPA kernel while counting, since the fused CPU kernel has no FLOP
formula registered). GMACs = GFLOPs / 2 is the convention of fvcore / most ViT tables ("17.6 GFLOPs"
for ViT-B/16 at 224 is 17.6 GMACs). "MAE fwd" is one Dynamics-MAE training forward (encoder on the
visible 10% of the patches + decoder on all of them) with the decoder of configs/pretrain/<variant>.yaml.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import configs
from capture.config import load_config
from pretrain.encoder import ENCODER_VARIANTS, SpaceTimeEncoder, encoder_config


def count_flops(fn, *args, **kwargs) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def encoder_flops(variant: str, frames: int | None = None) -> dict:
    """Forward FLOPs of one clip through the encoder (all patches) and through a Dynamics-MAE step."""
    cfg = encoder_config(variant)
    t = frames or cfg.num_frames
    with torch.device("meta"):
        encoder = SpaceTimeEncoder(cfg).eval()
        clip = torch.zeros(1, t, cfg.in_chans, cfg.img_size, cfg.img_size)
        flops = count_flops(encoder, clip)
        mae_flops = None
        config = configs.ROOT / "pretrain" / f"{variant}.yaml"  # the variant's Dynamics-MAE config, if one ships
        if config.is_file():
            from pretrain.train import PretrainConfig, build_model

            mae = build_model(load_config(PretrainConfig, config)).train()
            mae_flops = count_flops(mae, clip)
    params = sum(p.numel() for p in encoder.parameters())
    return {"variant": variant, "S": cfg.img_size, "patch": cfg.patch_size, "T": t, "P": encoder.num_patches,
            "dim": cfg.embed_dim, "depth": cfg.depth, "heads": cfg.num_heads, "params_M": params / 1e6,
            "gflops": flops / 1e9, "gmacs": flops / 2e9, "mae_gflops": None if mae_flops is None else mae_flops / 1e9}


def latency_ms(variant: str, threads: int, repeats: int = 50) -> tuple[float, float]:
    """Median wall time and median process CPU time (ms) of one batch-1 encoder forward (no grad, fp32) on
    `threads` threads. On a shared CPU the wall time includes waiting for a core; the CPU time does not."""
    cfg = encoder_config(variant)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encoder = SpaceTimeEncoder(cfg).eval()
        clip = torch.randn(1, cfg.num_frames, cfg.in_chans, cfg.img_size, cfg.img_size).to(torch.bfloat16)
        wall, cpu = [], []
        with torch.inference_mode():
            for i in range(repeats + 5):
                t0, c0 = time.perf_counter(), time.process_time()
                encoder(clip)
                if i >= 5:  # warm-up calls excluded
                    wall.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
        return 1e3 * sorted(wall)[len(wall) // 2], 1e3 * sorted(cpu)[len(cpu) // 2]
    finally:
        torch.set_num_threads(before)


def table(rows: list[dict]) -> str:
    lines = ["| variant | S | patch | T | P/frame | dim | depth | heads | params (M) | GFLOPs/clip | GMACs/clip | MAE fwd GFLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mae = "-" if r["mae_gflops"] is None else f"{r['mae_gflops']:.3g}"
        lines.append(f"| {r['variant']} | {r['S']} | {r['patch']} | {r['T']} | {r['P']} | {r['dim']} | {r['depth']} | {r['heads']} "
                     f"| {r['params_M']:.2f} | {r['gflops']:.4g} | {r['gmacs']:.4g} | {mae} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(ENCODER_VARIANTS), choices=list(ENCODER_VARIANTS))
    p.add_argument("--latency", action="store_true", help="also time batch-1 forwards of tiny and cpu")
    args = p.parse_args(argv)
    print(table([encoder_flops(v) for v in args.variants]))
    if args.latency:
        print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print("| variant | threads | batch-1 encoder forward, wall ms | CPU ms (all threads) |\n|---|---|---|---|")
        for v in [v for v in ("tiny", "cpu") if v in args.variants]:
            for threads in (1, 2):
                wall, cpu = latency_ms(v, threads)
                print(f"| {v} | {threads} | {wall:.2f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
