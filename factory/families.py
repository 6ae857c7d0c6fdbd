"""Model families of the randomised factory (issue 19): each a small, fast model of one kind, with a
size drawn per run and a learning-rate scale for its stable range.

    fam = FAMILIES["gru"]
    size = fam.draw_size(rng)                         # Size(width=48, depth=2, norm="layer", ...)
    shape = InputShape("sequence", (40, 1), 10)       # (T, C) signals, 10 classes
    fam.check(shape, size)                            # FamilyError naming the field, else None
    model = fam.build(shape, size)                    # (B, 40, 1) -> (B, 10)

Modalities and what the models map (`InputShape.dims` in brackets):
- "image" (C, S): (B, C, S, S) float -> (B, classes); C is 1 or 3, S 16-32 px for the factory;
- "tabular" (D,): (B, D) float -> (B, classes);
- "sequence" (T, C): (B, T, C) float, batch first -> (B, classes);
- "text" (context,): (B, T) int64 tokens, T <= context -> (B, T, vocab) next-token logits (a causal LM:
  position t sees tokens <= t only); `num_classes` is the vocabulary size.

Sources: plain torch modules written as users write them (`nn.Sequential` MLPs and CNNs, GroupNorm CNNs,
temporal CNNs, RNN/GRU/LSTM, `nn.TransformerEncoder`), timm models at tiny widths (their own classes, built
small; cf. `factory.archs`) and torchvision models at small widths. Every model is one the zero-config
capture (`capture.recorder.attach`) finds three hook points and a linear head in; tests/test_families.py
checks that, and `python -m factory.families --speed` measures the cost of a training step of each.

Sizes are drawn from small discrete sets (`Family.widths`, `depths`, `norms`, `acts`, `residuals`), chosen
so that a step at batch 32 on one CPU thread stays within a few tens of milliseconds. `Size.width` is the
family's base width (first stage channels, hidden size or embedding dim), `Size.depth` its number of
blocks (layers, recurrent layers, transformer blocks), spread over the stages of staged models.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.regnet import RegNet, RegNetCfg
from torchvision.models.resnet import BasicBlock as TVBasicBlock
from torchvision.models.resnet import ResNet as TVResNet

from factory.datasets import MODALITIES

NORMS = ("batch", "group", "layer", "none")
ACTS = ("relu", "gelu", "silu", "tanh")
_ACT_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
TEXT_WINDOW = 4  # tokens the per-token MLP language models see (t, t-1, ..., t-3)
GROUPS = 4  # GroupNorm groups (gcd(GROUPS, channels) for channel counts it does not divide)


class FamilyError(ValueError):
    """A family cannot build a model of this size for this input: the message names the family, the
    field (`modality`, `dims`, `num_classes`, `width`, `depth`, `norm`, `act`, `residual`) and why."""


@dataclass(frozen=True)
class InputShape:
    """What a model takes: image dims (C, S); tabular (D,); sequence (T, C); text (context,) with
    `num_classes` the vocabulary size."""

    modality: str
    dims: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class Size:
    """One drawn model size. `norm` in NORMS, `act` in ACTS; `residual`: skip connections around blocks."""

    width: int
    depth: int
    norm: str
    act: str
    residual: bool


Builder = Callable[[InputShape, Size], nn.Module]


@dataclass(frozen=True)
class Family:
    """A model family: its modalities, where its code comes from, its size choices and its builder.

    `lr_scale` multiplies the optimizer's base learning-rate range. `python -m factory.lr_probe`
    (AdamW, 150 steps at the median size, base 2e-3 x 0.25-4) is the evidence: ViT, DeiT and Swin do best
    at x1 and collapse at x2, ConvNeXt does best at x0.5 -> 0.5; the torch transformer is within 10% of its
    best at x0.5 -> 0.5 (the LR-sensitive kind users warm up); the other families did best at x1 or above
    (bar the MLPs on flattened 32 px colour images: x0.25-1) -> 1.0, except two kept at 0.5 as precautions the probe (median size: tanh, BatchNorm) does not test: the Elman
    RNN's ReLU variant and the plain CNN without norm under SGD (as the factory's AlexNet).

    `stride(size)` is the total downsampling of an image model, `min_map` the smallest final feature map it
    accepts and `image_multiple` what the image side must be a multiple of (patch grids); `width_multiple`
    what the width must be a multiple of (attention heads, channel halves, group width). Widths outside
    [min(widths), max(widths)] and depths outside [min(depths), max(depths)] are refused too: the ranges
    are the family's speed budget and what its builder was checked at."""

    name: str
    modalities: tuple[str, ...]
    source: str  # "torch", "timm" or "torchvision"
    lr_scale: float
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    norms: tuple[str, ...]
    acts: tuple[str, ...]
    residuals: tuple[bool, ...]
    builder: Builder = field(repr=False, compare=False)
    stride: Callable[[Size], int] = field(default=lambda size: 1, repr=False, compare=False)
    min_map: int = 2
    image_multiple: int = 1
    width_multiple: int = 1
    width_why: str = ""
    description: str = ""

    # ---------------------------------------------------------------- sizes
    def draw_size(self, rng: np.random.Generator) -> Size:
        """A size drawn uniformly from the family's choices (every draw passes `check` on any input the
        family supports at the factory's sizes: images of 16-32 px)."""
        return Size(int(rng.choice(self.widths)), int(rng.choice(self.depths)), str(rng.choice(self.norms)),
                    str(rng.choice(self.acts)), bool(rng.choice(self.residuals)))

    def smallest(self) -> Size:
        return Size(min(self.widths), min(self.depths), self.norms[0], self.acts[0], self.residuals[0])

    def largest(self) -> Size:
        return Size(max(self.widths), max(self.depths), self.norms[0], self.acts[0], self.residuals[0])

    def median(self) -> Size:
        """The middle width and depth (the median draw), with the family's first norm / act / residual."""
        w, d = sorted(self.widths), sorted(self.depths)
        return Size(w[(len(w) - 1) // 2], d[(len(d) - 1) // 2], self.norms[0], self.acts[0], self.residuals[0])

    # ---------------------------------------------------------------- checks and building
    def check(self, shape: InputShape, size: Size) -> None:
        """Raise `FamilyError` (naming the family, the field and why) unless this family builds a model of
        `size` for `shape`."""
        def refuse(what: str, why: str) -> FamilyError:
            return FamilyError(f"family {self.name!r}: {what}: {why}")

        if shape.modality not in self.modalities:
            raise refuse("modality", f"{shape.modality!r} is not supported; {self.name} takes {list(self.modalities)}")
        want = {"image": 2, "tabular": 1, "sequence": 2, "text": 1}[shape.modality]
        if len(shape.dims) != want or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in shape.dims):
            raise refuse("dims", f"{shape.modality} dims must be {want} positive int(s) "
                         f"({_DIMS_DOC[shape.modality]}), got {shape.dims!r}")
        if shape.num_classes < 2:
            raise refuse("num_classes", f"must be >= 2, got {shape.num_classes}")
        lo, hi = min(self.widths), max(self.widths)
        if not lo <= size.width <= hi:
            raise refuse("width", f"{size.width} is outside the family's range [{lo}, {hi}] (its speed budget)")
        if size.width % self.width_multiple:
            raise refuse("width", f"{size.width} is not a multiple of {self.width_multiple} ({self.width_why})")
        lo, hi = min(self.depths), max(self.depths)
        if not lo <= size.depth <= hi:
            raise refuse("depth", f"{size.depth} is outside the depths the family builds, [{lo}, {hi}]")
        for name, value, allowed in (("norm", size.norm, self.norms), ("act", size.act, self.acts),
                                     ("residual", size.residual, self.residuals)):
            if value not in allowed:
                raise refuse(name, f"{value!r} is not one the family has; it has {list(allowed)}")
        if shape.modality == "image":
            channels, side = shape.dims
            if side % self.image_multiple:
                raise refuse("dims", f"image side {side} is not a multiple of {self.image_multiple} "
                             f"(the family's patch grid)")
            stride = self.stride(size)
            if side // stride < self.min_map:
                raise refuse("dims", f"image side {side} is too small: the family downsamples by {stride} at depth "
                             f"{size.depth}, leaving {side // stride} px (it needs >= {self.min_map}; side >= "
                             f"{stride * self.min_map})")

    def build(self, shape: InputShape, size: Size) -> nn.Module:
        """The model (in train mode, weights from torch's global RNG) after `check`."""
        self.check(shape, size)
        return self.builder(shape, size).train()


_DIMS_DOC = {"image": "(C, S)", "tabular": "(D,)", "sequence": "(T, C)", "text": "(context,)"}


def build_family(name: str, shape: InputShape, size: Size) -> nn.Module:
    """`FAMILIES[name].build(shape, size)`; an unknown name is a FamilyError listing the known ones."""
    if name not in FAMILIES:
        raise FamilyError(f"unknown family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name].build(shape, size)


# ==================================================================== shared parts
def act_module(act: str) -> nn.Module:
    return _ACT_MODULES[act]()


def stage_depths(depth: int, stages: int) -> tuple[int, ...]:
    """`depth` blocks spread over `stages` stages, at least one each, the extra ones to the later-middle
    stages first (3 stages: 4 -> (1, 2, 1), 5 -> (1, 2, 2), 6 -> (2, 2, 2))."""
    base, extra = divmod(depth, stages)
    order = sorted(range(stages), key=lambda i: (abs(i - (stages - 1) / 2 - 0.25), -i))
    out = [base] * stages
    for i in order[:extra]:
        out[i] += 1
    return tuple(out)


def _groups(channels: int) -> int:
    return math.gcd(GROUPS, channels)


def norm2d(kind: str, channels: int) -> nn.Module:
    """Normalisation of (B, C, H, W) maps; "layer" is GroupNorm(1, C) (LayerNorm over C, H, W)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(_groups(channels), channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class FeatureNorm(nn.Module):
    """Normalisation over the last axis of (..., D) features (every leading axis is a sample axis):
    BatchNorm1d / GroupNorm on the flattened rows, LayerNorm as it is. Per position, so a causal LM
    stays causal (BatchNorm's batch statistics aside)."""

    def __init__(self, kind: str, dim: int):
        super().__init__()
        self.kind = kind
        self.norm = {"batch": lambda: nn.BatchNorm1d(dim), "group": lambda: nn.GroupNorm(_groups(dim), dim),
                     "layer": lambda: nn.LayerNorm(dim), "none": nn.Identity}[kind]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("layer", "none") or x.ndim == 2:
            return self.norm(x)
        return self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def feature_norm(kind: str, dim: int) -> nn.Module:
    """A norm of 2-D (B, D) features: the torch module itself (what a user writes in an nn.Sequential)."""
    return {"batch": lambda: nn.BatchNorm1d(dim), "group": lambda: nn.GroupNorm(_groups(dim), dim),
            "layer": lambda: nn.LayerNorm(dim), "none": nn.Identity}[kind]()


class TokenWindow(nn.Module):
    """(B, T) tokens -> (B, T, k E): the embeddings of tokens t, t-1, ..., t-k+1 side by side (zeros before
    the start), so a per-token MLP is a k-gram language model."""

    def __init__(self, vocab: int, dim: int, window: int = TEXT_WINDOW):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.window = window

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)  # (B, T, E)
        t = e.shape[1]
        return torch.cat([F.pad(e, (0, 0, i, 0))[:, :t] for i in range(self.window)], dim=-1)


def _flat_features(shape: InputShape) -> int:
    """How many numbers one flattened input holds: C S S for an image, D for tabular, T C for a sequence."""
    if shape.modality == "image":
        channels, side = shape.dims
        return channels * side * side
    return math.prod(shape.dims)


# ==================================================================== plain torch
def _mlp(shape: InputShape, size: Size) -> nn.Module:
    """nn.Sequential: Flatten (or a token window for text), `depth` x [Linear, norm, act], Linear head."""
    w = size.width
    text = shape.modality == "text"
    layers: list[nn.Module] = [TokenWindow(shape.num_classes, w // 2)] if text else [nn.Flatten()]
    fan_in = TEXT_WINDOW * (w // 2) if text else _flat_features(shape)
    for _ in range(size.depth):
        layers += [nn.Linear(fan_in, w), FeatureNorm(size.norm, w) if text else feature_norm(size.norm, w),
                   act_module(size.act)]
        fan_in = w
    return nn.Sequential(*layers, nn.Linear(w, shape.num_classes))


class ResMLPBlock(nn.Module):
    """norm -> Linear(D, 2D) -> act -> Linear(2D, D), added to its input when residual."""

    def __init__(self, dim: int, norm: str, act: str, residual: bool):
        super().__init__()
        self.norm = FeatureNorm(norm, dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), act_module(act), nn.Linear(2 * dim, dim)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(self.norm(x))))
        return x + y if self.residual else y


class ResMLP(nn.Module):
    """Residual MLP: flatten (text: a token window), stem Linear, `depth` ResMLPBlocks, norm, head."""

    def __init__(self, shape: InputShape, size: Size):
        super().__init__()
        w = size.width
        self.text = shape.modality == "text"
        self.embed = TokenWindow(shape.num_classes, w // 2) if self.text else nn.Flatten()
        self.stem = nn.Linear(TEXT_WINDOW * (w // 2) if self.text else _flat_features(shape), w)
        self.blocks = nn.Sequential(*[ResMLPBlock(w, size.norm, size.act, size.residual) for _ in range(size.depth)])
        self.norm = FeatureNorm(size.norm, w)
        self.act = act_module(size.act)
        self.head = nn.Linear(w, shape.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.norm(self.blocks(self.stem(self.embed(x))))))


def _cnn_stride(depth: int) -> int:
    return 2 * 2 ** min(depth - 1, 2)


def _cnn(shape: InputShape, size: Size) -> nn.Module:
    """nn.Sequential CNN: `depth` x [Conv3x3, norm, act], the first of stride 2, a MaxPool after the second
    and third; channels w, 2w, 4w, 4w, ...; global average pool, Flatten, Linear head."""
    cin, w = shape.dims[0], size.width
    layers: list[nn.Module] = []
    for i in range(size.depth):
        cout = w * 2 ** min(i, 2)
        layers += [nn.Conv2d(cin, cout, 3, stride=2 if i == 0 else 1, padding=1, bias=size.norm == "none"),
                   norm2d(size.norm, cout), act_module(size.act)]
        if 1 <= i <= 2:
            layers.append(nn.MaxPool2d(2))
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, shape.num_classes))


class ConvBlock(nn.Module):
    """conv3x3 (stride s) -> norm -> act -> conv3x3 -> norm, plus a (1x1-projected) skip when residual,
    then act: a ResNet basic block with GroupNorm."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, act: str, residual: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1, self.act1 = norm2d(norm, cout), act_module(act)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2, self.act2 = norm2d(norm, cout), act_module(act)
        self.residual = residual
        self.skip = (nn.Identity() if stride == 1 and cin == cout
                     else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm2d(norm, cout))) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + self.skip(x) if self.residual else y)


def _gn_strides(depth: int) -> list[int]:
    """Strides of the GroupNorm CNN's blocks: 2 at the second and fourth."""
    return [2 if i in (1, 3) else 1 for i in range(depth)]


class GNCNN(nn.Module):
    """GroupNorm CNN: a stride-2 stem conv, `depth` ConvBlocks (stride 2 at the second and fourth, channels
    doubling there), global average pool, `fc` head."""

    def __init__(self, shape: InputShape, size: Size):
        super().__init__()
        w = size.width
        self.stem = nn.Sequential(nn.Conv2d(shape.dims[0], w, 3, 2, 1, bias=False), norm2d(size.norm, w),
                                  act_module(size.act))
        blocks, cin = [], w
        for s in _gn_strides(size.depth):
            cout = cin * s
            blocks.append(ConvBlock(cin, cout, s, size.norm, size.act, size.residual))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, shape.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class ChannelNorm1d(nn.Module):
    """Norm of (B, C, T) features per time step (LayerNorm over C; BatchNorm1d as torch has it)."""

    def __init__(self, kind: str, channels: int):
        super().__init__()
        self.kind = kind
        self.norm = {"batch": lambda: nn.BatchNorm1d(channels), "layer": lambda: nn.LayerNorm(channels),
                     "none": nn.Identity}[kind]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2) if self.kind == "layer" else self.norm(x)


class TemporalBlock(nn.Module):
    """Channels-last in and out, (B, T, D): two dilated Conv1d (causal: left padding only) with norm and
    act, plus the input when residual."""

    def __init__(self, dim: int, kernel: int, dilation: int, causal: bool, norm: str, act: str, residual: bool):
        super().__init__()
        pad = (kernel - 1) * dilation
        self.pad = (pad, 0) if causal else (pad // 2, pad - pad // 2)
        self.conv1 = nn.Conv1d(dim, dim, kernel, dilation=dilation)
        self.norm1, self.act1 = ChannelNorm1d(norm, dim), act_module(act)
        self.conv2 = nn.Conv1d(dim, dim, kernel, dilation=dilation)
        self.norm2, self.act2 = ChannelNorm1d(norm, dim), act_module(act)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)  # (B, D, T)
        h = self.act1(self.norm1(self.conv1(F.pad(h, self.pad))))
        h = self.norm2(self.conv2(F.pad(h, self.pad))).transpose(1, 2)
        return self.act2(x + h if self.residual else h)


class TemporalCNN(nn.Module):
    """Temporal CNN: sequence (B, T, C) -> Linear stem -> TemporalBlocks (dilations 1, 2, 4, ...) -> mean
    over time -> head; text (B, T) -> embedding -> causal TemporalBlocks -> per-position head."""

    def __init__(self, shape: InputShape, size: Size):
        super().__init__()
        w = size.width
        self.text = shape.modality == "text"
        self.stem = nn.Embedding(shape.num_classes, w) if self.text else nn.Linear(shape.dims[1], w)
        self.blocks = nn.Sequential(*[TemporalBlock(w, 3, 2 ** (i % 4), self.text, size.norm, size.act, size.residual)
                                      for i in range(size.depth)])
        self.head = nn.Linear(w, shape.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))  # (B, T, D)
        return self.head(h if self.text else h.mean(1))


class RecurrentBlock(nn.Module):
    """One recurrent layer (batch first), LayerNorm (or none) on its outputs, plus its input when residual."""

    def __init__(self, cell: str, dim: int, norm: str, act: str, residual: bool):
        super().__init__()
        kw = {"nonlinearity": act} if cell == "rnn" else {}
        self.rnn = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell](dim, dim, batch_first=True, **kw)
        self.norm = nn.LayerNorm(dim) if norm == "layer" else nn.Identity()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.rnn(x)[0])  # (B, T, D)
        return x + y if self.residual else y


class RecurrentNet(nn.Module):
    """Sequence classifier (Linear stem, `depth` RecurrentBlocks, the last step's output -> readout ->
    head) or language model (embedding, RecurrentBlocks, per-position readout and head). The readout
    (Linear, tanh) gives a one-layer model three distinct layers to watch."""

    def __init__(self, cell: str, shape: InputShape, size: Size):
        super().__init__()
        w = size.width
        self.text = shape.modality == "text"
        self.stem = nn.Embedding(shape.num_classes, w) if self.text else nn.Linear(shape.dims[1], w)
        self.blocks = nn.Sequential(*[RecurrentBlock(cell, w, size.norm, size.act, size.residual) for _ in range(size.depth)])
        self.readout = nn.Sequential(nn.Linear(w, w), nn.Tanh())
        self.head = nn.Linear(w, shape.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))  # (B, T, D)
        return self.head(self.readout(h if self.text else h[:, -1]))


MAX_TOKENS = 16  # tokens of the transformer's sequence / tabular inputs (attention cost on one CPU thread)


class FeatureTokens(nn.Module):
    """Tabular (B, D) -> (B, N, E): N = min(D, MAX_TOKENS) tokens of g = ceil(D / N) consecutive features
    each (zero-padded), token j = x[j g:(j + 1) g] @ W_j + b_j (an FT-Transformer's numerical tokenizer when
    g = 1)."""

    def __init__(self, features: int, dim: int):
        super().__init__()
        self.group = math.ceil(features / min(features, MAX_TOKENS))
        self.tokens = math.ceil(features / self.group)
        self.weight = nn.Parameter(torch.randn(self.tokens, self.group, dim) / math.sqrt(self.group))
        self.bias = nn.Parameter(torch.zeros(self.tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, self.tokens * self.group - x.shape[1])).view(x.shape[0], self.tokens, self.group)
        return torch.einsum("bng,nge->bne", x, self.weight) + self.bias


class PatchTokens(nn.Module):
    """Sequence (B, T, C) -> (B, N, E): non-overlapping patches of p = ceil(T / MAX_TOKENS) steps
    (zero-padded at the end), each projected by one Linear(p C, E)."""

    def __init__(self, steps: int, channels: int, dim: int):
        super().__init__()
        self.patch = math.ceil(steps / MAX_TOKENS)
        self.tokens = math.ceil(steps / self.patch)
        self.proj = nn.Linear(self.patch * channels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        n = math.ceil(t / self.patch)
        x = F.pad(x, (0, 0, 0, n * self.patch - t))
        return self.proj(x.reshape(b, n, self.patch * c))


TRANSFORMER_HEADS = 2


class TransformerNet(nn.Module):
    """nn.TransformerEncoder (pre-norm, batch first) over: sequence patches (PatchTokens + learned
    positions), tabular feature groups (FeatureTokens) or text tokens (embedding + positions, causal mask).
    Classifiers mean-pool the tokens; the language model has a per-position head."""

    def __init__(self, shape: InputShape, size: Size):
        super().__init__()
        w = size.width
        self.modality = shape.modality
        if self.modality == "tabular":
            self.stem = FeatureTokens(shape.dims[0], w)
        elif self.modality == "sequence":
            self.stem = PatchTokens(shape.dims[0], shape.dims[1], w)
            tokens = self.stem.tokens
        else:
            self.stem, tokens = nn.Embedding(shape.num_classes, w), shape.dims[0]
        self.pos = nn.Parameter(torch.randn(1, tokens, w) * 0.02) if self.modality != "tabular" else None
        layer = nn.TransformerEncoderLayer(w, TRANSFORMER_HEADS, 2 * w, dropout=0.0, activation=size.act,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, size.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, shape.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)  # (B, N, D)
        if self.pos is not None:
            if h.shape[1] > self.pos.shape[1]:
                raise ValueError(f"{h.shape[1]} tokens exceed the {self.pos.shape[1]} positions this model was built "
                                 f"for (InputShape.dims: the text context / the sequence length)")
            h = h + self.pos[:, : h.shape[1]]
        if self.modality == "text":
            mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device, dtype=h.dtype)
            return self.head(self.norm(self.encoder(h, mask=mask, is_causal=True)))
        return self.head(self.norm(self.encoder(h).mean(1)))


# ==================================================================== timm at tiny widths
def _timm_norm(kind: str) -> Callable[..., nn.Module]:
    if kind == "group":
        return lambda channels, **kw: nn.GroupNorm(_groups(channels), channels)
    return nn.BatchNorm2d


def _timm_resnet(shape: InputShape, size: Size) -> nn.Module:
    """timm ResNet of BasicBlocks over 4 stages (w, 2w, 4w, 4w), a 3x3 stride-2 stem conv (timm's 'deep'
    stem type sets the stem width to w, its three convs replaced by one), no max-pool, output stride 8
    (the last stage dilated)."""
    from timm.models.resnet import BasicBlock, ResNet

    w = size.width
    m = ResNet(BasicBlock, stage_depths(size.depth, 4), num_classes=shape.num_classes, in_chans=shape.dims[0],
               channels=(w, 2 * w, 4 * w, 4 * w), stem_width=w // 2, stem_type="deep", output_stride=8,
               act_layer=_ACT_MODULES[size.act], norm_layer=_timm_norm(size.norm))
    m.conv1 = nn.Conv2d(shape.dims[0], w, 3, stride=2, padding=1, bias=False)  # one conv: the deep stem's 3 cost 40%
    m.maxpool = nn.Identity()
    return m


def _timm_convnext(shape: InputShape, size: Size) -> nn.Module:
    """timm ConvNeXt: 2x2 patch stem, 4 stages (w, 2w, 3w, 4w) at output stride 8 (the last two dilated),
    layer scale initialised at 0.1 (timm's 1e-6 is for deep models: at these depths the blocks barely
    trained in a factory run, 0.68 vs 0.80 validation accuracy on textures after 200 steps)."""
    from timm.models.convnext import ConvNeXt

    w = size.width
    return ConvNeXt(in_chans=shape.dims[0], num_classes=shape.num_classes, depths=stage_depths(size.depth, 4),
                    dims=(w, 2 * w, 3 * w, 4 * w), kernel_sizes=5, patch_size=2, output_stride=8, act_layer=size.act,
                    ls_init_value=0.1, drop_path_rate=0.0)


VIT_HEADS, DEIT_HEADS = 2, 3


def _timm_vit(shape: InputShape, size: Size) -> nn.Module:
    """timm VisionTransformer on a 4x4 patch grid with a class token (mean-pooled patch tokens learned
    textures far slower: 0.45 vs 0.97 validation accuracy after 200 steps)."""
    from timm.models.vision_transformer import VisionTransformer

    c, s = shape.dims
    return VisionTransformer(img_size=s, patch_size=s // 4, in_chans=c, num_classes=shape.num_classes,
                             embed_dim=size.width, depth=size.depth, num_heads=VIT_HEADS, mlp_ratio=2.0,
                             act_layer=_ACT_MODULES[size.act])


def _timm_deit(shape: InputShape, size: Size) -> nn.Module:
    """timm's distilled DeiT (class and distillation tokens, two heads averaged) on a 4x4 patch grid."""
    from timm.models.deit import VisionTransformerDistilled

    c, s = shape.dims
    return VisionTransformerDistilled(img_size=s, patch_size=s // 4, in_chans=c, num_classes=shape.num_classes,
                                      embed_dim=size.width, depth=size.depth, num_heads=DEIT_HEADS, mlp_ratio=2.0,
                                      act_layer=_ACT_MODULES[size.act])


def _timm_swin(shape: InputShape, size: Size) -> nn.Module:
    """timm Swin over an 8x8 patch grid, 3 stages (8x8, 4x4, 2x2 tokens), 4x4 windows, heads 1 / 2 / 4."""
    from timm.models.swin_transformer import SwinTransformer

    c, s = shape.dims
    return SwinTransformer(img_size=s, patch_size=s // 8, in_chans=c, num_classes=shape.num_classes,
                           embed_dim=size.width, depths=stage_depths(size.depth, 3), num_heads=(1, 2, 4),
                           window_size=4, mlp_ratio=2.0, drop_path_rate=0.0)


def _timm_mixer(shape: InputShape, size: Size) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    c, s = shape.dims
    return MlpMixer(num_classes=shape.num_classes, img_size=s, in_chans=c, patch_size=s // 4, num_blocks=size.depth,
                    embed_dim=size.width, act_layer=_ACT_MODULES[size.act])


def _effnet_arch(depth: int) -> list[list[str]]:
    """EfficientNet-B0's block types on 3 inverted-residual stages (expansion 3, squeeze-excite), strides
    (2, 2, 1) after a stride-1 depthwise block: /8 with the stride-2 stem."""
    r = stage_depths(depth, 3)
    return [["ds_r1_k3_s1_e1_c16_se0.25"], [f"ir_r{r[0]}_k3_s2_e3_c24_se0.25"], [f"ir_r{r[1]}_k5_s2_e3_c40_se0.25"],
            [f"ir_r{r[2]}_k3_s1_e3_c80_se0.25"]]


def _timm_efficientnet(shape: InputShape, size: Size) -> nn.Module:
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.efficientnet import EfficientNet

    mult = size.width / 16
    return EfficientNet(decode_arch_def(_effnet_arch(size.depth)), num_classes=shape.num_classes,
                        num_features=8 * size.width, in_chans=shape.dims[0], stem_size=size.width,
                        round_chs_fn=partial(round_channels, multiplier=mult), act_layer=_ACT_MODULES[size.act])


def _mnv3_arch(depth: int) -> list[list[str]]:
    """MobileNetV3-Small's block types (ReLU stages, then hard-swish with squeeze-excite) on 3 stages,
    strides (2, 2, 1): /8 with the stride-2 stem."""
    r = stage_depths(depth, 3)
    return [["ds_r1_k3_s1_e1_c16_nre"], [f"ir_r{r[0]}_k3_s2_e4_c24_nre"], [f"ir_r{r[1]}_k5_s2_e4_c40_se0.25"],
            [f"ir_r{r[2]}_k5_s1_e3_c48_se0.25"], ["cn_r1_k1_s1_c144"]]


def _timm_mobilenetv3(shape: InputShape, size: Size) -> nn.Module:
    """MobileNetV3 blocks; `size.act` sets the act of the later stages (the first two keep ReLU, as in
    the paper): "silu" builds MobileNetV3's hard-swish (its piecewise-linear SiLU), "relu" ReLU."""
    from timm.layers import get_act_layer
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.mobilenetv3 import MobileNetV3

    se = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU, rd_round_fn=round_channels)
    return MobileNetV3(decode_arch_def(_mnv3_arch(size.depth)), num_classes=shape.num_classes, in_chans=shape.dims[0],
                       stem_size=size.width, num_features=8 * size.width,
                       round_chs_fn=partial(round_channels, multiplier=size.width / 16),
                       act_layer=get_act_layer("hard_swish" if size.act == "silu" else "relu"), se_layer=se)


def _timm_densenet(shape: InputShape, size: Size) -> nn.Module:
    """timm DenseNet with 3 dense blocks (growth rate = width) and its max-pool stem step removed (/8)."""
    from timm.models.densenet import DenseNet

    m = DenseNet(growth_rate=size.width, block_config=stage_depths(size.depth, 3), num_classes=shape.num_classes,
                 in_chans=shape.dims[0], bn_size=2)
    m.features.pool0 = nn.Identity()
    return m


def _timm_regnet(shape: InputShape, size: Size) -> nn.Module:
    return SmallRegNet(shape.dims[0], shape.num_classes, size.width, size.depth, size.act)


class SmallRegNet(RegNet):
    """timm RegNetX (its RegStages of grouped bottlenecks, group width 8) with 4 stages of widths
    (w, 2w, 4w, 4w) and strides (1, 2, 2, 1) after the stride-2 stem (/8): timm derives stage widths from
    the RegNet rule, which gives fewer than the 4 stages its RegNet asserts at these tiny widths."""

    def __init__(self, in_chans: int, num_classes: int, width: int, depth: int, act: str):
        self._stages = (width, depth)
        super().__init__(RegNetCfg(depth=depth, w0=width, wa=width, wm=2.0, group_size=8, stem_width=width,
                                   act_layer=act), in_chans=in_chans, num_classes=num_classes)

    def _get_stage_args(self, cfg, default_stride=2, output_stride=32, drop_path_rate=0.0):
        w, depth = self._stages
        widths, strides = (w, 2 * w, 4 * w, 4 * w), (1, 2, 2, 1)
        stages = [dict(out_chs=c, stride=s, dilation=1, depth=d, bottle_ratio=1.0, group_size=8,
                       drop_path_rates=[0.0] * d) for c, s, d in zip(widths, strides, stage_depths(depth, 4))]
        return stages, dict(downsample=cfg.downsample, se_ratio=cfg.se_ratio, linear_out=cfg.linear_out,
                            act_layer=cfg.act_layer, norm_layer=cfg.norm_layer)


# ==================================================================== torchvision at small widths
def _tv_norm(kind: str) -> Callable[[int], nn.Module]:
    return (lambda c: nn.GroupNorm(_groups(c), c)) if kind == "group" else nn.BatchNorm2d


class SmallTVResNet(TVResNet):
    """torchvision's ResNet at small widths: its BasicBlocks and `_make_layer`, 3 stages (w, 2w, 4w), a
    3x3 stride-2 stem without max-pool (/8), `fc` head (torchvision hard-codes 64-512 channels in
    `ResNet.__init__`, so this one sets the same attributes itself)."""

    def __init__(self, in_chans: int, num_classes: int, width: int, layers: tuple[int, ...],
                 norm_layer: Callable[[int], nn.Module]):
        nn.Module.__init__(self)
        self._norm_layer, self.dilation, self.groups, self.base_width = norm_layer, 1, 1, 64
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_chans, width, 3, 2, 1, bias=False)
        self.bn1, self.relu, self.maxpool = norm_layer(width), nn.ReLU(inplace=True), nn.Identity()
        self.layer1 = self._make_layer(TVBasicBlock, width, layers[0])
        self.layer2 = self._make_layer(TVBasicBlock, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(TVBasicBlock, 4 * width, layers[2], stride=2)
        self.layer4 = nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _tv_resnet(shape: InputShape, size: Size) -> nn.Module:
    return SmallTVResNet(shape.dims[0], shape.num_classes, size.width, stage_depths(size.depth, 3), _tv_norm(size.norm))


def _tv_mobilenet(shape: InputShape, size: Size) -> nn.Module:
    """torchvision MobileNetV2 at width_mult = width / 32 on 4 stages (strides 1, 2, 2, 1 after the
    stride-2 stem: /8), its 1280-channel last conv narrowed to 8 x width."""
    from torchvision.models.mobilenetv2 import MobileNetV2
    from torchvision.ops.misc import Conv2dNormActivation

    r = stage_depths(size.depth, 3)
    setting = [[1, 16, 1, 1], [4, 24, r[0], 2], [4, 32, r[1], 2], [4, 64, r[2], 1]]
    m = MobileNetV2(num_classes=shape.num_classes, width_mult=size.width / 32, inverted_residual_setting=setting,
                    norm_layer=_tv_norm(size.norm))
    stem = m.features[0][0]
    m.features[0][0] = nn.Conv2d(shape.dims[0], stem.out_channels, 3, 2, 1, bias=False)
    last = m.features[-1][0].in_channels
    m.features[-1] = Conv2dNormActivation(last, 8 * size.width, kernel_size=1, norm_layer=_tv_norm(size.norm),
                                          activation_layer=nn.ReLU6)
    m.last_channel = 8 * size.width
    m.classifier[-1] = nn.Linear(8 * size.width, shape.num_classes)
    return m


def _tv_shufflenet(shape: InputShape, size: Size) -> nn.Module:
    """torchvision ShuffleNetV2 with stage widths (w, 2w, 4w), a narrow stem and last conv, no max-pool (/16)."""
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    w = size.width
    m = ShuffleNetV2(list(stage_depths(size.depth, 3)), [w // 2, w, 2 * w, 4 * w, 8 * w], num_classes=shape.num_classes)
    m.conv1[0] = nn.Conv2d(shape.dims[0], w // 2, 3, 2, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


# ==================================================================== the registry
_ALL = MODALITIES
_ALL_ACTS = ("relu", "gelu", "silu", "tanh")


def _families() -> dict[str, Family]:
    fams = [
        # ------------------------------------------------------------ plain torch
        Family("mlp", _ALL, "torch", 1.0, (64, 128, 192), (2, 3, 4), ("batch", "layer", "group", "none"), _ALL_ACTS,
               (False,), _mlp,
               description="nn.Sequential MLP on flattened inputs; text: a per-token MLP over a 4-token window"),
        Family("resmlp", _ALL, "torch", 1.0, (48, 64, 96), (2, 3, 4, 5), ("layer", "batch", "group", "none"),
               _ALL_ACTS, (True, False), lambda s, z: ResMLP(s, z),
               description="residual MLP blocks (norm, Linear 2x, act, Linear); text: per-token over a 4-token window"),
        Family("cnn", ("image",), "torch", 0.5, (8, 12), (2, 3, 4, 5), ("batch", "none"), _ALL_ACTS, (False,), _cnn,
               stride=lambda z: _cnn_stride(z.depth),
               description="nn.Sequential CNN: stride-2 conv, conv-norm-act(-maxpool) stacks, global pool, Linear head"),
        Family("gn_cnn", ("image",), "torch", 1.0, (8, 12), (2, 3, 4), ("group",), ("relu", "silu", "gelu"),
               (True, False), lambda s, z: GNCNN(s, z), stride=lambda z: 2 * 2 ** _gn_strides(z.depth).count(2),
               description="GroupNorm CNN of basic blocks, optionally residual"),
        Family("conv1d", ("sequence", "text"), "torch", 1.0, (16, 24, 32), (3, 4), ("batch", "layer", "none"),
               _ALL_ACTS, (True, False), lambda s, z: TemporalCNN(s, z),
               description="temporal CNN of dilated Conv1d blocks; text: causal (left-padded) convolutions"),
        Family("rnn", ("sequence", "text"), "torch", 0.5, (24, 32, 48), (1, 2), ("layer", "none"), ("tanh", "relu"),
               (True, False), lambda s, z: RecurrentNet("rnn", s, z),
               description="Elman RNN layers (batch first); classifier on the last step, or a language model"),
        Family("gru", ("sequence", "text"), "torch", 1.0, (24, 32, 48), (1, 2), ("layer", "none"), ("tanh",),
               (True, False), lambda s, z: RecurrentNet("gru", s, z),
               description="GRU layers (batch first); classifier on the last step, or a language model"),
        Family("lstm", ("sequence", "text"), "torch", 1.0, (24, 32, 48), (1, 2), ("layer", "none"), ("tanh",),
               (True, False), lambda s, z: RecurrentNet("lstm", s, z),
               description="LSTM layers (batch first); classifier on the last step, or a language model"),
        Family("transformer", ("sequence", "tabular", "text"), "torch", 0.5, (32, 48), (3, 4), ("layer",),
               ("relu", "gelu"), (True,), lambda s, z: TransformerNet(s, z), width_multiple=TRANSFORMER_HEADS,
               width_why=f"{TRANSFORMER_HEADS} attention heads",
               description="nn.TransformerEncoder (pre-norm, batch first): patch / feature-group tokens "
                           "mean-pooled, or a causal LM"),
        # ------------------------------------------------------------ timm
        Family("resnet", ("image",), "timm", 1.0, (8, 12), (4, 5), ("batch", "group"), ("relu", "silu"), (True,),
               _timm_resnet, stride=lambda z: 8, width_multiple=2, width_why="timm sets the stem to 2 x (width // 2)",
               description="timm ResNet (BasicBlock), 3x3 stride-2 stem, 4 stages at output stride 8"),
        Family("convnext", ("image",), "timm", 0.5, (12, 16), (4, 5), ("layer",), ("gelu", "silu"), (True,),
               _timm_convnext, stride=lambda z: 8,
               description="timm ConvNeXt, 2x2 patch stem, 4 stages at output stride 8, 5x5 kernels"),
        Family("vit", ("image",), "timm", 0.5, (32, 48), (4, 5), ("layer",), ("gelu", "silu"), (True,), _timm_vit,
               stride=lambda z: 4, min_map=4, image_multiple=4, width_multiple=VIT_HEADS,
               width_why=f"{VIT_HEADS} attention heads",
               description="timm ViT on a 4x4 patch grid, class token"),
        Family("deit", ("image",), "timm", 0.5, (24, 36), (4, 5), ("layer",), ("gelu",), (True,), _timm_deit,
               stride=lambda z: 4, min_map=4, image_multiple=4, width_multiple=DEIT_HEADS,
               width_why=f"{DEIT_HEADS} attention heads",
               description="timm distilled DeiT (class + distillation tokens, two heads) on a 4x4 patch grid"),
        Family("swin", ("image",), "timm", 0.5, (16, 24), (3, 4), ("layer",), ("gelu",), (True,), _timm_swin,
               stride=lambda z: 8, min_map=2, image_multiple=8,
               description="timm Swin on an 8x8 patch grid, 3 stages, 4x4 windows"),
        Family("mixer", ("image",), "timm", 1.0, (32, 48, 64), (3, 4), ("layer",), ("gelu", "silu"), (True,),
               _timm_mixer, stride=lambda z: 4, min_map=4, image_multiple=4,
               description="timm MLP-Mixer on a 4x4 patch grid"),
        Family("efficientnet", ("image",), "timm", 1.0, (8, 12), (3, 4), ("batch",), ("silu", "relu"), (True,),
               _timm_efficientnet, stride=lambda z: 8,
               description="timm EfficientNet blocks (MBConv + SE) on 3 stages"),
        Family("mobilenetv3", ("image",), "timm", 1.0, (8, 12), (3, 4), ("batch",), ("silu", "relu"), (True,),
               _timm_mobilenetv3, stride=lambda z: 8,
               description="timm MobileNetV3 blocks (ReLU, then hard-swish for act 'silu', SE) on 3 stages"),
        Family("densenet", ("image",), "timm", 1.0, (4, 6, 8), (3, 4), ("batch",), ("relu",), (False,),
               _timm_densenet, stride=lambda z: 8, description="timm DenseNet, 3 dense blocks, growth rate = width"),
        Family("regnet", ("image",), "timm", 1.0, (8, 16), (4, 5), ("batch",), ("relu", "silu"), (True,),
               _timm_regnet, stride=lambda z: 8, width_multiple=8, width_why="group width 8",
               description="timm RegNetX stages (grouped bottlenecks), 4 stages at stride 8"),
        # ------------------------------------------------------------ torchvision
        Family("tv_resnet", ("image",), "torchvision", 1.0, (8, 12), (3, 4), ("batch", "group"), ("relu",),
               (True,), _tv_resnet, stride=lambda z: 8,
               description="torchvision ResNet (BasicBlock, its _make_layer) at small widths, 3 stages"),
        Family("tv_mobilenet", ("image",), "torchvision", 1.0, (8, 12), (3, 4), ("batch",), ("relu",), (True,),
               _tv_mobilenet, stride=lambda z: 8,
               description="torchvision MobileNetV2, width_mult 0.25-0.5, 4 stages"),
        Family("tv_shufflenet", ("image",), "torchvision", 1.0, (16, 24), (3, 4), ("batch",), ("relu",),
               (False,), _tv_shufflenet, stride=lambda z: 16, min_map=1, width_multiple=2,
               width_why="its blocks split channels in two halves",
               description="torchvision ShuffleNetV2 at small widths, no max-pool"),
    ]
    return {f.name: f for f in fams}


FAMILIES: dict[str, Family] = _families()


# ==================================================================== measuring: python -m factory.families
def random_batch(shape: InputShape, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of `shape` (inputs, targets); text targets are the next tokens."""
    if shape.modality == "text":
        seq = torch.randint(0, shape.num_classes, (batch, shape.dims[0] + 1), generator=gen)
        return seq[:, :-1], seq[:, 1:]
    dims = (shape.dims[0], shape.dims[1], shape.dims[1]) if shape.modality == "image" else shape.dims
    return torch.randn(batch, *dims, generator=gen), torch.randint(0, shape.num_classes, (batch,), generator=gen)


def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class logits (B, K) or next-token logits (B, T, V)."""
    return F.cross_entropy(out.flatten(0, 1), y.flatten()) if out.ndim == 3 else F.cross_entropy(out, y)


def step_times(model: nn.Module, shape: InputShape, batch: int = 32, steps: int = 10, warmup: int = 3,
               seed: int = 0) -> tuple[float, float]:
    """(best CPU ms, median wall ms) of one training step (forward, backward, AdamW with foreach, as
    `factory.job.make_optimizer`) over `steps` steps after `warmup`. The best CPU time is the cost itself
    (timeit's convention: what exceeds it is other processes' interference, which on a shared 2-core
    machine varies by 2x from one minute to the next); the median wall time is what a run waited."""
    gen = torch.Generator().manual_seed(seed)
    x, y = random_batch(shape, batch, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    cpu, wall = [], []
    for i in range(warmup + steps):
        c0, w0 = time.process_time(), time.perf_counter()
        loss = loss_of(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    return 1000 * float(min(cpu)), 1000 * float(np.median(wall))


def speed_shapes() -> dict[str, InputShape]:
    """Per modality, the largest input of the built-in datasets (`factory.datasets.dataset_info`) with the
    most classes among them: the cost a family pays on its costliest dataset."""
    from factory.datasets import OFFLINE, dataset_info

    out: dict[str, InputShape] = {}
    for name in OFFLINE:
        info = dataset_info(name)
        cur = out.get(info.modality)
        if cur is None or math.prod(info.dims) > math.prod(cur.dims):
            cur = InputShape(info.modality, info.dims, max(info.num_classes, cur.num_classes if cur else 0))
        out[info.modality] = InputShape(info.modality, cur.dims, max(info.num_classes, cur.num_classes))
    return out


def speed_table(families: list[str] | None = None, batch: int = 32) -> list[dict]:
    """One row per family x modality at the family's median size (`Family.median`)."""
    torch.set_num_threads(1)
    shapes = speed_shapes()
    rows = []
    for name, fam in FAMILIES.items():
        if families and name not in families:
            continue
        for modality in fam.modalities:
            shape, size = shapes[modality], fam.median()
            torch.manual_seed(0)
            model = fam.build(shape, size)
            cpu, wall = step_times(model, shape, batch)
            rows.append({"family": name, "modality": modality, "dims": shape.dims, "width": size.width,
                         "depth": size.depth, "params": sum(p.numel() for p in model.parameters()),
                         "cpu_ms": round(cpu, 1), "wall_ms": round(wall, 1)})
            print(f"{name:14s} {modality:9s} {str(shape.dims):9s} w={size.width:<3d} d={size.depth}  "
                  f"{rows[-1]['params']:>8,d} params  {cpu:6.1f} ms CPU (best)  {wall:6.1f} ms wall (median)",
                  flush=True)
    return rows


LEARN_FAMILIES = {"image": ("cnn", "resnet"), "tabular": ("mlp", "transformer"), "sequence": ("gru", "conv1d"),
                  "text": ("lstm", "transformer")}  # the reference models of `learn_table`


def sample_batch(data, batch: int, gen: torch.Generator, text_context: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One seeded training batch of a `load_dataset` result: `batch` random samples, or with `text_context`
    (text) `batch` random windows of that many tokens and their next tokens."""
    if text_context is None:
        idx = torch.randint(0, len(data.x_train), (batch,), generator=gen)
        return data.x_train[idx], data.y_train[idx]
    idx = torch.randint(0, len(data.x_train) - text_context - 1, (batch,), generator=gen)
    win = idx[:, None] + torch.arange(text_context + 1)  # (batch, context + 1)
    return data.x_train[win[:, :-1]], data.x_train[win[:, 1:]]


def learn_curve(dataset: str, family: str, steps: int = 300, batch: int = 32, lr: float = 2e-3,
                checkpoints: tuple[int, ...] = (20, 100, 300), seed: int = 0) -> dict[int, tuple[float, float]]:
    """Train `family` (median size) on `dataset` (its natural dims, `dataset_info`) with AdamW at
    `lr * lr_scale` and return {step: (validation loss, validation accuracy)} at `checkpoints` (text:
    next-token loss and accuracy on validation windows). How learnable a dataset is in a factory-length run."""
    from factory.datasets import dataset_info, load_dataset

    info = dataset_info(dataset)
    kw = {"image_size": info.dims[1], "channels": info.dims[0]} if info.modality == "image" else {}
    data = load_dataset(dataset, seed=seed, max_train=3000, max_val=400, **kw)
    shape = InputShape(info.modality, info.dims, info.num_classes)
    fam = FAMILIES[family]
    torch.manual_seed(seed)
    model = fam.build(shape, fam.median())
    opt = torch.optim.AdamW(model.parameters(), lr=lr * fam.lr_scale, foreach=True)
    gen = torch.Generator().manual_seed(seed)
    context = info.dims[0]
    if info.modality == "text":
        starts = torch.arange(0, len(data.x_val) - context - 1, context)[:400]
        offsets = torch.arange(context)
        xv, yv = data.x_val[starts[:, None] + offsets], data.x_val[starts[:, None] + offsets + 1]
    else:
        xv, yv = data.x_val, data.y_val
    out = {}
    for step in range(1, steps + 1):
        x, y = sample_batch(data, batch, gen, context if info.modality == "text" else None)
        loss = loss_of(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in checkpoints:
            model.eval()
            with torch.no_grad():
                logits = model(xv)
                out[step] = (float(loss_of(logits, yv)), float((logits.argmax(-1) == yv).float().mean()))
            model.train()
    return out


def learn_table(datasets: list[str] | None = None, steps: int = 300) -> None:
    """Print how far each built-in dataset's reference families get in `steps` steps of batch 32."""
    from factory.datasets import OFFLINE, dataset_info

    torch.set_num_threads(1)
    for name in datasets or OFFLINE:
        info = dataset_info(name)
        chance = 1 / info.num_classes
        for family in LEARN_FAMILIES[info.modality]:
            curve = learn_curve(name, family, steps, checkpoints=(20, 100, steps))
            cells = "  ".join(f"step {k}: loss {v[0]:.2f} acc {v[1]:.3f}" for k, v in curve.items())
            print(f"{name:14s} {info.modality:9s} {str(info.dims):8s} {family:12s} chance {chance:.3f}  {cells}", flush=True)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = argparse.ArgumentParser(description="The factory's model families: list them, or time a training step of each.")
    p.add_argument("--speed", action="store_true", help="ms per training step (batch 32, AdamW, 1 thread) at the median "
                   "size on each modality's largest built-in input")
    p.add_argument("--learn", action="store_true", help="validation accuracy of reference families on each built-in "
                   "dataset after 20 / 100 / 300 steps")
    p.add_argument("--only", nargs="*", default=None, help="family names (--speed) or dataset names (--learn)")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    if args.learn:
        learn_table(args.only)
        return 0
    if not args.speed:
        for fam in FAMILIES.values():
            print(f"{fam.name:14s} {fam.source:12s} {','.join(fam.modalities):28s} widths {fam.widths} depths "
                  f"{fam.depths} norms {fam.norms} acts {fam.acts} residual {fam.residuals} lr x{fam.lr_scale}")
        return 0
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes share the cores: wall > CPU)")
    rows = speed_table(args.only, args.batch)
    cpu = [r["cpu_ms"] for r in rows]
    wall = [r["wall_ms"] for r in rows]
    print(f"\n{len(rows)} family x modality pairs: best CPU ms median {np.median(cpu):.1f}, max {max(cpu):.1f} "
          f"({rows[int(np.argmax(cpu))]['family']}/{rows[int(np.argmax(cpu))]['modality']}); wall ms median "
          f"{np.median(wall):.1f}, max {max(wall):.1f}; load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
