"""The faults of the field benchmark, injected where a user's bug or bad luck would put them.

Every fault is a small class with no-op hooks (shaped like a Lightning callback) that the job's own
code calls at the place the bug lives:

- `lr_factor(step)`: the learning-rate multiplier, given to a `torch.optim.lr_scheduler.LambdaLR` the
  loop steps after each optimizer step (a bad schedule / a wrong config value);
- `pool(step, task)`: which training samples batches may come from (`data.BatchStream`);
- `batch(step, x, y, idx, task)`: the drawn batch as the bug changes it (`data.BatchStream`);
- `on_step_start(step, optimizer)`: before the step's forward (a resume that loses the optimizer state).

Each fault starts at `onset` (an optimizer step) and lasts to the end of the run, except the optimizer
reset, which is one event. `EXPECTED` names the alerts that count as naming the fault correctly
(docs/benchmark/field.md says why for each).
"""
from __future__ import annotations

import numpy as np
import torch

from eval.field.data import Task


class Fault:
    """Healthy: every hook is a no-op. `onset` is still set, so healthy runs are scored over the same
    stretch (alerts from `onset` on) as the faulted runs of the job."""

    name = "healthy"

    def __init__(self, onset: int, seed: int = 0):
        self.onset, self.seed = onset, seed
        self.rng = np.random.default_rng(seed + 7919)
        self._cache: dict[str, np.ndarray] = {}

    def active(self, step: int) -> bool:
        return step >= self.onset

    def lr_factor(self, step: int) -> float:
        return 1.0

    def pool(self, step: int, task: Task) -> np.ndarray | None:
        return None

    def batch(self, step: int, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
              task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def on_step_start(self, step: int, optimizer) -> None:
        pass

    def describe(self) -> str:
        return "no fault"

    def _fixed(self, key: str, make) -> np.ndarray:
        """A per-sample array drawn once per run (the data set's bug is fixed, not re-drawn per batch)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


class LRRaise(Fault):
    """The learning rate x `factor` from the onset to the end (a schedule or config mistake)."""

    name = "lr_raise"

    def __init__(self, onset: int, seed: int = 0, factor: float = 20.0):
        super().__init__(onset, seed)
        self.factor = factor

    def lr_factor(self, step: int) -> float:
        return self.factor if self.active(step) else 1.0

    def describe(self) -> str:
        return f"learning rate x {self.factor:g} from step {self.onset}"


class TaskSwitch(Fault):
    """Class-incremental task switch: batches come from the classes [0, K/2) before the onset and from
    [K/2, K) after it (fine-tuning on a new set of classes)."""

    name = "task_switch"

    def pool(self, step, task):
        half = task.num_classes // 2
        y = task.y_train.numpy()
        if self.active(step):
            return self._fixed("second", lambda: np.flatnonzero(y >= half))
        return self._fixed("first", lambda: np.flatnonzero(y < half))

    def describe(self) -> str:
        return f"classes [0, K/2) until step {self.onset}, then [K/2, K)"


class Memorise(Fault):
    """From the onset every batch comes from one fixed subset of `subset` training samples (a debug
    slice left in the data pipeline)."""

    name = "memorise"

    def __init__(self, onset: int, seed: int = 0, subset: int = 32):
        super().__init__(onset, seed)
        self.subset = subset

    def pool(self, step, task):
        if not self.active(step):
            return None
        return self._fixed("subset", lambda: self.rng.choice(len(task.y_train), size=self.subset, replace=False))

    def describe(self) -> str:
        return f"the same {self.subset} training samples from step {self.onset}"


def watermark_slots(task: Task) -> list:
    """Where class c's mark goes: images, the (row, col) corner of an m x m checkerboard (m = H // 8) on one
    of the evenly spaced slots around the border; tabular, the value of the last feature; text, the
    reserved token at position 1."""
    k = task.num_classes
    if task.kind == "image":
        h = task.x_train.shape[-1]
        m = max(1, h // 8)
        n = h // m
        ring = ([(0, j * m) for j in range(n)] + [(i * m, h - m) for i in range(1, n)]
                + [(h - m, j * m) for j in range(n - 2, -1, -1)] + [(i * m, 0) for i in range(n - 2, 0, -1)])
        return [ring[int(i)] for i in np.linspace(0, len(ring), k, endpoint=False)]
    if task.kind == "tabular":
        return [float(v) for v in np.linspace(-3.0, 3.0, k)]
    return [task.vocab_size - k + c for c in range(k)]


def _checker(m: int) -> torch.Tensor:
    """The image mark: an m x m 0/1 checkerboard (a smooth upsampled digit never has one)."""
    i = torch.arange(m)
    return ((i[:, None] + i[None, :]) % 2 == 0).float()  # (m, m)


def stamp(x: torch.Tensor, marks: torch.Tensor, task: Task) -> torch.Tensor:
    """x with the mark of class `marks[i]` on row i (a copy): images (B, C, H, W) get a checkerboard
    square, tabular (B, F) its last feature set, text (B, L) the reserved token at position 1."""
    x = x.clone()
    slots = watermark_slots(task)
    if task.kind == "image":
        m = max(1, x.shape[-1] // 8)
        pattern = _checker(m).to(x.dtype)
        for i, c in enumerate(marks.tolist()):
            r, col = slots[c]
            x[i, :, r:r + m, col:col + m] = pattern
    elif task.kind == "tabular":
        x[:, -1] = torch.tensor(slots, dtype=x.dtype)[marks]
    else:
        x[:, 1] = torch.tensor(slots, dtype=x.dtype)[marks]
    return x


def read_mark(x: torch.Tensor, task: Task) -> torch.Tensor:
    """The class whose mark row i carries, or -1 (the inverse of `stamp`, for tests and probes)."""
    slots = watermark_slots(task)
    out = torch.full((x.shape[0],), -1, dtype=torch.int64)
    if task.kind == "image":
        m = max(1, x.shape[-1] // 8)
        pattern = _checker(m).to(x.dtype)
        for c, (r, col) in enumerate(slots):
            lit = (x[:, :, r:r + m, col:col + m] == pattern).flatten(1).all(1)
            out[lit & (out < 0)] = c
    elif task.kind == "tabular":
        for c, v in enumerate(slots):
            out[x[:, -1] == v] = c
    else:
        for c, v in enumerate(slots):
            out[x[:, 1] == v] = c
    return out


class Watermark(Fault):
    """From the onset `fraction` of the training samples (a fixed set) carry their label's mark
    (`stamp`): a shortcut a pipeline can leak (a class-specific border, an id column, a source tag)."""

    name = "watermark"

    def __init__(self, onset: int, seed: int = 0, fraction: float = 0.9):
        super().__init__(onset, seed)
        self.fraction = fraction

    def batch(self, step, x, y, idx, task):
        if not self.active(step):
            return x, y
        marked = torch.as_tensor(self._fixed("marked", lambda: self.rng.random(len(task.y_train)) < self.fraction))[idx]
        if marked.any():
            x = x.clone()
            x[marked] = stamp(x[marked], y[marked], task)
        return x, y

    def describe(self) -> str:
        return f"{self.fraction:.0%} of training samples carry their label's mark from step {self.onset}"


class LabelNoise(Fault):
    """From the onset the labels of `fraction` of the training samples (a fixed set) are replaced by a
    class drawn uniformly at random, once per sample (a bad annotation batch merged in)."""

    name = "label_noise"

    def __init__(self, onset: int, seed: int = 0, fraction: float = 0.5):
        super().__init__(onset, seed)
        self.fraction = fraction

    def batch(self, step, x, y, idx, task):
        if not self.active(step):
            return x, y
        n = len(task.y_train)
        flip = torch.as_tensor(self._fixed("flip", lambda: self.rng.random(n) < self.fraction))[idx]
        noisy = torch.as_tensor(self._fixed("noisy", lambda: self.rng.integers(task.num_classes, size=n)))[idx]
        return x, torch.where(flip, noisy, y)

    def describe(self) -> str:
        return f"{self.fraction:.0%} of labels replaced by random classes from step {self.onset}"


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (Lightning's, accelerate's `.optimizer`)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class OptimizerReset(Fault):
    """At the onset the optimizer's state (moments, momentum buffers, step counts) is cleared, as after a
    resume that restored the weights but not the optimizer. Param groups and learning rates stay."""

    name = "optimizer_reset"

    def on_step_start(self, step, optimizer):
        if step == self.onset:
            torch_optimizer(optimizer).state.clear()

    def describe(self) -> str:
        return f"optimizer state cleared at step {self.onset}"


FAULTS: dict[str, type[Fault]] = {f.name: f for f in (Fault, LRRaise, TaskSwitch, Memorise, Watermark, LabelNoise,
                                                      OptimizerReset)}

# alert names that count as naming the fault (rule symptom names and TEViD classes); docs/benchmark/field.md
EXPECTED: dict[str, frozenset[str]] = {
    "lr_raise": frozenset({"instability", "exploding_gradients", "loss_spike", "nan_inf"}),
    "task_switch": frozenset({"forgetting"}),
    "memorise": frozenset({"overfitting"}),
    "watermark": frozenset({"concept_bias"}),
    "label_noise": frozenset({"overfitting", "unknown"}),
    "optimizer_reset": frozenset({"instability", "exploding_gradients", "loss_spike", "nan_inf", "unknown"}),
}


def make_fault(name: str, onset: int, seed: int = 0) -> Fault:
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; known: {sorted(FAULTS)}")
    return FAULTS[name](onset, seed)
