"""The field benchmark's data: built-in or generated, nothing downloaded, and a batch stream that a fault can bend.

Three kinds of task, each a `Task` (train / validation tensors, class count, kind):

- images: sklearn's built-in `load_digits` (1,797 8x8 digits, on disk with sklearn), upsampled to the
  job's size, optionally as 3 channels for a torchvision model;
- tabular: `sklearn.datasets.make_classification` (Gaussian clusters per class, informative and
  redundant features), standardised with the training split's statistics;
- text: a generated corpus of token sequences whose class is its topic: every token is drawn from the
  class's topic distribution with probability `topic_rate`, else from a shared background distribution
  (a bag-of-words task a GRU or a tiny BERT learns to ~90% in a few hundred steps). Token 0 is padding,
  1 a [CLS] token at position 0, the last `num_classes` ids are reserved for the watermark fault.

`BatchStream` draws the training batches (sampling with replacement from a pool of indices, a random
shift for images) and asks the fault, at each batch, which samples are allowed (`fault.pool`) and how
the batch is changed (`fault.batch`): the data side of a user's bug lives in the data pipeline, where
the bug would.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PAD, CLS = 0, 1


@dataclass
class Task:
    """One data set: x_train (N, ...) float images / features or int64 tokens, y_train (N,) int64."""

    kind: str  # "image" | "tabular" | "text"
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    vocab_size: int = 0  # text only: token ids are < vocab_size
    shift: int = 0  # images only: random shift of up to `shift` pixels (the job's augmentation)


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


def digits_images(size: int = 16, channels: int = 1, shift: int = 1, seed: int = 0) -> Task:
    """sklearn's 8x8 digits, pixel values / 16 in [0, 1], bilinearly upsampled to size x size:
    x (N, channels, size, size). 80 / 20 train / validation split (1,438 / 359)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.expand(-1, channels, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, va = _split(len(y), 0.2, seed)
    return Task("image", x[tr], y[tr], x[va], y[va], 10, shift=shift)


def tabular(n_train: int = 40_000, n_val: int = 2_000, n_features: int = 20, n_classes: int = 6,
            class_sep: float = 1.0, seed: int = 0) -> Task:
    """`make_classification` with half the features informative and a fifth redundant, two clusters per
    class; x (N, n_features) standardised by the training split. Large enough that a 1,500-step run at
    batch 32 sees each sample about once: a healthy run does not overfit."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n_train + n_val, n_features=n_features, n_informative=n_features // 2,
                               n_redundant=n_features // 5, n_classes=n_classes, n_clusters_per_class=2,
                               class_sep=class_sep, flip_y=0.0, random_state=seed)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    return Task("tabular", x[:n_train], y[:n_train], x[n_train:], y[n_train:], n_classes)


def topic_text(n_train: int = 40_000, n_val: int = 2_000, length: int = 24, vocab_size: int = 64,
               n_classes: int = 4, topic_rate: float = 0.2, seed: int = 0) -> Task:
    """Generated topic-classification corpus: x (N, length) int64 = [CLS, t_1, ..., t_{length-1}].

    Content tokens are ids 2 .. vocab_size - n_classes - 1. Class c's topic distribution is a sparse
    Dirichlet(0.2) draw over them, the background one a Dirichlet(2.0) draw shared by all classes;
    each token comes from the topic with probability `topic_rate`."""
    rng = np.random.default_rng(seed)
    content = np.arange(2, vocab_size - n_classes)
    topics = rng.dirichlet(np.full(len(content), 0.2), size=n_classes)  # (K, V_content)
    background = rng.dirichlet(np.full(len(content), 2.0))  # (V_content,)
    n = n_train + n_val
    y = rng.integers(n_classes, size=n)
    from_topic = rng.random((n, length - 1)) < topic_rate
    bg = rng.choice(content, size=(n, length - 1), p=background)
    tp = np.empty_like(bg)
    for c in range(n_classes):
        rows = y == c
        tp[rows] = rng.choice(content, size=(int(rows.sum()), length - 1), p=topics[c])
    tokens = np.where(from_topic, tp, bg)
    x = np.concatenate([np.full((n, 1), CLS), tokens], axis=1)
    x, y = torch.tensor(x, dtype=torch.int64), torch.tensor(y, dtype=torch.int64)
    return Task("text", x[:n_train], y[:n_train], x[n_train:], y[n_train:], n_classes, vocab_size=vocab_size)


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image (B, C, H, W) moved by up to `shift` pixels in x and y, zero-filled (no wrap-around)."""
    if shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


class BatchStream:
    """Training batches, one per call of `next()`: batch k belongs to optimizer step k // accumulate.

    The fault decides, per step, the pool the batch is drawn from (`fault.pool(step, task)`: indices,
    or None for the whole training set) and changes the drawn batch (`fault.batch(step, x, y, idx,
    task)`), after the job's augmentation. Sampling is with replacement, from a generator seeded by
    `seed`, so a healthy and a faulted run of one seed see the same batches up to the onset."""

    def __init__(self, task: Task, fault, batch_size: int, seed: int, accumulate: int = 1):
        self.task, self.fault, self.batch_size, self.accumulate = task, fault, batch_size, accumulate
        self.gen = torch.Generator().manual_seed(seed)
        self.batches = 0

    @property
    def step(self) -> int:
        return self.batches // self.accumulate

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.step
        pool = self.fault.pool(step, self.task)
        n = len(self.task.y_train) if pool is None else len(pool)
        pick = torch.randint(0, n, (self.batch_size,), generator=self.gen)
        idx = pick if pool is None else torch.as_tensor(pool)[pick]
        x, y = self.task.x_train[idx], self.task.y_train[idx]
        if self.task.kind == "image":
            x = random_shift(x, self.task.shift, self.gen)
        x, y = self.fault.batch(step, x, y, idx, self.task)
        self.batches += 1
        return x, y

    def __iter__(self):
        while True:
            yield self.next()
