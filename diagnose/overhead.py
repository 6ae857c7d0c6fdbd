"""Monitor overhead (issue 6, "Overhead"): step time of a training job with the live monitor against the
plain loop, side by side in one process.

    python -m diagnose.overhead --out outputs/overhead [--cadence 50] [--rounds 7] [--steps 100] \
        [--checkpoint DIR|tiny|none] [--profile STEPS]

The job: the factory's `resnet` (factory.archs) on 32x32 digits (factory.train.cached_dataset), batch 32,
AdamW, one torch thread. Four modes share the model, the optimizer and one fixed list of `steps` batches:

    plain            the loop alone
    capture          capture.attach at the cadence, `cap.step(loss)` in the loop (the foundation's path)
    monitor          diagnose.watch(model, opt, checkpoint=False): capture + readouts + rule symptoms
    monitor + TEViD  diagnose.watch(model, opt, checkpoint): the above + TEViD and the decision rule

The protocol of `capture.bench` (its `interleaved_rounds` / `ratio_summary`): every round runs one block
of `steps` optimizer steps per mode, in an order shuffled each round; a mode's ratio is its block's step
time over the same round's plain block; reported as the median and min-max over rounds, for wall time
and for the process's CPU time (with one thread the CPU time is the less noisy of the two on a shared
machine). Monitors are attached anew for each block but resume the previous block's state (alerts,
symptom histories, TEViD streaks and its last T frames: `Monitor.load_state_dict(state, frames)`), so
TEViD predicts at every frame, as it does in a long run, rather than waiting T frames after each attach.

`--checkpoint`: default the shipped model (`diagnose/default_checkpoint`, what `diagnose.watch` loads) when it
exists, else `tiny` (a small TEViD
built from scratch and saved to a temporary directory, so the command always runs); `none` leaves the
TEViD mode out. The output says which. `--profile STEPS` then runs STEPS steps of the last monitor mode
under cProfile and tabulates where the monitor's and the capture's time goes, per call and per step.
Writes overhead.json and overhead.md to `--out`.
"""
from __future__ import annotations

import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import argparse
import json
import logging
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "diagnose" / "default_checkpoint"  # the shipped model (not TEVID_DEFAULT_CHECKPOINT)
MODES = ("plain", "capture", "monitor", "monitor + TEViD")


@dataclass
class OverheadConfig:
    cadence: int = 50  # one frame every `cadence` optimizer steps, in every mode that captures
    rounds: int = 7  # rounds of one block per mode
    steps: int = 100  # optimizer steps per block (a multiple of the cadence: each block sees the same frames)
    checkpoint: str | None = None  # TEViD dir | "tiny" | "none"; None: DEFAULT_CHECKPOINT if present, else "tiny"
    arch: str = "resnet"  # factory.archs name
    dataset: str = "digits"
    image_size: int = 32
    batch_size: int = 32
    lr: float = 2e-3  # AdamW, the factory's default for adamw
    weight_decay: float = 0.05
    warmup_steps: int = 20  # untimed plain steps before the first round
    profile_steps: int = 0  # > 0: then run this many steps of the last monitor mode under cProfile
    threads: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.cadence < 1 or self.rounds < 1 or self.steps < 1:
            raise ValueError(f"cadence, rounds and steps must be >= 1, got {self.cadence}, {self.rounds}, {self.steps}")
        if self.steps % self.cadence:
            raise ValueError(f"steps ({self.steps}) must be a multiple of cadence ({self.cadence}): otherwise "
                             "blocks of one mode hold different numbers of frames")


def tiny_checkpoint(directory: Path, frame_size: int = 32, window: int = 10) -> Path:
    """A randomly initialised small TEViD (1 block of the `tiny` encoder at S = `frame_size`) with a default
    calibration, saved as fine-tuning saves one: the stand-in when no fine-tuned checkpoint exists."""
    from diagnose.calibrate import Calibration, save_calibration
    from diagnose.tevid import TEViD, TEViDConfig
    from pretrain.checkpoint import save_checkpoint
    from pretrain.clips import CLASSES

    torch.manual_seed(0)
    cfg = TEViDConfig(encoder="tiny", encoder_overrides={"img_size": frame_size, "patch_size": 8, "num_frames": window, "depth": 1})
    path = save_checkpoint(directory / "final", model=TEViD(cfg), config={"model": asdict(cfg), "data": {"window": window}}, step=0)
    save_calibration(Calibration.default(len(CLASSES), CLASSES), path)
    return path


def resolve_checkpoint(choice: str | None, tmp: Path) -> tuple[Path | None, str]:
    """(checkpoint dir or None, description) for `--checkpoint`."""
    if choice is None:
        choice = str(DEFAULT_CHECKPOINT) if (DEFAULT_CHECKPOINT / "config.json").is_file() else "tiny"
    if choice == "none":
        return None, "none (TEViD mode left out)"
    if choice == "tiny":
        return tiny_checkpoint(tmp), ("tiny TEViD built from scratch (random weights, default calibration; "
                                      "no fine-tuned checkpoint used)")
    path = Path(choice)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no config.json there (a fine-tuned TEViD dir, 'tiny' or 'none')")
    return path, f"fine-tuned TEViD {path}"


def _block(step_fn, batches, cadence: int) -> tuple[float, float, float]:
    """(wall, CPU, robust CPU) seconds per step over `batches`. Robust CPU: the median CPU time of the
    steps that build no frame stands for all of them, the frame steps (every `cadence`-th, from the
    first) count in full: steps slowed down by other jobs on a shared machine drop out."""
    w0, c0 = time.perf_counter(), time.process_time()
    per_step = []
    for x, y in batches:
        t = time.process_time()
        step_fn(x, y)
        per_step.append(time.process_time() - t)
    n = len(batches)
    wall, cpu = (time.perf_counter() - w0) / n, (time.process_time() - c0) / n
    others = [t for i, t in enumerate(per_step) if i % cadence]
    frames = [t for i, t in enumerate(per_step) if i % cadence == 0]
    robust = (statistics.median(others) * len(others) + sum(frames)) / n if others else cpu
    return wall, cpu, robust


class _Job:
    """The training job the modes share: one model, one optimizer, one list of batches."""

    def __init__(self, cfg: OverheadConfig):
        from factory.archs import build_arch
        from factory.train import cached_dataset, make_optimizer

        data = cached_dataset(cfg.dataset, cfg.image_size, 3000, 400, None)
        torch.manual_seed(cfg.seed)
        self.model, self.modules = build_arch(cfg.arch, data.num_classes, cfg.image_size)
        self.model.train()
        self.opt = make_optimizer("adamw", self.model.parameters(), cfg.lr, cfg.weight_decay)
        g = torch.Generator().manual_seed(cfg.seed)
        idx = [torch.randint(0, len(data.x_train), (cfg.batch_size,), generator=g) for _ in range(cfg.steps)]
        self.batches = [(data.x_train[i], data.y_train[i]) for i in idx]
        self.cap = None

    def step(self, x, y) -> None:
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.cap is not None:
            self.cap.step(loss)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def measure(cfg: OverheadConfig, checkpoint: Path | None) -> dict:
    """Run the rounds; returns per-mode times, ratios and what each mode did (frames, predictions, alerts)."""
    import capture
    import diagnose
    from capture.bench import interleaved_rounds, ratio_summary

    job = _Job(cfg)
    frame_size = 32
    if checkpoint is not None:
        from pretrain.checkpoint import load_checkpoint

        frame_size = load_checkpoint(checkpoint).config["model"].get("encoder_overrides", {}).get("img_size", 32)
    modes = [m for m in MODES if checkpoint is not None or m != "monitor + TEViD"]
    done = {m: {"blocks": 0, "frames": 0, "tevid_predictions": 0, "alerts": 0, "alert_names": {}, "disabled": []}
            for m in modes}
    carry: dict[str, tuple[dict, list]] = {}  # mode -> (state_dict, last T frames) of its previous monitor
    window: dict[str, int] = {}

    def capture_block():
        job.cap = capture.attach(job.model, cadence=cfg.cadence, frame_size=frame_size, optimizer=job.opt, modules=job.modules)
        try:
            t = _block(job.step, job.batches, cfg.cadence)
        finally:
            job.cap.remove()
        done["capture"]["frames"] += len(job.cap.frames)
        job.cap = None
        return t

    def monitor_block(mode: str, ckpt):
        mon = diagnose.watch(job.model, job.opt, ckpt, cadence=cfg.cadence, frame_size=frame_size, modules=job.modules)
        n_alerts, n_pred = 0, 0
        if mode in carry:
            mon.load_state_dict(*carry[mode])
            n_alerts, n_pred = len(mon.alerts), len(mon.predictions)
        n_read = len(mon.readouts)
        t = _block(job.step, job.batches, cfg.cadence)
        mon.remove()
        carry[mode] = (mon.state_dict(), mon.frames)
        window[mode] = mon.window
        d = done[mode]
        d["frames"] += len(mon.readouts) - n_read
        d["tevid_predictions"] += len(mon.predictions) - n_pred
        d["alerts"] += len(mon.alerts) - n_alerts
        for a in mon.alerts[n_alerts:]:
            d["alert_names"][a.name] = d["alert_names"].get(a.name, 0) + 1
        if mon.disabled_reason:
            d["disabled"].append(mon.disabled_reason)
        return t

    blocks = {"plain": lambda: _block(job.step, job.batches, cfg.cadence), "capture": capture_block,
              "monitor": lambda: monitor_block("monitor", False)}
    if checkpoint is not None:
        blocks["monitor + TEViD"] = lambda: monitor_block("monitor + TEViD", checkpoint)

    cpu_times = {m: [] for m in modes}
    robust_times = {m: [] for m in modes}

    def timed(mode):
        def run():
            w, c, r = blocks[mode]()
            cpu_times[mode].append(c)
            robust_times[mode].append(r)
            done[mode]["blocks"] += 1
            return w
        return run

    for x, y in job.batches[: cfg.warmup_steps]:
        job.step(x, y)
    # untimed blocks first: first-call costs (imports, lazy init) are not overhead, and TEViD's window of T
    # frames fills before timing starts (each block resumes it)
    for mode in modes:
        timed(mode)()
        while mode in carry and len(carry[mode][1]) < window[mode]:
            timed(mode)()
    for m in modes:
        cpu_times[m].clear()
        robust_times[m].clear()
        done[m].update(blocks=0, frames=0, tevid_predictions=0, alerts=0, alert_names={})
    wall = interleaved_rounds({m: timed(m) for m in modes}, cfg.rounds, random.Random(cfg.seed), desc="overhead")
    profile = None
    if cfg.profile_steps:
        mode = modes[-1]
        mon = diagnose.watch(job.model, job.opt, checkpoint if mode == "monitor + TEViD" else False, cadence=cfg.cadence,
                             frame_size=frame_size, modules=job.modules)
        mon.load_state_dict(*carry[mode])
        profile = {"mode": mode, **profile_steps(job, cfg.profile_steps, mon.step_count, cfg.cadence)}
        mon.remove()
    kinds = {"wall": wall, "cpu": cpu_times, "robust_cpu": robust_times}
    return {
        "plain_ms_per_step": {k: 1000 * statistics.median(t["plain"]) for k, t in kinds.items()},
        "ratios": {k: ratio_summary(t) for k, t in kinds.items()},
        "ms_per_step": {m: {k: [1000 * x for x in t[m]] for k, t in kinds.items()} for m in modes},
        "modes": done,
        "frame_size": frame_size,
        "profile": profile,
    }


PROFILED = {  # what the table names -> (file suffix, function) in the cProfile statistics
    "monitor: optimizer step hook (all its work)": ("diagnose/monitor.py", "_post_step"),
    "monitor: frame (symptoms, TEViD, logging)": ("diagnose/monitor.py", "_on_frame"),
    "monitor: TEViD window + decision": ("diagnose/monitor.py", "_run_tevid"),
    "monitor: rule symptoms": ("diagnose/symptoms.py", "update"),
    "monitor: batched loss recovery": ("diagnose/monitor.py", "_sync_heads"),
    "monitor: layer statistics hooks": ("diagnose/monitor.py", "_layer_stats"),
    "monitor: gradient statistics": ("diagnose/monitor.py", "_grad_tensor"),
    "monitor: head forward hook": ("diagnose/monitor.py", "_head_forward"),
    "monitor: head gradient hook": ("diagnose/monitor.py", "_head_grad"),
    "capture: step": ("capture/recorder.py", "step"),
    "capture: frame assembly": ("capture/recorder.py", "_finish_frame"),
    "capture: activation/gradient maps": ("capture/frames.py", "tensor_to_map"),
    "capture: head hook (GWA per step)": ("capture/recorder.py", "_head_hook"),
    "training step (forward, backward, optimizer)": ("diagnose/overhead.py", "step"),
}


def profile_steps(job: "_Job", steps: int, first_step: int, cadence: int) -> dict:
    """cProfile over `steps` steps of the attached monitor: cumulative ms per call and per step (amortised)
    of the monitor's and the capture's functions (cProfile inflates Python-heavy code: read it for where
    the time goes, not for the ratio)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    batches = [job.batches[i % len(job.batches)] for i in range(steps)]
    prof.enable()
    for x, y in batches:
        job.step(x, y)
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = {}
    for label, (suffix, fn) in PROFILED.items():
        hits = [(v[1], v[3]) for (path, _, name), v in stats.items() if path.endswith(suffix) and name == fn]
        calls, cum = sum(c for c, _ in hits), sum(t for _, t in hits)
        if calls:
            rows[label] = {"calls": calls, "ms_per_call": 1000 * cum / calls, "ms_per_step": 1000 * cum / steps}
    frames = sum(1 for s in range(first_step, first_step + steps) if s % cadence == 0)
    return {"steps": steps, "frames": frames, "functions": rows}


def to_markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [f"Machine: {res['machine']} (shared with other jobs: figures are indicative); torch {res['torch']}.",
             f"Job: factory `{cfg['arch']}` on {cfg['image_size']}x{cfg['image_size']} {cfg['dataset']}, batch {cfg['batch_size']}, "
             f"AdamW; cadence {cfg['cadence']}, frames {res['frame_size']}x{res['frame_size']}; {cfg['rounds']} rounds x "
             f"{cfg['steps']} steps per mode, shuffled order each round.", f"TEViD checkpoint: {res['checkpoint']}.", "",
             f"Plain loop: {res['plain_ms_per_step']['wall']:.1f} ms/step wall, "
             f"{res['plain_ms_per_step']['cpu']:.1f} ms/step CPU (medians).",
             "Step time over the same round's plain block, median (min-max) over rounds; robust CPU: each block's "
             "non-frame steps count at their median CPU time, its frame steps in full.", "",
             "| mode | wall | CPU | robust CPU | frames | TEViD predictions | alerts |", "|---|---|---|---|---|---|---|"]
    cell = lambda q: f"{q['median']:.3f} ({q['min']:.3f}-{q['max']:.3f})"  # noqa: E731
    for mode, d in res["modes"].items():
        if mode == "plain":
            continue
        r = {k: cell(res["ratios"][k][mode]) for k in ("wall", "cpu", "robust_cpu")}
        names = ", ".join(f"{k} {v}" for k, v in sorted(d["alert_names"].items()))
        lines.append(f"| {mode} | {r['wall']} | {r['cpu']} | {r['robust_cpu']} | {d['frames']} | {d['tevid_predictions']} | "
                     f"{d['alerts']}{f' ({names})' if names else ''} |")
    prof = res.get("profile")
    if prof:
        lines += ["", f"cProfile over {prof['steps']} steps ({prof['frames']} frames) of `{prof['mode']}` (inflates Python-heavy "
                  "code; where the time goes, not the ratio):", "",
                  "| function | calls | ms per call | ms per step (amortised) |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['calls']} | {v['ms_per_call']:.3f} | {v['ms_per_step']:.3f} |" for k, v in prof["functions"].items()]
    return "\n".join(lines)


def run(cfg: OverheadConfig, out: str | Path) -> dict:
    """Measure, write overhead.json and overhead.md under `out`, return the results."""
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    log = logging.getLogger("tevid")  # alerts are counted in the results, not printed one by one
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint, which = resolve_checkpoint(cfg.checkpoint, Path(tmp))
            res = measure(cfg, checkpoint)
    finally:
        torch.set_num_threads(before)
        log.setLevel(level)
    res = {"config": asdict(cfg), "checkpoint": which,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {cfg.threads} torch thread(s)",
           "torch": torch.__version__, **res}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "overhead.md").write_text(to_markdown(res) + "\n")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    defaults = OverheadConfig()
    p.add_argument("--cadence", type=int, default=defaults.cadence)
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument("--steps", type=int, default=defaults.steps, help="steps per block, a multiple of --cadence")
    p.add_argument("--checkpoint", default=None, help="TEViD dir, 'tiny' (built from scratch) or 'none'; default: "
                   f"{DEFAULT_CHECKPOINT.relative_to(ROOT)} if present, else tiny")
    p.add_argument("--arch", default=defaults.arch)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="then profile STEPS steps of the last monitor mode with cProfile")
    args = p.parse_args(argv)
    cfg = OverheadConfig(cadence=args.cadence, rounds=args.rounds, steps=args.steps, checkpoint=args.checkpoint,
                         arch=args.arch, batch_size=args.batch_size, profile_steps=args.profile)
    res = run(cfg, args.out)
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
