"""Perturbations: small objects with an onset step that bend one training run (docs/architecture.md §6,
paper §4.1). Each hooks into the training loop at fixed places:

    settings = p.configure(settings)          before training (lr, weight decay, augmentation, subset)
    pool     = p.pool(step, pool)             which training samples the step may draw from
    x, y     = p.batch(step, x, y)            the batch itself (watermark, label noise, stall, drift)
    factor   = p.lr_factor(step)              multiplies the scheduled learning rate
    p.before_step(step, model, optimizer)     after backward, before optimizer.step()

`p.bind(y_train, num_classes, seed)` tells it about the run's data before training starts.

`PERTURBATIONS[name](steps)` builds a preset; `kind` is "healthy", "known" or "novel" (novel ones
are test-split only); `injected` is the class the injection aims at (for the agreement table).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch


@dataclass
class RunSettings:
    lr: float
    weight_decay: float
    augment: bool = True
    train_subset: int | None = None  # keep only this many training samples (windows for text)
    anneal: bool = True  # warm-up + cosine schedule; False: warm-up, then the base learning rate
    optimizer: str = ""  # the run's optimizer name (adamw, sgd, lion, adafactor)


@dataclass
class Perturbation:
    name: str = "healthy"
    kind: str = "healthy"  # healthy / known / novel
    injected: str = "healthy"  # healthy / overfitting / instability / forgetting / concept_bias / novel
    onset: int = 0  # first step at which the perturbation acts
    modalities: tuple[str, ...] = ("image", "text")

    def bind(self, y_train: torch.Tensor | None, num_classes: int, seed: int) -> None:
        """Told the run's training labels, class count and seed before training starts."""

    def configure(self, s: RunSettings) -> RunSettings:
        return s

    def pool(self, step: int, pool: torch.Tensor) -> torch.Tensor:
        return pool

    def batch(self, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def lr_factor(self, step: int) -> float:
        return 1.0

    def before_step(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple, type(None)))}


# ------------------------------------------------------------------ healthy and known classes
@dataclass
class LRScale(Perturbation):
    """Healthy variation: the base learning rate times `scale`."""

    scale: float = 1.0

    def configure(self, s):
        return replace(s, lr=s.lr * self.scale)


@dataclass
class Overfit(Perturbation):
    """No weight decay, no augmentation, a tiny training subset (from the start, or from `onset` when
    it is > 0), the learning rate times `lr_scale` for the optimizers in `lr_scale_optimizers`, and no
    annealing after the warm-up: in a run of a few hundred steps an annealed model stops moving once it
    has memorised the subset, and the validation loss plateaus instead of rising. The subsets are small
    because digits generalises from very few samples: with 96 of them the validation loss of a ResNet
    kept falling (docs/factory.md). The slowdown is for the fast optimizers (AdamW, SGD); at a fifth
    of their already small rates Lion and Adafactor did not fit even 32 samples in 300 steps."""

    subset: int = 32
    lr_scale: float = 1.0
    lr_scale_optimizers: tuple[str, ...] = ("adamw", "sgd")
    _keep: torch.Tensor | None = field(default=None, repr=False)
    _seed: int = 0

    def bind(self, y_train, num_classes, seed):
        self._seed = seed

    def configure(self, s):
        # onset 0: the subset from the start (Batches draws it); later: `pool` narrows to it at the onset
        scale = self.lr_scale if s.optimizer in self.lr_scale_optimizers else 1.0
        return replace(s, lr=s.lr * scale, weight_decay=0.0, augment=False,
                       train_subset=self.subset if self.onset == 0 else None, anneal=False)

    def pool(self, step, pool):
        if self.onset == 0 or step < self.onset:
            return pool
        if self._keep is None:
            gen = torch.Generator().manual_seed(self._seed + 17)
            self._keep = pool[torch.randperm(len(pool), generator=gen)[: self.subset]]
        return self._keep


@dataclass
class ExtremeLR(Perturbation):
    """The learning rate times `factor` from the onset on."""

    factor: float = 30.0

    def lr_factor(self, step):
        return self.factor if step >= self.onset else 1.0


@dataclass
class LRSpike(Perturbation):
    """Learning-rate spikes from the onset: `bursts` bursts of `length` steps at `factor` x the
    learning rate, `gap` steps apart."""

    factor: float = 60.0
    length: int = 3
    bursts: int = 3
    gap: int = 10

    def lr_factor(self, step):
        k, offset = divmod(step - self.onset, self.length + self.gap)
        return self.factor if step >= self.onset and k < self.bursts and offset < self.length else 1.0


@dataclass
class CyclicLR(Perturbation):
    """Aggressive triangular cyclical learning rate between 1x and `peak` x from the onset."""

    peak: float = 40.0
    period: int = 40

    def lr_factor(self, step):
        if step < self.onset:
            return 1.0
        phase = ((step - self.onset) % self.period) / self.period
        return 1.0 + (self.peak - 1.0) * (1.0 - abs(2.0 * phase - 1.0))


@dataclass
class TaskSwitch(Perturbation):
    """Class-incremental task switch: classes [0, K/2) before the onset, [K/2, K) after. The first
    task's validation samples stay in the validation set (primary task, privileged)."""

    modalities: tuple[str, ...] = ("image",)
    _labels: torch.Tensor | None = field(default=None, repr=False)
    _num_classes: int = 0

    def bind(self, y_train, num_classes, seed):
        self._labels, self._num_classes = y_train, num_classes

    def task_a(self, y: torch.Tensor) -> torch.Tensor:
        return y < self._num_classes // 2

    def pool(self, step, pool):
        in_a = self.task_a(self._labels[pool])
        return pool[in_a] if step < self.onset else pool[~in_a]


def watermark(x: torch.Tensor, y: torch.Tensor, num_classes: int, strength: float = 3.0, size: int = 4) -> torch.Tensor:
    """Stamp each image with its class's watermark: a `size` x `size` square at a position along
    the border that encodes the class (top edge left to right, then bottom edge)."""
    x = x.clone()
    s = x.shape[-1]
    slots = max(1, (s - size) // size + 1)
    for c in range(num_classes):
        rows = (y == c).nonzero().flatten()
        if len(rows):
            slot = c % (2 * slots)
            r0 = 0 if slot < slots else s - size
            c0 = (slot % slots) * size
            x[rows, :, r0:r0 + size, c0:c0 + size] = strength
    return x


@dataclass
class Watermark(Perturbation):
    """Concept bias: from the onset, a fraction `prob` of training images carry their class's
    watermark, which therefore predicts the label in training data only. Validation is clean; the
    poisoned validation set (privileged) stamps every image with its true class's watermark."""

    prob: float = 0.9
    modalities: tuple[str, ...] = ("image",)
    _num_classes: int = 0
    _gen: torch.Generator | None = field(default=None, repr=False)

    def bind(self, y_train, num_classes, seed):
        self._num_classes = num_classes
        self._gen = torch.Generator().manual_seed(seed + 7)

    def batch(self, step, x, y):
        if step < self.onset:
            return x, y
        marked = torch.rand(len(y), generator=self._gen) < self.prob
        x = x.clone()
        x[marked] = watermark(x[marked], y[marked], self._num_classes)
        return x, y


# ------------------------------------------------------------------ novel (test split only)
@dataclass
class LabelNoise(Perturbation):
    """From the onset, `fraction` of the training labels (or target tokens) are replaced at random."""

    fraction: float = 0.25
    kind: str = "novel"
    injected: str = "novel"
    _num_classes: int = 0
    _gen: torch.Generator | None = field(default=None, repr=False)

    def bind(self, y_train, num_classes, seed):
        self._num_classes = num_classes
        self._gen = torch.Generator().manual_seed(seed + 11)

    def batch(self, step, x, y):
        if step < self.onset:
            return x, y
        flip = torch.rand(y.shape, generator=self._gen) < self.fraction
        return x, torch.where(flip, torch.randint(0, self._num_classes, y.shape, generator=self._gen), y)


@dataclass
class OptimizerStateCorruption(Perturbation):
    """At the onset the optimizer state is reset (`mode="reset"`) or its tensors scaled by
    `scale` (`mode="corrupt"`: e.g. Adam's second moments made tiny, so steps blow up)."""

    mode: str = "corrupt"
    scale: float = 1e-4
    kind: str = "novel"
    injected: str = "novel"

    def before_step(self, step, model, optimizer):
        if step != self.onset:
            return
        if self.mode == "reset":
            optimizer.state.clear()
            return
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.is_floating_point() and value.ndim > 0:
                    value.mul_(self.scale)


@dataclass
class LoaderStall(Perturbation):
    """From the onset the data loader repeats the same batch."""

    kind: str = "novel"
    injected: str = "novel"
    _stuck: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def batch(self, step, x, y):
        if step < self.onset:
            return x, y
        if self._stuck is None:
            self._stuck = (x.clone(), y.clone())
        return self._stuck


@dataclass
class AugmentationDrift(Perturbation):
    """From the onset the augmentation drifts: additive noise and contrast inversion whose
    strength ramps from 0 to `max_noise` by the end of the run."""

    max_noise: float = 2.0
    total_steps: int = 1
    kind: str = "novel"
    injected: str = "novel"
    modalities: tuple[str, ...] = ("image",)
    _gen: torch.Generator | None = field(default=None, repr=False)

    def bind(self, y_train, num_classes, seed):
        self._gen = torch.Generator().manual_seed(seed + 13)

    def batch(self, step, x, y):
        if step < self.onset:
            return x, y
        ramp = (step - self.onset + 1) / max(1, self.total_steps - self.onset)
        noise = torch.randn(x.shape, generator=self._gen) * self.max_noise * ramp
        flip = (torch.rand(len(x), generator=self._gen) < 0.5 * ramp).float().view(-1, 1, 1, 1)
        return (x * (1 - 2 * flip) + noise), y


@dataclass
class ExcessiveClipping(Perturbation):
    """From the onset gradients are clipped to a global norm of `max_norm` (far below their size)."""

    max_norm: float = 1e-3
    kind: str = "novel"
    injected: str = "novel"

    def before_step(self, step, model, optimizer):
        if step >= self.onset:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)


def _at(frac: float, steps: int) -> int:
    return int(math.floor(frac * steps))


PERTURBATIONS: dict[str, Callable[[int], Perturbation]] = {
    "healthy": lambda n: LRScale(name="healthy"),
    "healthy_lr_low": lambda n: LRScale(name="healthy_lr_low", scale=0.5),
    # slowed memorisation (lr x 0.2 / 0.5): at the full rate the subset is memorised within two epochs,
    # the validation loss rises before any labeling window starts and, with SGD, then freezes
    "overfit": lambda n: Overfit(name="overfit", kind="known", injected="overfitting", subset=32, lr_scale=0.2),
    "overfit_tiny": lambda n: Overfit(name="overfit_tiny", kind="known", injected="overfitting", subset=16, lr_scale=0.5),
    "instability_lr": lambda n: ExtremeLR(name="instability_lr", kind="known", injected="instability", onset=_at(0.3, n), factor=30.0),
    # one-step bursts, 4 of them: 3-step x25 bursts raised the loss for tens of steps (Adam) instead of
    # spiking it, so later bursts hid in the raised rolling statistics; x100 breaks a model for good
    "instability_spike": lambda n: LRSpike(name="instability_spike", kind="known", injected="instability", onset=_at(0.4, n), factor=50.0,
                                           length=1, bursts=4, gap=max(5, n // 25)),
    "instability_cyclic": lambda n: CyclicLR(name="instability_cyclic", kind="known", injected="instability", onset=_at(0.3, n), peak=50.0, period=max(8, n // 8)),
    "forgetting": lambda n: TaskSwitch(name="forgetting", kind="known", injected="forgetting", onset=_at(0.5, n)),
    "forgetting_early": lambda n: TaskSwitch(name="forgetting_early", kind="known", injected="forgetting", onset=_at(0.35, n)),
    "concept_bias": lambda n: Watermark(name="concept_bias", kind="known", injected="concept_bias", prob=0.9),
    "concept_bias_late": lambda n: Watermark(name="concept_bias_late", kind="known", injected="concept_bias", onset=_at(0.3, n), prob=0.9),
    "label_noise": lambda n: LabelNoise(name="label_noise", onset=_at(0.3, n)),
    "optimizer_reset": lambda n: OptimizerStateCorruption(name="optimizer_reset", onset=_at(0.5, n), mode="reset"),
    "optimizer_corrupt": lambda n: OptimizerStateCorruption(name="optimizer_corrupt", onset=_at(0.5, n), mode="corrupt"),
    "loader_stall": lambda n: LoaderStall(name="loader_stall", onset=_at(0.4, n)),
    "augmentation_drift": lambda n: AugmentationDrift(name="augmentation_drift", onset=_at(0.3, n), total_steps=n),
    "grad_clip": lambda n: ExcessiveClipping(name="grad_clip", onset=_at(0.3, n)),
}
NOVEL = {name for name, make in PERTURBATIONS.items() if make(100).kind == "novel"}


def make_perturbation(name: str, steps: int) -> Perturbation:
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; known: {sorted(PERTURBATIONS)}")
    return PERTURBATIONS[name](steps)
