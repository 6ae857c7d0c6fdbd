"""The evidential head and loss against references written directly from docs/architecture.md §7."""
import math

import pytest
import torch
from torch.distributions import Dirichlet as TorchDirichlet
from torch.distributions import kl_divergence

from diagnose.evidential import IGNORE, dirichlet, evidential_loss, evidential_terms, kl_anneal, kl_to_uniform, tempered_probs

K = 5


def _reference_loss(f: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-sample loss, one sample at a time, in float64 with math.lgamma / torch.digamma on scalars."""
    out = []
    for row, t in zip(f.double(), target.tolist()):
        alpha = torch.log1p(torch.exp(row)) + 1.0  # softplus(f) + 1
        s = alpha.sum()
        y = torch.zeros(K, dtype=torch.float64)
        y[t] = 1.0
        nll = sum(y[k] * (torch.digamma(s) - torch.digamma(alpha[k])) for k in range(K))
        a_t = y + (1 - y) * alpha
        s_t = a_t.sum()
        # KL(Dir(a) || Dir(1)) = ln G(S) - sum ln G(a_k) - ln G(K) + sum (a_k - 1)(psi(a_k) - psi(S))
        kl = math.lgamma(s_t) - sum(math.lgamma(a) for a in a_t.tolist()) - math.lgamma(K)
        kl += sum((a_t[k] - 1) * (torch.digamma(a_t[k]) - torch.digamma(s_t)) for k in range(K))
        out.append(nll + lam * kl)
    return torch.stack(out)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_loss_equals_reference(lam):
    f = torch.randn(16, K) * 3
    target = torch.randint(0, K, (16,))
    ref = _reference_loss(f, target, lam)
    got = evidential_loss(f, target, lam)
    assert got.item() == pytest.approx(ref.mean().item(), rel=1e-5, abs=1e-6)


def test_kl_term_equals_torch_distributions():
    f = torch.randn(32, K) * 4
    target = torch.randint(0, K, (32,))
    _, kl = evidential_terms(f, target)
    alpha = dirichlet(f).alpha.double()
    y = torch.nn.functional.one_hot(target, K).double()
    alpha_tilde = y + (1 - y) * alpha
    ref = kl_divergence(TorchDirichlet(alpha_tilde), TorchDirichlet(torch.ones_like(alpha_tilde)))
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_to_uniform(torch.ones(3, K)), torch.zeros(3), atol=1e-6, rtol=0)  # KL(p||p) = 0
    assert (kl >= -1e-6).all()


def test_dirichlet_readout():
    f = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0, -10.0], [-30.0] * K])
    d = dirichlet(f)
    torch.testing.assert_close(d.alpha, torch.nn.functional.softplus(f) + 1)
    torch.testing.assert_close(d.vacuity, K / d.alpha.sum(-1))
    torch.testing.assert_close(d.probs.sum(-1), torch.ones(3))
    assert d.vacuity[2].item() == pytest.approx(1.0, abs=1e-6)  # no evidence at all: u = 1
    assert d.vacuity[1] < 0.4 and d.probs[1].argmax() == 0  # strong evidence for class 0


def test_ignored_targets_excluded_and_grad_finite():
    f = (torch.randn(8, K) * 5).requires_grad_()
    target = torch.tensor([0, IGNORE, 2, IGNORE, 4, 1, IGNORE, 3])
    loss = evidential_loss(f, target, 0.7)
    keep = target != IGNORE
    assert loss.item() == pytest.approx(_reference_loss(f[keep].detach(), target[keep], 0.7).mean().item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(f.grad).all()
    assert (f.grad[~keep] == 0).all() and (f.grad[keep] != 0).any()

    # extreme logits keep a finite gradient (softplus / digamma are evaluated in fp32)
    g = torch.tensor([[80.0, -80.0, 0.0, 30.0, -5.0]], requires_grad=True)
    evidential_loss(g, torch.tensor([1]), 1.0).backward()
    assert torch.isfinite(g.grad).all()


def test_all_ignored_gives_zero_with_graph():
    f = torch.randn(4, K, requires_grad=True)
    loss = evidential_loss(f, torch.full((4,), IGNORE), 1.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (f.grad == 0).all()


def test_class_weights_make_a_weighted_mean():
    f = torch.randn(6, K)
    target = torch.tensor([0, 0, 0, 0, 1, 2])
    w = torch.tensor([0.25, 2.0, 2.0, 1.0, 1.0])
    per = _reference_loss(f, target, 1.0)
    ws = w[target].double()
    assert evidential_loss(f, target, 1.0, w).item() == pytest.approx(((ws * per).sum() / ws.sum()).item(), rel=1e-5)


def test_loss_decreases_the_right_way():
    """More evidence on the true class lowers the loss; evidence on a wrong class is penalised by KL."""
    t = torch.tensor([2])
    weak, strong = torch.zeros(1, K), torch.zeros(1, K)
    strong[0, 2] = 6.0
    wrong = torch.zeros(1, K)
    wrong[0, 3] = 6.0
    assert evidential_loss(strong, t, 1.0) < evidential_loss(weak, t, 1.0) < evidential_loss(wrong, t, 1.0)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="outside 0..4"):
        evidential_loss(torch.zeros(2, K), torch.tensor([0, 5]), 1.0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        evidential_loss(torch.zeros(2, K), torch.tensor([0]), 1.0)


def test_kl_anneal_ramps_over_ten_epochs():
    assert [kl_anneal(e) for e in (0, 1, 5, 10, 11, 50)] == [0.0, 0.1, 0.5, 1.0, 1.0, 1.0]
    assert kl_anneal(2.5, epochs=5) == 0.5 and kl_anneal(3, epochs=0) == 1.0


def test_temperature_changes_probs_not_vacuity():
    alpha = dirichlet(torch.randn(4, K) * 3).alpha
    p1 = tempered_probs(alpha, 1.0)
    torch.testing.assert_close(p1, alpha / alpha.sum(-1, keepdim=True))
    hot, cold = tempered_probs(alpha, 2.0), tempered_probs(alpha, 0.5)
    assert (hot.max(-1).values <= p1.max(-1).values + 1e-6).all() and (cold.max(-1).values >= p1.max(-1).values - 1e-6).all()
    assert (hot.argmax(-1) == p1.argmax(-1)).all()
