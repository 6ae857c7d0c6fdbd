"""One factory run: train a perturbed job with capture on, evaluate it (privileged), label it, and
publish its run store. The capture path is the one a live job uses (`capture.attach`).

`run_one(spec, cfg, corpus_dir)` returns the run's manifest record. A run that diverges is data:
it stops after `divergence_patience` non-finite losses and is stored and labeled like any other.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capture.hessian import HessianTracker
from capture.lm import lm_loss
from capture.readouts import READOUT_NAMES
from capture.recorder import CaptureConfig, attach
from capture.store import RunWriter
from factory.archs import build_arch
from factory.config import FactoryConfig, TrainingConfig
from factory.datasets import TaskData, load_dataset
from factory.labeler import label_run
from factory.perturbations import Perturbation, RunSettings, make_perturbation, watermark
from factory.spec import RunSpec


# ------------------------------------------------------------------ ingredients
@functools.lru_cache(maxsize=8)
def cached_dataset(name: str, image_size: int, max_train: int, max_val: int, root: str | None) -> TaskData:
    return load_dataset(name, image_size=image_size, seed=0, root=root, max_train=max_train, max_val=max_val)


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":  # foreach: one fused kernel per op over all tensors (torch picks per-tensor on CPU)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, foreach=True)
    if name == "lion":
        from timm.optim import Lion

        return Lion(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: adamw, sgd, lion, adafactor")


def run_settings(pert: Perturbation, tc: TrainingConfig, arch: str, optimizer: str) -> RunSettings:
    """The recipe of one run (`tc.lr(arch, optimizer)`, the optimizer's weight decay) as its perturbation
    configures it."""
    return pert.configure(RunSettings(lr=tc.lr(arch, optimizer), weight_decay=tc.weight_decay[optimizer], optimizer=optimizer))


def step_lr(settings: RunSettings, tc: TrainingConfig, pert: Perturbation, step: int) -> float:
    """The learning rate of one step: the run's base rate, its schedule and the perturbation's factor."""
    return settings.lr * lr_schedule(step, tc.steps, tc.warmup_frac, settings.anneal) * pert.lr_factor(step)


def lr_schedule(step: int, steps: int, warmup_frac: float, anneal: bool = True) -> float:
    """Linear warm-up, then cosine from 1 to 0.1 (`anneal`) or constant."""
    warm = max(1, int(warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    if not anneal:
        return 1.0
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


class Batches:
    """Draws training batches for one run: images with light augmentation (a random shift of up to
    2 pixels; no mirror flip: digits and 1-D signals are not mirror-symmetric, and the flip kept the
    small ViTs near chance within a run), or text windows."""

    def __init__(self, data: TaskData, settings: RunSettings, tc: TrainingConfig, seed: int):
        self.data, self.tc, self.augment = data, tc, settings.augment
        self.gen = torch.Generator().manual_seed(seed)
        self.text = data.modality == "text"
        n = len(data.x_train) - tc.lm_context - 1 if self.text else len(data.x_train)
        pool = torch.arange(n)
        if settings.train_subset is not None:
            pool = pool[torch.randperm(n, generator=self.gen)[: settings.train_subset]]
        self.pool = pool

    def draw(self, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = pool[torch.randint(0, len(pool), (self.tc.batch_size,), generator=self.gen)]
        if self.text:
            offsets = torch.arange(self.tc.lm_context)
            stream = self.data.x_train
            return stream[idx[:, None] + offsets], stream[idx[:, None] + offsets + 1]
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        if self.augment:
            dx, dy = torch.randint(-2, 3, (2,), generator=self.gen).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        return x, y


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return lm_loss(out, y) if out.ndim == 3 else F.cross_entropy(out, y)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and per-sample correctness (text: token accuracy per window)."""
    model.eval()
    losses, correct = [], []
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        yy = y[i:i + batch]
        if out.ndim == 3:  # text: per window, mean token loss and token accuracy
            losses.append(F.cross_entropy(out.flatten(0, 1), yy.flatten(), reduction="none").view(yy.shape).mean(1))
            correct.append((out.argmax(-1) == yy).float().mean(1))
        else:
            losses.append(F.cross_entropy(out, yy, reduction="none"))
            correct.append(out.argmax(-1) == yy)
    model.train()
    correct_all = torch.cat(correct)
    return float(torch.cat(losses).mean()), float(correct_all.float().mean()), correct_all.numpy()


class LyapunovProbe:
    """Finite-horizon Lyapunov proxy of the real optimizer update (paper Algorithm 1, by finite
    differences): a clone of model and optimizer state starts `eps` away along a random direction
    and takes the same H steps on the same batches; per step the separation's growth factor is
    logged and the clone is pulled back to distance `eps` (Benettin renormalisation)."""

    def __init__(self, make_model, make_opt, model, optimizer, eps_rel: float, seed: int):
        self.model = model
        self.clone = make_model()
        self.clone.load_state_dict(model.state_dict())
        self.clone.train()
        self.opt = make_opt(self.clone.parameters())
        self.opt.load_state_dict(optimizer.state_dict())
        gen = torch.Generator().manual_seed(seed)
        params = [p for p in model.parameters()]
        norm = torch.sqrt(sum((p.detach().float() ** 2).sum() for p in params))
        self.eps = float(eps_rel * norm) or eps_rel
        direction = [torch.randn(p.shape, generator=gen) for p in params]
        scale = self.eps / float(torch.sqrt(sum((d**2).sum() for d in direction)))
        with torch.no_grad():
            for c, d in zip(self.clone.parameters(), direction):
                c.add_(d * scale)
        self.log_alpha: list[float] = []

    def step(self, x, y, lr: float, perturbation: Perturbation, step: int) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss = loss_fn(self.clone(x), y)
        loss.backward()
        perturbation.before_step(step, self.clone, self.opt)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            diffs = [c - p for c, p in zip(self.clone.parameters(), self.model.parameters())]
            dist = float(torch.sqrt(sum((d.float() ** 2).sum() for d in diffs)))
            self.log_alpha.append(math.log(max(dist / self.eps, 1e-12)) if math.isfinite(dist) else math.inf)
            if math.isfinite(dist) and dist > 0:
                for c, p, d in zip(self.clone.parameters(), self.model.parameters(), diffs):
                    c.copy_(p + d * (self.eps / dist))


# ------------------------------------------------------------------ one run
def run_one(spec: RunSpec, cfg: FactoryConfig, corpus: Path, overwrite: bool = False) -> dict:
    tc = cfg.training
    t0 = time.time()
    seed = int(spec.run_id.rsplit("-", 1)[1][:8], 16)  # stable per spec
    torch.manual_seed(seed)
    data = cached_dataset(spec.dataset, tc.image_size, tc.max_train, tc.max_val, cfg.data_root.get(spec.dataset))
    pert = make_perturbation(spec.perturbation, tc.steps)
    if data.modality not in pert.modalities:
        raise ValueError(f"perturbation {spec.perturbation} does not apply to {data.modality} data ({spec.dataset})")
    pert.bind(data.y_train, data.num_classes, seed)
    settings = run_settings(pert, tc, spec.arch, spec.optimizer)

    make_model = lambda: build_arch(spec.arch, data.num_classes, tc.image_size)[0]  # noqa: E731
    model, modules = build_arch(spec.arch, data.num_classes, tc.image_size)
    make_opt = lambda params: make_optimizer(spec.optimizer, params, settings.lr, settings.weight_decay)  # noqa: E731
    optimizer = make_opt(model.parameters())
    batches = Batches(data, settings, tc, seed)

    # Validation sets (privileged): clean, poisoned (watermark of the true class), text windows.
    if data.modality == "text":
        n_win = min(tc.max_val, (len(data.x_val) - 1) // tc.lm_context)
        starts = torch.arange(n_win) * tc.lm_context
        offs = torch.arange(tc.lm_context)
        x_val, y_val = data.x_val[starts[:, None] + offs], data.x_val[starts[:, None] + offs + 1]
        x_poison = None
    else:
        x_val, y_val = data.x_val, data.y_val
        x_poison = watermark(x_val, y_val, data.num_classes)

    store_path = corpus / "runs" / f"{spec.run_id}.zarr"
    store_path.parent.mkdir(parents=True, exist_ok=True)
    writer = RunWriter(store_path, cfg.capture.frame_size, spec=spec.to_dict(), overwrite=overwrite)
    ccfg = CaptureConfig(cadence=cfg.capture.cadence, frame_size=cfg.capture.frame_size, modules=modules)
    # top Hessian eigenvalue at every hessian_every-th frame, on a hook-free copy made before capture attaches
    hessian = HessianTracker(model, tc.hessian_every, seed=seed) if tc.hessian_every else None
    lyap_starts = sorted({int(f * tc.steps) for f in np.linspace(0.5, 0.9, tc.lyapunov_windows)}) if tc.lyapunov_windows else []

    val_loss, val_acc, val_correct, poison_correct, epoch_step = [], [], [], [], []
    lyap_windows: list[tuple[int, list[float]]] = []
    probe: LyapunovProbe | None = None
    nonfinite_run, status, steps_done = 0, "complete", 0
    with writer:  # any exception below removes the temporary store
        with attach(model, ccfg, optimizer=optimizer, sink=writer) as cap:
            model.train()
            for step in range(tc.steps):
                pool = pert.pool(step, batches.pool)
                x, y = pert.batch(step, *batches.draw(pool))
                lr = step_lr(settings, tc, pert, step)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if step in lyap_starts:
                    probe = LyapunovProbe(make_model, make_opt, model, optimizer, tc.lyapunov_eps, seed + step)
                    probe_start = step
                loss = loss_fn(model(x), y)
                loss.backward()
                frame = cap.step(loss, lr=lr)
                if hessian is not None and frame is not None:  # same parameters and batch as the frame
                    hessian.on_frame(loss_fn, x, y)
                pert.before_step(step, model, optimizer)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps_done = step + 1
                if probe is not None:
                    probe.step(x, y, lr, pert, step)
                    if len(probe.log_alpha) == tc.lyapunov_horizon:
                        lyap_windows.append((probe_start, probe.log_alpha))
                        probe = None
                nonfinite_run = 0 if math.isfinite(loss.item()) else nonfinite_run + 1
                if (step + 1) % tc.eval_every == 0 or nonfinite_run >= tc.divergence_patience:
                    vl, va, vc = evaluate(model, x_val, y_val)
                    val_loss.append(vl), val_acc.append(va), val_correct.append(vc), epoch_step.append(step + 1)
                    if x_poison is not None:
                        poison_correct.append(evaluate(model, x_poison, y_val)[2])
                if nonfinite_run >= tc.divergence_patience:
                    status = "diverged"
                    break

        signals = {
            "train_loss": writer.train_loss,
            "frame_step": writer.frame_steps,
            "gwa": writer.frame_readouts[:, READOUT_NAMES.index("gwa")],
            "epoch_step": np.asarray(epoch_step),
            "val_loss": np.asarray(val_loss),
            "val_acc": np.asarray(val_acc),
            "val_correct": np.asarray(val_correct),
            "poison_correct": np.asarray(poison_correct, dtype=bool) if poison_correct else None,
            "val_labels": y_val.numpy() if data.modality == "image" else None,
            "lyapunov": lyap_windows,
        }
        label = label_run(signals, spec, pert, data, cfg.labels, steps_done)
        for key in ("epoch_step", "val_loss", "val_acc", "val_correct"):
            writer.write_privileged(key, signals[key])
        if signals["poison_correct"] is not None:
            writer.write_privileged("poison_correct", signals["poison_correct"])
            writer.write_privileged("val_labels", signals["val_labels"])
        if lyap_windows:
            writer.write_privileged("lyapunov_start", np.asarray([s for s, _ in lyap_windows]))
            writer.write_privileged("lyapunov_log_alpha", np.asarray([a for _, a in lyap_windows]))
        # the rules' statistics come from validation data: privileged, like the signals behind them
        writer.write_privileged("labeling", np.zeros(0), attrs={"rules": label["rules"]})
        extra = {}
        if hessian is not None:  # public: a model quantity on the training batch, no validation data
            writer.set_frame_array("hessian_top", hessian.series())
            extra["hessian"] = hessian.metadata()  # its settings and cost (seconds, included in `seconds`)
        writer.finalize(
            label=label["label"], onset_step=label["onset_step"], trigger_step=label["trigger_step"],
            online_label=label["online_label"], status=status,
            perturbation=pert.describe(), capture=cap.metadata(), training=asdict(tc), epoch_steps=tc.eval_every,
            seconds=round(time.time() - t0, 2), num_classes=data.num_classes, modality=data.modality, **extra,
        )
    return {
        **spec.to_dict(),
        "label": label["label"],
        "onset_step": label["onset_step"],
        "trigger_step": label["trigger_step"],
        "online_label": label["online_label"],
        "injected": pert.injected,
        "status": status,
        "steps": steps_done,
        "n_frames": writer.n_frames,
        "seconds": round(time.time() - t0, 2),
        "store": str(store_path.relative_to(corpus)),
    }
