"""Video baselines: R(2+1)D and Video-Swin-T from torchvision on the same 6-channel clips as TEViD
(docs/architecture.md §9; paper Sec. 5.1 "Baselines", Table 3).

Both are plain softmax classifiers over the causal window of the last T = 10 frames:

    frames (B, T, 6, S, S) bf16 -> float, per-channel standardised (train statistics, buffers)
           -> 'b t c h w -> b c t h w' -> backbone -> logits (B, K = 5)

- `r2plus1d`: torchvision `VideoResNet` with `BasicBlock` / `Conv2Plus1D` and the R(2+1)D stem, i.e.
  `torchvision.models.video.r2plus1d_18` (layers [2, 2, 2, 2], width 64: the same parameter shapes
  except the stem's first conv, which takes 6 channels). `width` < 64 narrows every stage
  (width, 2w, 4w, 8w); `layers` makes it shallower.
- `video_swin`: torchvision `SwinTransformer3d` (the class behind `swin3d_t`; `swin3d_t()` hard-codes
  patch and window sizes, so passing them again is a duplicate keyword) with the patch embedding's
  conv for 6 channels. `swin3d_t`'s own sizes (patch [2, 4, 4], window [8, 7, 7], dim 96, depths
  [2, 2, 6, 2]) do run on (T = 10, 32 x 32) clips: torchvision pads the token grid (5, 8, 8) to the
  window and shrinks windows larger than the grid; the default here uses window [5, 4, 4] so the grid
  splits into 2 x 2 shifted windows at the first stage instead of one window, and a narrower model.

Training: `train_video(corpus, cfg)` on the windows of `pretrain.clips.CorpusClips` (train split),
IGNORE windows dropped, cross-entropy weighted by `diagnose.finetune.balanced_weights`, AdamW.
As a streaming `Diagnoser` (`VideoDetector`, kind "video"): probs = softmax, score = 1 - p(healthy),
vacuity None; the window is the last 10 frames, frame 0 repeated on the left before frame 9 (as
`eval.replay.TEViDDiagnoser`). Saved with `pretrain.checkpoint` (safetensors + JSON).
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, VideoResNet
from torchvision.models.video.swin_transformer import SwinTransformer3d
from tqdm import tqdm

from eval.replay import FrameOutput, PastView
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.clips import CLASSES, IGNORE, ClipConfig, CorpusClips, collate
from pretrain.engine import train_one_epoch

ARCHS = ("r2plus1d", "video_swin")
IN_CHANS = 6


@dataclass
class VideoConfig:
    """One video baseline: architecture, its sizes, and how it is trained."""

    arch: str = "r2plus1d"  # "r2plus1d" | "video_swin"
    # R(2+1)D
    width: int = 64  # channels of the first stage (64 = r2plus1d_18)
    layers: list = field(default_factory=lambda: [2, 2, 2, 2])
    # Video-Swin
    patch_size: list = field(default_factory=lambda: [2, 4, 4])  # (t, h, w) tubelet of the patch embedding
    window_size: list = field(default_factory=lambda: [5, 4, 4])
    embed_dim: int = 48
    depths: list = field(default_factory=lambda: [2, 2, 2, 2])
    num_heads: list = field(default_factory=lambda: [3, 6, 12, 24])
    stochastic_depth_prob: float = 0.1
    # training
    window: int = ClipConfig.window
    horizon_epochs: float = ClipConfig.horizon_epochs
    lr: float = 3e-4
    weight_decay: float = 0.05
    batch_size: int = 16
    epochs: int = 5
    max_steps: int | None = None  # stop after this many optimizer steps (tests)
    class_weighted: bool = True
    norm_clips: int = 256  # training clips used for the per-channel mean / std
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads in train_video (None: leave as is)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"VideoConfig.arch must be one of {ARCHS}, got {self.arch!r}")


def r2plus1d_config(**kw) -> VideoConfig:
    """R(2+1)D-18 at the cpu scale (full width; 31 M parameters)."""
    return VideoConfig(arch="r2plus1d", **kw)


def video_swin_config(**kw) -> VideoConfig:
    """Video-Swin at the cpu scale: swin3d_t's layout, dim 48, depths [2, 2, 2, 2], window [5, 4, 4]."""
    return VideoConfig(arch="video_swin", **kw)


VIDEO_CONFIGS = {"r2plus1d": r2plus1d_config, "video_swin": video_swin_config}


# ---------------------------------------------------------------- backbones

class NarrowR2Plus1D(VideoResNet):
    """torchvision's VideoResNet (BasicBlock, Conv2Plus1D, R(2+1)D stem) with a 6-channel stem and a
    configurable width; width 64 and layers [2, 2, 2, 2] has r2plus1d_18's parameter shapes."""

    def __init__(self, width: int = 64, layers=(2, 2, 2, 2), num_classes: int = len(CLASSES), in_chans: int = IN_CHANS):
        nn.Module.__init__(self)  # VideoResNet.__init__ hard-codes the widths 64 .. 512 and 3 input channels
        mid = 45 * width // 64  # R2Plus1dStem's 45 mid channels, scaled
        self.inplanes = width
        self.stem = nn.Sequential(
            nn.Conv3d(in_chans, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
            nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(width), nn.ReLU(inplace=True))
        self.layer1 = self._make_layer(BasicBlock, Conv2Plus1D, width, layers[0], stride=1)
        self.layer2 = self._make_layer(BasicBlock, Conv2Plus1D, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, Conv2Plus1D, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, Conv2Plus1D, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(8 * width * BasicBlock.expansion, num_classes)
        for m in self.modules():  # VideoResNet's initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)


def video_swin(cfg: VideoConfig, num_classes: int = len(CLASSES), in_chans: int = IN_CHANS) -> SwinTransformer3d:
    """torchvision SwinTransformer3d (swin3d_t's class) with the patch embedding's conv for 6 channels."""
    model = SwinTransformer3d(patch_size=list(cfg.patch_size), embed_dim=cfg.embed_dim, depths=list(cfg.depths),
                              num_heads=list(cfg.num_heads), window_size=list(cfg.window_size),
                              stochastic_depth_prob=cfg.stochastic_depth_prob, num_classes=num_classes)
    old = model.patch_embed.proj
    model.patch_embed.proj = nn.Conv3d(in_chans, old.out_channels, kernel_size=old.kernel_size, stride=old.stride)
    return model


class VideoClassifier(nn.Module):
    """(B, T, 6, S, S) clip -> (B, K) logits, with per-channel input standardisation (buffers)."""

    def __init__(self, cfg: VideoConfig, num_classes: int = len(CLASSES)):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("channel_mean", torch.zeros(IN_CHANS))
        self.register_buffer("channel_std", torch.ones(IN_CHANS))
        if cfg.arch == "r2plus1d":
            self.backbone = NarrowR2Plus1D(cfg.width, cfg.layers, num_classes)
        else:
            self.backbone = video_swin(cfg, num_classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 5 or frames.shape[2] != IN_CHANS:
            raise ValueError(f"{self.cfg.arch}: frames must be (B, T, {IN_CHANS}, S, S), got {tuple(frames.shape)}")
        x = frames.float()
        x = (x - self.channel_mean[:, None, None]) / self.channel_std[:, None, None]
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return self.backbone(rearrange(x, "b t c h w -> b c t h w"))  # (B, K)


# ---------------------------------------------------------------- training

def _labelled(ds: CorpusClips) -> np.ndarray:
    target = ds.targets()
    return np.flatnonzero(target != IGNORE), target


def _fit_normaliser(model: VideoClassifier, ds: CorpusClips, idx: np.ndarray, n: int, gen: torch.Generator) -> None:
    pick = idx[torch.randperm(len(idx), generator=gen)[:n].numpy()]
    x = torch.stack([ds[int(i)]["frames"] for i in pick]).float()  # (n, T, 6, S, S)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    model.channel_mean.copy_(x.mean(dim=(0, 1, 3, 4)))
    model.channel_std.copy_(x.std(dim=(0, 1, 3, 4)).clamp(min=1e-3))


def train_video(corpus: str | Path, cfg: VideoConfig | None = None, split: str = "train", progress: bool = True,
                name: str | None = None) -> tuple["VideoDetector", dict]:
    """Train a video baseline on the labelled windows of `split`; returns (detector, history {loss per step})."""
    from diagnose.finetune import balanced_weights

    cfg = cfg or VideoConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    ds = CorpusClips(corpus, split, ClipConfig(window=cfg.window, horizon_epochs=cfg.horizon_epochs))
    idx, target = _labelled(ds)
    if len(idx) == 0:
        raise ValueError(f"train_video: no labelled window of {cfg.window} frames in split {split!r} of {corpus}")
    model = VideoClassifier(cfg)
    _fit_normaliser(model, ds, idx, cfg.norm_clips, gen)
    counts = np.bincount(target[idx], minlength=len(CLASSES))
    weight = balanced_weights(counts.tolist()) if cfg.class_weighted else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(idx) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    history = {"loss": [], "n_train": int(len(idx)), "class_counts": counts.tolist()}
    bar = tqdm(total=total, desc=f"train {name or cfg.arch}", unit="step", file=sys.stderr, disable=not progress, leave=False)

    def epoch():  # one shuffled pass over the labelled windows, collated lazily
        for chunk in torch.from_numpy(idx)[torch.randperm(len(idx), generator=gen)].split(cfg.batch_size):
            yield collate([ds[int(i)] for i in chunk])

    def step_done(step: int, losses: list[torch.Tensor], batches: list) -> None:
        history["loss"].append(losses[0].item())
        bar.update()

    step = 0
    while step < total:  # the project's training engine (pretrain.engine), one process, no accumulation
        step = train_one_epoch(model, epoch(), opt, lambda m, batch: m(batch["frames"]),
                               lambda logits, batch: F.cross_entropy(logits, batch["target"], weight=weight, ignore_index=IGNORE),
                               step=step, max_steps=total, on_step=step_done, what=f"{name or cfg.arch} training").step
    bar.close()
    return VideoDetector(model.eval(), name or cfg.arch), history


# ---------------------------------------------------------------- streaming diagnoser

class VideoDetector:
    """A trained video classifier as a streaming Diagnoser: the window of the last `cfg.window` frames."""

    kind = "video"

    def __init__(self, model: VideoClassifier, name: str | None = None):
        self.model, self.cfg = model.eval(), model.cfg
        self.name = name or model.cfg.arch
        self.frame_window = model.cfg.window

    def reset(self, run_info: dict) -> None:
        pass  # windowed: no state between frames

    @torch.no_grad()
    def step(self, view: PastView) -> FrameOutput:
        idx = np.clip(np.arange(view.t - self.cfg.window + 1, view.t + 1), 0, None)  # frame indices of the window
        first = view.t + 1 - len(view.frames)  # view.frames holds frames first .. t
        frames = view.frames[torch.from_numpy(idx - first)][None]  # (1, T, 6, S, S)
        probs = torch.softmax(self.model(frames).float(), dim=-1)[0].double().numpy()
        return FrameOutput(score=float(1.0 - probs[0]), probs=probs)

    def logits(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 6, S, S) -> (B, K), no gradients (batched windows; `step` must agree)."""
        with torch.no_grad():
            return self.model(frames)

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(path, model=self.model, config={"video": asdict(self.cfg), "classes": list(CLASSES)}, step=0)

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> "VideoDetector":
        from capture.config import from_dict

        ckpt = load_checkpoint(path)
        if "video" not in ckpt.config:
            raise ValueError(f"{path}: not a video-baseline checkpoint (config has no 'video' section; keys {sorted(ckpt.config)})")
        cfg = from_dict(VideoConfig, ckpt.config["video"], f"{path}:video")
        model = VideoClassifier(cfg, len(ckpt.config.get("classes", CLASSES)))
        model.load_state_dict(ckpt.weights, strict=True)
        return cls(model.eval(), name)


def parameter_count(cfg: VideoConfig) -> int:
    return sum(p.numel() for p in VideoClassifier(cfg).parameters())


__all__ = ["ARCHS", "VIDEO_CONFIGS", "NarrowR2Plus1D", "VideoClassifier", "VideoConfig", "VideoDetector",
           "parameter_count", "r2plus1d_config", "train_video", "video_swin", "video_swin_config"]
