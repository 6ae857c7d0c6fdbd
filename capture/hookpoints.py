"""Where to hook: the early / middle / late points of any model, and its classifier head.

Blocks at 25 / 50 / 75% depth (docs/capture.md), hooked on the main path before the residual addition
where the block type makes that identifiable, else at the block output. Three rules, tried in order:

1. known blocks: `BLOCK_RULES` names, per block class (timm, torchvision, this project's LM), the child
   on the main path and the layout of its output;
2. repeated blocks, found by structure: the outermost module class that occurs at least three times
   and holds a good share of the trainable parameters (torchvision's `InvertedResidual`, a Hugging Face
   `BertLayer` / `GPT2Block` / `LlamaDecoderLayer`, `nn.TransformerEncoderLayer`, a user's own
   `ResBlock`), hooked at the block output;
3. layers: the leaf modules with trainable parameters (an `nn.Sequential` CNN or MLP, a GRU language
   model), in definition order, the head left out.

A user can instead name the three modules (exact names or fnmatch patterns). Output layouts are read
at the first captured forward from the output's rank; sequence-first modules (`nn.GRU`, `nn.LSTM`,
`nn.TransformerEncoderLayer` without `batch_first`) and `nn.Conv1d` say how their axes are ordered.
"""
from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from dataclasses import dataclass

import torch.nn as nn

DEPTHS = (0.25, 0.5, 0.75)
POSITIONS = ("early", "mid", "late")
MIN_COVERAGE = 0.3  # repeated blocks must hold this share of the trainable parameters (embeddings, head aside)
HEAD_NAMES = ("lm_head", "fc", "head", "heads", "classifier", "score")  # the last Linear inside one is the head
LINEAR_HEAD_NAMES = ("decoder", "output", "out", "proj_out")  # the head only when the attribute is a Linear itself


@dataclass(frozen=True)
class BlockRule:
    main_path: str | None  # child module on the main path before the residual add; None = block output
    layout: str  # layout of that module's output: "bchw", "bhwc", "bnd", or "auto" (from the output's rank)


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
    # torchvision: the residual branch where it has one name; channels-last where the block keeps it
    "torchvision.models.resnet.BasicBlock": BlockRule("bn2", "bchw"),
    "torchvision.models.resnet.Bottleneck": BlockRule("bn3", "bchw"),
    "torchvision.models.swin_transformer.SwinTransformerBlock": BlockRule(None, "bhwc"),
    "torchvision.models.swin_transformer.SwinTransformerBlockV2": BlockRule(None, "bhwc"),
    "torchvision.models.vision_transformer.EncoderBlock": BlockRule(None, "bnd"),
}
# modules whose 3-D output is (T, B, D) unless built with batch_first=True
_SEQUENCE_FIRST = (nn.RNNBase, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                   nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)
_CHANNELS_FIRST_1D = (nn.Conv1d, nn.ConvTranspose1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
                      nn.AdaptiveMaxPool1d)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # exact types: a subclass can be a block


@dataclass(frozen=True)
class HookPoint:
    position: str  # early / mid / late
    name: str  # qualified module name in the model
    module: nn.Module
    layout: str  # "bchw", "bhwc", "bnd", "tbd", "bcl", or "auto" (decided from the output's rank)
    prefix_tokens: int = 0  # leading tokens of a "bnd" output that are not patches (CLS, ...)
    rule: str = "explicit"  # how it was chosen: "block rule", "repeated <Class>", "layers", "explicit"


class HookPointError(ValueError):
    pass


def _class_key(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__name__}"


def _model_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__name__}"


def pick_depths(n: int) -> list[int]:
    """Indices of the blocks whose output sits at 25 / 50 / 75% depth among `n` blocks.

    Block k (0-based) ends at depth (k + 1) / n, so the block at fraction f is ceil(f n) - 1. The
    late point is never the last block once n >= 4, which matters for token-pooled ViTs: the
    patch tokens of the last block's attention get no gradient (only the class token reaches
    the head). For n >= 3 the three indices are distinct.
    """
    return [max(0, math.ceil(f * n) - 1) for f in DEPTHS]


def resolve_layout(layout: str, ndim: int) -> str | None:
    """The layout of a captured output of rank `ndim` at a point whose hint is `layout` (None: unusable)."""
    if ndim == 4:
        return layout if layout in ("bchw", "bhwc") else "bchw"
    if ndim == 3:
        return layout if layout in ("tbd", "bcl") else "bnd"
    if ndim == 2:
        return "bd"
    return None


def layout_hint(module: nn.Module) -> str:
    """What a module's class says about the axis order of its output ("auto" when nothing)."""
    rule = BLOCK_RULES.get(_class_key(module))
    if rule is not None:
        return rule.layout
    if isinstance(module, _SEQUENCE_FIRST):
        first = module
        if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
            first = module.layers[0]
        if isinstance(first, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            first = first.self_attn
        return "auto" if getattr(first, "batch_first", False) else "tbd"
    if isinstance(module, _CHANNELS_FIRST_1D):
        return "bcl"
    return "auto"


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, BlockRule]]:
    """All trainable blocks with a known rule, in module-definition order (= forward order for these models)."""
    return [(name, m, BLOCK_RULES[_class_key(m)]) for name, m in model.named_modules()
            if _class_key(m) in BLOCK_RULES and _trainable(m)]


def repeated_blocks(model: nn.Module, head: nn.Module | None = None) -> tuple[str, list[tuple[str, nn.Module]]] | None:
    """The outermost module class that occurs >= 3 times with trainable parameters and holds at least
    `MIN_COVERAGE` of the trainable parameters (embeddings and the head aside): (class name, its
    instances in definition order), or None. A class whose instances mostly sit inside the instances
    of another such class (torchvision's `Conv2dNormActivation` inside `InvertedResidual`) is passed
    over for the outer one; nested instances of one class count once (the outer one)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    head_names = {n for n, m in named if head is not None and m is head}
    excluded = sum(_trainable(m) for n, m in named if isinstance(m, nn.Embedding) or n in head_names)
    total = _trainable(model) - excluded
    if total <= 0:
        return None
    by_class: dict[type, list[tuple[str, nn.Module]]] = defaultdict(list)
    for name, m in named:
        if type(m) in _CONTAINERS or not any(True for _ in m.children()) or not _trainable(m):
            continue
        if head is not None and any(sub is head for sub in m.modules()):
            continue  # the head, or a module holding it
        by_class[type(m)].append((name, m))
    candidates = []
    for cls, members in by_class.items():
        members = [(n, m) for n, m in members if not any(n.startswith(o + ".") for o, _ in members)]
        coverage = sum(_trainable(m) for _, m in members) / total
        if len(members) >= 3 and coverage >= MIN_COVERAGE:
            candidates.append((cls, members, coverage))

    def nested(members, other) -> bool:
        inside = sum(any(n.startswith(o + ".") for o, _ in other) for n, _ in members)
        return inside * 2 > len(members)

    outer = [c for c in candidates if not any(o is not c and nested(c[1], o[1]) for o in candidates)]
    if not outer:
        return None
    cls, members, _ = max(outer, key=lambda c: c[2])
    return cls.__name__, members


def leaf_layers(model: nn.Module, head: nn.Module | None = None) -> list[tuple[str, nn.Module]]:
    """Leaf modules in definition order, the head left out: those with trainable parameters; when that
    gives fewer than three, every leaf from the first trainable one on (activations, dropout); and when
    that is still short, the head last."""
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    body = [(n, m) for n, m in leaves if m is not head]
    layers = [(n, m) for n, m in body if _trainable(m)]
    if len(layers) < 3 and layers:
        start = next(i for i, (_, m) in enumerate(body) if _trainable(m))
        layers = body[start:]
    if len(layers) < 3 and head is not None and _trainable(head):
        layers += [(n, m) for n, m in leaves if m is head]
    return layers


def find_hook_points(
    model: nn.Module, modules: list[str] | None = None, layouts: list[str] | None = None,
    head: nn.Module | None = None,
) -> list[HookPoint]:
    """The three hook points of `model`: automatic (see the module docstring), or from `modules` (names or
    fnmatch patterns). `head`: the classifier head, kept out of the automatic choice.

    With explicit `modules`: three entries match one module each, or one pattern that matches at
    least three modules, of which those at 25 / 50 / 75% are taken.
    """
    if not isinstance(model, nn.Module):
        raise HookPointError(f"expected a torch.nn.Module to watch, got {type(model).__module__}.{type(model).__name__}")
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    named = dict(model.named_modules())
    if modules:
        chosen = _match_modules(model, named, modules)
        layouts = layouts or [layout_hint(named[n]) for n in chosen]
        return [HookPoint(pos, name, named[name], lay, prefix) for pos, name, lay in zip(POSITIONS, chosen, layouts)]
    if not _trainable(model):
        raise HookPointError(
            f"{_model_name(model)} has no parameter that requires grad: nothing trains, so there is nothing to "
            f"watch. Watch the model you train (after requires_grad_(True) on the trainable part).")
    head = head if head is not None else find_head(model)
    blocks = find_blocks(model)
    if blocks:
        points = []
        for pos, idx in zip(POSITIONS, pick_depths(len(blocks))):
            name, block, rule = blocks[idx]
            target, tname = block, name
            if rule.main_path is not None:
                child = getattr(block, rule.main_path, None)
                if isinstance(child, nn.Module):
                    target, tname = child, f"{name}.{rule.main_path}"
            points.append(HookPoint(pos, tname, target, rule.layout, prefix if rule.layout == "bnd" else 0, "block rule"))
        return points
    found = repeated_blocks(model, head)
    if found is not None:
        cls_name, chosen, rule = found[0], found[1], f"repeated {found[0]}"
    else:
        chosen, rule = leaf_layers(model, head), "layers"
    if len(chosen) < 3:
        trainable = [n for n, m in named.items() if n and any(p.requires_grad for p in m.parameters(recurse=False))]
        raise HookPointError(
            f"no three hook points found in {_model_name(model)}: its trainable parameters sit in {len(trainable)} "
            f"module(s) {trainable[:6]} (a frozen backbone?). Name three modules (early, mid, late) whose outputs "
            f"depend on trainable parameters, e.g. watch(model, optimizer, modules=[...]) with names from "
            f"model.named_modules(): {[n for n in named if n][:12]}")
    points = []
    for pos, idx in zip(POSITIONS, pick_depths(len(chosen))):
        name, m = chosen[idx]
        points.append(HookPoint(pos, name, m, layout_hint(m), 0, rule))
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


def _last_linear(module: nn.Module) -> nn.Linear | None:
    if isinstance(module, nn.Linear):
        return module
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def find_head(model: nn.Module) -> nn.Linear | None:
    """The linear classifier head, looked for where models keep it: timm's `get_classifier()` (the main
    head of a distilled DeiT's pair; a non-linear answer is final), a Hugging Face model's
    `get_output_embeddings()`, an attribute named like a head (`lm_head`, `fc`, `head`, `heads.head`,
    `classifier[-1]`, `score`, ...: the last Linear inside it), else the model's last `nn.Linear` when it
    is the last module with parameters (a plain MLP or a GRU language model). None when there is none."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 - a model's own method; fall back to looking by name
            head = None
        else:
            if isinstance(head, (tuple, list)) and head:
                head = head[0]
            return head if isinstance(head, nn.Linear) else None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001
            head = None
        if isinstance(head, nn.Linear):
            return head
    with_params = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    last = with_params[-1] if with_params and isinstance(with_params[-1], nn.Linear) else None
    named = next((h for h in (_last_linear(getattr(model, n)) for n in HEAD_NAMES
                              if isinstance(getattr(model, n, None), nn.Module)) if h is not None), None)
    if named is None:
        named = next((getattr(model, n) for n in LINEAR_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Linear)), None)
    if named is not None and last is not None and last is not named and last.in_features == named.out_features \
            and with_params.index(last) > with_params.index(named):
        return last  # `fc` is a hidden layer feeding the model's last Linear (embedding -> GRU -> fc -> out)
    return named if named is not None else last
