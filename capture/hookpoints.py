"""Where to hook: the early / middle / late points of a model, and its classifier head.

DESIGN.md §3 and the main paper's Appendix B.3: blocks at 25 / 50 / 75% depth, hooked on the main
path before the residual addition where the block type makes that identifiable, else the block
output. `BLOCK_RULES` says, per block class, which child is that main path and how its output is
laid out. A user can instead name the three modules (exact names or fnmatch patterns).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch.nn as nn

DEPTHS = (0.25, 0.5, 0.75)
POSITIONS = ("early", "mid", "late")


@dataclass(frozen=True)
class BlockRule:
    main_path: str | None  # child module on the main path before the residual add; None = block output
    layout: str  # layout of that module's output: "bchw", "bhwc" or "bnd"


# Keyed by "<module>.<class>" so that e.g. timm's resnet and regnet `Bottleneck` stay apart.
BLOCK_RULES: dict[str, BlockRule] = {
    "timm.models.resnet.BasicBlock": BlockRule("bn2", "bchw"),
    "timm.models.resnet.Bottleneck": BlockRule("bn3", "bchw"),
    "timm.models.vision_transformer.Block": BlockRule("attn", "bnd"),  # ViT and DeiT
    "timm.models.convnext.ConvNeXtBlock": BlockRule("drop_path", "bchw"),  # gamma-scaled branch
    "timm.models.swin_transformer.SwinTransformerBlock": BlockRule("drop_path1", "bhwc"),
    "timm.models.mlp_mixer.MixerBlock": BlockRule("mlp_channels", "bnd"),
    "timm.models._efficientnet_blocks.InvertedResidual": BlockRule("bn3", "bchw"),  # MobileNetV3, EfficientNet
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv": BlockRule("bn2", "bchw"),
    "timm.models._efficientnet_blocks.EdgeResidual": BlockRule("bn2", "bchw"),
    "timm.models.regnet.Bottleneck": BlockRule("conv3", "bchw"),
    "timm.models.densenet.DenseLayer": BlockRule(None, "bchw"),  # no residual: the new features
    "timm.models.maxxvit.MaxxVitBlock": BlockRule(None, "bchw"),  # three residual sub-blocks: block output
    "capture.lm.Block": BlockRule("attn", "bnd"),
}


@dataclass(frozen=True)
class HookPoint:
    position: str  # early / mid / late
    name: str  # qualified module name in the model
    module: nn.Module
    layout: str  # "bchw", "bhwc", "bnd", or "auto" (decided from the output's rank)
    prefix_tokens: int = 0  # leading tokens of a "bnd" output that are not patches (CLS, ...)


class HookPointError(ValueError):
    pass


def _class_key(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__name__}"


def pick_depths(n: int) -> list[int]:
    """Indices of the blocks whose output sits at 25 / 50 / 75% depth among `n` blocks.

    Block k (0-based) ends at depth (k + 1) / n, so the block at fraction f is ceil(f n) - 1. The
    late point is never the last block once n >= 4, which matters for token-pooled ViTs: the
    patch tokens of the last block's attention get no gradient (only the class token reaches
    the head).
    """
    return [max(0, math.ceil(f * n) - 1) for f in DEPTHS]


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, BlockRule]]:
    """All blocks with a known rule, in module-definition order (= forward order for these models)."""
    return [(name, m, BLOCK_RULES[_class_key(m)]) for name, m in model.named_modules() if _class_key(m) in BLOCK_RULES]


def find_hook_points(
    model: nn.Module, modules: list[str] | None = None, layouts: list[str] | None = None
) -> list[HookPoint]:
    """The three hook points of `model`: automatic, or from `modules` (names or fnmatch patterns).

    With explicit `modules`: three entries match one module each, or one pattern that matches at
    least three modules, of which those at 25 / 50 / 75% are taken.
    """
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    named = dict(model.named_modules())
    if modules:
        chosen = _match_modules(model, named, modules)
        layouts = layouts or ["auto"] * 3  # "auto": from the output's rank, 4-D = channels first
        return [HookPoint(pos, name, named[name], lay, prefix) for pos, name, lay in zip(POSITIONS, chosen, layouts)]
    blocks = find_blocks(model)
    if not blocks:
        raise HookPointError(
            f"no hook points found in {type(model).__module__}.{type(model).__name__}: none of its modules is a "
            f"known block type. Name three modules (early, mid, late) explicitly, e.g. "
            f"capture.attach(model, modules=['layer1.0', 'layer2.0', 'layer3.0']) or a pattern such as "
            f"modules=['blocks.*.attn']. Known block types: {sorted(k.rsplit('.', 1)[-1] for k in BLOCK_RULES)}."
        )
    points = []
    for pos, idx in zip(POSITIONS, pick_depths(len(blocks))):
        name, block, rule = blocks[idx]
        target, tname = block, name
        if rule.main_path is not None:
            child = getattr(block, rule.main_path, None)
            if isinstance(child, nn.Module):
                target, tname = child, f"{name}.{rule.main_path}"
        points.append(HookPoint(pos, tname, target, rule.layout, prefix if rule.layout == "bnd" else 0))
    return points


def _match_modules(model: nn.Module, named: dict[str, nn.Module], patterns: list[str]) -> list[str]:
    names = [n for n in named if n]
    if len(patterns) == 1:
        hits = [n for n in names if fnmatch.fnmatchcase(n, patterns[0])]
        if len(hits) < 3:
            raise HookPointError(
                f"pattern {patterns[0]!r} matches {len(hits)} module(s) of {type(model).__name__}; it must match "
                f"at least 3 (early/mid/late are taken at 25/50/75%). Some module names: {names[:12]}"
            )
        return [hits[i] for i in pick_depths(len(hits))]
    if len(patterns) != 3:
        raise HookPointError(f"give 3 module names (early, mid, late) or 1 pattern, not {len(patterns)}: {patterns}")
    chosen = []
    for p in patterns:
        hits = [n for n in names if n == p] or [n for n in names if fnmatch.fnmatchcase(n, p)]
        if not hits:
            raise HookPointError(
                f"no module of {type(model).__name__} matches {p!r}. Some module names: {names[:12]}"
            )
        chosen.append(hits[0])
    return chosen


def find_head(model: nn.Module) -> nn.Linear | None:
    """The linear classifier head: timm's `get_classifier()` (the main head of a distilled DeiT's
    pair), the project LM's `lm_head`, else None."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, (tuple, list)) and head:
        head = head[0]
    return head if isinstance(head, nn.Linear) else None
