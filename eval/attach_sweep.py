"""Does `diagnose.watch(model, optimizer)` attach to the models people train? A registry-wide sweep.

    python -m eval.attach_sweep [--out outputs/attach_sweep] [--library torchvision|huggingface|plain] [--only NAME ...]

One case per torchvision classification family (the family's smallest builder at a small input, or a small
config of its class where the builder needs 224 px), tiny random-config Hugging Face models (no downloads)
and plain torch modules written as users write them. For each, in the style of timm's registry tests:

- `watch(model, optimizer)` attaches with no hook options (cadence 1, so that a few steps give frames);
- three distinct hook points at increasing depth (definition order);
- frames whose six channels are finite and not constant (over the steps and the frame's pixels);
- training unaffected: the same losses, step by step, with and without the monitor (seeded);
- `remove()` leaves no hook on any module and none on the optimizer.

Prints one line per case and the coverage per library; writes sweep.json. `tests/test_attach_anywhere.py`
runs a sample of the same cases through `check`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

STEPS = 3  # seeded optimizer steps with and without the monitor


@dataclass(frozen=True)
class Case:
    library: str  # "torchvision" | "huggingface" | "plain"
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple]  # -> the arguments `loss` takes after the model
    loss: Callable[..., torch.Tensor]  # loss(model, *batch), written as a user would


# ---------------------------------------------------------------- data and losses, user style
def images(size: int = 32, classes: int = 10, channels: int = 3, n: int = 4):
    return lambda g: (torch.randn(n, channels, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))


def tokens(vocab: int = 50, length: int = 12, n: int = 4):
    def batch(g):
        seq = torch.randint(0, vocab, (n, length + 1), generator=g)
        return seq[:, :-1], seq[:, 1:]
    return batch


def table(features: int = 12, classes: int = 3, n: int = 8):
    return lambda g: (torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))


def classify(model, x, y):
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)  # GoogLeNet's aux outputs
    return F.cross_entropy(logits, y)


def next_token(model, x, y):
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def hf_lm(model, x, y):
    return model(input_ids=x, labels=x).loss  # Hugging Face shifts the labels itself


def hf_classify(model, x, y):
    return model(x, labels=y).loss


def hf_images(model, x, y):
    return model(pixel_values=x, labels=y).loss


# ---------------------------------------------------------------- plain torch modules, as users write them
class GroupNormCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.conv2, self.gn2 = nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.GroupNorm(4, 32)
        self.conv3, self.gn3 = nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.GroupNorm(4, 32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        x = F.relu(self.gn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


class MixerLayer(nn.Module):
    """Token mixing, then channel mixing, each residual (a hand-written MLP-Mixer layer)."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):  # (B, N, D)
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class TokenMixer(nn.Module):
    def __init__(self, classes: int = 10, patch: int = 8, dim: int = 32, depth: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.layers = nn.ModuleList([MixerLayer((32 // patch) ** 2, dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, D)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.ff(self.norm(x))


class ResidualMLP(nn.Module):
    """A residual MLP for tabular data."""

    def __init__(self, features: int = 12, classes: int = 3, dim: int = 32, depth: int = 3):
        super().__init__()
        self.inp = nn.Linear(features, dim)
        self.blocks = nn.Sequential(*[ResBlock(dim) for _ in range(depth)])
        self.out = nn.Linear(dim, classes)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


class RNNLM(nn.Module):
    """A word-level GRU / LSTM language model (the PyTorch example's layout: encoder, rnn, decoder)."""

    def __init__(self, cell: str = "GRU", vocab: int = 50, dim: int = 32, layers: int = 2):
        super().__init__()
        self.encoder = nn.Embedding(vocab, dim)
        self.rnn = getattr(nn, cell)(dim, dim, num_layers=layers, batch_first=True)
        self.decoder = nn.Linear(dim, vocab)

    def forward(self, x):
        out, _ = self.rnn(self.encoder(x))  # (B, T, D)
        return self.decoder(out)


class TransformerClassifier(nn.Module):
    """`nn.TransformerEncoder` (sequence-first, torch's default) over token embeddings, mean-pooled."""

    def __init__(self, vocab: int = 50, classes: int = 3, dim: int = 32, depth: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=64, dropout=0.1)
        self.encoder = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):  # (B, T)
        h = self.encoder(self.embed(x).transpose(0, 1))  # (T, B, D)
        return self.fc(h.mean(0))


def plain_cases() -> list[Case]:
    cnn = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    mlp = lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),  # noqa: E731
                                nn.Linear(32, 10))
    text_cls = lambda g: (torch.randint(0, 50, (4, 12), generator=g), torch.randint(0, 3, (4,), generator=g))  # noqa: E731
    return [
        Case("plain", "sequential_cnn", cnn, images(), classify),
        Case("plain", "sequential_mlp", mlp, images(), classify),
        Case("plain", "groupnorm_cnn", GroupNormCNN, images(), classify),
        Case("plain", "token_mixing_mlp", TokenMixer, images(), classify),
        Case("plain", "residual_mlp_tabular", ResidualMLP, table(), classify),
        Case("plain", "gru_lm", lambda: RNNLM("GRU"), tokens(), next_token),
        Case("plain", "lstm_lm", lambda: RNNLM("LSTM"), tokens(), next_token),
        Case("plain", "transformer_encoder_classifier", TransformerClassifier, text_cls, classify),
    ]


# ---------------------------------------------------------------- torchvision: one model per family
def torchvision_cases() -> list[Case]:
    from torchvision import models
    from torchvision.models.maxvit import MaxVit
    from torchvision.models.vision_transformer import VisionTransformer

    def builder(name: str, **kw):
        return lambda: models.get_model(name, num_classes=10, **kw)

    families = {  # family -> (constructor, input size)
        "alexnet": (builder("alexnet"), 64),
        "convnext": (builder("convnext_tiny"), 32),
        "densenet": (builder("densenet121"), 32),
        "efficientnet": (builder("efficientnet_b0"), 32),
        "efficientnet_v2": (builder("efficientnet_v2_s"), 32),
        "googlenet": (builder("googlenet", init_weights=False), 32),
        "inception": (builder("inception_v3", aux_logits=False, init_weights=False), 80),  # 75 px at least
        "maxvit": (lambda: MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[16, 32],
                                  block_layers=[2, 2], head_dim=8, stochastic_depth_prob=0.0, num_classes=10), 32),
        "mnasnet": (builder("mnasnet0_5"), 32),
        "mobilenet_v2": (builder("mobilenet_v2"), 32),
        "mobilenet_v3": (builder("mobilenet_v3_small"), 32),
        "regnet_x": (builder("regnet_x_400mf"), 32),
        "regnet_y": (builder("regnet_y_400mf"), 32),
        "resnet": (builder("resnet18"), 32),
        "resnext": (builder("resnext50_32x4d"), 32),
        "wide_resnet": (builder("wide_resnet50_2"), 32),
        "shufflenet_v2": (builder("shufflenet_v2_x0_5"), 32),
        "squeezenet": (builder("squeezenet1_1"), 32),
        "swin": (builder("swin_t"), 32),
        "swin_v2": (builder("swin_v2_t"), 32),
        "vgg": (builder("vgg11"), 32),
        "vgg_bn": (builder("vgg11_bn"), 32),
        "vit": (lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32,
                                          mlp_dim=64, num_classes=10), 32),
    }
    return [Case("torchvision", name, build, images(size), classify) for name, (build, size) in families.items()]


# ---------------------------------------------------------------- Hugging Face: tiny random configs
def huggingface_cases() -> list[Case]:
    import transformers as tf

    small = dict(num_hidden_layers=4, num_attention_heads=2, hidden_size=32, intermediate_size=64)
    return [
        Case("huggingface", "gpt2", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            n_layer=4, n_head=2, n_embd=32, vocab_size=50, n_positions=32)), tokens(), hf_lm),
        Case("huggingface", "bert_classifier", lambda: tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=50, max_position_embeddings=32, num_labels=3, **small)),
            lambda g: (torch.randint(0, 50, (4, 12), generator=g), torch.randint(0, 3, (4,), generator=g)), hf_classify),
        Case("huggingface", "llama", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=50, max_position_embeddings=32, num_key_value_heads=2, **small)), tokens(), hf_lm),
        Case("huggingface", "vit_classifier", lambda: tf.ViTForImageClassification(tf.ViTConfig(
            image_size=32, patch_size=8, num_labels=10, **small)), images(), hf_images),
    ]


def all_cases() -> list[Case]:
    return plain_cases() + torchvision_cases() + huggingface_cases()


# ---------------------------------------------------------------- the check
@dataclass
class Result:
    library: str
    name: str
    ok: bool = False
    points: list[str] = field(default_factory=list)
    rule: str = ""
    head: str | None = None
    increasing: bool = False
    finite: bool = False
    varying: bool = False
    same_loss: bool = False
    hooks_left: int = -1
    missing_readouts: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


def count_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Every hook a module or the optimizer holds (forward, pre-forward, backward, state-dict hooks), and those
    `capture.hooks` keeps for them outside the objects."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_state_dict_hooks", "_load_state_dict_pre_hooks")
    from capture import hooks

    n = sum(len(getattr(m, a, {}) or {}) + hooks.active(m) for m in model.modules() for a in names)
    return n + hooks.active(optimizer) + sum(len(getattr(optimizer, a, {}) or {})
                                             for a in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"))


def _train(case: Case, watch_it: bool, seed: int = 0):
    """STEPS seeded SGD steps; returns (losses, monitor or None, model, optimizer)."""
    import diagnose

    torch.manual_seed(seed)
    model = case.build().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    monitor = diagnose.watch(model, opt, cadence=1) if watch_it else None
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(STEPS):
        loss = case.loss(model, *case.batch(g))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, monitor, model, opt


def check(case: Case) -> Result:
    """Run the registry checks on one case (never raises: a failure is recorded in `error`)."""
    res, t0 = Result(case.library, case.name), time.perf_counter()
    try:
        plain, _, _, _ = _train(case, watch_it=False)
        torch.manual_seed(0)
        before = count_hooks(*_fresh(case))
        watched, monitor, model, opt = _train(case, watch_it=True)
        cap = monitor.capture
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        res.points = [p.name for p in cap.points]
        res.rule = cap.points[0].rule
        res.head = None if cap.head is None else next(n for n, m in model.named_modules() if m is cap.head)
        res.increasing = len(set(res.points)) == 3 and [order[n] for n in res.points] == sorted(order[n] for n in res.points)
        frames = torch.stack([f.frame.float() for f in monitor.frames])  # (T, 6, S, S)
        res.finite = bool(torch.isfinite(frames).all())
        per_channel = frames.transpose(0, 1).flatten(1)  # (6, T*S*S)
        res.varying = bool((per_channel.std(dim=1) > 0).all())
        res.same_loss = len(plain) == len(watched) and all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for a, b in zip(plain, watched))
        res.missing_readouts = sorted(k for k, v in monitor.frames[-1].readouts.items() if v != v)
        monitor.remove()
        res.hooks_left = count_hooks(model, opt) - before
        res.ok = (res.increasing and res.finite and res.varying and res.same_loss and res.hooks_left == 0
                  and monitor.disabled_reason is None)
        if monitor.disabled_reason:
            res.error = f"monitor switched off: {monitor.disabled_reason}"
    except Exception as err:  # noqa: BLE001 - a sweep records every failure and goes on
        res.error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}"
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


def _fresh(case: Case):
    model = case.build()
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/attach_sweep")
    p.add_argument("--library", choices=("torchvision", "huggingface", "plain"), default=None)
    p.add_argument("--only", nargs="*", default=None, help="case names")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("tevid").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cases = [c for c in all_cases() if (args.library in (None, c.library)) and (not args.only or c.name in args.only)]
    results = []
    for case in cases:
        r = check(case)
        results.append(r)
        status = "ok  " if r.ok else "FAIL"
        print(f"{status} {r.library:12s} {r.name:32s} {r.rule:28s} {', '.join(r.points)}  head={r.head}  "
              f"({r.seconds:.1f} s){'' if r.ok else '  ' + str(r.error or asdict(r)).splitlines()[0]}", flush=True)
    print("\ncoverage (attached with no options, and every check passed):")
    for lib in dict.fromkeys(r.library for r in results):
        rs = [r for r in results if r.library == lib]
        print(f"  {lib:12s} {sum(r.ok for r in rs)} / {len(rs)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    print(f"wrote {out / 'sweep.json'}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
