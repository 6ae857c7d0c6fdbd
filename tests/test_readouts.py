"""Closed-form readouts against autograd / numpy references (docs/architecture.md §4)."""
import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

import capture
from capture.lm import lm_loss
from capture.readouts import gwa_aggregate, gwa_alignments, head_gradient, head_gradient_scores, output_stats
from zoo import tiny_lm


def _head_case(n=16, d=7, c=5, dtype=torch.float64):
    z = torch.randn(n, d, dtype=dtype)
    w = torch.randn(c, d, dtype=dtype, requires_grad=True)
    b = torch.randn(c, dtype=dtype, requires_grad=True)
    y = torch.randint(0, c, (n,))
    return z, w, b, y


def test_head_gradient_equals_autograd_softmax_ce():
    z, w, b, y = _head_case()
    logits = z @ w.T + b
    logits.retain_grad()
    F.cross_entropy(logits, y).backward()
    g = head_gradient(z, logits.grad)
    torch.testing.assert_close(g, w.grad, rtol=1e-12, atol=1e-12)
    # the paper's form: (P - Y) Z^T / B
    p, onehot = torch.softmax(logits.detach(), -1), F.one_hot(y, 5).double()
    torch.testing.assert_close(g, (p - onehot).T @ z / len(y), rtol=1e-12, atol=1e-12)
    s = head_gradient_scores(z, logits.grad, w.detach())
    torch.testing.assert_close(s["head_grad_norm"], w.grad.norm(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s["score_w"], w.grad.norm() / (w.norm() + 1e-12), rtol=1e-10, atol=0)
    torch.testing.assert_close(s["score_z"], w.grad.norm() / (z.norm() + 1e-12), rtol=1e-10, atol=0)


def test_head_gradient_equals_autograd_lm_head():
    lm = tiny_lm().double()
    tokens = torch.randint(0, 20, (3, 12))
    feats = lm.forward_features(tokens[:, :-1]).detach()  # (B, L, D)
    logits = lm.lm_head(feats)
    logits.retain_grad()
    lm_loss(logits, tokens[:, 1:]).backward()
    torch.testing.assert_close(head_gradient(feats, logits.grad), lm.lm_head.weight.grad, rtol=1e-12, atol=1e-12)


def test_gwa_per_sample_terms_equal_torch_func_reference():
    z, w, b, y = _head_case()
    w0, b0 = w.detach(), b.detach()

    def sample_loss(weight, zi, yi):
        return F.cross_entropy((zi @ weight.T + b0)[None], yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(w0, z, y)  # (N, C, d)
    flat = per_sample.reshape(len(y), -1)
    reference = (-flat @ w0.reshape(-1)) / (flat.norm(dim=1) * w0.norm())
    logits = (z @ w0.T + b0).requires_grad_()
    F.cross_entropy(logits, y).backward()
    torch.testing.assert_close(gwa_alignments(z, logits.grad, w0), reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dist", ["normal", "heavy", "uniform", "two_point"])
def test_gwa_aggregate_matches_scipy(dist):
    rng = np.random.default_rng(1)
    a = {
        "normal": rng.normal(0.2, 0.1, 500),
        "heavy": rng.standard_t(3, 500) * 0.1,
        "uniform": rng.uniform(-1, 1, 500),
        "two_point": np.array([-0.5, 0.5] * 50),  # excess kurtosis -2: denominator -0.8 -> guarded
    }[dist]
    denom = scipy.stats.kurtosis(a, fisher=True, bias=True) + 1.2
    expected = a.mean() / max(denom, 0.1)
    assert float(gwa_aggregate(torch.tensor(a))) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert np.isfinite(float(gwa_aggregate(torch.tensor(a))))


def test_gwa_aggregate_edge_cases():
    assert torch.isnan(gwa_aggregate(torch.tensor([])))
    assert float(gwa_aggregate(torch.full((10,), 0.3))) == pytest.approx(0.3 / 1.2)


def test_output_stats_against_naive():
    logits = torch.randn(32, 6)
    p = torch.softmax(logits, -1).numpy()
    s = output_stats(logits)
    srt = np.sort(p, axis=1)
    assert float(s["confidence"]) == pytest.approx(p.max(1).mean(), rel=1e-5)
    assert float(s["entropy"]) == pytest.approx(scipy.stats.entropy(p, axis=1).mean(), rel=1e-5)
    assert float(s["margin"]) == pytest.approx((srt[:, -1] - srt[:, -2]).mean(), rel=1e-5)


def test_capture_readouts_equal_autograd_on_a_real_model():
    """Through the hooks: the head-gradient readout equals the head's own .grad after backward."""
    from zoo import IMAGE_FAMILIES

    model = IMAGE_FAMILIES["resnet"]()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with capture.attach(model, cadence=1, frame_size=16) as cap:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        frame = cap.step(loss)
    head = model.get_classifier()
    assert frame.readouts["head_grad_norm"] == pytest.approx(float(head.weight.grad.norm()), rel=1e-5)
    assert frame.readouts["score_w"] == pytest.approx(float(head.weight.grad.norm() / head.weight.norm()), rel=1e-5)
    assert frame.readouts["loss"] == pytest.approx(float(loss))
