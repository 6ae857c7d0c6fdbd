"""The two regressibility probes of the main paper's Sec. 5.4 (Sec. 3.2, App. F.2): how much of the
training loss the internal state explains, and how much of the state the loss history explains.

    python -m eval.probes --corpus outputs/corpus/cpu --out outputs/probes/cpu [--checkpoint FINETUNED] [key=value ...]

(a) state -> loss: an MLP (sklearn MLPRegressor, hidden [512, 128, 32], ReLU, as App. F.2) from the
    internal state X_t of frame t to the training loss at the frame's step. X_t = the frame (6, S, S)
    average-pooled to (6, pool, pool) and flattened ("flattened internal states"; pool = S keeps every
    pixel); with `--checkpoint`, the fine-tuned TEViD's video embedding of the window ending at t
    (`TEViD.forward_video`, the readouts are NOT used: they contain the loss).
(b) loss history -> state: a TCN (4 residual blocks, kernel 5, dilations 1, 2, 4, 8, as App. F.2;
    `eval.baselines.tcn.TemporalBlock`) from the per-step training losses of the last `history_steps`
    optimizer steps up to the frame's step (left-padded with the first step) to "a low-dimensional
    embedding of X_t". The paper does not define that embedding; here it is the frame's 6 per-channel
    means (act early/mid/late, grad early/mid/late), each standardised with the train split's statistics.

The loss is used as log(loss) (`loss_transform: log`; losses span orders of magnitude across runs and
diverged runs reach 1e6+): frames whose loss is not finite and positive are left out of (a); in (b) a
non-finite loss in the history is replaced by the last finite one and flagged in a second input channel.
Fitted on the train split's frames, scored on the test split's (held-out runs, architectures, datasets,
optimizers). R^2 (sklearn `r2_score`) is computed per test run and then averaged (App. F.2; runs with
fewer than 3 frames or a constant target have none), and pooled over all test frames; (b) averages the
6 outputs' R^2 (`multioutput="uniform_average"`).

Outputs in --out: config.json (ProbeConfig), probes.json (per probe: R^2 mean / sd / median per run,
pooled R^2, counts, per-run R^2) and probes.md (one line per probe; `python -m eval.report --probes
FILE` puts the same table in the report). Reads runs only through capture.store.RunStore (public arrays).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from sklearn.metrics import r2_score
from tqdm import tqdm

from capture.config import cli_parser, load_config, save_config
from capture.frames import CHANNELS
from eval.baselines.tcn import TemporalBlock
from eval.replay import LoadedRun, load_run
from eval.report import jsonable
from eval.tables import probes_table
from pretrain.clips import ClipConfig, corpus_runs
from pretrain.engine import train_one_epoch


@dataclass
class ProbeConfig:
    train_split: str = "train"  # fit
    test_split: str = "test"  # score (held-out runs)
    pool: int = 8  # frames (6, S, S) -> (6, pool, pool) average-pooled, flattened: X_t of probe (a)
    loss_transform: str = "log"  # "log" | "none": the loss as target of (a) and input of (b)
    mlp_hidden: list = field(default_factory=lambda: [512, 128, 32])
    mlp_alpha: float = 1e-4  # L2 penalty
    mlp_max_iter: int = 200  # epochs (early stopping on 10% of the training frames)
    history_steps: int = 128  # optimizer steps of loss history in (b); the TCN's receptive field is 121
    tcn_channels: int = 32
    tcn_kernel: int = 5
    tcn_dilations: list = field(default_factory=lambda: [1, 2, 4, 8])
    tcn_epochs: int = 40
    tcn_lr: float = 1e-3
    batch_size: int = 128
    window: int = ClipConfig.window  # TEViD embedding only: frames per window (the checkpoint's data.window wins)
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self):
        if self.loss_transform not in ("log", "none"):
            raise ValueError(f"ProbeConfig.loss_transform must be 'log' or 'none', got {self.loss_transform!r}")
        if self.pool < 1 or self.history_steps < 1:
            raise ValueError(f"ProbeConfig: pool and history_steps must be >= 1, got {self.pool}, {self.history_steps}")


# ---------------------------------------------------------------- per-run arrays

@dataclass
class ProbeData:
    """Frames of one split as probe samples: X (N, F) state features, loss (N,) at the frame step
    (transformed; NaN when not finite), history (N, 2, H) loss history + non-finite flags, state (N, 6)
    per-channel frame means, run (N,) run index into `run_ids`."""

    run_ids: list
    run: np.ndarray
    x: np.ndarray
    loss: np.ndarray
    history: np.ndarray
    state: np.ndarray


def transform_loss(loss: np.ndarray, how: str) -> np.ndarray:
    loss = np.asarray(loss, dtype=np.float64)
    if how == "none":
        return np.where(np.isfinite(loss), loss, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(loss) & (loss > 0), np.log(loss), np.nan)


def loss_histories(loss: np.ndarray, steps: np.ndarray, h: int) -> np.ndarray:
    """(T, 2, h): for each frame step s, losses at steps s-h+1..s (left-padded with step 0), non-finite
    values replaced by the last finite one (0 before any), and a channel flagging them."""
    loss = np.asarray(loss, dtype=np.float64)
    bad = ~np.isfinite(loss)
    filled = loss.copy()
    last = 0.0
    for i in range(len(filled)):  # carry the last finite value forward (runs are a few thousand steps)
        if bad[i]:
            filled[i] = last
        else:
            last = filled[i]
    idx = np.clip(np.asarray(steps)[:, None] - np.arange(h - 1, -1, -1)[None, :], 0, None)  # (T, h), oldest first
    return np.stack([filled[idx], bad[idx].astype(np.float64)], axis=1)


def pooled_frames(frames: torch.Tensor, pool: int) -> np.ndarray:
    """(T, 6, S, S) -> (T, 6 * pool * pool) average-pooled frames."""
    x = F.adaptive_avg_pool2d(frames.float(), pool)  # (T, 6, pool, pool)
    return rearrange(x, "t c h w -> t (c h w)").numpy().astype(np.float64)


@torch.no_grad()
def tevid_embeddings(model, frames: torch.Tensor, window: int, batch: int = 64) -> np.ndarray:
    """(T, D): the fine-tuned TEViD's video embedding of the causal window ending at each frame
    (frame 0 repeated on the left before frame window-1, as eval.replay.TEViDDiagnoser)."""
    t = len(frames)
    idx = torch.clamp(torch.arange(t)[:, None] - torch.arange(window - 1, -1, -1)[None, :], min=0)  # (T, W)
    out = [model.forward_video(frames[idx[i:i + batch]].float()) for i in range(0, t, batch)]  # (b, W, 6, S, S) each
    return torch.cat(out).double().numpy()


def split_data(corpus: Path, split: str, cfg: ProbeConfig, model=None, progress: bool = True) -> ProbeData:
    """Probe samples of every frame of every usable run of `split` (one run in memory at a time)."""
    records = corpus_runs(corpus, split)
    run_ids, parts = [], []
    for i, record in enumerate(tqdm(records, desc=f"probe data ({split})", unit="run", file=sys.stderr, disable=not progress,
                                    leave=False)):
        run: LoadedRun = load_run(corpus, record)
        steps = run.frame_step
        loss = transform_loss(run.train_loss, cfg.loss_transform)
        x = pooled_frames(run.frames, cfg.pool) if model is None else tevid_embeddings(model, run.frames, cfg.window)
        state = run.frames.float().mean(dim=(2, 3)).double().numpy()  # (T, 6)
        run_ids.append(run.run_id)
        parts.append((np.full(len(steps), i), x, loss[steps], loss_histories(loss, steps, cfg.history_steps), state))
    if not parts:
        raise ValueError(f"{corpus}: split {split!r} has no usable run")
    cols = list(zip(*parts))
    return ProbeData(run_ids, *(np.concatenate(c) for c in cols))


# ---------------------------------------------------------------- scoring

def r2_by_run(y: np.ndarray, pred: np.ndarray, run: np.ndarray, run_ids: list, min_frames: int = 3) -> dict:
    """R^2 per run (then mean, sd, median over runs: App. F.2) and pooled over all samples. A run with
    fewer than `min_frames` samples or a constant target (per output) has no R^2."""
    y, pred = y.reshape(len(y), -1), pred.reshape(len(pred), -1)
    per_run = {}
    for i in np.unique(run):
        m = run == i
        if m.sum() >= min_frames and np.all(y[m].std(axis=0) > 1e-12):
            per_run[run_ids[int(i)]] = float(r2_score(y[m], pred[m], multioutput="uniform_average"))
    values = np.array(list(per_run.values()))
    nan = math.nan
    return {"r2_per_run_mean": float(values.mean()) if len(values) else nan,
            "r2_per_run_sd": float(values.std(ddof=1)) if len(values) > 1 else nan,
            "r2_per_run_median": float(np.median(values)) if len(values) else nan,
            "r2_pooled": float(r2_score(y, pred, multioutput="uniform_average")) if len(y) > 1 else nan,
            "n_test": int(len(y)), "n_test_runs": int(len(np.unique(run))), "n_runs_with_r2": int(len(values)),
            "per_run": per_run}


# ---------------------------------------------------------------- (a) state -> loss: MLP

def fit_state_to_loss(x_train: np.ndarray, y_train: np.ndarray, cfg: ProbeConfig):
    """sklearn pipeline: standardised features -> MLPRegressor on the standardised target (undone on output)."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    mlp = MLPRegressor(hidden_layer_sizes=tuple(cfg.mlp_hidden), activation="relu", alpha=cfg.mlp_alpha,
                       batch_size=min(cfg.batch_size, len(y_train)), max_iter=cfg.mlp_max_iter, early_stopping=len(y_train) >= 50,
                       random_state=cfg.seed)
    model = TransformedTargetRegressor(make_pipeline(StandardScaler(), mlp), transformer=StandardScaler())
    return model.fit(x_train, y_train)


def state_to_loss(train: ProbeData, test: ProbeData, cfg: ProbeConfig) -> dict:
    ok_tr = np.isfinite(train.loss) & np.isfinite(train.x).all(1)
    ok_te = np.isfinite(test.loss) & np.isfinite(test.x).all(1)
    if ok_tr.sum() < 2 or ok_te.sum() < 2:
        raise ValueError(f"state->loss probe: too few frames with a finite loss (train {ok_tr.sum()}, test {ok_te.sum()})")
    model = fit_state_to_loss(train.x[ok_tr], train.loss[ok_tr], cfg)
    pred = model.predict(test.x[ok_te])
    return {"n_train": int(ok_tr.sum()), "n_left_out": int((~ok_te).sum()),
            **r2_by_run(test.loss[ok_te], pred, test.run[ok_te], test.run_ids)}


# ---------------------------------------------------------------- (b) loss history -> state: TCN

class HistoryTCN(nn.Module):
    """(B, C_in, H) loss history -> (B, out) via residual causal dilated conv blocks, read at the last step."""

    def __init__(self, c_in: int, out: int, channels: int = 32, kernel: int = 5, dilations=(1, 2, 4, 8)):
        super().__init__()
        chans = [c_in] + [channels] * len(dilations)
        self.blocks = nn.Sequential(*[TemporalBlock(chans[i], chans[i + 1], kernel, d, 0.0) for i, d in enumerate(dilations)])
        self.head = nn.Linear(channels, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x)[:, :, -1])  # (B, out)


def _standardiser(a: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray]:
    mean = np.nanmean(a, axis=axis, keepdims=True)
    return mean, np.maximum(np.nanstd(a, axis=axis, keepdims=True), 1e-6)


def fit_history_to_state(h_train: np.ndarray, y_train: np.ndarray, cfg: ProbeConfig):
    """Train a HistoryTCN (MSE on standardised inputs and targets); returns predict(h) -> y."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    hm, hs = _standardiser(h_train[:, :1], axis=(0, 2))  # the loss channel; the flag channel stays 0/1
    ym, ys = _standardiser(y_train, axis=0)

    def prep(h):
        h = h.copy()
        h[:, :1] = (h[:, :1] - hm) / hs
        return torch.from_numpy(h).float()

    x, y = prep(h_train), torch.from_numpy((y_train - ym) / ys).float()
    model = HistoryTCN(x.shape[1], y.shape[1], cfg.tcn_channels, cfg.tcn_kernel, tuple(cfg.tcn_dilations))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.tcn_lr, weight_decay=1e-4)
    for _ in range(cfg.tcn_epochs):  # the project's training engine (pretrain.engine)
        batches = ((x[idx], y[idx]) for idx in torch.randperm(len(y), generator=gen).split(cfg.batch_size))
        train_one_epoch(model, batches, opt, lambda m, batch: m(batch[0]), lambda out, batch: F.mse_loss(out, batch[1]),
                        what="loss->state probe training")
    model.eval()

    @torch.no_grad()
    def predict(h: np.ndarray) -> np.ndarray:
        out = torch.cat([model(b) for b in prep(h).split(1024)]) if len(h) else torch.zeros(0, y.shape[1])
        return out.double().numpy() * ys + ym

    return predict


def loss_to_state(train: ProbeData, test: ProbeData, cfg: ProbeConfig) -> dict:
    ok_tr, ok_te = np.isfinite(train.state).all(1), np.isfinite(test.state).all(1)
    predict = fit_history_to_state(train.history[ok_tr], train.state[ok_tr], cfg)
    return {"n_train": int(ok_tr.sum()), "n_left_out": int((~ok_te).sum()),
            **r2_by_run(test.state[ok_te], predict(test.history[ok_te]), test.run[ok_te], test.run_ids)}


# ---------------------------------------------------------------- the command

def run_probes(corpus: str | Path, out: str | Path, cfg: ProbeConfig, checkpoint: str | Path | None = None,
               progress: bool = True) -> dict:
    """Both probes; writes config.json, probes.json, probes.md into `out`; returns probes.json's content."""
    corpus, out = Path(corpus), Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    save_config(cfg, out)
    t0 = time.time()
    model, window = None, cfg.window
    if checkpoint is not None:
        from diagnose.tevid import load_tevid
        from pretrain.checkpoint import load_checkpoint

        model, _ = load_tevid(checkpoint, require_calibration=False)
        window = int((load_checkpoint(checkpoint).config.get("data") or {}).get("window", cfg.window))
        cfg = dataclasses.replace(cfg, window=window)
    train, test = split_data(corpus, cfg.train_split, cfg, model, progress), split_data(corpus, cfg.test_split, cfg, model, progress)
    loss_name = "log training loss" if cfg.loss_transform == "log" else "training loss"
    x_name = (f"TEViD video embedding ({checkpoint}, window {window})" if model is not None
              else f"frame avg-pooled to 6x{cfg.pool}x{cfg.pool}")
    a = state_to_loss(train, test, cfg)
    b = loss_to_state(train, test, cfg)
    probes = {
        "corpus": str(corpus), "checkpoint": None if checkpoint is None else str(checkpoint),
        "train_split": cfg.train_split, "test_split": cfg.test_split,
        "state_to_loss": {"input": x_name, "target": f"{loss_name} at the frame step", "model": f"MLP {cfg.mlp_hidden}", **a},
        "loss_to_state": {"input": f"{loss_name}, last {cfg.history_steps} steps", "target": f"per-channel frame means ({len(CHANNELS)})",
                          "model": f"TCN kernel {cfg.tcn_kernel}, dilations {cfg.tcn_dilations}", **b},
        "seconds": round(time.time() - t0, 1),
    }
    probes = jsonable(probes)
    (out / "probes.json").write_text(json.dumps(probes, indent=1, allow_nan=False) + "\n")
    (out / "probes.md").write_text(f"# Regressibility probes (paper Sec. 5.4)\n\ncorpus `{corpus}`; fitted on "
                                   f"`{cfg.train_split}`, R² on `{cfg.test_split}` runs.\n\n{probes_table(probes)}\n")
    return probes


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    parser = cli_parser("Regressibility probes of paper Sec. 5.4: state -> loss (MLP) and loss history -> state (TCN)",
                        corpus=True, checkpoint=True)
    args = parser.parse_args(argv)
    cfg = load_config(ProbeConfig, args.config, args.overrides)
    run_probes(args.corpus, args.out, cfg, args.checkpoint)
    print((Path(args.out) / "probes.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
