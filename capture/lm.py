"""A small plain-torch causal Transformer language model (character level).

It lives in `capture` because capture must find its hook points and head without importing
the factory (docs/architecture.md §2). Pre-norm blocks; the attention output `attn` is the main path before
the residual add, which is where capture hooks (docs/architecture.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class LMConfig:
    vocab_size: int = 96
    context: int = 64
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h e) -> three b h l e", three=3, h=self.heads)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, L, e)
        return self.proj(rearrange(y, "b h l e -> b l (h e)"))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CausalLM(nn.Module):
    """`tokens (B, L) -> logits (B, L, V)`; the head is `lm_head` (a linear layer, untied)."""

    def __init__(self, cfg: LMConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or LMConfig()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.context, cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size)
        nn.init.normal_(self.pos_emb, std=0.02)

    def get_classifier(self) -> nn.Module:
        return self.lm_head

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.cfg.context:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds context {self.cfg.context}")
        x = self.tok_emb(tokens) + self.pos_emb[:, : tokens.shape[1]]  # (B, L, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.forward_features(tokens))  # (B, L, V)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; `targets` are the inputs shifted by one."""
    return F.cross_entropy(rearrange(logits, "b l v -> (b l) v"), rearrange(targets, "b l -> (b l)"))
