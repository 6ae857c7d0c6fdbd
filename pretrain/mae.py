"""Dynamics-MAE: masked autoencoding of internal-state videos (docs/architecture.md §7; paper Sec. 4.2, App. C).

Tube masking hides the same spatial patches in every frame (ratio 0.9 by default, the paper's
choice after a 75-95% sweep, App. C.3); the encoder (`pretrain.encoder.SpaceTimeEncoder`) sees the
visible tokens only; a lighter decoder of the same divided space-time blocks (4 by default, App. C.1)
receives the projected encoder tokens with a learned mask token at every masked position plus its own
spatial / temporal position embeddings, and predicts the pixels of every patch. The loss is the MSE
on per-patch normalised pixels (each frame's patch normalised over its p*p*C values, MAE's
`norm_pix_loss`) of the masked patches only, in all T frames of each masked tube.

Split as facebookresearch/mae `models_mae.py`: `forward_encoder` / `forward_decoder` / `forward_loss`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from einops import rearrange, repeat
from timm.layers import trunc_normal_

from pretrain.encoder import DividedBlock, EncoderConfig, SpaceTimeEncoder, init_weights


def tube_mask(batch: int, num_patches: int, ratio: float, generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tube masks: `keep` (B, P_vis) and `masked` (B, P_mask) sorted patch indices, the same
    for every frame of a clip. Exactly round(ratio * P) patches are masked, at least one stays visible."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"tube_mask: ratio must be in [0, 1), got {ratio}")
    n_mask = min(round(ratio * num_patches), num_patches - 1)
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device if generator is not None else device)
    order = noise.argsort(dim=1)  # a random permutation of the patches per clip
    keep = order[:, : num_patches - n_mask].sort(dim=1).values
    masked = order[:, num_patches - n_mask:].sort(dim=1).values
    return keep.to(device) if device is not None else keep, masked.to(device) if device is not None else masked


class MAEOutput(NamedTuple):
    loss: torch.Tensor     # scalar
    pred: torch.Tensor     # (B, T, P, patch*patch*C) predicted (normalised) pixels of every patch
    keep: torch.Tensor     # (B, P_vis) visible patches
    masked: torch.Tensor   # (B, P_mask) masked patches


class DynamicsMAE(nn.Module):
    """Encoder of visible tube tokens + divided-attention decoder with mask tokens; `model.encoder` is
    the `SpaceTimeEncoder` whose state dict fine-tuning loads."""

    def __init__(self, encoder_cfg: EncoderConfig | dict, decoder_dim: int | None = None, decoder_depth: int = 4,
                 decoder_heads: int | None = None, mask_ratio: float = 0.9, norm_pix_loss: bool = True):
        super().__init__()
        self.encoder = SpaceTimeEncoder(encoder_cfg)
        cfg = self.encoder.cfg
        decoder_dim = decoder_dim or cfg.embed_dim // 2
        decoder_heads = decoder_heads or max(1, decoder_dim // 64)  # VideoMAE-B: 384 wide, 6 heads
        if decoder_dim % decoder_heads:
            raise ValueError(f"DynamicsMAE: decoder_dim {decoder_dim} is not divisible by decoder_heads {decoder_heads}")
        if not 0.0 < mask_ratio < 1.0 or round(mask_ratio * self.encoder.num_patches) < 1:
            raise ValueError(f"DynamicsMAE: mask_ratio {mask_ratio} masks no patch or all of them "
                             f"({self.encoder.num_patches} per frame); the paper uses 0.9")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = cfg.patch_size
        num_patches = self.encoder.num_patches

        self.decoder_embed = nn.Linear(cfg.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, decoder_dim))
        self.decoder_pos_space = nn.Parameter(torch.zeros(1, 1, num_patches, decoder_dim))
        self.decoder_pos_time = nn.Parameter(torch.zeros(1, cfg.num_frames, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList(DividedBlock(decoder_dim, decoder_heads, cfg.mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, cfg.patch_size ** 2 * cfg.in_chans)

        for p in (self.mask_token, self.decoder_pos_space, self.decoder_pos_time):
            trunc_normal_(p, std=0.02)
        for module in (self.decoder_embed, *self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token", "decoder_pos_space", "decoder_pos_time"}

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> (B, T, P, p*p*C), patches in the encoder's row-major order."""
        return rearrange(frames, "b t c (h p1) (w p2) -> b t (h w) (p1 p2 c)", p1=self.patch_size, p2=self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, T, P, p*p*C) -> (B, T, C, H, W)."""
        side = self.encoder.cfg.img_size // self.patch_size
        return rearrange(patches, "b t (h w) (p1 p2 c) -> b t c (h p1) (w p2)", h=side, w=side, p1=self.patch_size, p2=self.patch_size)

    def forward_encoder(self, frames: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Visible tokens only: (B, T, P_vis, D)."""
        return self.encoder.forward_features(frames, keep)

    def forward_decoder(self, latent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """latent (B, T, P_vis, D) -> predicted pixels (B, T, P, p*p*C) of every patch."""
        x = self.decoder_embed(latent)  # (B, T, P_vis, Dd)
        b, t, _, dd = x.shape
        full = self.mask_token.to(x.dtype).expand(b, t, self.encoder.num_patches, dd)
        full = torch.scatter(full, 2, repeat(keep, "b v -> b t v d", t=t, d=dd), x)  # visible tokens at their positions
        x = full + self.decoder_pos_space + self.decoder_pos_time[:, :t]
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, frames: torch.Tensor, pred: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the (normalised) pixels of masked patches, all frames of each tube."""
        pred = pred.float()  # the loss in fp32 also under bf16 autocast
        target = self.patchify(frames.float())  # (B, T, P, p*p*C)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, T, P)
        mask = torch.zeros(per_patch.shape[0], per_patch.shape[2], device=pred.device, dtype=pred.dtype)
        mask.scatter_(1, masked, 1.0)  # (B, P): 1 = masked
        mask = repeat(mask, "b p -> b t p", t=per_patch.shape[1])
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, frames: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None) -> MAEOutput:
        """frames (B, T, C, H, W) -> loss, predictions and the tube mask drawn for this batch."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        keep, masked = tube_mask(frames.shape[0], self.encoder.num_patches, ratio, generator=generator, device=frames.device)
        latent = self.forward_encoder(frames, keep)
        pred = self.forward_decoder(latent, keep)
        return MAEOutput(self.forward_loss(frames, pred, masked), pred, keep, masked)
