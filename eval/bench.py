"""TEViD speed on this machine: single-window latency and fine-tuning throughput (docs/models.md, TEViD).

    python -m eval.bench                           # latency of tiny and cpu at batch 1, 2 threads;
                                                   # training clips/s of cpu with 1 and 2 processes
    python -m eval.bench --processes 1 --train-steps 5

Latency: `TEViD.predict` (inputs both) on one random window (T = 10 frames of 6 x S x S bf16 and
its readouts), after warm-up; median and 90th percentile of wall time over `--repeats`, and the
median CPU time of the process per call (with 1 thread on a shared CPU, the best estimate of the
latency the machine gives when it is not shared; with 2 threads it also counts OpenMP spin-waiting). Throughput: full
fine-tuning steps (forward, evidential loss, backward, AdamW) of the `cpu` variant on random clips
of the corpus shape, `--batch-size` per process; with 2 processes through a real
`accelerate launch --multi_gpu --num_processes 2` (DDP over gloo), each process on one thread.
Synthetic clips isolate the model from data loading; `diagnose/finetune.py` logs clips/s of real
epochs in epochs.csv. The CPU may be shared: treat the figures as indicative.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from diagnose.evidential import evidential_loss
from diagnose.tevid import TEViD, TEViDConfig

ROOT = Path(__file__).resolve().parents[1]


def random_clips(model: TEViD, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.encoder.cfg
    frames = torch.randn(batch, c.num_frames, c.in_chans, c.img_size, c.img_size).to(torch.bfloat16)
    return frames, torch.rand(batch, c.num_frames, 8) * 5


def latency(variant: str, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    model = TEViD(TEViDConfig(encoder=variant)).eval()
    frames, readouts = random_clips(model, 1)
    for _ in range(5):
        model.predict(frames, readouts)
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        model.predict(frames, readouts)
        times.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    times.sort()
    # CPU time of the process per call: on a shared machine, with 1 thread, close to the unshared latency
    return {"variant": variant, "threads": threads, "median_ms": statistics.median(times),
            "p90_ms": times[int(0.9 * (len(times) - 1))], "cpu_ms": statistics.median(cpu),
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6}


def train_throughput(variant: str, batch: int, steps: int, threads: int | None = None, warmup: int = 2) -> dict:
    """Fine-tuning steps on random clips in this process (or in each of an accelerate launch);
    `threads` per process, default CPU cores / processes."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    world = accelerator.num_processes
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    torch.manual_seed(accelerator.process_index)
    model = TEViD(TEViDConfig(encoder=variant, encoder_overrides={"drop_path": 0.1}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    frames, readouts = random_clips(accelerator.unwrap_model(model), batch)
    target = torch.randint(0, 5, (batch,))
    for i in range(warmup + steps):
        if i == warmup:
            accelerator.wait_for_everyone()
            start = time.perf_counter()
        loss = evidential_loss(model(frames, readouts), target, 1.0)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    out = {"variant": variant, "processes": world, "threads": threads, "batch_per_process": batch, "steps": steps,
           "clips_per_s": world * batch * steps / seconds, "seconds": seconds}
    accelerator.end_training()
    return out


def launch_two(variant: str, batch: int, steps: int) -> dict:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--module", "eval.bench",
           "--worker", "--variant", variant, "--batch-size", str(batch), "--train-steps", str(steps)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"2-process benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["tiny", "cpu"], help="latency variants")
    p.add_argument("--threads", nargs="+", type=int, default=[2, 1], help="latency thread counts")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--variant", default="cpu", help="throughput variant")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--processes", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    p.add_argument("--train-threads", nargs="+", type=int, default=[2, 1], help="threads of the 1-process run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one process of the 2-process run
    args = p.parse_args(argv)
    if args.worker:
        result = train_throughput(args.variant, args.batch_size, args.train_steps)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        return 0

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f})")
    print("| variant | threads | params (M) | median latency (ms) | p90 (ms) | CPU time/call (ms) |\n|---|---|---|---|---|---|")
    for v in args.variants:
        for threads in args.threads:
            r = latency(v, threads, args.repeats)
            print(f"| {v} | {r['threads']} | {r['params_M']:.2f} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['cpu_ms']:.2f} |",
                  flush=True)
    print("\n| variant | processes | threads/process | batch/process | clips/s |\n|---|---|---|---|---|")
    runs = [(n, t) for n in args.processes for t in (args.train_threads if n == 1 else [1])]
    for n, threads in runs:
        if n == 1:
            r = train_throughput(args.variant, args.batch_size, args.train_steps, threads)
        else:
            r = launch_two(args.variant, args.batch_size, args.train_steps)
        print(f"| {r['variant']} | {r['processes']} | {r['threads']} | {r['batch_per_process']} | {r['clips_per_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
