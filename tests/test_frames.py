"""Frame builder: layouts, shape/dtype, causal normalisation, non-finite handling, bad input."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import capture
from capture.frames import Projection, RobustNormalizer, channel_groups, group_vectors, tensor_to_map, to_grid
from zoo import IMAGE_FAMILIES, tiny_lm

S = 16


def test_to_grid_layouts():
    x = torch.randn(2, 5, 3, 4)
    assert torch.equal(to_grid(x, "bchw"), x)
    assert torch.equal(to_grid(x.permute(0, 2, 3, 1), "bhwc"), x)
    tokens = torch.randn(2, 1 + 16, 8)  # CLS + 4x4 patches
    grid = to_grid(tokens, "bnd", prefix_tokens=1)
    assert grid.shape == (2, 8, 4, 4)
    assert torch.equal(grid[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])  # row-major patch order
    odd = to_grid(torch.randn(2, 10, 8), "bnd")  # 10 tokens -> padded to 4x4
    assert odd.shape == (2, 8, 4, 4) and torch.all(odd.flatten(2)[:, :, 10:] == 0)
    assert to_grid(torch.randn(3, 7), "bd").shape == (3, 1, 3, 3)


def test_channel_groups_is_group_rms():
    x = torch.randn(2, 16, 3, 3)
    ref = x.reshape(2, 8, 2, 3, 3).pow(2).mean(2).sqrt()
    torch.testing.assert_close(channel_groups(x, 8), ref)
    assert channel_groups(torch.randn(1, 3, 2, 2), 8).shape == (1, 8, 2, 2)  # C < G works


def test_tensor_to_map_against_naive_reference():
    x = torch.randn(4, 16, 6, 6)
    m, bad = tensor_to_map(x, "bchw", 12, Projection.mean(8))
    naive = x.reshape(4, 8, 2, 6, 6).pow(2).mean(2).sqrt().mean(1).mean(0)  # groups, projection, batch
    naive = F.interpolate(naive[None, None], size=(12, 12), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    torch.testing.assert_close(m, naive)
    assert int(bad) == 0


def test_pca_projection_fit_and_roundtrip():
    x = torch.randn(8, 16, 4, 4) * torch.linspace(0.1, 3, 16)[None, :, None, None]
    proj = Projection.fit_pca(group_vectors(x, "bchw", 8))
    assert proj.kind == "pca" and proj.groups == 8 and sum(proj.weight) > 0
    again = Projection.from_dict(proj.to_dict())
    assert again == proj and again.digest() == proj.digest() != Projection.mean(8).digest()


def test_normalizer_is_causal_and_frozen():
    torch.manual_seed(0)
    frames = [torch.randn(6, S, S) * (i + 1) for i in range(6)]
    a, b = RobustNormalizer(warmup=2), RobustNormalizer(warmup=2)
    out_a = [a(f) for f in frames]
    out_b = [b(f) for f in frames[:3]] + [b(f * 100) for f in frames[3:]]  # different future
    for i in range(3):
        assert torch.equal(out_a[i], out_b[i]), "frame i must not depend on frames after i"
    assert a.frozen
    med = a.median.clone()
    a(torch.randn(6, S, S) * 1000)
    assert torch.equal(a.median, med), "statistics are frozen after warm-up"
    assert all(torch.isfinite(o).all() and o.abs().max() < 14 for o in out_a + out_b)


def test_normalizer_waits_for_an_informative_map():
    n = RobustNormalizer(warmup=1)
    first = torch.zeros(6, S, S)  # zero-initialised BatchNorm: the first activation map is constant
    n(first)
    assert not n.frozen
    n(torch.randn(6, S, S))
    assert n.frozen and (n.scale > 0).all()


def _causal_run(model_fn, data, steps, cadence=2):
    torch.manual_seed(1)
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with capture.attach(model, cadence=cadence, frame_size=S) as cap:
        for x, y in data[:steps]:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            cap.step(loss)
            opt.step()
            opt.zero_grad()
    return cap.frames


def test_capture_is_causal_end_to_end():
    torch.manual_seed(2)
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(8)]
    other = data[:4] + [(torch.randn(4, 3, 32, 32) * 5, torch.randint(0, 10, (4,))) for _ in range(4)]
    fa = _causal_run(IMAGE_FAMILIES["resnet"], data, 8)
    fb = _causal_run(IMAGE_FAMILIES["resnet"], other, 8)
    assert len(fa) == len(fb) == 4
    for i in range(2):  # frames at steps 0 and 2 only saw the shared first 4 batches
        assert torch.equal(fa[i].frame, fb[i].frame)
    assert not torch.equal(fa[3].frame, fb[3].frame)


class Blowup(nn.Module):
    """Turns its input non-finite on demand, in the forward and in the backward."""

    def __init__(self):
        super().__init__()
        self.forward_bad = False

    def forward(self, x):
        return x * float("inf") if self.forward_bad else x


def test_non_finite_values_give_finite_frames_and_a_count():
    model = IMAGE_FAMILIES["resnet"]()
    blow = Blowup()
    model.layer3[0].bn2 = nn.Sequential(model.layer3[0].bn2, blow)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with capture.attach(model, cadence=1, frame_size=S, modules=["layer2.0.bn2", "layer3.0.bn2", "layer4.0.bn2"]) as cap:
        for bad in (False, True):
            blow.forward_bad = bad
            loss = F.cross_entropy(model(x), y)
            loss.backward()  # NaN/Inf gradients everywhere below layer3 when bad
            frame = cap.step(loss)
            model.zero_grad()
    assert torch.isfinite(frame.frame.float()).all()
    assert frame.readouts["nonfinite"] > 0
    assert cap.frames[0].readouts["nonfinite"] == 0
    assert np.isnan(frame.readouts["loss"])


def test_model_without_linear_head_still_gets_frames_with_one_warning():
    model = IMAGE_FAMILIES["resnet"]()
    model.fc = nn.Sequential(nn.Linear(64, 10))  # not found as a head
    with pytest.warns(RuntimeWarning, match="no linear classifier head") as record:
        cap = capture.attach(model, cadence=1, frame_size=S)
        for _ in range(3):
            loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
            loss.backward()
            frame = cap.step(loss)
    cap.remove()
    assert sum("no linear classifier head" in str(w.message) for w in record) == 1
    assert all(np.isnan(frame.readouts[k]) for k in ("head_grad_norm", "score_w", "score_z", "gwa"))
    assert frame.readouts["confidence"] > 0  # output statistics come from the model's output
    assert frame.frame.shape == (6, S, S)


@pytest.mark.parametrize("family", ["convnext", "vit", "lm"])
def test_batch_of_one(family):
    model = tiny_lm() if family == "lm" else IMAGE_FAMILIES[family]()  # (BatchNorm nets cannot train on 1)
    x = torch.randint(0, 20, (1, 8)) if family == "lm" else torch.randn(1, 3, 32, 32)
    with capture.attach(model, cadence=1, frame_size=S) as cap:
        loss = F.cross_entropy(model(x).reshape(-1, 20 if family == "lm" else 10), torch.randint(0, 10, (8 if family == "lm" else 1,)))
        loss.backward()
        frame = cap.step(loss)
    assert torch.isfinite(frame.frame.float()).all() and not cap.faults
    assert np.isfinite(frame.readouts["gwa"]) and np.isfinite(frame.readouts["head_grad_norm"])


def test_non_square_token_count_lm():
    model = tiny_lm()  # 11 tokens: padded to a 4x4 grid
    tokens = torch.randint(0, 20, (2, 12))
    with capture.attach(model, cadence=1, frame_size=S) as cap:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        frame = cap.step(loss)
    assert frame.frame.shape == (6, S, S) and not cap.faults
    assert np.isfinite(frame.readouts["head_grad_norm"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_models(dtype):
    model = IMAGE_FAMILIES["vit"]()
    with capture.attach(model, cadence=1, frame_size=S) as cap, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # CPU fp16 autocast support notices
        with torch.autocast("cpu", dtype=dtype):
            loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
        loss.backward()
        frame = cap.step(loss)
    assert not cap.faults
    assert frame.frame.dtype == torch.bfloat16 and torch.isfinite(frame.frame.float()).all()
    assert np.isfinite(frame.readouts["head_grad_norm"])


def test_hooks_are_idle_between_capture_steps():
    model = IMAGE_FAMILIES["resnet"]()
    with capture.attach(model, cadence=5, frame_size=S, gwa_window="step") as cap:
        for step in range(7):
            loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.randint(0, 10, (2,)))
            loss.backward()
            if step in (1, 2, 3, 4, 6):
                assert all(m is None for m in cap._maps) and not cap._head, f"hooks did work at step {step}"
            cap.step(loss)
    assert [f.step for f in cap.frames] == [0, 5]


def test_capture_never_raises_into_the_training_step():
    model = IMAGE_FAMILIES["resnet"]()
    with capture.attach(model, cadence=1, frame_size=S) as cap:
        cap.projection.weight = ["not a number"] * 8  # a broken projection: every map fails
        with pytest.warns(RuntimeWarning, match="capture fault"):
            loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.randint(0, 10, (2,)))
            loss.backward()
            frame = cap.step(loss)
    assert cap.faults and frame is not None and torch.isfinite(frame.frame.float()).all()
