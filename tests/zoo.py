"""Tiny instances of every model family capture supports (32x32 inputs, fast on a CPU)."""
from __future__ import annotations

import timm
import torch.nn as nn
from timm.models.densenet import DenseNet
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from capture.lm import CausalLM, LMConfig

IMAGE_FAMILIES = {
    "resnet": lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, channels=(8, 16, 32, 64), stem_width=8),
    "resnet_bottleneck": lambda: ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, channels=(8, 16, 32, 64), stem_width=8),
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10),
    "deit": lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10),
    "deit_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10),
    "convnext": lambda: timm.create_model("convnext_atto", dims=(8, 16, 32, 64), depths=(1, 1, 2, 1), num_classes=10),
    "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), num_classes=10),
    "mixer": lambda: MlpMixer(img_size=32, patch_size=8, num_blocks=4, embed_dim=32, num_classes=10),
    "mobilenetv3": lambda: timm.create_model("mobilenetv3_small_050", num_classes=10),
    "regnet": lambda: timm.create_model("regnetx_002", num_classes=10),
    "efficientnet": lambda: timm.create_model("efficientnet_b0", num_classes=10),
    "densenet": lambda: DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_classes=10),
    "maxvit": lambda: timm.create_model("maxvit_rmlp_pico_rw_256", img_size=32, num_classes=10),
}


def tiny_lm() -> CausalLM:
    return CausalLM(LMConfig(vocab_size=20, context=16, dim=32, depth=4, heads=2))


class TinyNet(nn.Module):
    """conv-ReLU-conv-ReLU-conv-tanh, global pool, linear head: any image size works (the monitor tests' model)."""

    def __init__(self, width: int = 8, classes: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, classes)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.blocks(x))


def poison_at(model: TinyNet, at: int):
    """A `before(step, x)` hook for the tests' loops: sets one weight of `model.blocks[2]` to inf at step `at`."""
    import torch

    def poison(step, x):
        if step == at:
            with torch.no_grad():
                model.blocks[2].weight[0, 0, 0, 0] = float("inf")
        return x

    return poison
