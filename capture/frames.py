"""Internal-state frames: captured tensors -> one `6 x S x S` bfloat16 frame.

Implements docs/architecture.md §3 (and the main paper's Appendix B.3):

    any layout  --to_grid-->  (B, C, H, W)                non-finite values replaced and counted
                --channel-group RMS-->  (B, G, H, W)
                --shared 1x1 projection G->1-->  (B, H, W)
                --batch mean-->  (H, W)
                --resize-->  (S, S)
    six maps    --robust z-score (frozen stats)--> signed log1p --> (6, S, S) bf16
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

LAYOUTS = ("bchw", "bhwc", "bnd", "tbd", "bcl", "bd")
CHANNELS = ("act_early", "act_mid", "act_late", "grad_early", "grad_mid", "grad_late")


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


def tensor_to_map(
    x: torch.Tensor, layout: str, size: int, projection: Projection, prefix_tokens: int = 0, per_sample: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One captured tensor -> `(S, S)` float32 map and its count of non-finite values (a 0-d tensor:
    no device sync). Runs in float32 with autocast off, whatever the user's forward runs under.

    `per_sample=True` (DP telemetry): each sample's map before the batch mean, `(B, H, W)` at the
    tensor's own resolution, and its count of non-finite values `(B,)`; `resize_map` of their mean is
    the `(S, S)` map."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _tensor_to_map(x.detach().float(), layout, size, projection, prefix_tokens, per_sample)


def resize_map(m: torch.Tensor, size: int) -> torch.Tensor:
    """`(H, W)` -> `(S, S)`: bilinear with antialiasing (a linear map: the resized mean is the mean of the resized)."""
    return F.interpolate(m[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0]


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


def _tensor_to_map(x: torch.Tensor, layout: str, size: int, projection: Projection, prefix_tokens: int,
                   per_sample: bool = False):
    bad, finite = count_nonfinite(x, per_sample)
    if not finite:
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    pooled = channel_groups(to_grid(x, layout, prefix_tokens), projection.groups)  # (B, G, H, W)
    if per_sample:
        return projection.apply(pooled), bad  # (B, H, W), (B,)
    # batch mean, then the (linear) projection: B times less work than projecting every sample -> (H, W) -> (S, S)
    return resize_map(projection.apply(pooled.mean(dim=0, keepdim=True))[0], size), bad


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
