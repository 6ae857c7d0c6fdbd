"""`watch(model, optimizer)` with no hook options attaches to models outside timm: a sample of the registry
sweep (`python -m eval.attach_sweep` runs all of it), the layouts and outputs those models produce, and the
head readouts under losses other than softmax cross-entropy."""
import logging
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import capture
import diagnose
from capture.frames import to_grid
from capture.hookpoints import find_head, find_hook_points
from capture.recorder import _first_tensor
from diagnose.monitor import recover_loss
from eval.attach_sweep import all_cases, check

# CI runs every plain and Hugging Face case and the cheaper torchvision families; the sweep runs all 23
SAMPLE = {"sequential_cnn", "sequential_mlp", "groupnorm_cnn", "token_mixing_mlp", "residual_mlp_tabular", "gru_lm",
          "lstm_lm", "transformer_encoder_classifier", "gpt2", "bert_classifier", "llama", "vit_classifier",
          "resnet", "mobilenet_v3", "squeezenet", "shufflenet_v2", "swin", "vit", "mnasnet", "efficientnet"}
CASES = {c.name: c for c in all_cases()}


def test_the_sample_names_real_cases():
    assert SAMPLE <= set(CASES)
    assert {c.library for c in CASES.values()} == {"plain", "torchvision", "huggingface"}


@pytest.mark.parametrize("name", sorted(SAMPLE))
def test_watch_attaches_with_no_options(name):
    r = check(CASES[name])
    assert r.error is None, r.error
    assert r.increasing, f"three distinct points in forward order: {r.points}"
    assert r.finite and r.varying, "frames finite, every channel varying"
    assert r.same_loss, "the monitor changed the training losses"
    assert r.hooks_left == 0, f"{r.hooks_left} hooks left after remove()"
    assert r.ok


def test_sequence_first_and_conv1d_layouts_become_token_grids():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(5, 2, 3)  # (T, B, D)
    torch.testing.assert_close(to_grid(x, "tbd"), to_grid(x.transpose(0, 1).contiguous(), "bnd"))
    y = torch.randn(2, 3, 7)  # (B, C, L)
    torch.testing.assert_close(to_grid(y, "bcl"), to_grid(y.transpose(1, 2).contiguous(), "bnd"))
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 3, enable_nested_tensor=False)
    model = nn.Sequential(enc, nn.Linear(8, 2))
    assert {p.layout for p in find_hook_points(model)} == {"tbd"}
    rnn = nn.ModuleDict({"a": nn.GRU(4, 4, batch_first=True), "b": nn.Conv1d(4, 4, 3), "c": nn.GRU(4, 4)})
    assert [p.layout for p in find_hook_points(rnn)] == ["auto", "bcl", "tbd"]


def test_structured_outputs_give_their_main_tensor():
    t = torch.ones(2)

    @dataclass
    class Out:
        loss: None
        logits: torch.Tensor

    assert _first_tensor({"loss": None, "logits": t}) is t
    assert _first_tensor(Out(None, t)) is t
    assert _first_tensor((t, (t, t))) is t
    assert _first_tensor("text") is None


def test_heads_are_found_where_models_keep_them():
    from torchvision.models import mobilenet_v2, resnet18, squeezenet1_1

    m = resnet18(num_classes=3)
    assert find_head(m) is m.fc
    m = mobilenet_v2(num_classes=3)
    assert find_head(m) is m.classifier[-1]
    assert find_head(squeezenet1_1(num_classes=3)) is None  # a 1x1-conv head: head readouts missing
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert find_head(mlp) is mlp[2]

    class Hidden(nn.Module):  # a hidden layer named like a head, feeding the real head
        def __init__(self):
            super().__init__()
            self.embed, self.gru = nn.Embedding(10, 8), nn.GRU(8, 8, batch_first=True)
            self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

    m = Hidden()
    assert find_head(m) is m.out


class Regressor(nn.Module):
    def __init__(self, outputs: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.fc = nn.Linear(16, outputs)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.mark.parametrize("loss_name", ["mse", "bce_multilabel", "label_smoothing", "ignore_index"])
def test_other_losses_give_frames_and_mark_what_does_not_hold(loss_name, caplog):
    torch.manual_seed(0)
    outputs = {"mse": 1, "bce_multilabel": 4}.get(loss_name, 5)
    model = Regressor(outputs)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(16, 6)
    losses = {
        "mse": lambda out: F.mse_loss(out.squeeze(1), 5 + x[:, 0]),
        "bce_multilabel": lambda out: F.binary_cross_entropy_with_logits(out, (x[:, :4] > 0).float()),
        "label_smoothing": lambda out: F.cross_entropy(out, torch.arange(16) % 5, label_smoothing=0.1),
        "ignore_index": lambda out: F.cross_entropy(out, torch.where(torch.arange(16) < 4, -100, torch.arange(16) % 5)),
    }
    softmax = loss_name in ("label_smoothing", "ignore_index")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="tevid"):
        warnings.simplefilter("always")
        monitor = diagnose.watch(model, opt, checkpoint=False, cadence=1)
        true_losses = []
        for _ in range(4):
            loss = losses[loss_name](model(x))
            loss.backward()
            opt.step()
            opt.zero_grad()
            true_losses.append(loss.item())
        monitor.remove()
    assert monitor.disabled_reason is None
    assert len(monitor.frames) == 4 and torch.isfinite(torch.stack([f.frame.float() for f in monitor.frames])).all()
    r = monitor.readouts[-1]
    assert r["head_grad_norm"] > 0  # dL/dW of the head, exact for any loss
    softmax_readouts = [r[k] for k in ("confidence", "entropy", "margin")]
    not_softmax = [w for w in caught if "not a softmax loss" in str(w.message)]
    if softmax:
        assert all(v == v for v in softmax_readouts) and not not_softmax
    else:
        assert all(v != v for v in softmax_readouts), "softmax readouts of a non-softmax loss must be missing"
        assert len(not_softmax) == 1, "one warning"
    if loss_name == "ignore_index":  # recovered from the head: cross-entropy over the labelled rows
        assert r["loss"] == pytest.approx(true_losses[-1], rel=1e-4)
    elif loss_name in ("mse", "bce_multilabel"):
        assert r["loss"] != r["loss"], "a loss that is not cross-entropy must read as missing, not as a number"
        assert sum("observe(loss=loss)" in m for m in caplog.messages) == 1


def test_recover_loss_refuses_non_softmax_gradients():
    logits = torch.randn(8, 1, requires_grad=True)
    target = torch.randn(8)
    loss = F.mse_loss(logits.squeeze(1), target)
    (grad,) = torch.autograd.grad(loss, logits)
    value, known = recover_loss(logits, grad)
    assert not bool(known) and value != value  # was 0.0 before: -log softmax of one logit
    logits = torch.randn(8, 3, requires_grad=True)
    loss = F.cross_entropy(logits, torch.arange(8) % 3)
    (grad,) = torch.autograd.grad(loss, logits)
    value, known = recover_loss(logits, grad)
    assert bool(known) and float(value) == pytest.approx(loss.item(), rel=1e-5)


def test_a_head_shared_by_two_losses_and_tied_embeddings_attach():
    class TwoTask(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
            self.fc = nn.Linear(16, 3)

        def forward(self, a, b):
            return self.fc(self.body(a)), self.fc(self.body(b))

    model = TwoTask()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with diagnose.watch(model, opt, checkpoint=False, cadence=1) as monitor:
        for _ in range(3):
            h1, h2 = model(torch.randn(8, 6), torch.randn(8, 6))
            (F.cross_entropy(h1, torch.arange(8) % 3) + F.cross_entropy(h2, torch.arange(8) % 3)).backward()
            opt.step()
            opt.zero_grad()
    assert monitor.disabled_reason is None and len(monitor.readouts) == 3
    assert torch.isfinite(monitor.frames[-1].frame.float()).all()


def test_a_model_that_is_not_a_module_is_named():
    with pytest.raises(TypeError, match="torch.nn.Module, got builtins.function"):
        capture.attach(lambda x: x)
