"""TEViD: the temporal vision diagnostician (docs/architecture.md §7; paper Sec. 4.3 and Appendix D).

    frames   (B, T, 6, S, S) -> keep `channels` -> SpaceTimeEncoder -> tokens (B, T, P, D) -> mean over T and P -> (B, D)
    readouts (B, T, 8) raw   -> readout_features (B, T, 16) -> Linear+GELU per frame (B, T, E) -> GRU -> last state (B, E)
    concat (B, D + E) -> LayerNorm -> MLP -> evidence logits f (B, K)
                                   +-> MLP -> anomaly logit a (B,)     (with `anomaly_head`)

With `anomaly_head` a second head scores "is this window anomalous" (trained with binary cross-entropy on
every window of a labelled run, the onset-to-trigger stretch the class head ignores included; targets
`pretrain.clips.window_anomalous`): that score drives the alarm, the class head names the kind
(`diagnose.decision`, `Rule.score_threshold`).

With `representation="relative"` the same two branches read the run-relative inputs of `capture.relative`
(the look of the network taken out): unit patterns (B, T, 6, P, P) in place of the frames (the encoder's
img_size is then P) and the relative scalars (B, T, 81) in place of the readouts (no readout_features).

`inputs` selects the branches: "both" (the model), "video" or "readouts" (the fusion ablation is one
flag; an unused branch is not built). `channels` selects frame channels for the encoder (the
activations-only / gradients-only ablation, paper App. C.4, Table 12): the model always takes the
corpus's 6-channel frames and keeps these channels before the patch embedding, whose `in_chans` is
their number, so every caller (fine-tuning, calibration, replay, live monitor) passes frames as
stored. The evidential read-out of `f` is `diagnose.evidential.dirichlet`.
The encoder starts from a Dynamics-MAE checkpoint (its `encoder.*` weights; the encoder config is
taken from the checkpoint; a channel subset keeps the matching input slices of the patch projection,
a longer window resamples the temporal position embedding) or from scratch. A fine-tuned TEViD is
saved with `pretrain.checkpoint` and its calibration (`calibration.json`) beside it; `load_tevid(dir)`
returns both.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp, trunc_normal_

from capture.frames import CHANNELS
from capture.relative import (BATCH_FEATURES, HISTORY_FEATURES, OPTIONAL_FEATURES, RELATIVE_FEATURES, REPRESENTATIONS, STEP_LOSS_FEATURES, STILL_FEATURES,
                              WEIGHT_FEATURES,
                              RelativeConfig, relative_config_of)
from capture.schema import CLASSES, CLIP_READOUTS
from diagnose.ensemble import TEViDEnsemble, ensemble_config, ensemble_members
from diagnose.evidential import dirichlet, tempered_probs
from pretrain.encoder import EncoderConfig, SpaceTimeEncoder, encoder_config

INPUTS = ("both", "video", "readouts")
ENCODER_PREFIX = "encoder."  # where a Dynamics-MAE checkpoint keeps its encoder weights


@dataclass
class TEViDConfig:
    encoder: str = "tiny"  # variant of pretrain.encoder.ENCODER_VARIANTS
    encoder_overrides: dict = field(default_factory=dict)  # EncoderConfig fields, e.g. {drop_path: 0.1}
    inputs: str = "both"  # "both" | "video" | "readouts"
    readout_dim: int = 64  # E: per-frame readout embedding and GRU state
    hidden_dim: int = 256  # fusion MLP hidden width
    dropout: float = 0.1  # in the fusion MLP
    num_classes: int = 5  # K: Healthy + 4 known anomaly classes (capture.schema.CLASSES)
    channels: list = field(default_factory=lambda: list(CHANNELS))  # frame channels the encoder reads (capture.frames.CHANNELS)
    # "frames": stored frames (B, T, 6, S, S) and raw readouts (B, T, 8); "relative": the run-relative
    # inputs of capture.relative, unit patterns (B, T, 6, P, P) and scalars (B, T, 81)
    representation: str = "frames"
    reference_lag: int = 0  # relative: capture.relative.RelativeConfig.reference_lag (0: the run's start)
    # relative: the scalars of capture.relative.RELATIVE_FEATURES the readout branch reads;
    # the inputs stay (B, T, 81), the branch selects its columns; None: all but the optional ones (step losses, weights, history)
    scalars: list | None = None
    # relative: also read capture.relative.STEP_LOSS_FEATURES (the losses of the steps between frames); off, the
    # branch reads the other scalars only, as every model made before those features existed
    step_losses: bool = False
    weight_step: bool = False  # relative: also read capture.relative.WEIGHT_FEATURES (how fast the weights move)
    weight_still: bool = False  # relative: also read capture.relative.STILL_FEATURES (the share of weight tensors that stopped)
    batch_features: bool = False  # relative: also read capture.relative.BATCH_FEATURES (batch_repeat, confident_miss)
    # relative: also read the run-so-far trace (capture.relative.HISTORY_FEATURES: slow average and leaky peak) of
    # every scalar it reads, so a window remembers what happened before it
    history: bool = False
    history_rate: float = 0.03  # relative: RelativeConfig.history_rate (the slow average's weight per frame)
    peak_decay: float = 0.05  # relative: RelativeConfig.peak_decay (the share of its gap the leaky peak closes per frame)
    best_decay: float = 0.0  # relative: RelativeConfig.best_decay (loss_above_best's low: 0 the run's lowest, > 0 leaky)
    best_from_steps: bool = False  # relative: RelativeConfig.best_from_steps (loss_above_best from the steps' median loss)
    anomaly_head: bool = False  # a binary anomaly score beside the class evidence (see the module docstring)
    # training only: heads that predict the watched run's context (a manifest field -> its number of values, e.g.
    # {family: 13, dataset: 5}) from the fused features through a gradient reversal (Ganin & Lempitsky 2015), so the
    # features are pushed to carry less of what the network and data look like (diagnose.finetune, adversary_weight)
    adversary: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.inputs not in INPUTS:
            raise ValueError(f"TEViDConfig.inputs must be one of {INPUTS}, got {self.inputs!r}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"TEViDConfig.representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        if self.num_classes < 2:
            raise ValueError(f"TEViDConfig.num_classes must be >= 2, got {self.num_classes}")
        bad = [c for c in self.channels if c not in CHANNELS]
        if not self.channels or bad or len(set(self.channels)) != len(self.channels):
            raise ValueError(f"TEViDConfig.channels must be distinct names of {CHANNELS}, got {self.channels!r}")
        if self.scalars is not None:
            bad = [n for n in self.scalars if n not in RELATIVE_FEATURES]
            if self.representation != "relative" or not self.scalars or bad or len(set(self.scalars)) != len(self.scalars):
                raise ValueError(f"TEViDConfig.scalars must be distinct names of {RELATIVE_FEATURES} with representation "
                                 f"'relative', got {self.scalars!r} (representation {self.representation!r})")
        in_chans = self.encoder_overrides.get("in_chans", len(self.channels))
        if in_chans != len(self.channels):
            raise ValueError(f"TEViDConfig: encoder_overrides.in_chans={in_chans} but {len(self.channels)} channels are "
                             f"selected ({self.channels}); in_chans follows `channels`")

        for flag in ("step_losses", "weight_step", "weight_still", "batch_features", "history"):
            if getattr(self, flag) and self.representation != "relative":
                raise ValueError(f"TEViDConfig.{flag} needs representation 'relative' (they are relative scalars)")

    @property
    def scalar_names(self) -> list[str]:
        """relative: the scalars the readout branch reads, in input order (`scalars`, else all but the optional
        ones, and the step-loss features with `step_losses`, the weight features with `weight_step` and `weight_still`, the
        batch features with `batch_features`; with
        `history`, then the slow average and leaky peak of each of those)."""
        names = list(self.scalars) if self.scalars is not None else [n for n in RELATIVE_FEATURES if n not in OPTIONAL_FEATURES]
        extra = ((STEP_LOSS_FEATURES if self.step_losses else ()) + (WEIGHT_FEATURES if self.weight_step else ())
                 + (STILL_FEATURES if self.weight_still else ()) + (BATCH_FEATURES if self.batch_features else ()))
        names = names + [n for n in extra if n not in names]
        if self.history:
            names += [f"{trace}_{n}" for trace in ("slow", "peak") for n in names if f"{trace}_{n}" in HISTORY_FEATURES
                      and f"{trace}_{n}" not in names]
        return names

    def relative_config(self) -> RelativeConfig:
        """The run-relative transform this model's scalars were made with (clips, live stream, probes)."""
        return relative_config_of(self)

    @property
    def uses_video(self) -> bool:
        return self.inputs in ("both", "video")

    @property
    def uses_readouts(self) -> bool:
        return self.inputs in ("both", "readouts")

    @property
    def channel_index(self) -> list[int]:
        """Indices of `channels` in the stored frames' channel axis."""
        return [CHANNELS.index(c) for c in self.channels]

    def encoder_cfg(self) -> EncoderConfig:
        return encoder_config(self.encoder, **{**self.encoder_overrides, "in_chans": len(self.channels)})


def readout_features(readouts: torch.Tensor) -> torch.Tensor:
    """`(..., 8)` raw CLIP_READOUTS -> `(..., 16)` model-ready: signed log1p of each value (non-finite -> 0),
    then 8 missing flags (1.0 where the raw value was not finite). Readouts span 1e-3 .. 1e12 across runs."""
    finite = torch.isfinite(readouts)
    x = torch.where(finite, readouts, torch.zeros_like(readouts)).float()
    return torch.cat([x.sign() * x.abs().log1p(), (~finite).float()], dim=-1)


class ReadoutEncoder(nn.Module):
    """The window's scalars -> one vector: per-frame embedding, then a 1-layer GRU over T. The scalars are
    the raw readouts (B, T, 8), made model-ready by `readout_features`, or the relative scalars (B, T, 81)
    of `capture.relative` (already finite and squashed)."""

    def __init__(self, dim: int, representation: str = "frames", scalars: list | None = None):
        super().__init__()
        self.relative = representation == "relative"
        self.n_inputs = len(RELATIVE_FEATURES) if self.relative else len(CLIP_READOUTS)
        # relative: the columns read (None: all); a buffer-free list, so older checkpoints load as before
        self.columns = [RELATIVE_FEATURES.index(n) for n in scalars] if self.relative and scalars is not None else None
        if not self.relative:
            n_features = 2 * len(CLIP_READOUTS)  # raw: signed log1p + missing flags
        else:
            n_features = self.n_inputs if self.columns is None else len(self.columns)
        self.embed = nn.Sequential(nn.Linear(n_features, dim), nn.GELU())
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, readouts: torch.Tensor) -> torch.Tensor:
        if readouts.ndim != 3 or readouts.shape[-1] != self.n_inputs:
            what = f"relative scalars {RELATIVE_FEATURES}" if self.relative else f"raw {CLIP_READOUTS}"
            raise ValueError(f"TEViD: readouts must be (B, T, {self.n_inputs}) {what}, got {tuple(readouts.shape)}")
        if self.columns is not None:
            readouts = readouts[..., self.columns]  # (B, T, F_sel)
        x = self.embed(readouts if self.relative else readout_features(readouts))  # (B, T, E)
        _, h = self.gru(x)  # h (1, B, E): the state after the window's last frame
        return h[-1]


class TEViD(nn.Module):
    def __init__(self, cfg: TEViDConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TEViDConfig()
        width = 0
        self.encoder = SpaceTimeEncoder(cfg.encoder_cfg()) if cfg.uses_video else None
        if self.encoder is not None:
            width += self.encoder.cfg.embed_dim
        all_channels = cfg.channel_index == list(range(len(CHANNELS)))
        self.channel_index = None if all_channels else cfg.channel_index  # None: the frames as stored
        scalars = cfg.scalar_names if cfg.representation == "relative" else None
        self.readouts = ReadoutEncoder(cfg.readout_dim, cfg.representation, scalars) if cfg.uses_readouts else None
        if self.readouts is not None:
            width += cfg.readout_dim
        self.fusion_norm = nn.LayerNorm(width)
        self.head = Mlp(width, hidden_features=cfg.hidden_dim, out_features=cfg.num_classes, drop=cfg.dropout)
        self.anomaly = Mlp(width, hidden_features=cfg.hidden_dim, out_features=1, drop=cfg.dropout) if cfg.anomaly_head else None
        self.adversary = nn.ModuleDict({name: Mlp(width, hidden_features=cfg.hidden_dim, out_features=int(n))
                                        for name, n in cfg.adversary.items()}) if cfg.adversary else None
        self.familiarity = None  # a diagnose.familiarity.Familiarity (not a parameter: saved beside the weights)
        for m in (self.fusion_norm, self.head, self.anomaly, self.readouts, self.adversary):
            if m is not None:
                m.apply(_init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} if self.encoder is not None else set()

    def forward_video(self, frames: torch.Tensor) -> torch.Tensor:
        """The video branch alone: stored frames (B, T, 6, S, S) -> the mean of the encoder's T x P tokens (B, D)."""
        if self.encoder is None:
            raise ValueError(f"TEViD(inputs={self.cfg.inputs!r}) has no video encoder")
        if self.channel_index is not None:
            if frames.ndim != 5 or frames.shape[2] != len(CHANNELS):
                raise ValueError(f"TEViD(channels={self.cfg.channels}) takes the stored frames (B, T, {len(CHANNELS)}, S, S) "
                                 f"and selects its channels itself; got shape {tuple(frames.shape)}")
            frames = frames[:, :, self.channel_index]  # (B, T, C_sel, S, S)
        tokens = self.encoder.forward_features(frames)  # (B, T, P, D)
        return tokens.mean(dim=(1, 2))  # (B, D)

    def forward_features(self, frames: torch.Tensor | None, readouts: torch.Tensor | None) -> torch.Tensor:
        """The fused window representation (B, D + E) (or one of the two, per `inputs`)."""
        parts = []
        if self.encoder is not None:
            if frames is None:
                raise ValueError(f"TEViD(inputs={self.cfg.inputs!r}) needs frames (B, T, 6, S, S)")
            parts.append(self.forward_video(frames))  # (B, D)
        if self.readouts is not None:
            if readouts is None:
                raise ValueError(f"TEViD(inputs={self.cfg.inputs!r}) needs readouts (B, T, {len(CLIP_READOUTS)})")
            parts.append(self.readouts(readouts.float()))  # (B, E)
        return self.fusion_norm(torch.cat(parts, dim=-1))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)  # (B, K) evidence logits f

    def forward(self, frames: torch.Tensor | None = None, readouts: torch.Tensor | None = None,
                with_anomaly: bool = False, with_adversary: bool = False):
        """Evidence logits f (B, K); `alpha = softplus(f) + 1` (diagnose.evidential). `with_anomaly=True`
        returns (f, anomaly logit (B,)) and needs `anomaly_head`; `with_adversary=True` appends {name: context
        logits (B, n)} computed through the gradient reversal (needs `adversary`). One forward through a DDP
        wrapper for all of them."""
        features = self.forward_features(frames, readouts)
        out = [self.forward_head(features)]
        if with_anomaly:
            if self.anomaly is None:
                raise ValueError("TEViD: with_anomaly=True needs TEViDConfig.anomaly_head=True")
            out.append(self.anomaly(features)[:, 0])
        if with_adversary:
            if self.adversary is None:
                raise ValueError("TEViD: with_adversary=True needs TEViDConfig.adversary (context heads)")
            reversed_ = GradientReversal.apply(features)
            out.append({name: head(reversed_) for name, head in self.adversary.items()})
        return out[0] if len(out) == 1 else tuple(out)

    @torch.no_grad()
    def predict(self, frames: torch.Tensor | None = None, readouts: torch.Tensor | None = None, temperature: float = 1.0) -> dict:
        """dict(probs (B, K) after `temperature`, vacuity (B,), alpha (B, K), logits (B, K), and with
        `anomaly_head` anomaly (B,) = sigmoid of the anomaly logit); no gradients. Call `.eval()` first
        (load_tevid returns the model in eval mode). With a familiarity bank attached (`familiarity`, set by
        `load_tevid` from `familiarity.safetensors`), `vacuity` is its distance score and the head's own
        vacuity is `evidential_vacuity`."""
        features = self.forward_features(frames, readouts)
        logits = self.forward_head(features).float()
        d = dirichlet(logits)
        out = {"probs": tempered_probs(d.alpha, temperature), "vacuity": d.vacuity, "alpha": d.alpha, "logits": logits}
        if self.anomaly is not None:
            out["anomaly"] = torch.sigmoid(self.anomaly(features)[:, 0].float())
        if self.familiarity is not None:  # Unknown from the distance to the training windows (diagnose.familiarity)
            out["evidential_vacuity"], out["vacuity"] = d.vacuity, self.familiarity.score_window(features, readouts)
        return out


class GradientReversal(torch.autograd.Function):
    """Identity forward, negated gradient backward: the heads after it learn to predict, the layers before it
    learn to make that prediction fail (domain-adversarial training)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


class TEViDLoadError(RuntimeError):
    pass


def _adapt_mae_weights(weights: dict[str, torch.Tensor], cfg: TEViDConfig) -> dict[str, torch.Tensor]:
    """The MAE encoder's weights reshaped for TEViD's encoder where the ablations change shapes:
    a channel subset keeps those input slices of the patch projection (trained on all 6 channels);
    more frames than the checkpoint's `num_frames` resample the temporal position embedding linearly
    (as timm's `resample_abs_pos_embed` does for 2-D grids); fewer keep its first frames (what the
    encoder does for a short clip anyway)."""
    weights = dict(weights)
    w = weights.get("patch_embed.proj.weight")  # (D, C, p, p)
    if w is not None and w.shape[1] == len(CHANNELS) and len(cfg.channels) != len(CHANNELS):
        weights["patch_embed.proj.weight"] = w[:, cfg.channel_index].clone()
    pe, t = weights.get("pos_embed_time"), cfg.encoder_cfg().num_frames  # (1, T_mae, 1, D)
    if pe is not None and pe.shape[1] != t:
        if t < pe.shape[1]:
            weights["pos_embed_time"] = pe[:, :t].clone()
        else:
            x = F.interpolate(rearrange(pe, "1 t 1 d -> 1 d t"), size=t, mode="linear", align_corners=True)
            weights["pos_embed_time"] = rearrange(x, "1 d t -> 1 t 1 d").contiguous()
    return weights


def build_tevid(cfg: TEViDConfig, mae_checkpoint: str | Path | None = None) -> tuple[TEViD, TEViDConfig]:
    """A TEViD from scratch, or with its encoder initialised from a Dynamics-MAE checkpoint directory.

    With a checkpoint the encoder config comes from the checkpoint (`config["encoder"]`); fields set
    in `cfg.encoder_overrides` win (e.g. `drop_path`, or `num_frames` for a longer window), and
    `in_chans` follows `cfg.channels` (`_adapt_mae_weights`). The returned config holds the resolved
    encoder fields, so it rebuilds the same model without the checkpoint.
    """
    if mae_checkpoint is None or not cfg.uses_video:
        return TEViD(cfg), cfg
    from pretrain.checkpoint import load_checkpoint

    ckpt = load_checkpoint(mae_checkpoint)
    enc = ckpt.config.get("encoder")
    if not isinstance(enc, dict):
        raise TEViDLoadError(f"{ckpt.path}/config.json has no 'encoder' section: not a Dynamics-MAE checkpoint "
                             f"(config keys: {sorted(ckpt.config)})")
    cfg = dataclasses.replace(cfg, encoder_overrides={**enc, **cfg.encoder_overrides, "in_chans": len(cfg.channels)})
    model = TEViD(cfg)
    weights = {k[len(ENCODER_PREFIX):]: v for k, v in ckpt.weights.items() if k.startswith(ENCODER_PREFIX)}
    if not weights:
        raise TEViDLoadError(f"{ckpt.path}: no weights start with {ENCODER_PREFIX!r}")
    weights = _adapt_mae_weights(weights, cfg)
    try:
        model.encoder.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise TEViDLoadError(f"{ckpt.path}: encoder weights do not fit TEViD's encoder {cfg.encoder_cfg()} "
                             f"(encoder_overrides must not change the checkpoint's shapes): {err}") from err
    return model, cfg


def tevid_config_from(config: dict, where: str = "checkpoint") -> TEViDConfig:
    """The TEViDConfig in a saved fine-tuning config (its "model" section)."""
    from capture.config import from_dict

    if not isinstance(config.get("model"), dict):
        raise TEViDLoadError(f"{where}: config has no 'model' section (keys: {sorted(config)}): not a TEViD checkpoint")
    return from_dict(TEViDConfig, config["model"], f"{where}:model")


MANIFEST_FILE = "MANIFEST.json"  # written by eval.ship beside a shipped model
MANIFEST_REQUIRED = ("model.safetensors", "config.json", "calibration.json")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (the digests of MANIFEST.json, eval.ship)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_manifest(path: str | Path) -> bool:
    """When directory `path` holds a MANIFEST.json (a shipped model, `eval.ship`), every file it lists
    must have the recorded size and sha256, and the weights, config and calibration must be among them;
    else `TEViDLoadError` naming the file. Returns whether there was a manifest to check."""
    path = Path(path)
    manifest = path / MANIFEST_FILE
    if not manifest.exists():
        return False
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        items = [(str(name), int(rec["bytes"]), str(rec["sha256"])) for name, rec in files.items()]
    except Exception as err:  # noqa: BLE001 - JSON, unicode, missing keys, wrong types
        raise TEViDLoadError(f"{manifest}: unreadable ({type(err).__name__}: {err}); the shipped model cannot be "
                             "verified, so it is not loaded") from None
    unlisted = sorted(set(MANIFEST_REQUIRED) - {name for name, _, _ in items})
    if unlisted:
        raise TEViDLoadError(f"{manifest}: does not list {unlisted}; the shipped model cannot be verified")
    for name, size, digest in items:
        f = path / name
        if Path(name).name != name:
            raise TEViDLoadError(f"{manifest}: lists {name!r}, not a file of {path}")
        if not f.is_file():
            raise TEViDLoadError(f"{f}: listed in {manifest} but missing")
        if f.stat().st_size != size:
            raise TEViDLoadError(f"{f}: {f.stat().st_size} bytes where {manifest} records {size}: damaged or changed "
                                 "after shipping; not loaded")
        actual = file_sha256(f)
        if actual != digest:
            raise TEViDLoadError(f"{f}: sha256 {actual} does not match {manifest} ({digest}): damaged or changed "
                                 "after shipping; not loaded")
    return True


def _check_window(config: dict, cfg: TEViDConfig, where: str) -> None:
    """The saved `data.window` (frames per window the model was fine-tuned and calibrated on, and that
    the monitor feeds it) is an integer the encoder can take: 1..num_frames."""
    data = config.get("data", {})
    if not isinstance(data, dict):
        raise TEViDLoadError(f"{where}: data must be a mapping, got {type(data).__name__}")
    if "window" not in data:
        return  # the monitor's default window (10) then applies, checked against the encoder when it runs
    window = data["window"]
    high = cfg.encoder_cfg().num_frames if cfg.uses_video else None
    if not isinstance(window, int) or isinstance(window, bool) or window < 1 or (high is not None and window > high):
        raise TEViDLoadError(f"{where}: data.window must be an integer in [1, {high or 'any'}] "
                             f"(the encoder's num_frames), got {window!r}")


def save_ensemble(members: list[str | Path], out: str | Path) -> Path:
    """Fine-tuned TEViD checkpoints (`out/final` directories of one model config: seeds, or cross-fitting's
    fold models) written as one `TEViDEnsemble` checkpoint at `out`: weights and config, no calibration
    (`diagnose.recalibrate --members` and `diagnose.crossfit --ensemble` calibrate it). The frame cadences the
    members were trained on (state.json) are kept when they agree, so the live default cadence stays theirs."""
    from pretrain.checkpoint import load_checkpoint, save_checkpoint

    if not members:
        raise ValueError("save_ensemble: no member checkpoints given")
    models, config, cadences = [], None, set()
    for d in members:
        ckpt = load_checkpoint(d)
        where = str(ckpt.path / "config.json")
        if ensemble_members(ckpt.config, where) is not None:
            raise TEViDLoadError(f"{where}: already an ensemble; give the member checkpoints themselves")
        member = TEViD(tevid_config_from(ckpt.config, where))
        member.load_state_dict(ckpt.weights, strict=True)
        models.append(member)
        config = config or ckpt.config
        cadences.add(tuple((ckpt.extra or {}).get("trained_cadences") or ()))
    extra = {"trained_cadences": list(cadences.pop())} if len(cadences) == 1 and () not in cadences else {}
    return save_checkpoint(out, model=TEViDEnsemble(models), config=ensemble_config(config, len(models), members),
                           step=0, extra=extra)


def load_tevid(path: str | Path, require_calibration: bool = True):
    """(model in eval mode, Calibration) from a fine-tuning output dir (`out/final`), or a fold ensemble's
    (`diagnose.ensemble`: config.json has an `ensemble` section; the model is then a `TEViDEnsemble`). A shipped model's
    files are first checked against its MANIFEST.json (`verify_manifest`). Weights load strictly from
    safetensors; the config's model section and `data.window` are checked; `calibration.json` must be
    there and complete (`diagnose.calibrate.load_calibration`), for as many classes as the model has,
    unless `require_calibration=False` (then an uncalibrated default: temperature 1, tau 0.35,
    thresholds 0.9)."""
    from diagnose.calibrate import Calibration, load_calibration
    from pretrain.checkpoint import load_checkpoint

    verify_manifest(path)
    ckpt = load_checkpoint(path)
    cfg = tevid_config_from(ckpt.config, str(ckpt.path / "config.json"))
    _check_window(ckpt.config, cfg, str(ckpt.path / "config.json"))
    try:
        members = ensemble_members(ckpt.config, str(ckpt.path / "config.json"))
    except ValueError as err:
        raise TEViDLoadError(str(err)) from None
    model = TEViD(cfg) if members is None else TEViDEnsemble([TEViD(cfg) for _ in range(members)])
    try:
        model.load_state_dict(ckpt.weights, strict=True)
    except RuntimeError as err:
        raise TEViDLoadError(f"{ckpt.path}: weights do not match the saved model config: {err}") from err
    model.eval()
    from diagnose.familiarity import load_familiarity

    model.familiarity = load_familiarity(path)
    cal_file = Path(path) / "calibration.json"
    if cal_file.exists() or require_calibration:
        cal = load_calibration(path)
        if len(cal.classes) != cfg.num_classes:
            raise TEViDLoadError(f"{cal_file}: {len(cal.classes)} classes {cal.classes} for a model of "
                                 f"{cfg.num_classes} (config.json model.num_classes)")
    else:
        cal = Calibration.default(cfg.num_classes, CLASSES[: cfg.num_classes])
    return model, cal

