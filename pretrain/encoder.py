"""Factorized space-time ViT encoder of internal-state videos (docs/architecture.md §7; paper Sec. 4.2, App. C.1).

Frames of a clip are embedded patch by patch (one spatial patch per token, no temporal tubelets),
given separate learned spatial (P) and temporal (T) position embeddings, and processed by blocks of
TimeSformer's divided space-time attention (Bertasius et al. 2021, "divided_space_time"):

    temporal attention over the T frames of each patch position   'b t p d -> (b p) t d'
    spatial attention over the P (visible) patches of each frame  'b t p d -> (b t) p d'
    MLP
each pre-norm with a residual. With tube masking (the same patches hidden in every frame) every
visible patch position still has all T frames, so the factorisation stays valid on visible tokens
only (Dynamics-MAE, `pretrain/mae.py`).

Named variants (docs/architecture.md §10): `tiny` for tests (16x16 frames of the smoke corpus), `cpu` for the
2-core benchmark, `base` = ViT-B (12 layers, 768 wide, 12 heads, patch 16, S = 224, T = 10).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange, repeat
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Attention


@dataclass
class EncoderConfig:
    img_size: int = 32       # S: frames are S x S
    patch_size: int = 8      # P = (S / patch_size)^2 patches per frame
    in_chans: int = 6        # the 6 frame channels (docs/architecture.md §3)
    num_frames: int = 10     # T: the window length; shorter clips use the first frames' time embedding
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0   # stochastic depth, linearly increasing over the blocks

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"EncoderConfig: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"EncoderConfig: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")


ENCODER_VARIANTS: dict[str, EncoderConfig] = {
    # tests: the smoke corpus has 16x16 frames -> 16 patches per frame
    "tiny": EncoderConfig(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2),
    # the 2-core CPU benchmark (corpus frames 32x32 -> 16 patches per frame)
    "cpu": EncoderConfig(img_size=32, patch_size=8, embed_dim=192, depth=4, num_heads=3),
    # ViT-B as in the paper (App. C.1, Table 14: drop path 0.1); 196 patches per frame
    "base": EncoderConfig(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path=0.1),
}


def encoder_config(variant: str, **overrides) -> EncoderConfig:
    """The named variant with `overrides` of its fields (`encoder_config("cpu", depth=6)`)."""
    if variant not in ENCODER_VARIANTS:
        raise ValueError(f"unknown encoder variant {variant!r}; valid: {sorted(ENCODER_VARIANTS)}")
    valid = {f.name for f in dataclasses.fields(EncoderConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise ValueError(f"encoder {variant!r}: unknown field(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return dataclasses.replace(ENCODER_VARIANTS[variant], **overrides)


class DividedBlock(nn.Module):
    """One TimeSformer divided space-time block on tokens (B, T, P, D): temporal attention, spatial
    attention, MLP; pre-norm, residual, per-clip stochastic depth. TimeSformer's extra `temporal_fc`
    (there to start from ImageNet image weights) is left out: nothing here is initialised from images."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm_time = nn.LayerNorm(dim)
        self.attn_time = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm_space = nn.LayerNorm(dim)
        self.attn_space = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.attn_time(self.norm_time(rearrange(x, "b t p d -> (b p) t d")))  # attend over T per patch
        x = x + self.drop_path(rearrange(h, "(b p) t d -> b t p d", b=b))
        h = self.attn_space(self.norm_space(rearrange(x, "b t p d -> (b t) p d")))  # attend over P per frame
        x = x + self.drop_path(rearrange(h, "(b t) p d -> b t p d", b=b))
        return x + self.drop_path(self.mlp(self.norm_mlp(x)))


def init_weights(module: nn.Module) -> None:
    """ViT / MAE initialisation: truncated-normal linears, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SpaceTimeEncoder(nn.Module):
    """Factorized space-time ViT over clips (B, T, C, S, S); see the module docstring."""

    def __init__(self, cfg: EncoderConfig | dict | None = None):
        super().__init__()
        cfg = EncoderConfig(**cfg) if isinstance(cfg, dict) else (cfg or EncoderConfig())
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.num_patches: int = self.patch_embed.num_patches
        self.pos_embed_space = nn.Parameter(torch.zeros(1, 1, self.num_patches, cfg.embed_dim))
        self.pos_embed_time = nn.Parameter(torch.zeros(1, cfg.num_frames, 1, cfg.embed_dim))
        rates = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]  # stochastic depth per block
        self.blocks = nn.ModuleList(DividedBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.embed_dim)

        trunc_normal_(self.pos_embed_space, std=0.02)
        trunc_normal_(self.pos_embed_time, std=0.02)
        self.apply(init_weights)
        w = self.patch_embed.proj.weight  # as MAE: the patch projection initialised like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed_space", "pos_embed_time"}

    def _check(self, x: torch.Tensor) -> None:
        c = self.cfg
        if x.ndim != 5:
            raise ValueError(f"SpaceTimeEncoder: expected clips (B, T, C, H, W), got shape {tuple(x.shape)}")
        _, t, ch, h, w = x.shape
        if (ch, h, w) != (c.in_chans, c.img_size, c.img_size):
            raise ValueError(f"SpaceTimeEncoder: frames of shape {(ch, h, w)} do not match the encoder's "
                             f"{(c.in_chans, c.img_size, c.img_size)} (in_chans, img_size, img_size)")
        if not 1 <= t <= c.num_frames:
            raise ValueError(f"SpaceTimeEncoder: {t} frames per clip; the encoder takes 1..{c.num_frames} (num_frames)")

    def embed(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens plus position embeddings (B, T, P_vis, D), only the `keep` patches if given."""
        self._check(x)
        b, t = x.shape[:2]
        x = x.to(self.patch_embed.proj.weight.dtype)  # frames are stored as bf16; compute in the params' dtype
        tokens = self.patch_embed(rearrange(x, "b t c h w -> (b t) c h w"))  # (B*T, P, D)
        tokens = rearrange(tokens, "(b t) p d -> b t p d", b=b)
        tokens = tokens + self.pos_embed_space + self.pos_embed_time[:, :t]
        if keep is not None:
            if keep.ndim != 2 or keep.shape[0] != b:
                raise ValueError(f"SpaceTimeEncoder: keep must be (B={b}, P_vis) indices, got shape {tuple(keep.shape)}")
            index = repeat(keep.to(tokens.device), "b v -> b t v d", t=t, d=tokens.shape[-1])
            tokens = torch.gather(tokens, 2, index)  # (B, T, P_vis, D): the same patches in every frame
        return tokens

    def forward_features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C, H, W); keep (B, P_vis) long indices of visible patches (a tube: the same in every
        frame) or None for all; returns tokens (B, T, P_vis, D) after the final norm."""
        x = self.embed(x, keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D): the mean of all T x P tokens."""
        return self.forward_features(x).mean(dim=(1, 2))


def encoder_from_checkpoint(path: str | Path, prefix: str = "encoder.") -> SpaceTimeEncoder:
    """The encoder of a saved checkpoint (`pretrain.checkpoint`): config from `config["encoder"]`,
    weights from the keys starting with `prefix` (a Dynamics-MAE checkpoint stores `encoder.*`)."""
    from pretrain.checkpoint import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(path)
    if "encoder" not in ckpt.config:
        raise CheckpointError(f"{ckpt.path}: config.json has no 'encoder' section (keys: {sorted(ckpt.config)})")
    encoder = SpaceTimeEncoder(EncoderConfig(**ckpt.config["encoder"]))
    weights = {k[len(prefix):]: v for k, v in ckpt.weights.items() if k.startswith(prefix)}
    if not weights:
        raise CheckpointError(f"{ckpt.path}: no weights start with {prefix!r}")
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as err:  # missing / unexpected keys, shape mismatches
        raise CheckpointError(f"{ckpt.path}: the {prefix}* weights do not fit its encoder config: {err}") from err
    return encoder
