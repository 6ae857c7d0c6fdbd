"""Internal-state frames: captured tensors -> one `6 x S x S` bfloat16 frame.

Implements docs/architecture.md §3 (and the main paper's Appendix B.3):

    any layout  --to_grid-->  (B, C, H, W)                non-finite values replaced and counted
                --channel-group RMS-->  (B, G, H, W)
                --shared 1x1 projection G->1-->  (B, H, W)
                --batch mean-->  (H, W)
                --resize-->  (S, S)
    six maps    --robust z-score (frozen stats)--> signed log1p --> (6, S, S) bf16

Beside each frame, from the same native `(H, W)` batch-mean maps (issue 19: what a new input
representation needs, so that changing it does not mean regenerating the corpus):

    native (H, W) map  --log10 RMS over its data cells-->  level      (6,)     float32
                       --standardise per frame, resize-->   pattern    (6, P, P)

The level keeps the map's absolute scale (before any normalisation) and the pattern its spatial
shape alone, so that levels relative to the run can be computed when a store is read.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

LAYOUTS = ("bchw", "bhwc", "bnd", "tbd", "bcl", "bd")
CHANNELS = ("act_early", "act_mid", "act_late", "grad_early", "grad_mid", "grad_late")
PATTERN_SIZE = 8  # default P of the per-map patterns (CaptureConfig.pattern_size)
LEVEL_FLOOR = -30.0  # log10 RMS of a map that is all zeros (or whose RMS is below 1e-30): finite, far below any real map
PATTERN_RESIZE = "bilinear: align_corners=True (no antialias) along axes shorter than P, antialiased along longer ones"


def to_grid(x: torch.Tensor, layout: str, prefix_tokens: int = 0) -> torch.Tensor:
    """Bring a captured tensor to `(B, C, H, W)`.

    `bnd` token outputs drop `prefix_tokens` (CLS / register tokens) and are padded with zeros
    to the next square number of tokens; `tbd` (sequence-first RNN / transformer outputs) and `bcl`
    (1-D convolutions) are brought to `bnd` first; `bd` vectors become a 1-channel square grid.
    """
    if layout == "bchw":
        return x
    if layout == "bhwc":
        return rearrange(x, "b h w c -> b c h w")
    if layout == "tbd":
        x, layout = rearrange(x, "t b d -> b t d"), "bnd"
    if layout == "bcl":
        x, layout = rearrange(x, "b c l -> b l c"), "bnd"
    if layout == "bd":
        x = x.unsqueeze(-1)  # (B, D, 1): D tokens of one channel
        layout = "bnd"
    if layout == "bnd":
        x = x[:, prefix_tokens:]
        n = x.shape[1]
        side = max(1, math.isqrt(n - 1) + 1) if n > 0 else 1
        if side * side != n:
            x = F.pad(x, (0, 0, 0, side * side - n))
        return rearrange(x, "b (h w) d -> b d h w", h=side)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def grid_cells(shape: tuple[int, ...], layout: str, prefix_tokens: int = 0) -> int:
    """How many cells of `to_grid`'s `(H, W)` grid hold data for a tensor of `shape`: H * W for image
    layouts; for token layouts the tokens after the prefix (the first cells in row-major order; the rest
    is `to_grid`'s zero padding up to a square)."""
    if layout == "bchw":
        return shape[2] * shape[3]
    if layout == "bhwc":
        return shape[1] * shape[2]
    tokens = {"bnd": 1, "bd": 1, "tbd": 0, "bcl": 2}.get(layout)
    if tokens is None:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return max(0, shape[tokens] - prefix_tokens)


def channel_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Root-mean-square over `groups` contiguous channel groups: `(B, C, H, W) -> (B, G, H, W)`.

    Adaptive pooling, so any C works (C < G repeats channels). RMS rather than a signed mean:
    the gradient entering a LayerNorm sums to zero over channels, so signed channel means of the
    gradient are exactly zero at every token of a pre-norm transformer's residual stream.
    """
    b, c, h, w = x.shape
    if c % groups == 0:  # equal contiguous groups: the same bins as adaptive pooling, ~7x faster on CPU
        return _sqrt((x * x).reshape(b, groups, c // groups, h, w).mean(dim=2))
    pooled = F.adaptive_avg_pool3d((x * x)[:, None], (groups, h, w))  # (B, 1, G, H, W)
    return _sqrt(pooled[:, 0])


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Elementwise sqrt. On CPU through numpy's (correctly rounded) sqrt: torch's vectorised CPU sqrt takes
    a slow path on zeros, ~7x slower, and max pooling leaves 3/4 of a CNN's gradient map at exactly 0."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
        return torch.from_numpy(np.sqrt(x.contiguous().numpy()))
    return x.sqrt()


@dataclass
class Projection:
    """The single 1x1 projection `G -> 1` shared by all architectures and all six maps.

    Default weights are the mean (1/G each). `fit_pca` sets them to the first principal
    component of group vectors gathered from training runs; `frozen` projections are versioned
    by `digest()` and saved in every run store's attributes.
    """

    weight: list[float] = field(default_factory=lambda: [1.0 / 8] * 8)
    bias: float = 0.0
    kind: str = "mean"

    @property
    def groups(self) -> int:
        return len(self.weight)

    @classmethod
    def mean(cls, groups: int = 8) -> "Projection":
        return cls(weight=[1.0 / groups] * groups, bias=0.0, kind="mean")

    @classmethod
    def fit_pca(cls, samples: torch.Tensor) -> "Projection":
        """Fit on `(N, G)` group vectors (pixels of pooled maps, see `group_vectors`).
        Sign chosen so the weights sum > 0."""
        from sklearn.decomposition import PCA

        x = samples.detach().double().cpu().numpy()
        pca = PCA(n_components=1).fit(x)
        w = pca.components_[0]
        if w.sum() < 0:
            w = -w
        bias = -float(pca.mean_ @ w)  # centre the projected values
        return cls(weight=[float(v) for v in w], bias=bias, kind="pca")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, G, H, W) -> (B, H, W)`."""
        w = torch.tensor(self.weight, dtype=x.dtype, device=x.device)
        return torch.einsum("bghw,g->bhw", x, w) + self.bias

    def to_dict(self) -> dict:
        return {"weight": list(self.weight), "bias": self.bias, "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict) -> "Projection":
        return cls(weight=[float(v) for v in d["weight"]], bias=float(d["bias"]), kind=str(d["kind"]))

    def digest(self) -> str:
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def group_vectors(x: torch.Tensor, layout: str, groups: int, prefix_tokens: int = 0) -> torch.Tensor:
    """`(N, G)` pooled group vectors of one captured tensor: the samples `Projection.fit_pca` takes."""
    x = torch.nan_to_num(x.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    return rearrange(channel_groups(to_grid(x, layout, prefix_tokens), groups), "b g h w -> (b h w) g")


class NativeMap(NamedTuple):
    """A captured tensor reduced to its map at the tensor's own resolution."""

    map: torch.Tensor  # (H, W) batch mean, or (B, H, W) per sample; float32
    nonfinite: torch.Tensor  # count of non-finite values replaced by 0: 0-d, or (B,) per sample
    cells: int  # cells of the grid holding data (`grid_cells`); the rest is zero padding
    resized: torch.Tensor | None = None  # (S, S) `resize_map` of the batch-mean map, when asked for


def native_map(x: torch.Tensor, layout: str, projection: Projection, prefix_tokens: int = 0,
               per_sample: bool = False, size: int | None = None) -> NativeMap:
    """One captured tensor -> its projected, pooled map at its native `(H, W)` (before `resize_map`), the
    count of its non-finite values (no device sync), its data cells and, given `size` (not per sample),
    its `(S, S)` resized map. Float32, autocast off.
    `per_sample=True` (DP telemetry): each sample's map before the batch mean, `(B, H, W)`."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        m, bad = _tensor_to_map(x.detach().float(), layout, projection, prefix_tokens, per_sample)
        resized = resize_map(m, size) if size is not None and not per_sample else None
    return NativeMap(m, bad, grid_cells(tuple(x.shape), layout, prefix_tokens), resized)


def tensor_to_map(
    x: torch.Tensor, layout: str, size: int, projection: Projection, prefix_tokens: int = 0, per_sample: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One captured tensor -> `(S, S)` float32 map and its count of non-finite values (a 0-d tensor:
    no device sync). Runs in float32 with autocast off, whatever the user's forward runs under.

    `per_sample=True` (DP telemetry): each sample's map before the batch mean, `(B, H, W)` at the
    tensor's own resolution, and its count of non-finite values `(B,)`; `resize_map` of their mean is
    the `(S, S)` map."""
    native = native_map(x, layout, projection, prefix_tokens, per_sample, size)
    return (native.map if per_sample else native.resized), native.nonfinite


def resize_map(m: torch.Tensor, size: int) -> torch.Tensor:
    """`(H, W)` -> `(S, S)`: bilinear with antialiasing (a linear map: the resized mean is the mean of the resized)."""
    return F.interpolate(m[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0]


@functools.lru_cache(maxsize=256)
def _axis_matrix(n: int, size: int) -> np.ndarray:
    """`(P, n)` float64: `resize_pattern` along one axis of length n, found by resizing the n unit impulses."""
    if n == size:
        return np.eye(n)
    eye = torch.eye(n, dtype=torch.float64)[:, None, :, None]  # n images (1, n, 1): impulse j at row j
    out = F.interpolate(eye, size=(size, 1), mode="bilinear", align_corners=n < size, antialias=n > size)
    return out[:, 0, :, 0].T.numpy().copy()  # (P, n): column j is impulse j's response


def resize_pattern(m: torch.Tensor, size: int) -> torch.Tensor:
    """`(H, W)` -> `(P, P)`, one axis at a time (`PATTERN_RESIZE`): `A_H @ m @ A_W.T`, the two `(P, n)` axis
    matrices of `F.interpolate(mode="bilinear")` with, per axis:

    - shorter than P: `align_corners=True`, no antialias. Linear interpolation between the cells, the
      outer cells on the border: a 2x2 map becomes a smooth bilinear ramp bounded by its values, with
      neither the blocks of nearest-neighbour upsampling nor the flat border bands of
      `align_corners=False` (1.5 of 8 pixels each side for 2 -> 8), whose width would give the native
      size (the architecture) away. The price: the cell centres move up to half a native cell outwards.
    - longer than P: `antialias=True` (a triangle filter as wide as the reduction, the kernel of
      `resize_map`): every output pixel averages the cells it covers, nothing is subsampled away.
    - equal to P: left as it is."""
    h, w = m.shape
    a_h, a_w = (torch.from_numpy(_axis_matrix(n, size)).to(m.device, m.dtype) for n in (h, w))
    return a_h @ m @ a_w.T


def summarise_maps(maps: list[torch.Tensor | None], size: int, cells: list[int | None] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Native maps (each `(H, W)` or None) -> levels `(len(maps),)` and patterns `(len(maps), P, P)`, float32
    on the CPU (NaN level, zero pattern for a None or a map without data cells). See `map_summary`.

    The maps come to the CPU in one copy (call this once per frame, where the frame is synced anyway) and
    are summarised together in float64, each in the top-left corner of a common zero-padded block: on maps
    this small, a numpy call per map and statistic would cost several times the arithmetic."""
    k = len(maps)
    cells = cells or [None] * k
    levels, patterns = [math.nan] * k, np.zeros((k, size, size))
    idx = [c for c, m in enumerate(maps) if m is not None and (cells[c] is None or cells[c] > 0)]
    if idx:
        shapes = tuple((*maps[c].shape, maps[c].numel() if cells[c] is None else min(cells[c], maps[c].numel())) for c in idx)
        take, rows, n, a_h, a_w = _block_layout(shapes, size)
        flat = torch.cat([maps[c].detach().reshape(-1) for c in idx]).to("cpu", torch.float64).numpy()
        v = np.zeros(rows.shape)  # (k', Hmax * Wmax): map i's data cells in the top-left (H_i, W_i) of its row
        v[rows] = flat[take]
        lv, z = _standardise(v, rows, n)
        patterns[idx] = a_h @ z.reshape(len(idx), a_h.shape[2], a_w.shape[1]) @ a_w  # (k', P, P)
        for c, level in zip(idx, lv):
            levels[c] = level
    return torch.tensor(levels, dtype=torch.float32), torch.from_numpy(patterns.astype(np.float32))


@functools.lru_cache(maxsize=64)
def _block_layout(shapes: tuple[tuple[int, int, int], ...], size: int):
    """Maps of `shapes` ((H, W, data cells), ...), flattened and concatenated, laid out in a `(k, Hmax * Wmax)`
    block: which of their values are data cells (`take`), where these go (`rows`: map i's cells row-major in
    the top-left (H_i, W_i) of row i), the cell counts `n`, and the per-map `resize_pattern` matrices padded
    with zeros to `(k, P, Hmax)` and `(k, Wmax, P)`."""
    hmax, wmax = max(h for h, _, _ in shapes), max(w for _, w, _ in shapes)
    take = np.concatenate([np.arange(h * w) < n for h, w, n in shapes])
    rows = np.zeros((len(shapes), hmax, wmax), dtype=bool)
    a_h, a_w = np.zeros((len(shapes), size, hmax)), np.zeros((len(shapes), wmax, size))
    for i, (h, w, n) in enumerate(shapes):
        rows[i, :h, :w] = (np.arange(h * w) < n).reshape(h, w)
        a_h[i, :, :h], a_w[i, :w, :] = _axis_matrix(h, size), _axis_matrix(w, size).T
    return take, rows.reshape(len(shapes), -1), [n for _, _, n in shapes], a_h, a_w


def _standardise(v: np.ndarray, rows: np.ndarray, n: list[int]) -> tuple[list[float], np.ndarray]:
    """`(k, N)` float64 maps, zero outside their data cells `rows` (`n[i]` of them) -> levels and the
    standardised maps `(k, N)` (zero outside the data cells, and for a constant map): `map_summary`'s
    arithmetic. Sums in numpy, the per-map scalars in Python (k is at most 6: cheaper than numpy calls)."""
    s1, s2 = v.sum(axis=1).tolist(), np.einsum("kn,kn->k", v, v).tolist()
    if not all(map(math.isfinite, s2)):  # inf or NaN somewhere (a float32 overflow): inf -> float32's largest, NaN -> 0
        big = float(torch.finfo(torch.float32).max)
        v = np.nan_to_num(v, nan=0.0, posinf=big, neginf=-big)
        s1, s2 = v.sum(axis=1).tolist(), np.einsum("kn,kn->k", v, v).tolist()
    levels, means, scales = [], [], []
    for a, b, cnt in zip(s1, s2, n):
        mean, ms = a / cnt, b / cnt
        var = max(ms - mean * mean, 0.0)  # float64: exact enough for the test below and for 1 / sd
        levels.append(max(LEVEL_FLOOR, 0.5 * math.log10(ms)) if ms > 0 else LEVEL_FLOOR)
        means.append(mean)
        scales.append(1.0 / math.sqrt(var) if var > 1e-10 * ms else 0.0)  # sd <= 1e-5 RMS: constant, zero pattern
    return levels, (v - np.array(means)[:, None]) * (rows * np.array(scales)[:, None])


def map_summary(m: torch.Tensor, size: int, cells: int | None = None) -> tuple[float, torch.Tensor]:
    """A native `(H, W)` map -> (level, `(P, P)` float32 pattern on the CPU), computed in float64.

    level    log10 of the RMS of the map's `cells` data cells (default all), at least `LEVEL_FLOOR`: a
             zero map gets the floor, not -inf. A value that overflowed float32 (inf) counts as
             float32's largest, so a level is at most log10(3.4e38) ~ 38.5. No data cells: NaN.
    pattern  the data cells standardised (minus their mean, over their population std), padding cells
             set to 0 (the mean: `to_grid`'s zero padding of token grids leaves no mark), then
             `resize_pattern`. A map whose std is at most 1e-5 of its RMS (constant up to float32
             rounding, e.g. a 1x1 map) gives zeros. Mean 0 and std 1 hold over the native data cells;
             at P x P the spread is smaller (interpolating a 2x2 map or averaging a 32x32 one shrinks
             it: about 0.6 for 2x2 random maps): a reader wanting unit variance at P x P divides by it."""
    levels, patterns = summarise_maps([m], size, [cells])
    return float(levels[0]), patterns[0]


def count_nonfinite(x: torch.Tensor, per_sample: bool = False) -> tuple[torch.Tensor, bool]:
    """(int64 count of x's non-finite elements, 0-d or `(B,)` with `per_sample`; whether x is known to be all
    finite). On CPU a look at the data costs no device sync: a finite sum means every element is finite (one
    inf or NaN makes it inf or NaN), the usual case, and the count is skipped (one reduction, no temporary:
    ~30x cheaper than counting `~isfinite(x)`). A non-finite sum (or one that overflowed) and other devices
    count exactly, on the device."""
    if x.device.type == "cpu" and math.isfinite(x.sum().item()):
        return torch.zeros(x.shape[0] if per_sample else (), dtype=torch.int64), True
    d = x - x  # 0 exactly where x is finite, NaN where it is not
    return (torch.count_nonzero(d.flatten(1), dim=1) if per_sample else torch.count_nonzero(d)), False


def _tensor_to_map(x: torch.Tensor, layout: str, projection: Projection, prefix_tokens: int, per_sample: bool = False):
    bad, finite = count_nonfinite(x, per_sample)
    if not finite:
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    pooled = channel_groups(to_grid(x, layout, prefix_tokens), projection.groups)  # (B, G, H, W)
    if per_sample:
        return projection.apply(pooled), bad  # (B, H, W), (B,)
    # batch mean, then the (linear) projection: B times less work than projecting every sample -> (H, W)
    return projection.apply(pooled.mean(dim=0, keepdim=True))[0], bad


class RobustNormalizer:
    """Per-channel robust z-score with statistics from the run's own first captures.

    Each of the six maps gets a median and an IQR pooled over its first captures, frozen once at
    least `warmup` captures are pooled and their IQR is non-zero. A map can be constant at first
    (a zero-initialised last BatchNorm makes the first activation map all zeros; a 1x1 feature map
    resizes to a constant frame): it then keeps pooling until the spread over time is non-zero,
    scaled meanwhile by its mean absolute deviation, or 1. Frame i only ever uses frames 0..i, so
    normalisation is causal.
    """

    TINY = 1e-12

    def __init__(self, warmup: int = 1, clip: float = 1e6, max_pool: int = 64):
        self.warmup = warmup
        self.clip = clip
        self.max_pool = max_pool  # a map that stays constant this long is frozen as it is
        self._pool: list[list[torch.Tensor]] = [[] for _ in CHANNELS]
        self._frozen = [False] * len(CHANNELS)
        self.median = torch.zeros(len(CHANNELS))
        self.scale = torch.ones(len(CHANNELS))

    @property
    def frozen(self) -> bool:
        return all(self._frozen)

    def _update(self, maps: torch.Tensor) -> None:
        for c, m in enumerate(maps.detach().float().cpu()):
            if self._frozen[c]:
                continue
            pool = self._pool[c]
            pool.append(m.flatten())
            values = torch.cat(pool)
            q1, med, q3 = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75]))
            iqr, mad = q3 - q1, (values - med).abs().mean()
            self.median[c] = med
            self.scale[c] = iqr if iqr > self.TINY else (mad if mad > self.TINY else 1.0)
            if (len(pool) >= self.warmup and iqr > self.TINY) or len(pool) >= self.max_pool:
                self._frozen[c] = True
                pool.clear()

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        """`(6, S, S)` float maps -> squashed float32 frame."""
        if not self.frozen:
            self._update(maps)
        med = self.median.to(maps.device)[:, None, None]
        scale = self.scale.to(maps.device)[:, None, None]
        z = ((maps.float() - med) / scale).clamp(-self.clip, self.clip)
        return torch.sign(z) * torch.log1p(z.abs())  # bounded by log1p(clip) ~ 13.8

    def state_dict(self) -> dict:
        return {"warmup": self.warmup, "frozen": self.frozen, "median": self.median.tolist(), "scale": self.scale.tolist()}
