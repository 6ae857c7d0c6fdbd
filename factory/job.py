"""A training job, built once: model, optimizer, batches, perturbation, learning-rate schedule and
settings, from a run spec (`job_from_spec`) or from the same ingredients named directly (`build_job`).

    job = job_from_spec(spec, cfg)                 # a factory run
    loop = run_job(job, [callbacks ...])           # factory.loop: the one step loop

The factory's runs (`factory.train.run_one`), the HPO trials and the privacy-curve jobs are built here
and run by `factory.loop.run_job`, so they draw batches, schedule the learning rate and bend the step
with their perturbation in the same order. The ingredients (`make_optimizer`, `Batches`,
`lr_schedule`, `evaluate`, ...) are also used on their own by experiments that train a factory model
in their own loop.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from capture.lm import lm_loss
from factory.archs import build_arch
from factory.config import TrainingConfig
from factory.datasets import MODALITIES, TaskData, load_dataset
from factory.perturbations import SCHEDULES, Perturbation, RunSettings, make_perturbation
from pretrain.engine import warmup_cosine

if TYPE_CHECKING:
    from factory.config import FactoryConfig
    from factory.spec import RunSpec

__all__ = ["Batches", "Job", "build_job", "cached_dataset", "evaluate", "job_from_spec", "loss_fn", "lr_schedule",
           "make_optimizer", "run_seed", "run_settings", "step_lr"]


# ------------------------------------------------------------------ ingredients
@functools.lru_cache(maxsize=16)
def cached_dataset(name: str, image_size: int, max_train: int, max_val: int, root: str | None,
                   channels: int | None = None) -> TaskData:
    return load_dataset(name, image_size=image_size, channels=channels, seed=0, root=root, max_train=max_train, max_val=max_val)


OPTIMIZERS = ("adamw", "adam", "nadam", "radam", "sgd", "rmsprop", "adagrad", "lamb", "lion", "adafactor")


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """An optimizer by name (OPTIMIZERS) at `lr` and `weight_decay`: the usual recipe of each (SGD with
    Nesterov momentum 0.9; RMSprop without momentum, alpha 0.99, as torch and Keras default)."""
    if name == "adamw":  # foreach: one fused kernel per op over all tensors (torch picks per-tensor on CPU)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if name == "nadam":
        return torch.optim.NAdam(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, foreach=True)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if name == "lamb":  # Adam's direction, each layer's step scaled to its weight norm (timm's LAMB)
        from timm.optim import Lamb

        return Lamb(params, lr=lr, weight_decay=weight_decay)
    if name == "lion":
        from timm.optim import Lion

        return Lion(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def run_settings(pert: Perturbation, tc: TrainingConfig, arch: str, optimizer: str) -> RunSettings:
    """The recipe of one run (`tc.lr(arch, optimizer)`, the optimizer's weight decay) as its perturbation
    configures it."""
    return pert.configure(RunSettings(lr=tc.lr(arch, optimizer), weight_decay=tc.weight_decay[optimizer], optimizer=optimizer))


RESTART_CYCLES = 3  # schedule "restarts": cosine cycles after the warm-up (a peak at the start of each)
# schedule "step": x0.1 at each of these fractions of the run. Late drops: with drops at 50% and 75% the faults
# injected at 30-50% met a rate at a tenth or a hundredth, and 10 of 20 forgetting, 5 of 12 concept-bias and 6 of
# 16 instability runs of the first ~700 runs of the drawn cpu corpus showed no effect (constant: 12/14, 15/19, 11/13;
# counted from the stores' attributes with an ad-hoc script before those step-schedule runs were regenerated)
STEP_DROPS = (0.75, 0.9)


def lr_schedule(step: int, steps: int, warmup_frac: float, anneal: bool = True, schedule: str = "cosine",
                warmup_peak: float = 1.0) -> float:
    """The factory's schedules, as the multiplier of the base rate at `step` (0-based) of `steps`. Each
    starts with a linear warm-up over `warmup_frac` of the steps (at least one step), then:

    - "cosine": cosine from 1 to 0.1 at the end (`pretrain.engine.warmup_cosine`, the factory's default);
    - "constant": 1;
    - "step": 1, then x0.1 from STEP_DROPS[0] (75%) of the run and x0.1 again (0.01) from STEP_DROPS[1] (90%);
    - "warmup": the warm-up rises to `warmup_peak` (> 1: a warm-up bump), then settles to 1 along a
      half-cosine over half the warm-up's length, then 1 (a long `warmup_frac` makes the shape);
    - "restarts": RESTART_CYCLES cosine cycles from 1 to 0.1 (SGDR warm restarts: back to 1 at once).

    `anneal` False: constant after the warm-up whatever the schedule (Overfit's runs)."""
    warmup = max(1, int(warmup_frac * steps))
    if not anneal or schedule == "constant":
        return warmup_cosine(step, steps, warmup, 1.0)
    if schedule == "cosine":
        return warmup_cosine(step, steps, warmup, 0.1)
    if schedule == "warmup":
        if step < warmup:
            return warmup_peak * (step + 1) / warmup
        settle = max(1, warmup // 2)
        t = min(1.0, (step + 1 - warmup) / settle)
        return 1.0 + (warmup_peak - 1.0) * 0.5 * (1 + math.cos(math.pi * t))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        return 0.1 ** sum(step >= int(f * steps) for f in STEP_DROPS)
    if schedule == "restarts":
        cycle = max(1, math.ceil((steps - warmup) / RESTART_CYCLES))
        t = ((step - warmup) % cycle) / cycle
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {schedule!r}; known: {list(SCHEDULES)}")


def step_lr(settings: RunSettings, tc: TrainingConfig, pert: Perturbation, step: int) -> float:
    """The learning rate of one step: the run's base rate, its schedule (`settings.schedule`, warm-up
    `settings.warmup_frac` or else the TrainingConfig's) and the perturbation's factor."""
    warmup = tc.warmup_frac if settings.warmup_frac is None else settings.warmup_frac
    factor = lr_schedule(step, tc.steps, warmup, settings.anneal, settings.schedule, settings.warmup_peak)
    return settings.lr * factor * pert.lr_factor(step)


TABULAR_JITTER = 0.05  # std of the gaussian jitter on (standardised) tabular features
SEQUENCE_SHIFT = 2  # largest circular time shift of a sequence batch, in steps


class Batches:
    """Draws training batches for one run (`settings.batch_size`, else the TrainingConfig's), with light
    augmentation per modality when `settings.augment`: images a random shift of up to 2 pixels (no
    mirror flip: digits and 1-D signals are not mirror-symmetric, and the flip kept the small ViTs near
    chance within a run); tabular rows a small gaussian jitter (std TABULAR_JITTER on standardised
    features); sequences a random circular time shift of up to SEQUENCE_SHIFT steps; text windows none."""

    def __init__(self, data: TaskData, settings: RunSettings, tc: TrainingConfig, seed: int):
        if data.modality not in MODALITIES:
            raise ValueError(f"data.modality must be one of {MODALITIES}, got {data.modality!r} ({data.name})")
        self.data, self.tc, self.augment = data, tc, settings.augment
        self.batch_size = settings.batch_size or tc.batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.text = data.modality == "text"
        n = len(data.x_train) - tc.lm_context - 1 if self.text else len(data.x_train)
        pool = torch.arange(n)
        if settings.train_subset is not None:
            pool = pool[torch.randperm(n, generator=self.gen)[: settings.train_subset]]
        self.pool = pool

    def draw(self, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = pool[torch.randint(0, len(pool), (self.batch_size,), generator=self.gen)]
        if self.text:
            offsets = torch.arange(self.tc.lm_context)
            stream = self.data.x_train
            return stream[idx[:, None] + offsets], stream[idx[:, None] + offsets + 1]
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        if self.augment:
            x = self.augmented(x)
        return x, y

    def augmented(self, x: torch.Tensor) -> torch.Tensor:
        """One batch's augmentation (same shape out), by modality."""
        modality = self.data.modality
        if modality == "image":  # x: (B, C, S, S)
            dx, dy = torch.randint(-2, 3, (2,), generator=self.gen).tolist()
            return torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if modality == "tabular":  # x: (B, D)
            return x + TABULAR_JITTER * torch.randn(x.shape, generator=self.gen)
        # sequence, x: (B, T, C)
        shift = int(torch.randint(-SEQUENCE_SHIFT, SEQUENCE_SHIFT + 1, (1,), generator=self.gen))
        return torch.roll(x, shifts=shift, dims=1)


def loss_fn(out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The training loss: cross-entropy over classes, or over next tokens for (B, T, V) LM logits, with
    `label_smoothing` (the run's `RunSettings.label_smoothing`; 0: plain cross-entropy)."""
    if not label_smoothing:
        return lm_loss(out, y) if out.ndim == 3 else F.cross_entropy(out, y)
    if out.ndim == 3:  # (B, T, V) logits, (B, T) targets -> one row per token
        out, y = out.flatten(0, 1), y.flatten()
    return F.cross_entropy(out, y, label_smoothing=label_smoothing)


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


# ------------------------------------------------------------------ the job
@dataclass
class Job:
    """Everything the step loop (`factory.loop.run_job`) runs: built once by `build_job`."""

    arch: str
    optimizer_name: str
    data: TaskData
    training: TrainingConfig  # steps, batch size, warm-up (the other fields matter to the factory only)
    perturbation: Perturbation
    settings: RunSettings  # the recipe as the perturbation configured it
    seed: int
    model: nn.Module
    modules: list[str] | None  # capture hook points (`build_arch`'s second item; None: capture finds them)
    optimizer: torch.optim.Optimizer
    batches: Batches
    model_factory: Callable[[], nn.Module] | None = None  # a drawn run's family at its size; None: build_arch

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch of `step`: drawn from the perturbation's pool, then bent by it."""
        pool = self.perturbation.pool(step, self.batches.pool)
        return self.perturbation.batch(step, *self.batches.draw(pool))

    def lr(self, step: int) -> float:
        """The learning rate of `step` (`step_lr`)."""
        return step_lr(self.settings, self.training, self.perturbation, step)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of a step, label-smoothed as the recipe says (`settings.label_smoothing`);
        the step loop back-propagates `perturbation.scale_loss` of it."""
        return loss_fn(out, y, self.settings.label_smoothing)

    def make_model(self) -> nn.Module:
        """A fresh model of the job's architecture (draws its initial weights from torch's global RNG)."""
        if self.model_factory is not None:
            return self.model_factory()
        return build_arch(self.arch, self.data.num_classes, self.training.image_size)[0]

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """An optimizer of the job's kind at its base rate and weight decay."""
        return make_optimizer(self.optimizer_name, params, self.settings.lr, self.settings.weight_decay)


def build_job(arch: str, data: TaskData, optimizer: str, perturbation: Perturbation, training: TrainingConfig, seed: int,
              settings: RunSettings | None = None, model_factory: Callable[[], nn.Module] | None = None) -> Job:
    """Build a job: seed torch's global RNG with `seed`, tell the perturbation about the data, configure
    the recipe through it, then model, optimizer and batch sampler (in this order: the model's initial
    weights are the first draws after the seed). `settings`: the recipe before the perturbation
    configures it (None: the factory's, `training.lr(arch, optimizer)` and its weight decay).
    `model_factory`: builds the model (a drawn family at its drawn size; None: `build_arch(arch, ...)`)."""
    if data.modality not in perturbation.modalities:
        raise ValueError(f"perturbation {perturbation.name} does not apply to {data.modality} data ({data.name})")
    torch.manual_seed(seed)
    perturbation.bind(data.y_train, data.num_classes, seed)
    if hasattr(perturbation, "style"):  # a watermark stamps the corpus's style (its validation sets do too)
        perturbation.style = training.watermark
    if settings is None:
        settings = run_settings(perturbation, training, arch, optimizer)
    else:
        settings = perturbation.configure(replace(settings, optimizer=settings.optimizer or optimizer))
    model, modules = (model_factory(), None) if model_factory else build_arch(arch, data.num_classes, training.image_size)
    opt = make_optimizer(optimizer, model.parameters(), settings.lr, settings.weight_decay)
    batches = Batches(data, settings, training, seed)
    return Job(arch, optimizer, data, training, perturbation, settings, seed, model, modules, opt, batches, model_factory)


def run_seed(spec: RunSpec) -> int:
    """The seed of a factory run: stable per spec (from its run id)."""
    return int(spec.run_id.rsplit("-", 1)[1][:8], 16)


def job_from_spec(spec: RunSpec, cfg: FactoryConfig) -> Job:
    """The job of one factory run: its dataset, its perturbation preset and the corpus's training recipe
    (a grid run), or its drawn family, size and recipe (a drawn run, `drawn_job`)."""
    if spec.context:
        return drawn_job(spec, cfg)
    tc = cfg.training
    data = cached_dataset(spec.dataset, tc.image_size, tc.max_train, tc.max_val, cfg.data_root.get(spec.dataset))
    pert = make_perturbation(spec.perturbation, tc.steps)
    if data.modality not in pert.modalities:
        raise ValueError(f"perturbation {spec.perturbation} does not apply to {data.modality} data ({spec.dataset})")
    return build_job(spec.arch, data, spec.optimizer, pert, tc, run_seed(spec))


def drawn_job(spec: RunSpec, cfg: FactoryConfig) -> Job:
    """The job of a drawn run (factory.contexts): the dataset at its natural channels and size, the family
    at the drawn size, the drawn recipe; the run's length, batch size and warm-up replace the config's,
    and it is validated `contexts.epochs` times (every max_steps // epochs steps)."""
    from factory.datasets import dataset_info
    from factory.families import FAMILIES, InputShape, Size

    ctx = spec.ctx
    steps = int(ctx["max_steps"])
    info = dataset_info(spec.dataset)
    tc = replace(cfg.training, steps=steps, batch_size=int(ctx["batch_size"]), warmup_frac=float(ctx["warmup_frac"]),
                 eval_every=max(1, steps // cfg.contexts.epochs))
    image_size, channels = (info.dims[1], info.dims[0]) if info.modality == "image" else (tc.image_size, None)
    data = cached_dataset(spec.dataset, image_size, tc.max_train, tc.max_val, cfg.data_root.get(spec.dataset), channels)
    pert = make_perturbation(spec.perturbation, steps)
    family = FAMILIES[spec.arch]
    shape = InputShape(info.modality, tuple(info.dims), data.num_classes)
    size = Size(int(ctx["width"]), int(ctx["depth"]), ctx["norm"], ctx["act"], bool(ctx["residual"]))
    # the warm-up comes from `tc` (RunSettings' None), the batch size is tc's drawn one unless the perturbation
    # replaces it; Family.build checks the size
    settings = RunSettings(lr=float(ctx["lr"]), weight_decay=float(ctx["weight_decay"]), augment=bool(ctx["augment"]),
                           optimizer=spec.optimizer, schedule=ctx["schedule"], label_smoothing=float(ctx["label_smoothing"]),
                           batch_size=tc.batch_size)
    return build_job(spec.arch, data, spec.optimizer, pert, tc, run_seed(spec), settings=settings,
                     model_factory=lambda: family.build(shape, size))
