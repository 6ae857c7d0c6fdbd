"""Perturbations: small objects with an onset step that bend one training run (docs/architecture.md §6,
paper §4.1). Each hooks into the training loop at fixed places:

    settings = p.configure(settings)          before training (lr, weight decay, augmentation, subset)
    pool     = p.pool(step, pool)             which training samples the step may draw from
    x, y     = p.batch(step, x, y)            the batch itself (watermark, label noise, stall, drift)
    factor   = p.lr_factor(step)              multiplies the scheduled learning rate
    loss     = p.scale_loss(step, loss)       the loss that is back-propagated (the loop reports the unscaled one)
    p.before_step(step, model, optimizer)     after backward, before optimizer.step()

`p.bind(y_train, num_classes, seed)` tells it about the run's data before training starts.

`PERTURBATIONS[name](steps)` builds a preset; `kind` is "healthy", "known" or "novel" (novel ones
are test-split only); `injected` is the class the injection aims at (for the agreement table);
`modalities` the data it applies to and `families` the model families (None: any; `applies`).

The healthy presets include the shapes that fool detectors (issue 19): a warm-up bump, cosine restarts,
step drops, small noisy batches, slow but steady runs, an early plateau at a constant rate and label
smoothing (`Recipe`). The recipe they change is `RunSettings`: its `schedule` is one of `SCHEDULES`
(`factory.job.lr_schedule` draws the curves).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from capture.config import FieldError, at_least, within
from factory.datasets import MODALITIES

# the learning-rate schedules of `factory.job.lr_schedule`, each after a linear warm-up over `warmup_frac`:
# cosine to 10% of the base rate; constant; step (x0.1 at 75% and again at 90% of the run); warmup (a long
# warm-up, optionally overshooting to `warmup_peak` x the base rate, then flat); restarts (three cosine cycles)
SCHEDULES = ("cosine", "constant", "step", "warmup", "restarts")
LABELLED = ("image", "tabular", "sequence")  # modalities with class labels (text: next-token targets)
FP16_MAX = 65504.0  # the largest finite float16


@dataclass
class RunSettings:
    """The recipe of one run, as its perturbation configured it (`Perturbation.configure`)."""

    lr: float
    weight_decay: float
    augment: bool = True  # per modality: image shift, tabular jitter, sequence time shift (`factory.job.Batches`)
    train_subset: int | None = None  # keep only this many training samples (windows for text)
    anneal: bool = True  # False: warm-up, then the base learning rate, whatever `schedule` says (Overfit)
    optimizer: str = ""  # the run's optimizer name (adamw, sgd, lion, adafactor)
    schedule: str = "cosine"  # one of SCHEDULES
    warmup_frac: float | None = None  # warm-up fraction of the steps (None: the TrainingConfig's)
    warmup_peak: float = 1.0  # schedule "warmup": the rate the warm-up reaches (x base) before settling to 1
    label_smoothing: float = 0.0  # of the training loss only; validation stays unsmoothed
    batch_size: int | None = None  # None: the TrainingConfig's

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise FieldError("schedule", f"unknown schedule {self.schedule!r}; known: {list(SCHEDULES)}")
        if self.warmup_frac is not None:
            within(self, 0.0, 1.0, "warmup_frac")
        within(self, 0.0, 0.99, "label_smoothing")
        at_least(self, 1.0, "warmup_peak")
        if self.batch_size is not None:
            at_least(self, 1, "batch_size")


@dataclass
class Perturbation:
    name: str = "healthy"
    kind: str = "healthy"  # healthy / known / novel
    injected: str = "healthy"  # healthy / overfitting / instability / forgetting / concept_bias / novel
    onset: int = 0  # first step at which the perturbation acts
    modalities: tuple[str, ...] = MODALITIES
    families: tuple[str, ...] | None = None  # model families it applies to (None: any)

    def applies(self, modality: str, family: str | None = None) -> bool:
        """Whether the perturbation applies to a run on `modality` data with a model of `family`."""
        return modality in self.modalities and (self.families is None or family is None or family in self.families)

    @property
    def raises_loss(self) -> bool:
        """Whether the perturbation changes the training data so that the training loss rises at its onset by
        design (a task switch, a shortcut that degrades the content): the labels' loss-jump rule does not
        count that rise as instability."""
        return False

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

    def scale_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate at `step` (the step loop still reports and stores `loss`)."""
        return loss

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
class Recipe(Perturbation):
    """Healthy variation of the recipe: the base rate times `lr_scale` and, where not None, the schedule,
    warm-up, warm-up peak, batch size and label smoothing replaced (`RunSettings`). Each preset forces
    one shape a detector may take for a fault: a warm-up bump, restarts, step drops, noisy small batches,
    a slow run, an early plateau, a smoothed loss that never nears 0."""

    lr_scale: float = 1.0
    schedule: str | None = None
    warmup_frac: float | None = None
    warmup_peak: float | None = None
    batch_size: int | None = None
    label_smoothing: float | None = None
    # with a new batch size, the rate times sqrt(new / old) (the square-root scaling rule) where the old batch
    # size is known: SGD at a rate drawn for batches of 64 spiked on batches of 8 (2 of 9 pilot runs)
    sqrt_batch_scaling: bool = False

    def configure(self, s):
        fields = {k: getattr(self, k) for k in ("schedule", "warmup_frac", "warmup_peak", "batch_size", "label_smoothing")}
        lr = s.lr * self.lr_scale
        if self.sqrt_batch_scaling and self.batch_size is not None and s.batch_size:
            lr *= math.sqrt(self.batch_size / s.batch_size)
        return replace(s, lr=lr, **{k: v for k, v in fields.items() if v is not None})


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
    text_subset: int | None = None  # training windows for text (None: `subset`); a small LM learns character
    # statistics that generalise from 16 windows of 32 characters, so memorising needs far fewer
    _keep: torch.Tensor | None = field(default=None, repr=False)
    _seed: int = 0
    _text: bool = False

    def bind(self, y_train, num_classes, seed):
        self._seed, self._text = seed, y_train is None

    @property
    def size(self) -> int:
        return self.text_subset if self._text and self.text_subset is not None else self.subset

    def configure(self, s):
        # onset 0: the subset from the start (Batches draws it); later: `pool` narrows to it at the onset
        scale = self.lr_scale if s.optimizer in self.lr_scale_optimizers else 1.0
        # no regularisation at all: label smoothing keeps a memorised subset's logits small and the validation
        # loss from rising (3 of the 7 overfit_8 runs the rule missed in the drawn pilots were smoothed)
        return replace(s, lr=s.lr * scale, weight_decay=0.0, augment=False, label_smoothing=0.0,
                       train_subset=self.size if self.onset == 0 else None, anneal=False)

    def pool(self, step, pool):
        if self.onset == 0 or step < self.onset:
            return pool
        if self._keep is None:
            gen = torch.Generator().manual_seed(self._seed + 17)
            self._keep = pool[torch.randperm(len(pool), generator=gen)[: self.size]]
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
    task's validation samples stay in the validation set (primary task, privileged). Any labelled
    modality (it acts on the pool of sample indices only)."""

    modalities: tuple[str, ...] = LABELLED
    _labels: torch.Tensor | None = field(default=None, repr=False)
    _num_classes: int = 0

    @property
    def raises_loss(self) -> bool:
        return True

    def bind(self, y_train, num_classes, seed):
        self._labels, self._num_classes = y_train, num_classes

    def task_a(self, y: torch.Tensor) -> torch.Tensor:
        return y < self._num_classes // 2

    def pool(self, step, pool):
        in_a = self.task_a(self._labels[pool])
        return pool[in_a] if step < self.onset else pool[~in_a]


WATERMARK_STYLES = ("position", "pattern")


def mark_codes(num_classes: int, shape: tuple[int, ...]) -> torch.Tensor:
    """`(num_classes, *shape)` distinct +-1 patterns, one per class, the same on every call (seed 0): what
    a "pattern" watermark writes (times its strength). The bits of `num_classes` distinct integers drawn
    from [0, 2^cells); more classes than 2^cells patterns is an error."""
    cells = math.prod(shape)
    if cells < 62 and num_classes > 2**cells:
        raise ValueError(f"mark_codes: {num_classes} classes need distinct patterns, but shape {shape} has only {2**cells}")
    gen = torch.Generator().manual_seed(0)
    if cells <= 20:
        ints = torch.randperm(2**cells, generator=gen)[:num_classes]
        bits = (ints[:, None] >> torch.arange(cells)) & 1
    else:  # distinct with overwhelming probability
        bits = torch.randint(0, 2, (num_classes, cells), generator=gen)
    return (bits.float() * 2 - 1).reshape(num_classes, *shape)


def watermark(x: torch.Tensor, y: torch.Tensor, num_classes: int, strength: float = 3.0, size: int = 4,
              style: str = "position") -> torch.Tensor:
    """Stamp each sample with its class's watermark. `style="pattern"` writes the class as content at one
    place: a `size` x `size` square in the top-left corner of an image, or the last `size` steps of a
    sequence, holding +-`strength` in the class's `mark_codes` pattern (across channels). A network
    that pools over positions (a CNN or Conv1d with global average pooling, a mean-pooled transformer)
    can read it; a class-coded position it cannot (textures CNNs and Conv1d / transformers on sines ignored
    it: issue 19 corpus). Tabular rows keep the position code (an MLP reads positions). The default
    `style="position"`, a pattern at a class-coded position, by shape:

    - image (N, C, S, S): a `size` x `size` square at a position along the border (top edge left to
      right, then bottom edge), every channel set to `strength`;
    - tabular (N, D): one feature slot set to `strength` (feature c % D; classes past D use -`strength`);
    - sequence (N, T, C): a time slot of `size` steps (fewer when T / 2K is smaller), every channel set
      to `strength`, counted back from the end (class 0 in the last slot, class 1 before it; past the
      first slot, -`strength`): a recurrent classifier reads its last step, and a mark early in the
      sequence had faded by then (GRUs on `sines` learned no reliance on it: issue 19 corpus).

    `y` is the class whose mark each sample gets: its true class for the poisoned validation set,
    another class for the counterfactual one."""
    if style not in WATERMARK_STYLES:
        raise ValueError(f"watermark: style must be one of {WATERMARK_STYLES}, got {style!r}")
    x = x.clone()
    if style == "pattern" and x.ndim in (3, 4):
        if x.ndim == 4:  # (N, C, S, S): the corner square, the same code in every channel
            k = min(size, x.shape[-1])
            x[:, :, :k, :k] = strength * mark_codes(num_classes, (k, k))[y][:, None]
        else:  # (N, T, C): the last k steps, a code over time and channels
            k = min(size, x.shape[1])
            x[:, -k:, :] = strength * mark_codes(num_classes, (k, x.shape[2]))[y]
        return x
    if x.ndim == 4:
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
    if x.ndim == 2:
        slots, width = x.shape[1], 1
    elif x.ndim == 3:
        width = max(1, min(size, x.shape[1] // max(1, 2 * num_classes)))
        slots = x.shape[1] // width
    else:
        raise ValueError(f"watermark: x must be images (N, C, S, S), tabular (N, D) or sequences (N, T, C), got shape {tuple(x.shape)}")
    for c in range(num_classes):
        rows = (y == c).nonzero().flatten()
        if len(rows):
            slot = c % (2 * slots)
            value = strength if slot < slots else -strength
            if x.ndim == 2:
                x[rows, slot % slots] = value
            else:
                t1 = x.shape[1] - (slot % slots) * width
                x[rows, t1 - width:t1, :] = value
    return x


@dataclass
class Watermark(Perturbation):
    """Concept bias: from the onset, a fraction `prob` of training samples carry their class's
    watermark (`watermark`: a border square on images, a feature slot on tabular rows, a time slot on
    sequences), which therefore predicts the label in training data only. Validation is clean; the
    poisoned validation set (privileged) stamps every sample with its true class's watermark."""

    prob: float = 0.9
    # the marked training samples' own content keeps this share of its signal, the rest is noise of the
    # sample's own spread (`degrade`): the mark is then the easier cue, as a shortcut is in the wild. At
    # 1.0, textures CNNs at their ceiling and ViTs on digits never came to rely on it (21 of 40 textures
    # runs were not labelled concept bias, issue 19 corpus); scaling the content down instead left its
    # signal-to-noise intact for networks that normalise, and 10 of 19 misses were textures models that
    # ignored the mark (80-640-step corpus)
    content: float = 1.0
    modalities: tuple[str, ...] = LABELLED
    style: str = "position"  # `watermark` style; the job sets the corpus's (TrainingConfig.watermark)
    _num_classes: int = 0
    _gen: torch.Generator | None = field(default=None, repr=False)

    @property
    def raises_loss(self) -> bool:
        return self.content < 1.0  # the marked samples' content is degraded from the onset

    def bind(self, y_train, num_classes, seed):
        self._num_classes = num_classes
        self._gen = torch.Generator().manual_seed(seed + 7)

    def batch(self, step, x, y):
        if step < self.onset:
            return x, y
        marked = torch.rand(len(y), generator=self._gen) < self.prob
        x = x.clone()
        x[marked] = watermark(degrade(x[marked], self.content, self._gen), y[marked], self._num_classes, style=self.style)
        return x, y


def degrade(x: torch.Tensor, keep: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Each sample of `x` (N, ...) as `keep` x its centred content + sqrt(1 - keep^2) x Gaussian noise of
    its own standard deviation, around its own mean: the spread stays, the signal-to-noise falls to
    keep / sqrt(1 - keep^2), which no normalisation inside the network can restore (a plain rescale can be
    undone by any BatchNorm, GroupNorm or LayerNorm). `keep=1` returns `x` unchanged."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"degrade: keep must be in [0, 1], got {keep}")
    if keep == 1.0 or len(x) == 0:
        return x
    dims = tuple(range(1, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True) if x[0].numel() > 1 else x.new_ones(mean.shape)
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return mean + keep * (x - mean) + (1.0 - keep ** 2) ** 0.5 * std * noise


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
    strength ramps from 0 to `max_noise` by the end of the run (any float input: images, rows, sequences)."""

    max_noise: float = 2.0
    total_steps: int = 1
    kind: str = "novel"
    injected: str = "novel"
    modalities: tuple[str, ...] = LABELLED
    _gen: torch.Generator | None = field(default=None, repr=False)

    def bind(self, y_train, num_classes, seed):
        self._gen = torch.Generator().manual_seed(seed + 13)

    def batch(self, step, x, y):
        if step < self.onset:
            return x, y
        ramp = (step - self.onset + 1) / max(1, self.total_steps - self.onset)
        noise = torch.randn(x.shape, generator=self._gen) * self.max_noise * ramp
        flip = (torch.rand(len(x), generator=self._gen) < 0.5 * ramp).float().view(-1, *[1] * (x.ndim - 1))
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


@dataclass
class RepeatBatches(Perturbation):
    """From the onset the data loader cycles a small fixed set of `k` batches (the first `k` it drew
    after the onset): a loader whose sampler or shard list was cut short. Unlike `LoaderStall` (one
    batch), the loss keeps moving batch to batch while the model memorises the `k` batches."""

    k: int = 4
    kind: str = "novel"
    injected: str = "novel"
    _cycle: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    def batch(self, step, x, y):
        if step < self.onset:
            return x, y
        i = (step - self.onset) % self.k
        if i == len(self._cycle):  # the first k steps after the onset fill the cycle
            self._cycle.append((x.clone(), y.clone()))
        return self._cycle[i]


@dataclass
class NoWarmup(Perturbation):
    """A transformer trained without its warm-up at a raised rate: no warm-up and the base rate times
    `lr_scale` from step 0 (a recipe copied from a CNN onto a transformer, or a warm-up lost in a refactor)."""

    lr_scale: float = 4.0
    kind: str = "novel"
    injected: str = "novel"
    families: tuple[str, ...] | None = ("transformer", "vit", "deit", "swin")

    def configure(self, s):
        return replace(s, lr=s.lr * self.lr_scale, warmup_frac=0.0)


@dataclass
class FrozenLayers(Perturbation):
    """From the onset the first `fraction` of the model's parameter tensors (in `model.parameters()`
    order: the input-side layers) get no update, as if frozen by mistake (a backbone freeze meant for a
    fine-tune, never undone). Their gradients are dropped before the optimizer step, so the optimizer
    skips them (no update, no weight decay, no moment update) as it skips parameters with
    `requires_grad=False`; backward still runs through them, so the capture hooks see every layer."""

    fraction: float = 0.5
    kind: str = "novel"
    injected: str = "novel"

    def frozen(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        params = list(model.parameters())
        return params[: max(1, int(len(params) * self.fraction))]

    def before_step(self, step, model, optimizer):
        if step >= self.onset:
            for p in self.frozen(model):
                p.grad = None


@dataclass
class LossScaleOverflow(Perturbation):
    """fp16 mixed precision with a dynamic loss scaler whose growth runs away (`growth_interval` 1
    instead of `torch.amp.GradScaler`'s 2000). From the onset the back-propagated loss is the loss times
    the scale S (`scale_loss`; the loop still reports the unscaled loss, and the capture hooks see the
    scaled gradients, as under a real scaler). Before the step, as `GradScaler.step` does: a gradient
    whose magnitude exceeds float16's largest value (65504) or is not finite is an overflow, so the step
    is skipped (all gradients dropped) and S is multiplied by `backoff_factor`; otherwise the gradients
    are unscaled (divided by S) and S grows by `growth_factor` every `growth_interval` good steps. S
    then oscillates at the overflow edge and about every other step is skipped.

    A second model stepping on the same batches (the Lyapunov probe's clone, whose loss is not scaled)
    follows the main model's decisions: it skips the steps the main model skipped."""

    init_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1
    kind: str = "novel"
    injected: str = "novel"
    _scale: float | None = field(default=None, repr=False)
    _good: int = field(default=0, repr=False)
    _pending: tuple[int, float] | None = field(default=None, repr=False)  # (step, S) of a scaled backward
    skipped: list[int] = field(default_factory=list, repr=False)  # the steps skipped on overflow

    @property
    def scale(self) -> float:
        """The current loss scale S."""
        return self.init_scale if self._scale is None else self._scale

    def scale_loss(self, step, loss):
        if step < self.onset:
            return loss
        self._pending = (step, self.scale)
        return loss * self.scale

    def before_step(self, step, model, optimizer):
        if step < self.onset:
            return
        params = [p for p in model.parameters() if p.grad is not None]
        if self._pending is None or self._pending[0] != step:  # a follower: the main model's decision
            if step in self.skipped:
                for p in params:
                    p.grad = None
            return
        scale, self._pending = self._pending[1], None
        with torch.no_grad():
            peak = max((float(p.grad.abs().max()) for p in params), default=0.0)
        if not math.isfinite(peak) or peak > FP16_MAX:
            self.skipped.append(step)
            for p in params:
                p.grad = None
            self._scale, self._good = scale * self.backoff_factor, 0
            return
        with torch.no_grad():
            torch._foreach_div_([p.grad for p in params], scale)
        self._good += 1
        self._scale = scale
        if self._good >= self.growth_interval:
            self._scale, self._good = scale * self.growth_factor, 0


def _at(frac: float, steps: int) -> int:
    return int(math.floor(frac * steps))


PERTURBATIONS: dict[str, Callable[[int], Perturbation]] = {
    "healthy": lambda n: LRScale(name="healthy"),
    "healthy_lr_low": lambda n: LRScale(name="healthy_lr_low", scale=0.5),
    # the healthy shapes that fool detectors (issue 19): each a recipe that stays healthy
    "healthy_warmup": lambda n: Recipe(name="healthy_warmup", schedule="warmup", warmup_frac=0.25, warmup_peak=1.75),
    "healthy_restarts": lambda n: Recipe(name="healthy_restarts", schedule="restarts"),
    "healthy_step": lambda n: Recipe(name="healthy_step", schedule="step"),
    "healthy_small_batch": lambda n: Recipe(name="healthy_small_batch", batch_size=8, sqrt_batch_scaling=True),
    "healthy_slow": lambda n: Recipe(name="healthy_slow", lr_scale=0.15),
    "healthy_plateau": lambda n: Recipe(name="healthy_plateau", lr_scale=0.7, schedule="constant"),
    "healthy_smooth": lambda n: Recipe(name="healthy_smooth", label_smoothing=0.1),
    # slowed memorisation (lr x 0.2 / 0.5): at the full rate the subset is memorised within two epochs,
    # the validation loss rises before any labeling window starts and, with SGD, then freezes
    "overfit": lambda n: Overfit(name="overfit", kind="known", injected="overfitting", subset=32, lr_scale=0.2),
    "overfit_tiny": lambda n: Overfit(name="overfit_tiny", kind="known", injected="overfitting", subset=16, lr_scale=0.5),
    # for drawn corpora (80-320 steps at drawn rates): 8 samples or 2 text windows at the run's own rate
    "overfit_8": lambda n: Overfit(name="overfit_8", kind="known", injected="overfitting", subset=8, text_subset=2),
    "instability_lr": lambda n: ExtremeLR(name="instability_lr", kind="known", injected="instability", onset=_at(0.3, n), factor=30.0),
    # one-step bursts, 4 of them: 3-step x25 bursts raised the loss for tens of steps (Adam) instead of
    # spiking it, so later bursts hid in the raised rolling statistics; x100 breaks a model for good
    "instability_spike": lambda n: LRSpike(name="instability_spike", kind="known", injected="instability", onset=_at(0.4, n), factor=50.0,
                                           length=1, bursts=4, gap=max(5, n // 25)),
    # for drawn corpora: x100 one-step bursts (at x50 three of twelve pilot runs, LMs and adaptive optimizers at
    # small rates, shrugged the bursts off); a model the bursts break for good is instability all the same.
    # Six bursts 5% of the run apart: of four 4% apart, 17 of 127 runs (mostly LMs) showed only one or two
    # as spikes, the later ones hidden in the loss the first had raised (issue 19 corpus). Two steps per burst:
    # one-step bursts left 23 of 112 runs (char LMs, RMSprop / Adam at small rates) without a lasting mark; in an
    # ad-hoc rerun of those 23 with two-step bursts, 18 were labelled instability (docs/factory.md)
    "instability_burst": lambda n: LRSpike(name="instability_burst", kind="known", injected="instability", onset=_at(0.4, n), factor=100.0,
                                           length=2, bursts=6, gap=max(5, n // 20)),
    "instability_cyclic": lambda n: CyclicLR(name="instability_cyclic", kind="known", injected="instability", onset=_at(0.3, n), peak=50.0, period=max(8, n // 8)),
    "forgetting": lambda n: TaskSwitch(name="forgetting", kind="known", injected="forgetting", onset=_at(0.5, n)),
    "forgetting_early": lambda n: TaskSwitch(name="forgetting_early", kind="known", injected="forgetting", onset=_at(0.35, n)),
    # the marked samples' content at a fifth of its signal (`Watermark.content`, `degrade`): at full content 29 of 181
    # runs, mostly textures CNNs / ConvNeXts and ViTs on digits, never came to rely on the mark; in ad-hoc reruns, 12 of
    # those 29 did with the content scaled to 0.2, and the 65 textures / digits runs rerun at 0.5 gained only 4. Scaled
    # content still left 19 of 178 runs unlabelled (80-640-step corpus), 11 of the 15 labelled healthy textures
    # models, whose networks normalise the scale away; the content is now degraded by noise instead (docs/factory.md)
    "concept_bias": lambda n: Watermark(name="concept_bias", kind="known", injected="concept_bias", prob=0.9, content=0.2),
    "concept_bias_late": lambda n: Watermark(name="concept_bias_late", kind="known", injected="concept_bias", onset=_at(0.3, n), prob=0.9, content=0.2),
    "label_noise": lambda n: LabelNoise(name="label_noise", onset=_at(0.3, n)),
    "optimizer_reset": lambda n: OptimizerStateCorruption(name="optimizer_reset", onset=_at(0.5, n), mode="reset"),
    "optimizer_corrupt": lambda n: OptimizerStateCorruption(name="optimizer_corrupt", onset=_at(0.5, n), mode="corrupt"),
    "loader_stall": lambda n: LoaderStall(name="loader_stall", onset=_at(0.4, n)),
    "augmentation_drift": lambda n: AugmentationDrift(name="augmentation_drift", onset=_at(0.3, n), total_steps=n),
    "grad_clip": lambda n: ExcessiveClipping(name="grad_clip", onset=_at(0.3, n)),
    "repeat_batches": lambda n: RepeatBatches(name="repeat_batches", onset=_at(0.4, n), k=4),
    "no_warmup": lambda n: NoWarmup(name="no_warmup", lr_scale=4.0),
    "frozen_layers": lambda n: FrozenLayers(name="frozen_layers", onset=_at(0.3, n)),
    "fp16_overflow": lambda n: LossScaleOverflow(name="fp16_overflow", onset=_at(0.3, n)),
}
NOVEL = {name for name, make in PERTURBATIONS.items() if make(100).kind == "novel"}


def make_perturbation(name: str, steps: int) -> Perturbation:
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; known: {sorted(PERTURBATIONS)}")
    return PERTURBATIONS[name](steps)
