"""A TCN on scalar telemetry curves (paper Sec. 5.1 "Baselines", Table 3; Bai et al. 2018, "An
empirical evaluation of generic convolutional and recurrent networks for sequence modeling").

Input of the window ending at frame t: the last `window` frames (10, as TEViD) of per-frame scalar
features, each computed from the past only (`telemetry_features`):

    readout_features(CLIP_READOUTS)   16   signed log1p of the 8 readouts TEViD reads + 8 missing flags
    loss since the previous frame      3   signed log1p of mean and max of the finite per-step losses,
                                           fraction of non-finite steps
    relative (cfg.relative)           10   the 10 signed-log1p values above minus their value at frame 0
                                           (runs differ in loss scale by dataset and architecture)

standardised with the train split's mean/std (buffers of the model). The learning rate is not an
input, as for TEViD (docs/clips.md: a setting of the job, not a state of the network).

    (B, W, F) -> 'b w f -> b f w' -> [causal dilated Conv1d block] x levels (dilation 1, 2, 4, ...)
              -> last time step (B, C) -> Linear -> logits (B, K)

Trained with class-weighted cross-entropy on the window targets of TEViD (pretrain.clips.run_targets;
IGNORE windows excluded). As a Diagnoser: probs = softmax, score = 1 - p(healthy), vacuity None.

What the TCN reads is a `FeatureSet` (default `TELEMETRY`, the features above); the Hessian baseline
(eval/baselines/hessian_tcn.py) is the same machinery on the top-Hessian-eigenvalue series.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from capture.schema import CLASSES, CLIP_READOUTS, IGNORE
from diagnose.tevid import readout_features
from eval.replay import FrameOutput, LoadedRun, PastView
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.clips import ClipConfig, run_targets
from pretrain.engine import train_one_epoch

LOSS_FEATURES = ("loss_mean", "loss_max", "loss_nonfinite")


@dataclass
class TCNConfig:
    window: int = 10  # frames per window (as TEViD's T)
    channels: int = 32
    kernel_size: int = 3
    levels: int = 3  # dilations 1, 2, 4: receptive field 1 + 2 (k-1)(2^levels - 1) = 15 frames >= window
    dropout: float = 0.1
    relative: bool = True
    lr: float = 3e-3
    weight_decay: float = 1e-4
    epochs: int = 40
    batch_size: int = 64
    class_weighted: bool = True  # cross-entropy weights ~ 1 / class frequency in the training windows
    seed: int = 0
    horizon_epochs: float = ClipConfig.horizon_epochs  # of the targets


def feature_names(relative: bool = True) -> list[str]:
    base = [*CLIP_READOUTS, *(f"{k}_missing" for k in CLIP_READOUTS), *LOSS_FEATURES]
    rel = [f"{k}_rel" for k in (*CLIP_READOUTS, *LOSS_FEATURES[:2])] if relative else []
    return base + rel


def _slog(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def telemetry_features(frame_step, readouts, readout_names, train_loss, relative: bool = True) -> np.ndarray:
    """(T, F) float32 features of every frame; row t depends on frames <= t and steps <= frame_step[t] only."""
    names = list(readout_names)
    missing = [k for k in CLIP_READOUTS if k not in names]
    if missing:
        raise ValueError(f"telemetry_features: readouts {missing} missing (the run has {names})")
    raw = np.asarray(readouts, dtype=np.float32)[:, [names.index(k) for k in CLIP_READOUTS]]
    ro = readout_features(torch.from_numpy(raw)).numpy()  # (T, 16)
    steps, loss = np.asarray(frame_step, dtype=np.int64), np.asarray(train_loss, dtype=np.float64)
    stats = np.zeros((len(steps), 3))
    start = 0
    for t, s in enumerate(steps):
        seg = loss[start:s + 1]
        fin = seg[np.isfinite(seg)]
        if len(fin):
            stats[t, :2] = _slog(np.array([fin.mean(), fin.max()]))
        stats[t, 2] = 1.0 - len(fin) / max(len(seg), 1)
        start = s + 1
    feats = [ro, stats]
    if relative:
        values = np.concatenate([ro[:, :len(CLIP_READOUTS)], stats[:, :2]], axis=1)  # (T, 10) signed log1p
        feats.append(values - values[:1])
    return np.concatenate(feats, axis=1).astype(np.float32)


@dataclass(frozen=True)
class FeatureSet:
    """What a TCN reads per frame. `compute(src, relative) -> (T, F)` float32 takes a `LoadedRun` (training)
    or a `PastView` (streaming): both have frame_step, readouts, readout_names, train_loss, frame_arrays;
    row t must depend on frames <= t only. `names(relative)`: the F column names (saved with a checkpoint)."""

    name: str
    compute: Callable[[object, bool], np.ndarray]
    names: Callable[[bool], list[str]]


TELEMETRY = FeatureSet(
    "telemetry",
    lambda src, relative: telemetry_features(src.frame_step, src.readouts, src.readout_names, src.train_loss, relative),
    feature_names)


def last_window(features: np.ndarray, t: int, window: int) -> np.ndarray:
    """(window, F) rows t-window+1 .. t, left-padded with row 0 while t < window - 1."""
    idx = np.clip(np.arange(t - window + 1, t + 1), 0, None)
    return features[idx]


class TemporalBlock(nn.Module):
    """Two causal dilated convolutions with a residual connection (Bai et al. 2018, Fig. 1b)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.pad = (kernel_size - 1) * dilation  # left padding only: output t sees inputs <= t
        self.conv1 = nn.Conv1d(c_in, c_out, kernel_size, dilation=dilation)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel_size, dilation=dilation)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, W)
        y = self.drop(F.relu(self.conv1(F.pad(x, (self.pad, 0)))))
        y = self.drop(F.relu(self.conv2(F.pad(y, (self.pad, 0)))))
        return F.relu(y + self.skip(x))


class ScalarTCN(nn.Module):
    def __init__(self, cfg: TCNConfig, n_features: int, num_classes: int = len(CLASSES)):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        chans = [n_features] + [cfg.channels] * cfg.levels
        self.blocks = nn.Sequential(*[TemporalBlock(chans[i], chans[i + 1], cfg.kernel_size, 2 ** i, cfg.dropout)
                                      for i in range(cfg.levels)])
        self.head = nn.Linear(cfg.channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, F) raw features -> logits (B, K)."""
        x = (x - self.feature_mean) / self.feature_std
        h = self.blocks(rearrange(x, "b w f -> b f w"))  # (B, C, W)
        return self.head(h[:, :, -1])


# ---------------------------------------------------------------- training data and training

def run_features(run: LoadedRun, relative: bool = True, features: FeatureSet = TELEMETRY) -> np.ndarray:
    return features.compute(run, relative)


def tcn_windows(runs: list[LoadedRun], cfg: TCNConfig,
                features: FeatureSet = TELEMETRY) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows of labelled frames (t >= window-1, target != IGNORE): X (N, W, F), y (N,)."""
    xs, ys = [], []
    clip = ClipConfig(window=cfg.window, horizon_epochs=cfg.horizon_epochs)
    for run in runs:
        feats = run_features(run, cfg.relative, features)
        target, _ = run_targets(run.truth, run.frame_step, clip)
        for t in range(cfg.window - 1, len(run)):
            if int(target[t]) != IGNORE:
                xs.append(last_window(feats, t, cfg.window))
                ys.append(int(target[t]))
    if not xs:
        raise ValueError(f"tcn_windows: no labelled window of {cfg.window} frames in {len(runs)} run(s)")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long)


def _fit_normaliser(model: ScalarTCN, runs: list[LoadedRun], features: FeatureSet) -> None:
    rows = np.concatenate([run_features(r, model.cfg.relative, features) for r in runs])
    model.feature_mean.copy_(torch.from_numpy(rows.mean(0)))
    model.feature_std.copy_(torch.from_numpy(np.maximum(rows.std(0), 1e-3)))


def train_tcn(train_runs: list[LoadedRun], cfg: TCNConfig | None = None, val_runs: list[LoadedRun] | None = None,
              progress: bool = True, features: FeatureSet = TELEMETRY,
              name: str = "tcn_scalar") -> tuple["TCNDetector", dict]:
    """Train on the windows of `train_runs`; returns the detector and history {train_loss, val_loss: per epoch}."""
    cfg = cfg or TCNConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    x, y = tcn_windows(train_runs, cfg, features)
    model = ScalarTCN(cfg, x.shape[-1])
    _fit_normaliser(model, train_runs, features)
    counts = torch.bincount(y, minlength=len(CLASSES)).float()
    weight = None
    if cfg.class_weighted:
        weight = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros(()))
    val = tcn_windows(val_runs, cfg, features) if val_runs else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = {"train_loss": [], "val_loss": [], "n_train": len(y), "class_counts": counts.tolist()}
    total = 0.0

    def step_done(step: int, losses: list[torch.Tensor], batches: list) -> None:
        nonlocal total
        total += losses[0].item() * len(batches[0][1])

    for _ in tqdm(range(cfg.epochs), desc=f"train {name}", unit="epoch", file=sys.stderr, disable=not progress, leave=False):
        total = 0.0
        batches = ((x[idx], y[idx]) for idx in torch.randperm(len(y), generator=gen).split(cfg.batch_size))
        train_one_epoch(model, batches, opt, lambda m, batch: m(batch[0]),  # the project's training engine (pretrain.engine)
                        lambda logits, batch: F.cross_entropy(logits, batch[1], weight=weight), on_step=step_done,
                        what=f"{name} training")
        history["train_loss"].append(total / len(y))
        if val is not None:
            model.eval()
            with torch.no_grad():
                history["val_loss"].append(F.cross_entropy(model(val[0]), val[1], weight=weight).item())
    model.eval()
    return TCNDetector(model, name, features), history


class TCNDetector:
    """A trained TCN as a streaming Diagnoser: probs over CLASSES, score = 1 - p(healthy)."""

    kind = "scalar"
    frame_window = 0

    def __init__(self, model: ScalarTCN, name: str = "tcn_scalar", features: FeatureSet = TELEMETRY):
        self.model, self.name, self.cfg, self.features = model.eval(), name, model.cfg, features

    def reset(self, run_info: dict) -> None:
        pass  # every frame recomputes the features of the (short) past

    @torch.no_grad()
    def step(self, view: PastView) -> FrameOutput:
        feats = self.features.compute(view, self.cfg.relative)
        x = torch.from_numpy(last_window(feats, view.t, self.cfg.window))[None]  # (1, W, F)
        probs = torch.softmax(self.model(x).float(), dim=-1)[0].numpy().astype(np.float64)
        return FrameOutput(score=float(1.0 - probs[0]), probs=probs)

    def save(self, path: str | Path) -> Path:
        config = {"tcn": asdict(self.cfg), "feature_set": self.features.name,
                  "features": self.features.names(self.cfg.relative), "classes": list(CLASSES)}
        return save_checkpoint(path, model=self.model, config=config, step=0)

    @classmethod
    def load(cls, path: str | Path, name: str = "tcn_scalar", features: FeatureSet = TELEMETRY) -> "TCNDetector":
        ckpt = load_checkpoint(path)
        if "tcn" not in ckpt.config:
            raise ValueError(f"{path}: not a TCN checkpoint (config has no 'tcn' section)")
        saved = ckpt.config.get("feature_set", TELEMETRY.name)
        if saved != features.name:
            raise ValueError(f"{path}: a TCN on {saved!r} features, loaded as one on {features.name!r}")
        cfg = TCNConfig(**ckpt.config["tcn"])
        model = ScalarTCN(cfg, len(ckpt.config["features"]), len(ckpt.config.get("classes", CLASSES)))
        model.load_state_dict(ckpt.weights)
        return cls(model, name, features)


def windows_logits(detector: TCNDetector, run: LoadedRun) -> torch.Tensor:
    """(T, K) logits of every frame's window, in one batch (the streaming `step` must agree)."""
    feats = run_features(run, detector.cfg.relative, detector.features)
    x = torch.from_numpy(np.stack([last_window(feats, t, detector.cfg.window) for t in range(len(run))]))
    with torch.no_grad():
        return detector.model(x)

