"""Offline datasets of the data factory (docs/architecture.md §6): one registry, one entry point.

    data = load_dataset("shapes", image_size=32, seed=0, num_classes=8)
    data.x_train  # (N, 3, 32, 32) float32, standardised per channel on the train split

Built in, nothing downloaded: scikit-learn `digits`; `mnist1d`, the MNIST-1D generator of
Greydanus (2020, "Scaling down deep learning", Sec. 2) re-implemented and vectorised, each 1-D
signal drawn as a curve on an S x S canvas; procedural `shapes` and `textures` whose class count
and noise are parameters; `pydoc_chars`, a character-level corpus from the documentation text that
ships with Python. Real datasets load from a local `root` in their standard on-disk formats:
`cifar10`, `cifar100` (python pickle batches, read by a restricted unpickler that resolves only
numpy's array reconstructors: a crafted file is refused, never run), `svhn` (`*_32x32.mat`), `tiny_imagenet` (JPEG tree),
`wikitext2` (`wiki.*.raw`); their val split is their test split.

Built in as well (issue 19's randomised corpus; nothing downloaded): `tabular_blobs` (scikit-learn's
`make_classification`), `tabular_wide` (scikit-learn's `make_gaussian_quantiles` in a rotated noise
subspace), `mnist1d_seq` (the MNIST-1D signals as (T, 1) sequences), `sines` (multi-channel waves whose
class is their frequency band, channel lag and chirp) and `pysrc_chars` (the Python standard library's
own .py sources, character level).

Every image dataset comes out as 3-channel `image_size` x `image_size` float32 images by default
(grayscale replicated, resized with `F.interpolate`); `channels=1` gives 1-channel images (colour
images converted to luminance). Images are standardised with the train split's per-channel mean
and std (kept in `meta`). Tabular data, (N, D) float32, is standardised per feature and sequences,
(N, T, C) float32, per channel, both on the train split. Text datasets are int64 token streams over a
<= 100-symbol vocabulary (`meta["vocab"]`). Everything is deterministic given `seed`.

`dataset_info(name)` says what a dataset is (modality, natural dims, classes) without loading it: the
image size and channel count the randomised corpus uses it at, the tabular features, the sequence
shape, and for text the factory's context length.
"""
from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable
import sys
import sysconfig
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d


@dataclass
class TaskData:
    name: str
    modality: str  # "image", "tabular", "sequence" or "text"
    num_classes: int  # classes; for text the vocabulary size
    # image: (N, C, S, S) float32 standardised (C = 3 unless channels=1); tabular: (N, D) float32;
    # sequence: (N, T, C) float32; text: (N,) int64 token stream
    x_train: torch.Tensor
    y_train: torch.Tensor | None  # (N,) int64 in [0, num_classes); text: None
    x_val: torch.Tensor
    y_val: torch.Tensor | None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """What every loader is told besides its own params. Loaders may subsample early (to avoid
    decoding files that would be dropped); `load_dataset` subsamples again, a no-op then."""

    image_size: int
    seed: int
    root: str | None
    max_train: int | None
    max_val: int | None


DATASETS: dict[str, Callable[..., TaskData]] = {}
TEXT_BLOCK = 256  # text: max_train / max_val count blocks of this many tokens (see load_dataset)
# random streams per seed, kept apart: generator content, its noise, train / val subsampling
_CONTENT_STREAM, _NOISE_STREAM, _TRAIN_STREAM, _VAL_STREAM = 0, 1, 2, 3


def register(name: str) -> Callable:
    def add(fn: Callable[..., TaskData]) -> Callable[..., TaskData]:
        DATASETS[name] = fn
        return fn

    return add


def load_dataset(name: str, *, image_size: int = 32, channels: int | None = None, seed: int = 0,
                 root: str | None = None, max_train: int | None = None, max_val: int | None = None,
                 **params) -> TaskData:
    """Load dataset `name` (a key of DATASETS) with its own `params` (e.g. `num_classes=8`).
    An unknown name or param is a ValueError listing the valid ones; a real dataset without a
    usable `root` is a FileNotFoundError naming the files it expects.

    Images come out at `image_size` with `channels` channels (1 or 3; None: 3, as before the
    randomised corpus); `dataset_info(name).dims` is the (channels, size) the corpus uses. Both are
    ignored by tabular, sequence and text datasets, except that `channels` given for one of them is
    a ValueError (a caller that thinks it loads images).

    `max_train` / `max_val` keep a deterministic, class-balanced subset of the samples; for text
    they keep the first `max * TEXT_BLOCK` tokens, so one config number is a sensible budget for
    both modalities (a window count of a few hundred would otherwise leave a few hundred chars).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3 (or None: 3), got {channels!r}")
    loader = DATASETS[name]
    valid = [p for p in inspect.signature(loader).parameters if p != "req"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown params {unknown} for dataset {name!r}; valid: {valid or 'none'}")
    if channels is not None and name in INFO and INFO[name].modality != "image":
        raise ValueError(f"channels={channels} given for {name!r}, a {INFO[name].modality} dataset: only images have channels")
    req = Request(image_size, seed, None if root is None else str(root), max_train, max_val)
    raw = loader(req, **params)
    raw.meta.update(name=name, seed=seed, params=params)
    if raw.modality == "text":
        return _finish_text(raw, max_train, max_val)
    if raw.modality in ("tabular", "sequence"):
        return _finish_features(raw, seed, max_train, max_val)
    return _finish_images(raw, image_size, seed, max_train, max_val, 3 if channels is None else channels)


# ------------------------------------------------------------------ shared finishing steps
def subsample_index(n: int, keep: int | None, seed: int | list[int], labels: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of a deterministic subset of size `keep` (all of range(n) when keep is None
    or >= n). With labels, classes are drawn round-robin so the subset stays balanced and holds
    every class as soon as keep >= number of classes."""
    if keep is None or keep >= n:
        return np.arange(n)
    perm = np.random.default_rng(seed).permutation(n)
    if labels is None:
        return np.sort(perm[:keep])
    yp = np.asarray(labels)[perm]
    order = np.argsort(yp, kind="stable")
    first = np.searchsorted(yp[order], yp[order], side="left")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - first  # position of each sample within its class (in perm order)
    return np.sort(perm[np.argsort(rank, kind="stable")[:keep]])


_LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights: RGB -> grey


def to_images(x: torch.Tensor, image_size: int, channels: int = 3) -> torch.Tensor:
    """(N, C, H, W) uint8 (0..255) or float -> (N, channels, S, S) float32; C must be 1 or 3. Grey
    images are replicated to 3 channels, colour ones converted to luminance for 1."""
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images need 1 or 3 channels, got shape {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if channels == 1 and x.shape[1] == 3:
        x = torch.einsum("nchw,c->nhw", x, torch.tensor(_LUMINANCE))[:, None]
    if x.shape[-2:] != (image_size, image_size):
        shrink = image_size < max(x.shape[-2:])  # antialias only when downsampling (avoids aliasing)
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrink)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 and channels == 3 else x


def _finish_images(raw: TaskData, image_size: int, seed: int, max_train: int | None, max_val: int | None,
                   channels: int = 3) -> TaskData:
    it = subsample_index(len(raw.y_train), max_train, [seed, _TRAIN_STREAM], raw.y_train.numpy())
    iv = subsample_index(len(raw.y_val), max_val, [seed, _VAL_STREAM], raw.y_val.numpy())
    x_train, x_val = to_images(raw.x_train[it], image_size, channels), to_images(raw.x_val[iv], image_size, channels)
    std, mean = torch.std_mean(x_train, dim=(0, 2, 3), keepdim=True)
    std = std.clamp_min(1e-6)  # a constant channel stays finite
    meta = {**raw.meta, "image_size": image_size, "channels": channels, "mean": mean.flatten().tolist(),
            "std": std.flatten().tolist()}
    return TaskData(raw.name, "image", raw.num_classes, (x_train - mean) / std, raw.y_train[it].long(),
                    (x_val - mean) / std, raw.y_val[iv].long(), meta)


def _finish_features(raw: TaskData, seed: int, max_train: int | None, max_val: int | None) -> TaskData:
    """Tabular (N, D) / sequence (N, T, C): class-balanced subsets, then standardised with the train
    split's mean and std per feature (tabular) or per channel over all steps (sequence)."""
    it = subsample_index(len(raw.y_train), max_train, [seed, _TRAIN_STREAM], raw.y_train.numpy())
    iv = subsample_index(len(raw.y_val), max_val, [seed, _VAL_STREAM], raw.y_val.numpy())
    x_train, x_val = raw.x_train[it].float(), raw.x_val[iv].float()
    axes = (0,) if raw.modality == "tabular" else (0, 1)
    std, mean = torch.std_mean(x_train, dim=axes, keepdim=True)
    std = std.clamp_min(1e-6)
    meta = {**raw.meta, "mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    return TaskData(raw.name, raw.modality, raw.num_classes, (x_train - mean) / std, raw.y_train[it].long(),
                    (x_val - mean) / std, raw.y_val[iv].long(), meta)


def _finish_text(raw: TaskData, max_train: int | None, max_val: int | None) -> TaskData:
    # a contiguous prefix: text windows must not straddle cut points
    x_train = raw.x_train if max_train is None else raw.x_train[: max_train * TEXT_BLOCK]
    x_val = raw.x_val if max_val is None else raw.x_val[: max_val * TEXT_BLOCK]
    return TaskData(raw.name, "text", raw.num_classes, x_train.clone(), None, x_val.clone(), None, raw.meta)


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced labels in random order."""
    return rng.permutation(np.arange(n) % num_classes)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], shaped (1, S, S) for broadcasting against (N, 1, 1)."""
    c = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)
    return c[None, None, :], c[None, :, None]  # X (columns), Y (rows)


def _colour_pair(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random background and foreground colours, (n, 3, 1, 1), >= 0.35 apart in every channel so
    the pattern is always visible; colour itself carries no class information."""
    bg = rng.random((n, 3)).astype(np.float32)
    gap = rng.uniform(0.35, 0.5, (n, 3)).astype(np.float32)
    fg = np.where(bg > 0.5, bg - gap, bg + gap)
    return bg[:, :, None, None], fg[:, :, None, None]


def _smooth_field(n: int, channels: int, cells: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency Gaussian random field: a cells x cells grid upsampled bicubically."""
    coarse = torch.from_numpy(rng.standard_normal((n, channels, cells, cells)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).numpy()


def _procedural(name: str, render: Callable, classes: list[str], req: Request, num_classes: int, noise: float,
                n_train: int, n_val: int) -> TaskData:
    """Shared driver of the procedural families: balanced labels, render at a canvas of
    max(32, S) (so small outputs are antialiased by the final resize), add noise from its own
    stream (the same seed gives the same clean images at any noise level), split."""
    if not 2 <= num_classes <= len(classes):
        raise ValueError(f"{name}: num_classes must be in [2, {len(classes)}], got {num_classes}")
    if n_train < 1 or n_val < 1:
        raise ValueError(f"{name}: n_train and n_val must be positive, got {n_train}, {n_val}")
    rng, noise_rng = np.random.default_rng([req.seed, _CONTENT_STREAM]), np.random.default_rng([req.seed, _NOISE_STREAM])
    n = n_train + n_val
    y = _labels(n, num_classes, rng)
    canvas = max(32, req.image_size)
    img = render(y, canvas, rng)  # (n, 3, canvas, canvas) float32 in ~[0, 1]
    img += noise * noise_rng.standard_normal(img.shape, dtype=np.float32)
    x, yt = torch.from_numpy(img), torch.from_numpy(y)
    meta = {"source": f"procedural {name}", "classes": classes[:num_classes], "noise": noise}
    return TaskData(name, "image", num_classes, x[:n_train], yt[:n_train], x[n_train:], yt[n_train:], meta)


# ------------------------------------------------------------------ shapes
def _shape_sdf(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) of a unit-size shape in its own frame."""
    r = np.hypot(u, v)
    if kind == "circle":
        return r - 0.9
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.75
    if kind == "triangle":  # equilateral, circumradius 1: inside all three half-planes
        normals = [np.pi / 2 + k * 2 * np.pi / 3 for k in range(3)]
        return np.max([u * np.cos(a) + v * np.sin(a) for a in normals], axis=0) - 0.5
    if kind == "cross":
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 1, av - 0.3), np.maximum(av - 1, au - 0.3))
    if kind == "ring":
        return np.abs(r - 0.75) - 0.2
    if kind == "bar":
        return np.maximum(np.abs(u) - 1, np.abs(v) - 0.28)
    if kind == "half_disk":
        return np.maximum(r - 0.95, -v)
    if kind == "frame":
        return np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.7) - 0.17
    if kind == "two_dots":
        return np.minimum(np.hypot(u - 0.55, v), np.hypot(u + 0.55, v)) - 0.4
    if kind == "star":
        return r - (0.6 + 0.35 * np.cos(5 * np.arctan2(v, u)))
    raise ValueError(f"unknown shape {kind!r}")


SHAPES = ["circle", "square", "triangle", "cross", "ring", "bar", "half_disk", "frame", "two_dots", "star"]


def _coverage(sd: np.ndarray, pixel: float) -> np.ndarray:
    """Antialiased coverage from a signed distance in canvas units: a one-pixel linear ramp."""
    return np.clip(0.5 - sd / pixel, 0.0, 1.0)


def _render_shapes(y: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    n = len(y)
    X, Y = _grid(size)
    pixel = 2.0 / size
    bg, fg = _colour_pair(n, rng)
    # clutter: a faint smooth colour field and 3 small dots of random colour under the shape
    img = bg + 0.15 * _smooth_field(n, 3, 4, size, rng)
    for _ in range(3):
        cx, cy = (rng.uniform(-0.9, 0.9, (2, n, 1, 1))).astype(np.float32)
        rad = rng.uniform(0.05, 0.09, (n, 1, 1)).astype(np.float32)
        cover = _coverage(np.hypot(X - cx, Y - cy) - rad, pixel)[:, None]
        img += cover * (rng.random((n, 3, 1, 1), dtype=np.float32) - img)
    scale = rng.uniform(0.35, 0.6, (n, 1, 1)).astype(np.float32)  # half-width in canvas units
    cx, cy = (rng.uniform(-1, 1, (2, n, 1, 1)) * (0.95 - scale)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    dx, dy = X - cx, Y - cy
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / scale
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / scale
    sd = np.empty((n, size, size), dtype=np.float32)
    for k in np.unique(y):  # one vectorised pass per class
        sd[y == k] = _shape_sdf(SHAPES[k], u[y == k], v[y == k])
    cover = _coverage(sd * scale, pixel)[:, None]  # local units -> canvas units
    return (img + cover * (fg - img)).astype(np.float32)


@register("shapes")
def load_shapes(req: Request, num_classes: int = 6, noise: float = 0.1, n_train: int = 3000, n_val: int = 600) -> TaskData:
    """Geometric shapes (SHAPES, in order) at random position, size, rotation and colour over a
    cluttered background (smooth colour field, small distractor dots)."""
    return _procedural("shapes", _render_shapes, SHAPES, req, num_classes, noise, n_train, n_val)


# ------------------------------------------------------------------ textures
TEXTURES = ["stripes_0", "stripes_45", "stripes_90", "stripes_135", "checker", "dots", "blobs", "rings",
            "waves", "fine_stripes"]


def _texture(kind: str, X: np.ndarray, Y: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """Pattern in [0, 1], (n, S, S). Random phase / offset everywhere, so no pixel is informative
    on its own; orientations jitter by +-10 degrees, frequencies (cycles per image) by a range."""
    def draw(lo, hi):
        return rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)

    jitter, phase = np.deg2rad(draw(-10, 10)), draw(0, 2 * np.pi)
    freq = draw(2.5, 4.5) * np.pi  # radians per canvas unit (the canvas spans 2 units)
    if kind.startswith("stripes_"):  # the angle is the stripes' normal: stripes_0 are vertical
        a = np.deg2rad(float(kind.split("_")[1])) + jitter
        return 0.5 + 0.5 * np.sin(freq * (X * np.cos(a) + Y * np.sin(a)) + phase)
    if kind == "fine_stripes":  # any orientation: only the frequency tells it apart
        a, f = draw(0, np.pi), draw(7, 9) * np.pi
        return 0.5 + 0.5 * np.sin(f * (X * np.cos(a) + Y * np.sin(a)) + phase)
    u = X * np.cos(jitter) + Y * np.sin(jitter)
    v = -X * np.sin(jitter) + Y * np.cos(jitter)
    if kind == "checker":
        return 1 / (1 + np.exp(-6 * np.sin(freq * u + phase) * np.sin(freq * v + draw(0, 2 * np.pi))))
    if kind == "dots":  # bright where both cosines peak: a lattice of round dots
        return np.clip(np.cos(freq * u + phase) + np.cos(freq * v + draw(0, 2 * np.pi)) - 1.0, 0, 1)
    if kind == "blobs":
        z = _smooth_field(n, 1, 6, X.shape[-1], rng)[:, 0]
        z = (z - z.mean((1, 2), keepdims=True)) / (z.std((1, 2), keepdims=True) + 1e-6)
        return 1 / (1 + np.exp(-2 * z))
    if kind == "rings":
        r = np.hypot(X - draw(-0.5, 0.5), Y - draw(-0.5, 0.5))
        return 0.5 + 0.5 * np.sin(freq * r + phase)
    if kind == "waves":
        a = draw(0, np.pi)
        s, t = X * np.cos(a) + Y * np.sin(a), -X * np.sin(a) + Y * np.cos(a)
        return 0.5 + 0.5 * np.sin(freq * s + 2.0 * np.sin(draw(1, 2) * np.pi * t + phase) + draw(0, 2 * np.pi))
    raise ValueError(f"unknown texture {kind!r}")


def _render_textures(y: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    X, Y = _grid(size)
    bg, fg = _colour_pair(len(y), rng)
    p = np.empty((len(y), size, size), dtype=np.float32)
    for k in np.unique(y):
        p[y == k] = _texture(TEXTURES[k], X, Y, rng, int((y == k).sum()))
    return (bg + p[:, None] * (fg - bg)).astype(np.float32)


@register("textures")
def load_textures(req: Request, num_classes: int = 6, noise: float = 0.1, n_train: int = 3000, n_val: int = 600) -> TaskData:
    """Texture classes (TEXTURES, in order): oriented gratings, checkerboard, dots, smooth blobs,
    concentric rings, wavy stripes, fine stripes; two random colours per image."""
    return _procedural("textures", _render_textures, TEXTURES, req, num_classes, noise, n_train, n_val)


# ------------------------------------------------------------------ mnist1d
# The ten 12-point digit templates and the generator settings of the reference implementation
# (greydanus/mnist1d, get_templates / get_dataset_args).
_MNIST1D_TEMPLATES = np.array([
    [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5], [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
    [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5], [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
    [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5], [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
    [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5], [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
    [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5], [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
])
MNIST1D_ARGS = {"padding": (36, 60), "scale_coeff": 0.4, "max_translation": 48, "corr_noise_scale": 0.25,
                "iid_noise_scale": 2e-2, "shear_scale": 0.75}


def _mnist1d_templates() -> np.ndarray:
    x = _MNIST1D_TEMPLATES - _MNIST1D_TEMPLATES.mean(1, keepdims=True)
    x /= x.std(1, keepdims=True)
    return (x - x[:, :1]) / 6.0  # every template starts (and ends) at 0


def _resample(x: np.ndarray, lengths: np.ndarray, out: int) -> np.ndarray:
    """Row-wise linear interpolation of the first `lengths[i]` values of row i onto `out` evenly
    spaced points (interp1d over linspace(0, 1, .) in the reference), vectorised."""
    pos = np.linspace(0, 1, out)[None, :] * (lengths - 1)[:, None]
    i = np.minimum(np.floor(pos).astype(np.int64), (lengths - 2)[:, None])
    frac = pos - i
    return np.take_along_axis(x, i, 1) * (1 - frac) + np.take_along_axis(x, i + 1, 1) * frac


# The same digits with a small shift, a mild shear and less padding noise, and time reversed so that the
# digit (the first quarter of a reference signal) ends the sequence, where a recurrent classifier reads it:
# learnable within the drawn corpus's 80-320 steps. On the reference settings the test split's healthy
# runs ended at a median validation accuracy of 0.22 (images) and 0.10 (sequences, chance) (issue 19
# corpus, `factory.stats`).
MNIST1D_ALIGNED_ARGS = {**MNIST1D_ARGS, "max_translation": 6, "corr_noise_scale": 0.1, "shear_scale": 0.3, "reverse": True}


def mnist1d_signals(y: np.ndarray, length: int, rng: np.random.Generator, args: dict | None = None) -> np.ndarray:
    """MNIST-1D signals for digit labels y, (n, length): the reference `transform` applied to
    every template at once (pad with zeros, dilate, scale, translate, correlated noise in the
    padding, iid noise, shear, subsample). Same procedure and settings (`args`, default
    MNIST1D_ARGS); a different random stream, so it does not reproduce the reference pickle bit for bit."""
    a, n, tl = args or MNIST1D_ARGS, len(y), _MNIST1D_TEMPLATES.shape[1]
    lo, hi = a["padding"]
    full = tl + hi
    pad = lo + (rng.random(n) * (hi - lo + 1)).astype(np.int64)
    src = np.zeros((n, full))
    src[:, :tl] = _mnist1d_templates()[y] + 1e-8  # eps keeps the digit apart from the zero padding
    x = _resample(src, tl + pad, full)  # pad, then dilate to a common length
    x *= 1 + a["scale_coeff"] * (rng.random(n) - 0.5)[:, None]
    shift = rng.integers(0, a["max_translation"], n)
    x = np.take_along_axis(x, (np.arange(full)[None, :] - shift[:, None]) % full, 1)  # circular shift
    corr = gaussian_filter1d(a["corr_noise_scale"] * rng.standard_normal((n, full)), 2, axis=1)
    x = np.where(x != 0, x, corr) + a["iid_noise_scale"] * rng.standard_normal((n, full))
    x -= (a["shear_scale"] * (rng.random(n) - 0.5))[:, None] * np.linspace(-0.5, 0.5, full)[None, :]
    x = _resample(x, np.full(n, full), length)
    return x[:, ::-1].copy() if a.get("reverse") else x


def render_signals(signals: np.ndarray, size: int, amplitude: float = 3.5) -> np.ndarray:
    """Draw each 1-D signal as a curve on a size x size canvas, (n, size, size) in [0, 1].

    Time runs left to right (the signal linearly resampled at the column centres); values
    +-`amplitude` span bottom to top (clipped). Each column is lit over the vertical range the
    curve covers inside it (from half-way to its left neighbour to half-way to its right one),
    so steep segments stay connected, with a one-pixel antialiased edge: a ~2 px stroke."""
    n, length = signals.shape
    t = np.clip((np.arange(size) + 0.5) / size * length - 0.5, 0, length - 1)
    i = np.minimum(np.floor(t).astype(np.int64), length - 2)
    v = signals[:, i] * (1 - (t - i)) + signals[:, i + 1] * (t - i)  # (n, size)
    rows = (1 - np.clip(v / amplitude, -1, 1)) / 2 * size - 0.5  # value -> row coordinate (0 = top)
    left = np.concatenate([rows[:, :1], rows[:, :-1]], 1)
    right = np.concatenate([rows[:, 1:], rows[:, -1:]], 1)
    lo = np.minimum(rows, np.minimum((rows + left) / 2, (rows + right) / 2))[:, None, :]
    hi = np.maximum(rows, np.maximum((rows + left) / 2, (rows + right) / 2))[:, None, :]
    r = np.arange(size, dtype=np.float64)[None, :, None]
    dist = np.maximum(np.maximum(lo - r, r - hi), 0)  # rows from the covered interval
    return np.clip(1.5 - dist, 0, 1).astype(np.float32)


def _mnist1d_images(name: str, req: Request, n_train: int, n_val: int, length: int, args: dict) -> TaskData:
    rng = np.random.default_rng([req.seed, _CONTENT_STREAM])
    n = n_train + n_val
    y = _labels(n, 10, rng)
    x = mnist1d_signals(y, length, rng, args)
    x = (x - x.mean()) / x.std()  # as the reference: centre the whole set, unit std
    img = torch.from_numpy(render_signals(x, max(32, req.image_size)))[:, None]
    yt = torch.from_numpy(y)
    meta = {"source": "procedural MNIST-1D (Greydanus 2020)", "signal_length": length, **args}
    return TaskData(name, "image", 10, img[:n_train], yt[:n_train], img[n_train:], yt[n_train:], meta)


@register("mnist1d")
def load_mnist1d(req: Request, n_train: int = 4000, n_val: int = 1000, length: int = 40) -> TaskData:
    """MNIST-1D (Greydanus 2020): 10 classes, signals of `length` points drawn as curves."""
    return _mnist1d_images("mnist1d", req, n_train, n_val, length, MNIST1D_ARGS)


@register("mnist1d_aligned")
def load_mnist1d_aligned(req: Request, n_train: int = 4000, n_val: int = 1000, length: int = 40) -> TaskData:
    """`mnist1d` with small shifts and less noise (MNIST1D_ALIGNED_ARGS), drawn as curves."""
    return _mnist1d_images("mnist1d_aligned", req, n_train, n_val, length, MNIST1D_ALIGNED_ARGS)


# ------------------------------------------------------------------ digits
@register("digits")
def load_digits(req: Request) -> TaskData:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), stratified 80/20 split by seed."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # pixel values 0..16
    y = torch.from_numpy(d.target.astype(np.int64))
    it, iv = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target, random_state=req.seed)
    # indices into the 1,797 images: the split itself, before any max_train / max_val
    meta = {"source": "sklearn.datasets.load_digits", "train_index": it, "val_index": iv}
    return TaskData("digits", "image", 10, x[it], y[it], x[iv], y[iv], meta)


# ------------------------------------------------------------------ tabular
def _split_labelled(name: str, modality: str, x: np.ndarray, y: np.ndarray, n_train: int, num_classes: int,
                    meta: dict) -> TaskData:
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return TaskData(name, modality, num_classes, xt[:n_train], yt[:n_train], xt[n_train:], yt[n_train:], meta)


def _check_sizes(name: str, n_train: int, n_val: int) -> None:
    if n_train < 1 or n_val < 1:
        raise ValueError(f"{name}: n_train and n_val must be positive, got {n_train}, {n_val}")


@register("tabular_blobs")
def load_tabular_blobs(req: Request, n_train: int = 4000, n_val: int = 1000) -> TaskData:
    """scikit-learn's `make_classification`: 16 features (8 informative, 4 redundant combinations of
    them, 4 noise), 6 classes of 2 Gaussian clusters each on hypercube vertices (class_sep 1.0), 3% of
    labels flipped. A linear model reaches about 0.5, a small MLP about 0.7 in 300 steps."""
    from sklearn.datasets import make_classification

    _check_sizes("tabular_blobs", n_train, n_val)
    x, y = make_classification(n_samples=n_train + n_val, n_features=16, n_informative=8, n_redundant=4,
                               n_classes=6, n_clusters_per_class=2, class_sep=1.0, flip_y=0.03, random_state=req.seed)
    meta = {"source": "sklearn.datasets.make_classification", "informative": 8, "redundant": 4}
    return _split_labelled("tabular_blobs", "tabular", x, y, n_train, 6, meta)


@register("tabular_wide")
def load_tabular_wide(req: Request, n_train: int = 4000, n_val: int = 1000) -> TaskData:
    """32 features: scikit-learn's `make_gaussian_quantiles` in 4 dimensions (4 classes: shells of the
    4-D Gaussian split at its radius quantiles) beside 28 noise features, all rotated by one random
    orthogonal matrix, so every feature mixes signal and noise. Not linearly separable (a linear model
    stays near chance, 0.25); a small MLP reaches about 0.6 in 300 steps."""
    from sklearn.datasets import make_gaussian_quantiles

    _check_sizes("tabular_wide", n_train, n_val)
    n = n_train + n_val
    rng = np.random.default_rng([req.seed, _CONTENT_STREAM])
    signal, y = make_gaussian_quantiles(n_samples=n, n_features=4, n_classes=4, random_state=req.seed)
    x = np.concatenate([signal, rng.standard_normal((n, 28))], axis=1)
    rotation, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    meta = {"source": "sklearn.datasets.make_gaussian_quantiles + noise, rotated", "informative": 4}
    return _split_labelled("tabular_wide", "tabular", x @ rotation, y, n_train, 4, meta)


# ------------------------------------------------------------------ sequences
def _mnist1d_sequences(name: str, req: Request, n_train: int, n_val: int, length: int, args: dict) -> TaskData:
    _check_sizes(name, n_train, n_val)
    rng = np.random.default_rng([req.seed, _CONTENT_STREAM])
    y = _labels(n_train + n_val, 10, rng)
    x = mnist1d_signals(y, length, rng, args)[:, :, None]  # (n, T, 1)
    meta = {"source": "procedural MNIST-1D (Greydanus 2020)", "signal_length": length, **args}
    return _split_labelled(name, "sequence", x, y, n_train, 10, meta)


@register("mnist1d_seq")
def load_mnist1d_seq(req: Request, n_train: int = 4000, n_val: int = 1000, length: int = 40) -> TaskData:
    """The MNIST-1D signals themselves as (T, 1) sequences, T = `length`: the same signals and labels as
    `mnist1d`'s images for the same seed and sizes."""
    return _mnist1d_sequences("mnist1d_seq", req, n_train, n_val, length, MNIST1D_ARGS)


@register("mnist1d_aligned_seq")
def load_mnist1d_aligned_seq(req: Request, n_train: int = 4000, n_val: int = 1000, length: int = 40) -> TaskData:
    """`mnist1d_aligned`'s signals as (T, 1) sequences: the same signals and labels for the same seed and sizes."""
    return _mnist1d_sequences("mnist1d_aligned_seq", req, n_train, n_val, length, MNIST1D_ALIGNED_ARGS)


SINES_CLASSES = [f"{band}_{lag}_{chirp}" for chirp in ("up", "down") for lag in ("lead", "lag") for band in ("slow", "fast")]


def sine_signals(y: np.ndarray, length: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """(n, length, 3) signals for `sines` labels y (see SINES_CLASSES: bit 0 frequency band, bit 1 which
    channel leads, bit 2 chirp direction). Channels 0 and 1 are one chirped wave at random amplitudes
    and phase, channel 1 shifted by +-(0.3-0.6) pi; channel 2 is a random walk (no class information);
    plus Gaussian noise of std `noise` everywhere."""
    n = len(y)
    band, lag, chirp = y % 2, (y // 2) % 2, y // 4
    t = np.linspace(0, 1, length)[None, :]
    f0 = np.where(band[:, None] == 0, rng.uniform(1.5, 3.0, (n, 1)), rng.uniform(3.0, 5.0, (n, 1)))  # cycles
    k = np.where(chirp[:, None] == 0, 1.0, -1.0) * rng.uniform(0.3, 0.8, (n, 1))
    phase = 2 * np.pi * f0 * (t + k * (t ** 2 - t)) + rng.uniform(0, 2 * np.pi, (n, 1))  # mean frequency f0
    shift = np.where(lag[:, None] == 0, 1.0, -1.0) * rng.uniform(0.3, 0.6, (n, 1)) * np.pi
    amp = rng.uniform(0.5, 1.5, (n, 3))
    walk = np.cumsum(rng.standard_normal((n, length)), axis=1) / np.sqrt(length)
    x = np.stack([amp[:, :1] * np.sin(phase), amp[:, 1:2] * np.sin(phase + shift), amp[:, 2:] * walk], axis=-1)
    return x + noise * rng.standard_normal(x.shape)


@register("sines")
def load_sines(req: Request, n_train: int = 4000, n_val: int = 1000, length: int = 48, noise: float = 0.6) -> TaskData:
    """3-channel waves, 8 classes (SINES_CLASSES): frequency band x which channel leads x chirp up/down,
    with random amplitudes, phases and a distractor channel; see `sine_signals`."""
    _check_sizes("sines", n_train, n_val)
    rng = np.random.default_rng([req.seed, _CONTENT_STREAM])
    y = _labels(n_train + n_val, 8, rng)
    meta = {"source": "procedural sines", "classes": SINES_CLASSES, "noise": noise}
    return _split_labelled("sines", "sequence", sine_signals(y, length, noise, rng), y, n_train, 8, meta)


# ------------------------------------------------------------------ text
OOV = "\ufffd"  # every character outside printable ASCII maps to this one symbol (index 0)
VOCAB = OOV + "\t\n" + "".join(chr(c) for c in range(32, 127))
_LOOKUP = np.zeros(128, dtype=np.int64)
_LOOKUP[[ord(c) for c in VOCAB[1:]]] = np.arange(1, len(VOCAB))


def encode_chars(text: str) -> torch.Tensor:
    """Text -> int64 indices into VOCAB (vectorised over code points)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return torch.from_numpy(np.where(codes < 128, _LOOKUP[np.minimum(codes, 127)], 0))


def decode_chars(tokens: torch.Tensor) -> str:
    return "".join(VOCAB[i] for i in tokens.tolist())


def _text_data(name: str, train: str, val: str, source: str) -> TaskData:
    x_train, x_val = encode_chars(train), encode_chars(val)
    oov = float((x_train == 0).float().mean()) if len(x_train) else 0.0
    meta = {"source": source, "vocab": VOCAB, "oov_symbol": OOV, "oov_fraction_train": oov}
    return TaskData(name, "text", len(VOCAB), x_train, None, x_val, None, meta)


@register("pydoc_chars")
def load_pydoc_chars(req: Request) -> TaskData:
    """Python's own documentation topics (pydoc_data.topics), sorted by key and joined by blank
    lines; contiguous 90/10 split."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    cut = int(0.9 * len(text))
    return _text_data("pydoc_chars", text[:cut], text[cut:], "pydoc_data.topics")


def stdlib_sources(max_chars: int) -> list[Path]:
    """The standard library's top-level .py files in sorted name order, as many whole files as fit in
    `max_chars` (at least one); a FileNotFoundError when the installation ships no sources."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(folder.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"pysrc_chars: no .py files in the standard library folder {folder} "
                                "(an installation without sources)")
    chosen, total = [], 0
    for f in files:
        size = f.stat().st_size
        if chosen and total + size > max_chars:
            break
        chosen.append(f)
        total += size
    return chosen


@register("pysrc_chars")
def load_pysrc_chars(req: Request, max_chars: int = 1_000_000) -> TaskData:
    """The Python standard library's own source: its top-level .py files in sorted name order (whole
    files up to `max_chars` characters, `stdlib_sources`), joined by blank lines; contiguous 90/10
    split. Fixed for a given Python version (recorded in `meta`)."""
    files = stdlib_sources(max_chars)
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    cut = int(0.9 * len(text))
    data = _text_data("pysrc_chars", text[:cut], text[cut:], "sysconfig stdlib *.py")
    data.meta.update(python=sys.version.split()[0], files=[f.name for f in files])
    return data


# ------------------------------------------------------------------ real datasets from `root`
def find_root(name: str, root: str | None, files: list[str], subdir: str) -> Path:
    """The folder holding `files`: `root` itself or `root/subdir`; else a clear error."""
    wanted = ", ".join(files)
    if root is None:
        raise FileNotFoundError(f"{name} is read from a local copy: pass root=<folder holding {wanted}> "
                                f"(e.g. the extracted {subdir}/); nothing is downloaded")
    for folder in (Path(root), Path(root) / subdir):
        if all((folder / f).exists() for f in files):
            return folder
    missing = [f for f in files if not (Path(root) / f).exists()]
    raise FileNotFoundError(f"{name}: root={root} lacks {', '.join(missing)} (expected {wanted} "
                            f"in root or in root/{subdir})")


def _numpy_global(name: str):
    """numpy's pickle helper `name` (numpy 2 keeps them in numpy._core, numpy 1 in numpy.core)."""
    import importlib

    for module in ("numpy._core.multiarray", "numpy._core.numeric", "numpy.core.multiarray", "numpy.core.numeric"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {name}")


class _NdarrayType:
    """What the global `numpy.ndarray` resolves to in a CIFAR batch: a marker only `_safe_reconstruct`
    accepts (the real class, called by a crafted REDUCE, could build arrays of any dtype)."""


def _plain_dtype(spec, *args) -> np.dtype:
    """np.dtype of a type string ('u1', b'<i8', ...) only: no structured or object dtypes."""
    if not isinstance(spec, (str, bytes)):
        raise pickle.UnpicklingError(f"dtype {spec!r} is not a plain type string: not allowed in a CIFAR batch")
    dtype = np.dtype(spec.decode("latin-1") if isinstance(spec, bytes) else spec, *args)
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"dtype {dtype} is not a plain numeric/bytes dtype: not allowed in a CIFAR batch")
    return dtype


def _safe_reconstruct(subtype, shape, dtype):
    if subtype is not _NdarrayType:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not allowed in a CIFAR batch")
    return np.ndarray.__new__(np.ndarray, shape, _plain_dtype(dtype))


def _checked(dtype) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.names is not None:
        raise pickle.UnpicklingError(f"dtype {dtype!r} is not allowed in a CIFAR batch")
    return dtype


def _safe_scalar(dtype, *data):
    return _numpy_global("scalar")(_checked(dtype), *data)


def _safe_frombuffer(buf, dtype, shape, order):
    return _numpy_global("_frombuffer")(buf, _checked(dtype), shape, order)


def _safe_encode(text, encoding="utf-8"):
    """`_codecs.encode`, which Python 3's protocol-2 pickles use for bytes: text to latin-1 bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin-1 text in a CIFAR batch")
    return text.encode(encoding)


# every global a CIFAR python batch may name (numpy 1 and 2 spellings), mapped to a checked stand-in
_CIFAR_GLOBALS = {
    **{(m, "_reconstruct"): _safe_reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _safe_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _safe_frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _safe_encode,
}


class _BatchUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its BUILD step can be checked too
    """Reads a CIFAR python batch (a dict of bytes keys to numpy arrays, lists, bytes and numbers) and
    nothing else. The only globals it resolves are numpy's array, dtype and scalar reconstructors,
    checked: plain dtypes only, no ndarray subclasses. Any other global (os.system, builtins.eval, a
    class whose __reduce__ runs code) is refused before it can be called. BUILD (`__setstate__`) is
    allowed on arrays and dtypes only, and a dtype's state may not add fields or flags: numpy would
    otherwise take a state marking plain bytes as object pointers."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return allowed

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a CIFAR batch")

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            if (not isinstance(state, tuple) or len(state) not in (8, 9) or state[2:5] != (None, None, None)
                    or state[7] != inst.flags or (len(state) == 9 and state[8] is not None)):
                raise pickle.UnpicklingError(f"dtype state {state!r} is not allowed in a CIFAR batch")
        elif isinstance(inst, np.ndarray):
            if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[4], (bytes, bytearray)):
                raise pickle.UnpicklingError("array state is not (version, shape, dtype, fortran, raw bytes)")
            _checked(state[2])
        else:
            raise pickle.UnpicklingError(f"setting the state of a {type(inst).__name__} is not allowed in a CIFAR batch")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def _unpickle(path: Path) -> dict:
    """One CIFAR python batch through `_BatchUnpickler`; a ValueError naming the file for anything that is
    not one (a crafted pickle is refused, never run)."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError, OverflowError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a CIFAR python batch ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (a {type(batch).__name__}, expected a dict)")
    return batch


def _batch_arrays(path: Path, batch: dict, label_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, 32, 32) uint8 images and (N,) int64 labels of one batch, checked."""
    data, labels = batch.get(b"data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be an (N, 3072) uint8 array, got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        y = None
    if y is None or y.shape != (len(data),) or (len(y) and (y.min() < 0 or y.max() >= classes)):
        raise ValueError(f"{path}: {label_key!r} must be {len(data)} labels in [0, {classes})")
    return data.reshape(-1, 3, 32, 32), y


def _cifar(name: str, req: Request, train_files: list[str], test_file: str, label_key: bytes, classes: int,
           subdir: str) -> TaskData:
    folder = find_root(name, req.root, train_files + [test_file], subdir)

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_batch_arrays(folder / f, _unpickle(folder / f), label_key, classes) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(x), torch.from_numpy(y)

    (xt, yt), (xv, yv) = read(train_files), read([test_file])
    return TaskData(name, "image", classes, xt, yt, xv, yv, {"source": str(folder)})


@register("cifar10")
def load_cifar10(req: Request) -> TaskData:
    files = [f"data_batch_{i}" for i in range(1, 6)]
    return _cifar("cifar10", req, files, "test_batch", b"labels", 10, "cifar-10-batches-py")


@register("cifar100")
def load_cifar100(req: Request) -> TaskData:
    return _cifar("cifar100", req, ["train"], "test", b"fine_labels", 100, "cifar-100-python")


@register("svhn")
def load_svhn(req: Request) -> TaskData:
    """SVHN cropped digits (format 2): X (32, 32, 3, N) uint8, y (N, 1) with 10 meaning digit 0."""
    from scipy.io import loadmat

    folder = find_root("svhn", req.root, ["train_32x32.mat", "test_32x32.mat"], "svhn")

    def read(file: str) -> tuple[torch.Tensor, torch.Tensor]:
        mat = loadmat(folder / file)
        x = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)))  # (H, W, C, N) -> (N, C, H, W)
        y = mat["y"].reshape(-1).astype(np.int64) % 10  # label 10 is the digit 0
        return torch.from_numpy(x), torch.from_numpy(y)

    (xt, yt), (xv, yv) = read("train_32x32.mat"), read("test_32x32.mat")
    return TaskData("svhn", "image", 10, xt, yt, xv, yv, {"source": str(folder)})


def _read_jpegs(paths: list[Path]) -> torch.Tensor:
    """(N, 3, H, W) uint8 at the first image's size (Tiny-ImageNet is all 64x64; some are grey)."""
    from PIL import Image

    arrays, size = [], None
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            size = size or im.size
            arrays.append(np.asarray(im if im.size == size else im.resize(size, Image.BILINEAR)))
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


@register("tiny_imagenet")
def load_tiny_imagenet(req: Request, num_classes: int | None = None) -> TaskData:
    """Tiny-ImageNet-200: train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt.
    Classes are the sorted wnids (as torchvision's ImageFolder), the first `num_classes` kept
    (default: all, 200 in the real set).
    Only the files that survive max_train / max_val are decoded."""
    folder = find_root("tiny_imagenet", req.root, ["wnids.txt", "train", "val/images", "val/val_annotations.txt"],
                       "tiny-imagenet-200")
    wnids = sorted((folder / "wnids.txt").read_text().split())
    num_classes = len(wnids) if num_classes is None else num_classes
    if not 1 <= num_classes <= len(wnids):
        raise ValueError(f"tiny_imagenet: num_classes must be in [1, {len(wnids)}], got {num_classes}")
    index = {w: i for i, w in enumerate(wnids[:num_classes])}
    train = [(p, index[w]) for w in index for p in sorted((folder / "train" / w / "images").glob("*.JPEG"))]
    val = []
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in index:
            val.append((folder / "val" / "images" / parts[0], index[parts[1]]))
    if not train or not val:
        raise FileNotFoundError(f"tiny_imagenet: no JPEGs found for the selected classes under {folder}")

    def read(items: list[tuple[Path, int]], keep: int | None, seed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = np.array([c for _, c in items])
        idx = subsample_index(len(items), keep, seed, labels)  # the same subset _finish_images would take
        return _read_jpegs([items[i][0] for i in idx]), torch.from_numpy(labels[idx])

    xt, yt = read(train, req.max_train, [req.seed, _TRAIN_STREAM])
    xv, yv = read(val, req.max_val, [req.seed, _VAL_STREAM])
    return TaskData("tiny_imagenet", "image", num_classes, xt, yt, xv, yv,
                    {"source": str(folder), "wnids": wnids[:num_classes]})


@register("wikitext2")
def load_wikitext2(req: Request) -> TaskData:
    """WikiText-2 raw, character level like pydoc_chars: wiki.train.raw / wiki.valid.raw."""
    folder = find_root("wikitext2", req.root, ["wiki.train.raw", "wiki.valid.raw"], "wikitext-2-raw")
    read = lambda f: (folder / f).read_text(encoding="utf-8")  # noqa: E731
    return _text_data("wikitext2", read("wiki.train.raw"), read("wiki.valid.raw"), str(folder))


BUILTIN = ["digits", "mnist1d", "shapes", "textures", "pydoc_chars"]  # need no files; 3-channel images by default
# every dataset that needs no files: BUILTIN and the other modalities of the randomised corpus
OFFLINE = BUILTIN + ["tabular_blobs", "tabular_wide", "mnist1d_seq", "sines", "pysrc_chars", "mnist1d_aligned", "mnist1d_aligned_seq"]
TEXT_DATASETS = {"pydoc_chars", "wikitext2", "pysrc_chars"}  # modality "text": known without loading them


# ------------------------------------------------------------------ what a dataset is, without loading it
TEXT_CONTEXT = 32  # the dims of a text dataset: the factory's default context (TrainingConfig.lm_context)


MODALITIES = ("image", "tabular", "sequence", "text")  # what TaskData.modality may be


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's modality, natural dims and class count (text: vocabulary size). Dims as
    `factory.families.InputShape`: image (C, S), the channel count and size the randomised corpus loads
    it at (`load_dataset(name, image_size=S, channels=C)`); tabular (D,); sequence (T, C); text
    (TEXT_CONTEXT,)."""

    modality: str
    dims: tuple[int, ...]
    num_classes: int


_TEXT_INFO = DatasetInfo("text", (TEXT_CONTEXT,), len(VOCAB))
INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("image", (1, 16), 10),  # 8x8 scans, upsampled
    "mnist1d": DatasetInfo("image", (1, 24), 10),
    "mnist1d_aligned": DatasetInfo("image", (1, 24), 10),
    "shapes": DatasetInfo("image", (3, 32), 6),
    "textures": DatasetInfo("image", (3, 32), 6),
    "cifar10": DatasetInfo("image", (3, 32), 10),
    "cifar100": DatasetInfo("image", (3, 32), 100),
    "svhn": DatasetInfo("image", (3, 32), 10),
    "tiny_imagenet": DatasetInfo("image", (3, 64), 200),
    "tabular_blobs": DatasetInfo("tabular", (16,), 6),
    "tabular_wide": DatasetInfo("tabular", (32,), 4),
    "mnist1d_seq": DatasetInfo("sequence", (40, 1), 10),
    "mnist1d_aligned_seq": DatasetInfo("sequence", (40, 1), 10),
    "sines": DatasetInfo("sequence", (48, 3), 8),
    "pydoc_chars": _TEXT_INFO,
    "pysrc_chars": _TEXT_INFO,
    "wikitext2": _TEXT_INFO,
}
def dataset_info(name: str, **params) -> DatasetInfo:
    """What `load_dataset(name, **params)` gives, without loading anything: modality, dims, classes.
    `params` are the dataset's own (`num_classes` of shapes / textures / tiny_imagenet, `length` of
    mnist1d_seq / sines); others are accepted when the loader takes them and change nothing here."""
    if name not in INFO:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(INFO))}")
    valid = [p for p in inspect.signature(DATASETS[name]).parameters if p != "req"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown params {unknown} for dataset {name!r}; valid: {valid or 'none'}")
    info = INFO[name]
    if params.get("num_classes") is not None:
        info = replace(info, num_classes=int(params["num_classes"]))
    if "length" in params and info.modality == "sequence":
        info = replace(info, dims=(int(params["length"]), info.dims[1]))
    return info
