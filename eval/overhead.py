"""Monitor overhead (issue 6 "Overhead", issue 17 part 6): step time of a training job with the live monitor,
and with the tools people use instead, against the plain loop, side by side in one process.

    python -m eval.overhead --out outputs/overhead [--cadence 50 ...] [--rounds 7] [--steps 100] \
        [--modes capture monitor tevid cockpit wandb] [--arch resnet|cnn] \
        [--checkpoint DIR|tiny|none] [--profile STEPS]

The job: a factory architecture (`--arch`, factory.archs; default `resnet`) or `cnn`, the small
`nn.Sequential` CNN of `small_cnn` (the peers need a model BackPACK can extend), on 32x32 digits
(factory.train.cached_dataset), batch 32, AdamW, one torch thread. The modes share the model, the
optimizer and one fixed list of `steps` batches; besides `plain` (the loop alone), `--modes` picks from:

    capture          capture.attach at the cadence, `cap.step(loss)` in the loop (the foundation's path)
    monitor          diagnose.watch(model, opt, checkpoint=False): capture + readouts + rule symptoms
    tevid            "monitor + TEViD": diagnose.watch(model, opt, checkpoint): the above + TEViD and the
                     decision rule (the shipped model by default)
    cockpit          "Cockpit economy" (cockpit-for-pytorch): `Cockpit(params, quantities=configuration(
                     "economy", track_schedule=linear(cadence)))` on the BackPACK-`extend`ed model and loss,
                     `with cockpit(step, info={batch_size, individual_losses, loss, optimizer})` around
                     backward, as in Cockpit's own examples (individual losses every step)
    wandb            "wandb.watch log=all": `wandb.watch(model, log="all", log_freq=cadence)` in an offline
                     run (WANDB_MODE=offline, a temporary dir), `run.log({"loss": ...})` at the steps where
                     the watch fires (its histograms are committed with that row; no other logging)

The peers are optional (`pip install -e .[bench]`): imported lazily, a missing one is left out of the
run and the output says so. Cockpit 1.0.2 imports `pkg_resources`, which setuptools >= 81 no longer
ships: `_pkg_resources_shim` stands in for the two names it uses (version lookup only, via
importlib.metadata). BackPACK's hooks sit on the model only during Cockpit's blocks (`_unextend` removes
them), so no other mode pays for them. With AdamW, Cockpit's `Alpha` takes its documented fallback
(projections from parameter differences; its "No update step implemented" warning is silenced).

The protocol of `capture.bench` (its `interleaved_rounds` / `ratio_summary`): every round runs one block
of `steps` optimizer steps per mode, in an order shuffled each round. Every block starts from one snapshot
of the model and the optimizer, taken after `warmup_steps` plain steps (`_Job.reset`, in place): each
block replays the same stretch of training, so all modes do the same work on the same numbers and the job
never memorises its `steps` batches (which, trained on for thousands of steps, drove the loss and the
head gradients to ~0). A mode's ratio is its block's step
time over the same round's plain block; reported as the median and min-max over rounds, for wall time
and for CPU time: this process's plus its child processes' (wandb's `wandb-core` service, which does its
writing in another process; `psutil`, when installed), which with one torch thread is the less noisy of
the two on a shared machine. Each `--cadence` is one such run (cadences one after the other). Monitors
and Cockpit are attached anew for each block but resume the previous block's state (a monitor's alerts,
symptom histories, TEViD streaks and its last T frames: `Monitor.load_state_dict(state, frames)`;
Cockpit's object and global step), so TEViD predicts at every frame, as it does in a long run, rather
than waiting T frames after each attach.

`--checkpoint`: default the shipped model (`diagnose/default_checkpoint`, what `diagnose.watch` loads) when it
exists, else `tiny` (a small TEViD built from scratch and saved to a temporary directory, so the command
always runs); `none` leaves the TEViD mode out. The output says which. `--profile STEPS` then runs STEPS
steps of the last monitor mode under cProfile, per cadence, and tabulates where the monitor's and the
capture's time goes, per call and per step. Writes overhead.json and overhead.md to `--out`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import copy
import importlib.metadata
import json
import logging
import platform
import random
import statistics
import sys
import tempfile
import time
import types
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "diagnose" / "default_checkpoint"  # the shipped model (not TEVID_DEFAULT_CHECKPOINT)
TEVID = "monitor + TEViD"
COCKPIT = "Cockpit economy"
WANDB = "wandb.watch log=all"
MODES = ("plain", "capture", "monitor", TEVID, COCKPIT, WANDB)
OPTIONS = {"capture": "capture", "monitor": "monitor", "tevid": TEVID, "cockpit": COCKPIT, "wandb": WANDB}  # --modes
PEERS = {COCKPIT: "cockpit-for-pytorch", WANDB: "wandb"}  # peer mode -> the package it needs
MONITORS = ("monitor", TEVID)


@dataclass
class OverheadConfig:
    cadences: tuple[int, ...] = (50,)  # one run per cadence: a frame / record every `cadence` optimizer steps
    rounds: int = 7  # rounds of one block per mode
    steps: int = 100  # optimizer steps per block (a multiple of every cadence: each block sees the same frames)
    modes: tuple[str, ...] = ("capture", "monitor", TEVID)  # besides plain; names of MODES
    checkpoint: str | None = None  # TEViD dir | "tiny" | "none"; None: DEFAULT_CHECKPOINT if present, else "tiny"
    arch: str = "resnet"  # factory.archs name, or "cnn" (`small_cnn`)
    dataset: str = "digits"
    image_size: int = 32
    batch_size: int = 32
    lr: float = 2e-3  # AdamW, the factory's default for adamw
    weight_decay: float = 0.05
    warmup_steps: int = 200  # plain steps before the first block; every block starts from the state they reach
    profile_steps: int = 0  # > 0: then run this many steps of the last monitor mode under cProfile, per cadence
    threads: int = 1
    seed: int = 0

    def __post_init__(self):
        self.cadences, self.modes = tuple(self.cadences), tuple(self.modes)
        if not self.cadences or min(self.cadences) < 1 or self.rounds < 1 or self.steps < 1:
            raise ValueError(f"cadences, rounds and steps must be >= 1, got {self.cadences}, {self.rounds}, {self.steps}")
        for c in self.cadences:
            if self.steps % c:
                raise ValueError(f"steps ({self.steps}) must be a multiple of cadence ({c}): otherwise "
                                 "blocks of one mode hold different numbers of frames")
        unknown = [m for m in self.modes if m not in MODES[1:]]
        if unknown:
            raise ValueError(f"modes: unknown {unknown}; valid: {list(MODES[1:])}")


def small_cnn(num_classes: int, image_size: int = 32) -> nn.Sequential:
    """Three Conv(3x3)-ReLU-MaxPool(2) stages of 16, 32 and 64 channels, then Flatten and one Linear head:
    only layers BackPACK extends. `capture.attach` finds its hook points itself (its trainable layers:
    the three convolutions)."""
    s = image_size // 8
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, S/2, S/2)
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, S/4, S/4)
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, S/8, S/8)
        nn.Flatten(), nn.Linear(64 * s * s, num_classes))  # (B, num_classes)

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


# ---------------------------------------------------------------- the peers (optional, imported lazily)
def _pkg_resources_shim() -> None:
    """Cockpit's `__init__` does `from pkg_resources import DistributionNotFound, get_distribution` (for its
    version string); setuptools >= 81 removed `pkg_resources`. Where it is missing, a stand-in module with
    those two names (backed by importlib.metadata) goes into sys.modules; nothing else is provided."""
    try:
        import pkg_resources  # noqa: F401
        return
    except ImportError:
        pass
    shim = types.ModuleType("pkg_resources")

    class DistributionNotFound(Exception):
        pass

    def get_distribution(name: str):
        try:
            return types.SimpleNamespace(project_name=name, version=importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError as err:
            raise DistributionNotFound(name) from err

    shim.DistributionNotFound, shim.get_distribution = DistributionNotFound, get_distribution
    sys.modules["pkg_resources"] = shim


def import_peer(mode: str):
    """The peer's modules (a namespace) or ImportError with the package to install."""
    try:
        if mode == COCKPIT:
            _pkg_resources_shim()
            from backpack import extend, memory_cleanup
            from backpack.context import CTX
            from cockpit import Cockpit
            from cockpit.utils.configuration import configuration
            from cockpit.utils.schedules import linear

            return types.SimpleNamespace(Cockpit=Cockpit, configuration=configuration, linear=linear, extend=extend,
                                         memory_cleanup=memory_cleanup, CTX=CTX)
        import wandb

        return wandb
    except ImportError as err:
        raise ImportError(f"{PEERS[mode]} is not installed ({err}); `pip install -e .[bench]` adds it") from err


def available_modes(requested: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """(modes to run, plain first; {peer mode left out: why})."""
    run, left_out = ["plain"], {}
    for m in requested:
        if m in PEERS:
            try:
                import_peer(m)
            except ImportError as err:
                left_out[m] = str(err)
                continue
        run.append(m)
    return run, left_out


def _children_cpu() -> float:
    """CPU seconds of this process's live child processes (wandb's service); 0 without psutil."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            total += t.user + t.system
    return total


def _block(step_fn, batches, heavy) -> tuple[float, float, float]:
    """(wall, CPU, robust CPU) seconds per step over `batches`; CPU includes the child processes'. Robust
    CPU: the median CPU time of the steps for which `heavy(i)` is False (no frame, no record) stands for all
    of them, the heavy steps count in full: steps slowed down by other jobs on a shared machine drop out."""
    k0 = _children_cpu()
    w0, c0 = time.perf_counter(), time.process_time()
    per_step = []
    for x, y in batches:
        t = time.process_time()
        step_fn(x, y)
        per_step.append(time.process_time() - t)
    n = len(batches)
    wall, cpu = (time.perf_counter() - w0) / n, (time.process_time() - c0) / n
    children = (_children_cpu() - k0) / n
    others = [t for i, t in enumerate(per_step) if not heavy(i)]
    full = [t for i, t in enumerate(per_step) if heavy(i)]
    robust = (statistics.median(others) * len(others) + sum(full)) / n if others else cpu
    return wall, cpu + children, robust + children


class _Job:
    """The training job the modes share: one model, one optimizer, one list of batches."""

    def __init__(self, cfg: OverheadConfig):
        from factory.archs import build_arch
        from factory.train import cached_dataset, make_optimizer

        data = cached_dataset(cfg.dataset, cfg.image_size, 3000, 400, None)
        torch.manual_seed(cfg.seed)
        if cfg.arch == "cnn":
            self.model, self.modules = small_cnn(data.num_classes, cfg.image_size), None
        else:
            self.model, self.modules = build_arch(cfg.arch, data.num_classes, cfg.image_size)
        self.model.train()
        self.opt = make_optimizer("adamw", self.model.parameters(), cfg.lr, cfg.weight_decay)
        g = torch.Generator().manual_seed(cfg.seed)
        idx = [torch.randint(0, len(data.x_train), (cfg.batch_size,), generator=g) for _ in range(cfg.steps)]
        self.batches = [(data.x_train[i], data.y_train[i]) for i in idx]
        self.cap = None
        self._start: tuple[dict, dict] | None = None

    def warm_up(self, steps: int) -> None:
        """`steps` plain steps (over the batches, cyclically), then snapshot the model and the optimizer:
        every block starts from this state (`reset`)."""
        for i in range(steps):
            self.step(*self.batches[i % len(self.batches)])
        self._start = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.opt.state_dict()))

    def reset(self) -> None:
        """Back to the snapshot of `warm_up`, in place (hooks and references to the parameters and the
        optimizer stay valid): each block replays the same stretch of training, so every mode does the
        same work on the same numbers and the job never memorises its `steps` batches."""
        self.model.load_state_dict(self._start[0])
        self.opt.load_state_dict(self._start[1])

    def step(self, x, y) -> None:
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.cap is not None:
            self.cap.step(loss)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _new_done() -> dict:
    return {"blocks": 0, "frames": 0, "tevid_predictions": 0, "alerts": 0, "alert_names": {}, "disabled": []}


class _Mode:
    """One mode of the comparison: `block()` runs `steps` timed steps and returns (wall, CPU, robust CPU)
    seconds per step; `done` counts what it did (frames or records, predictions, alerts) in timed blocks."""

    def __init__(self, name: str, job: _Job, cadence: int):
        self.name, self.job, self.cadence = name, job, cadence
        self.done = _new_done()

    def heavy(self, i: int) -> bool:
        """Whether step i of a block builds a frame / a record (blocks start at a multiple of the cadence)."""
        return i % self.cadence == 0

    def ready(self) -> bool:
        """False while the mode needs more untimed blocks (TEViD's window of T frames filling)."""
        return True

    def block(self) -> tuple[float, float, float]:
        return _block(self.job.step, self.job.batches, self.heavy)

    def close(self) -> None:
        pass


class _Capture(_Mode):
    def __init__(self, name, job, cadence, frame_size: int):
        super().__init__(name, job, cadence)
        self.frame_size = frame_size

    def block(self):
        import capture

        job = self.job
        job.cap = capture.attach(job.model, cadence=self.cadence, frame_size=self.frame_size, optimizer=job.opt,
                                 modules=job.modules)
        try:
            t = super().block()
        finally:
            job.cap.remove()
        self.done["frames"] += len(job.cap.frames)
        job.cap = None
        return t


class _Monitor(_Mode):
    """diagnose.watch, attached for each block, resuming the previous block's state and last T frames."""

    def __init__(self, name, job, cadence, frame_size: int, checkpoint):
        super().__init__(name, job, cadence)
        self.frame_size, self.checkpoint = frame_size, checkpoint
        self.carry: tuple[dict, list] | None = None
        self.window = 0

    def attach(self):
        import diagnose

        mon = diagnose.watch(self.job.model, self.job.opt, self.checkpoint, cadence=self.cadence,
                             frame_size=self.frame_size, modules=self.job.modules)
        if self.carry is not None:
            mon.load_state_dict(*self.carry)
        return mon

    def ready(self):
        return self.carry is not None and len(self.carry[1]) >= self.window

    def block(self):
        mon = self.attach()
        n_alerts, n_pred, n_read = len(mon.alerts), len(mon.predictions), len(mon.readouts)
        try:
            t = _block(self.job.step, self.job.batches, self.heavy)
        finally:
            mon.remove()
        self.carry, self.window = (mon.state_dict(), mon.frames), mon.window
        d = self.done
        d["frames"] += len(mon.readouts) - n_read
        d["tevid_predictions"] += len(mon.predictions) - n_pred
        d["alerts"] += len(mon.alerts) - n_alerts
        for a in mon.alerts[n_alerts:]:
            d["alert_names"][a.name] = d["alert_names"].get(a.name, 0) + 1
        if mon.disabled_reason:
            d["disabled"].append(mon.disabled_reason)
        return t


class _Cockpit(_Mode):
    """Cockpit's economy configuration, tracked at the cadence; BackPACK extends the model for the block."""

    def __init__(self, name, job, cadence):
        super().__init__(name, job, cadence)
        self.lib = import_peer(COCKPIT)
        quantities = self.lib.configuration("economy", track_schedule=self.lib.linear(cadence))
        self.cockpit = self.lib.Cockpit(job.model.parameters(), quantities=quantities)
        self.loss_fn = nn.CrossEntropyLoss(reduction="mean")
        self.individual_loss_fn = nn.CrossEntropyLoss(reduction="none")
        self.global_step = 0

    def heavy(self, i):
        return i % self.cadence in (0, 1)  # Alpha tracks the step after each tracked one too

    def step(self, x, y) -> None:
        job, cp, s = self.job, self.cockpit, self.global_step
        outputs = job.model(x)
        loss = self.loss_fn(outputs, y)
        losses = self.individual_loss_fn(outputs, y)
        with cp(s, info={"batch_size": x.shape[0], "individual_losses": losses, "loss": loss, "optimizer": job.opt}):
            loss.backward(create_graph=cp.create_graph(s))
        job.opt.step()
        job.opt.zero_grad(set_to_none=True)
        self.global_step += 1

    def _unextend(self) -> None:
        """Undo `backpack.extend`: remove its hooks (BackPACK keeps every handle in CTX), stored inputs /
        outputs and the 'already extended' flags, so the other modes run on the plain model."""
        self.lib.CTX.remove_hooks()
        for m in [*self.job.model.modules(), self.loss_fn]:
            self.lib.memory_cleanup(m)
            m.__dict__.pop("_backpack_extend", None)

    def tracked(self) -> int:
        """Steps Cockpit has tracked so far (its GradNorm quantity's results)."""
        return sum(len(q.output) for q in self.cockpit.quantities if type(q).__name__ == "GradNorm")

    def block(self):
        tracked = self.tracked()
        self.lib.extend(self.job.model)
        self.lib.extend(self.loss_fn)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="No update step implemented")  # Alpha with AdamW
                warnings.filterwarnings("ignore", message="Full backward hook is firing")  # BackPACK, first module
                t = _block(self.step, self.job.batches, self.heavy)
        finally:
            self._unextend()
        self.done["frames"] += self.tracked() - tracked
        return t


class _Wandb(_Mode):
    """wandb.watch(log="all", log_freq=cadence) for the block, in the offline run `run`."""

    def __init__(self, name, job, cadence, run):
        super().__init__(name, job, cadence)
        self.wandb, self.run = import_peer(WANDB), run
        self.i = 0

    def heavy(self, i):
        return (i + 1) % self.cadence == 0  # the watch fires on its cadence-th forward / backward since attach

    def step(self, x, y) -> None:
        job = self.job
        loss = F.cross_entropy(job.model(x), y)
        loss.backward()
        job.opt.step()
        job.opt.zero_grad(set_to_none=True)
        self.i += 1
        if self.i % self.cadence == 0:
            self.run.log({"loss": loss.item()})  # commits the histograms the watch logged at this step
            self.done["frames"] += 1

    def block(self):
        self.wandb.watch(self.job.model, log="all", log_freq=self.cadence)
        self.i = 0
        try:
            return _block(self.step, self.job.batches, self.heavy)
        finally:
            self.wandb.unwatch(self.job.model)


@contextlib.contextmanager
def wandb_offline_run(tmp: Path):
    """An offline wandb run writing under `tmp` (WANDB_MODE=offline while it lives), finished on exit."""
    wandb = import_peer(WANDB)
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(tmp), WANDB_SILENT="true")
    run = wandb.init(project="tevid-overhead", dir=str(tmp), mode="offline", settings=wandb.Settings(silent=True))
    try:
        yield run
    finally:
        run.finish()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure(cfg: OverheadConfig, cadence: int, modes: list[str], job: _Job, checkpoint: Path | None,
            frame_size: int, wandb_run=None) -> dict:
    """The rounds at one cadence; returns per-mode times, ratios and what each mode did (frames or records,
    TEViD predictions, alerts)."""
    from capture.bench import interleaved_rounds, ratio_summary

    def make(m: str) -> _Mode:
        if m == "capture":
            return _Capture(m, job, cadence, frame_size)
        if m in MONITORS:
            return _Monitor(m, job, cadence, frame_size, checkpoint if m == TEVID else False)
        if m == COCKPIT:
            return _Cockpit(m, job, cadence)
        if m == WANDB:
            return _Wandb(m, job, cadence, wandb_run)
        return _Mode(m, job, cadence)

    runners = {m: make(m) for m in modes}
    cpu_times = {m: [] for m in modes}
    robust_times = {m: [] for m in modes}

    def timed(mode):
        def run():
            job.reset()
            w, c, r = runners[mode].block()
            cpu_times[mode].append(c)
            robust_times[mode].append(r)
            runners[mode].done["blocks"] += 1
            return w
        return run

    # untimed blocks first: first-call costs (imports, lazy init) are not overhead, and TEViD's window of T
    # frames fills before timing starts (each block resumes it)
    for mode in modes:
        timed(mode)()
        while not runners[mode].ready():
            timed(mode)()
    for m in modes:
        cpu_times[m].clear()
        robust_times[m].clear()
        runners[m].done = _new_done()
    wall = interleaved_rounds({m: timed(m) for m in modes}, cfg.rounds, random.Random(cfg.seed),
                              desc=f"overhead, cadence {cadence}")
    profile = None
    monitors = [m for m in modes if m in MONITORS]
    if cfg.profile_steps and monitors:
        job.reset()
        mon = runners[monitors[-1]].attach()
        try:
            profile = {"mode": monitors[-1], **profile_steps(job, cfg.profile_steps, mon.step_count, cadence)}
        finally:
            mon.remove()
    kinds = {"wall": wall, "cpu": cpu_times, "robust_cpu": robust_times}
    return {
        "cadence": cadence,
        "plain_ms_per_step": {k: 1000 * statistics.median(t["plain"]) for k, t in kinds.items()},
        "ratios": {k: ratio_summary(t) for k, t in kinds.items()},
        "ms_per_step": {m: {k: [1000 * x for x in t[m]] for k, t in kinds.items()} for m in modes},
        "modes": {m: r.done for m, r in runners.items()},
        "profile": profile,
    }


PROFILED = {  # what the table names -> (file suffix, function) in the cProfile statistics
    "monitor: optimizer step hook (all its work)": ("diagnose/monitor.py", "_post_step"),
    "monitor: frame (symptoms, TEViD, logging)": ("diagnose/monitor.py", "_on_frame"),
    "monitor: TEViD window + decision": ("diagnose/monitor.py", "_run_tevid"),
    "monitor: rule symptoms": ("diagnose/symptoms.py", "update"),
    "monitor: batched loss recovery": ("diagnose/loss_recovery.py", "_sync_heads"),
    "monitor: layer statistics hooks": ("diagnose/layer_stats.py", "layer_stats"),
    "monitor: gradient statistics": ("diagnose/layer_stats.py", "tensor"),
    "monitor: head forward hook": ("diagnose/monitor.py", "_head_forward"),
    "monitor: head gradient hook": ("diagnose/monitor.py", "_head_grad"),
    "capture: step": ("capture/recorder.py", "step"),
    "capture: frame assembly": ("capture/recorder.py", "_finish_frame"),
    "capture: activation/gradient maps": ("capture/frames.py", "native_map"),
    "capture: levels and patterns": ("capture/frames.py", "summarise_maps"),
    "capture: head hook (GWA per step)": ("capture/recorder.py", "_head_hook"),
    "training step (forward, backward, optimizer)": ("eval/overhead.py", "step"),
}


def profile_steps(job: _Job, steps: int, first_step: int, cadence: int) -> dict:
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


def _cell(q: dict) -> str:
    return f"{q['median']:.2f} ({q['min']:.2f}-{q['max']:.2f})"


def to_markdown(res: dict) -> str:
    cfg = res["config"]
    job = "the small Sequential CNN (`small_cnn`)" if cfg["arch"] == "cnn" else f"factory `{cfg['arch']}`"
    lines = [f"Machine: {res['machine']} (shared with other jobs: figures are indicative); torch {res['torch']}.",
             f"Job: {job} on {cfg['image_size']}x{cfg['image_size']} {cfg['dataset']}, batch {cfg['batch_size']}, "
             f"AdamW; frames {res['frame_size']}x{res['frame_size']}; {cfg['rounds']} rounds x {cfg['steps']} steps "
             "per mode, shuffled order each round, at each cadence.", f"TEViD checkpoint: {res['checkpoint']}."]
    lines += [f"Left out: {m}: {why}" for m, why in res["left_out"].items()]
    lines += ["", "Plain loop, ms/step (medians): " + "; ".join(
        f"cadence {r['cadence']}: {r['plain_ms_per_step']['wall']:.1f} wall, {r['plain_ms_per_step']['cpu']:.1f} CPU"
        for r in res["runs"]) + ".",
        "Step time over the same round's plain block, median (min-max) over rounds. CPU: this process and its "
        "child processes; robust CPU: each block's steps without a frame / record count at their median CPU "
        "time, the others in full. Frames / records: monitor frames, Cockpit's tracked steps, wandb's logged "
        "rows, over the timed blocks.", "",
        "| mode | cadence | wall | CPU | robust CPU | frames / records | TEViD predictions | alerts |",
        "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        for mode, d in r["modes"].items():
            if mode == "plain":
                continue
            q = {k: _cell(r["ratios"][k][mode]) for k in ("wall", "cpu", "robust_cpu")}
            names = ", ".join(f"{k} {v}" for k, v in sorted(d["alert_names"].items()))
            lines.append(f"| {mode} | {r['cadence']} | {q['wall']} | {q['cpu']} | {q['robust_cpu']} | {d['frames']} | "
                         f"{d['tevid_predictions']} | {d['alerts']}{f' ({names})' if names else ''} |")
    for r in res["runs"]:
        prof = r.get("profile")
        if prof:
            lines += ["", f"cProfile over {prof['steps']} steps ({prof['frames']} frames) of `{prof['mode']}` at cadence "
                      f"{r['cadence']} (inflates Python-heavy code; where the time goes, not the ratio):", "",
                      "| function | calls | ms per call | ms per step (amortised) |", "|---|---|---|---|"]
            lines += [f"| {k} | {v['calls']} | {v['ms_per_call']:.3f} | {v['ms_per_step']:.3f} |"
                      for k, v in prof["functions"].items()]
    return "\n".join(lines)


def run(cfg: OverheadConfig, out: str | Path) -> dict:
    """Measure every cadence, write overhead.json and overhead.md under `out`, return the results."""
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    log = logging.getLogger("tevid")  # alerts are counted in the results, not printed one by one
    level = log.level
    log.setLevel(logging.ERROR)
    modes, left_out = available_modes(cfg.modes)
    for m, why in left_out.items():
        print(f"overhead: {m} left out: {why}", file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            checkpoint, which = None, "none (TEViD mode not asked for)"
            if TEVID in modes:
                checkpoint, which = resolve_checkpoint(cfg.checkpoint, Path(tmp))
                if checkpoint is None:
                    modes.remove(TEVID)
            frame_size = 32
            if checkpoint is not None:
                from pretrain.checkpoint import load_checkpoint

                frame_size = load_checkpoint(checkpoint).config["model"].get("encoder_overrides", {}).get("img_size", 32)
            wandb_run = stack.enter_context(wandb_offline_run(Path(tmp))) if WANDB in modes else None
            job = _Job(cfg)
            job.warm_up(cfg.warmup_steps)
            runs = [measure(cfg, c, modes, job, checkpoint, frame_size, wandb_run) for c in cfg.cadences]
    finally:
        torch.set_num_threads(before)
        log.setLevel(level)
    res = {"config": asdict(cfg), "checkpoint": which, "left_out": left_out, "frame_size": frame_size,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {cfg.threads} torch thread(s)",
           "torch": torch.__version__, "versions": _versions(modes), "runs": runs}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "overhead.md").write_text(to_markdown(res) + "\n")
    return res


def _versions(modes: list[str]) -> dict[str, str]:
    """Versions of the peer packages that ran (and BackPACK under Cockpit)."""
    names = [PEERS[m] for m in modes if m in PEERS] + (["backpack-for-pytorch"] if COCKPIT in modes else [])
    return {n: importlib.metadata.version(n) for n in names}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; oneDNN reads it lazily
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    defaults = OverheadConfig()
    p.add_argument("--cadence", type=int, nargs="+", default=list(defaults.cadences), help="one run per cadence")
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument("--steps", type=int, default=defaults.steps, help="steps per block, a multiple of every --cadence")
    p.add_argument("--modes", nargs="+", choices=list(OPTIONS), default=[k for k, v in OPTIONS.items() if v in defaults.modes],
                   help="modes besides plain (cockpit, wandb: the peers, optional packages)")
    p.add_argument("--checkpoint", default=None, help="TEViD dir, 'tiny' (built from scratch) or 'none'; default: "
                   f"{DEFAULT_CHECKPOINT.relative_to(ROOT)} if present, else tiny")
    p.add_argument("--arch", default=defaults.arch, help="a factory.archs name, or 'cnn' (the small Sequential CNN)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="then profile STEPS steps of the last monitor mode with cProfile, at each cadence")
    args = p.parse_args(argv)
    cfg = OverheadConfig(cadences=tuple(args.cadence), rounds=args.rounds, steps=args.steps, checkpoint=args.checkpoint,
                         modes=tuple(OPTIONS[m] for m in args.modes), arch=args.arch, batch_size=args.batch_size,
                         profile_steps=args.profile)
    res = run(cfg, args.out)
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
