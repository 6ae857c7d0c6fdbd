"""Architectures of the factory: the timm families of capture at small widths, an AlexNet-style
plain CNN, and the project's causal LM (docs/architecture.md §6). Sized for a 2-core CPU: a training step at
batch 32 on 32x32 inputs costs tens of milliseconds, not the 100-900 ms of timm's defaults.

`build_arch(name, num_classes, image_size)` returns `(model, capture_modules)`; the second item is
None when capture finds the hook points itself, else the three module names to hook.
"""
from __future__ import annotations

from typing import Callable

import timm
import torch.nn as nn

from capture.lm import CausalLM, LMConfig

TEXT_ARCHS = {"lm", "lm_base"}


class AlexNetStyle(nn.Module):
    """A small non-residual CNN in AlexNet's shape (conv-relu-pool stacks, then an MLP head)."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 0-2
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 3-5
            nn.Conv2d(2 * w, 3 * w, 3, padding=1), nn.ReLU(inplace=True),  # 6-7
            nn.Conv2d(3 * w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(4),  # 8-10
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 4 * w), nn.ReLU(inplace=True), nn.Linear(4 * w, num_classes))

    def get_classifier(self) -> nn.Module:
        return self.classifier[-1]

    def forward(self, x):
        return self.classifier(self.features(x))


def _timm(name: str, **kw) -> Callable[[int, int], nn.Module]:
    return lambda num_classes, image_size: timm.create_model(name, pretrained=False, num_classes=num_classes, **kw(image_size) if callable(kw) else kw)


def _resnet(num_classes: int, image_size: int) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, channels=(16, 32, 64, 128), stem_width=16)


def _vit(dim: int, depth: int, heads: int, patch: int, name: str = "vit_tiny_patch16_224"):
    def make(num_classes: int, image_size: int) -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=image_size,
                                 patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                                 class_token=False, global_pool="avg")
    return make


def _mixer(num_classes: int, image_size: int) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=num_classes, img_size=image_size, patch_size=4, num_blocks=4, embed_dim=64)


def _efficientnet(num_classes: int, image_size: int) -> nn.Module:
    from timm.models.efficientnet import _gen_efficientnet

    # output_stride 8 (timm dilates the last two strided stages): at stride 32 a 32x32 input is 1x1
    # by the last stage, and the model did not learn textures (healthy Lion / Adafactor runs ended at
    # 0.21-0.33 validation accuracy, 6 classes); at stride 8, 0.69 / 0.90 (docs/factory.md)
    return _gen_efficientnet("efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.34, pretrained=False,
                             num_classes=num_classes, output_stride=8 if image_size <= 64 else 32)


def _densenet(num_classes: int, image_size: int) -> nn.Module:
    from timm.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_classes=num_classes)


def _maxvit(num_classes: int, image_size: int) -> nn.Module:
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, _rw_max_cfg

    # three stages (32px input: 8x8, 4x4, 2x2 maps) so 2x2 windows fit; widths divisible by head_dim 32
    cfg = MaxxVitCfg(embed_dim=(32, 64, 96), depths=(1, 1, 1), block_type=("M",) * 3, stem_width=16,
                     **_rw_max_cfg(window_size=(2, 2)))
    return MaxxVit(cfg, img_size=image_size, num_classes=num_classes)


ARCHS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet": _resnet,
    "vit": _vit(dim=64, depth=4, heads=2, patch=8),
    "deit": _vit(dim=48, depth=6, heads=3, patch=8, name="deit_tiny_patch16_224"),
    "convnext": lambda c, s: timm.create_model("convnext_atto", pretrained=False, num_classes=c, dims=(16, 32, 64, 128), depths=(1, 1, 2, 1)),
    "swin": lambda c, s: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=c, img_size=s, window_size=4,
                                           embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)),
    "mixer": _mixer,
    "mobilenetv3": lambda c, s: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=c),
    "regnet": lambda c, s: timm.create_model("regnetx_002", pretrained=False, num_classes=c),
    "efficientnet": _efficientnet,
    "densenet": _densenet,
    "maxvit": _maxvit,
    "alexnet": lambda c, s: AlexNetStyle(c),
    "lm": lambda c, s: CausalLM(LMConfig(vocab_size=c, context=64, dim=64, depth=4, heads=4)),
    "lm_base": lambda c, s: CausalLM(LMConfig(vocab_size=c, context=256, dim=512, depth=8, heads=8)),
}
# AlexNet has no residual blocks for capture to recognise: its conv layers are named explicitly.
CAPTURE_MODULES = {"alexnet": ["features.3", "features.6", "features.8"]}


def build_arch(name: str, num_classes: int, image_size: int = 32) -> tuple[nn.Module, list[str] | None]:
    """`name` is a key of ARCHS, or `timm:<model name>` for a timm model at its own size (the
    paper-scale configs: `timm:resnet18`, `timm:vit_base_patch16_224`, ...)."""
    if name.startswith("timm:"):
        return timm.create_model(name[5:], pretrained=False, num_classes=num_classes), None
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHS)} or timm:<name>")
    return ARCHS[name](num_classes, image_size), CAPTURE_MODULES.get(name)
