"""Models as a user writes or builds them: their own nn.Modules, a torchvision model, a Hugging Face
model from a config. Nothing here knows about the monitor or the project's factory."""
from __future__ import annotations

import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages and a linear classifier: (B, C, H, W) -> (B, K)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.conv3 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.BatchNorm2d(4 * width),
                                   nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        return self.fc(self.pool(x).flatten(1))


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block: x + W2 relu(W1 LN(x)), (B, D) -> (B, D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResMLP(nn.Module):
    """Residual MLP for tabular data: (B, F) -> (B, K)."""

    def __init__(self, in_features: int, num_classes: int, dim: int = 64, depth: int = 4):
        super().__init__()
        self.stem = nn.Linear(in_features, dim)
        self.blocks = nn.Sequential(*[ResidualBlock(dim, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))))


def plain_mlp(in_features: int, num_classes: int, hidden: int = 128) -> nn.Sequential:
    """The MLP people write first: Linear-ReLU x 3, then the classifier, (B, F) -> (B, K)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class GRUClassifier(nn.Module):
    """Embedding -> 2-layer GRU -> last hidden state -> MLP head: tokens (B, L) int64 -> (B, K)."""

    def __init__(self, vocab_size: int, num_classes: int, embed: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.gru = nn.GRU(embed, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, hidden)
        self.act = nn.ReLU()
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq, _ = self.gru(self.embed(tokens))  # (B, L, H)
        return self.out(self.act(self.fc(seq[:, -1])))


def torchvision_model(name: str, num_classes: int) -> nn.Module:
    """A torchvision classifier built with random weights, as `torchvision.models.<name>(num_classes=K)`."""
    import torchvision

    return getattr(torchvision.models, name)(num_classes=num_classes)


def tiny_bert(vocab_size: int, num_classes: int, length: int) -> nn.Module:
    """`BertForSequenceClassification` from a tiny `BertConfig` (random weights, no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=length, num_labels=num_classes,
                        pad_token_id=0)
    return BertForSequenceClassification(config)
