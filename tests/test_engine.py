"""The model-training engine (`pretrain.engine`): its schedule, its CSV log and its epoch loop."""
import csv
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.engine import CsvLog, NonFiniteLossError, train_one_epoch, warmup_cosine


def _factory_schedule_before_the_engine(step: int, steps: int, warmup_frac: float, anneal: bool = True) -> float:
    """factory.train.lr_schedule as it was written before it became a call of `warmup_cosine`."""
    warm = max(1, int(warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    if not anneal:
        return 1.0
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def test_the_factory_schedule_is_the_engine_schedule_bit_for_bit():
    from factory.job import lr_schedule

    for steps in (1, 7, 60, 300, 4321):
        for frac in (0.0, 0.05, 0.3):
            for anneal in (True, False):
                assert [lr_schedule(s, steps, frac, anneal) for s in range(steps)] == \
                       [_factory_schedule_before_the_engine(s, steps, frac, anneal) for s in range(steps)]


def test_warmup_cosine_shape():
    f = [warmup_cosine(s, 10, 2, 0.0) for s in range(11)]
    assert f[:3] == [0.5, 1.0, 1.0] and f[6] == pytest.approx(0.5) and f[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(f[1:], f[2:]))
    assert [warmup_cosine(s, 10, 2, 1.0) for s in range(2, 11)] == [1.0] * 9  # min_ratio 1: constant after warm-up
    assert warmup_cosine(50, 10, 2, 0.1) == pytest.approx(0.1)  # past the end: stays at the floor


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_csv_log_appends_on_resume_and_drops_rows_past_the_checkpoint(tmp_path):
    path = tmp_path / "train.csv"
    log = CsvLog(path, ["step", "loss"])
    for step in (10, 20, 30):
        log.write({"step": step, "loss": step / 10})
    before = path.read_bytes()
    CsvLog(path, ["step", "loss"], resume_step=30).write({"step": 40, "loss": 4.0})  # nothing to drop: appended
    assert path.read_bytes().startswith(before)
    assert [r["step"] for r in _rows(path)] == ["10", "20", "30", "40"]
    # killed after writing step 40, resumed from the checkpoint at 20: 30 and 40 are written again
    log = CsvLog(path, ["step", "loss"], resume_step=20)
    assert [r["step"] for r in _rows(path)] == ["10", "20"]
    log.write({"step": 30})
    assert _rows(path)[-1] == {"step": "30", "loss": ""} and not list(tmp_path.glob("*.tmp"))
    CsvLog(path, ["step", "loss"])  # a fresh run starts a fresh file
    assert _rows(path) == [] and path.read_text().strip() == "step,loss"
    CsvLog(tmp_path / "other.csv", ["step"], enabled=False).write({"step": 1})  # not the main process
    assert not (tmp_path / "other.csv").exists()
    with pytest.raises(ValueError, match="step_key"):
        CsvLog(tmp_path / "x.csv", ["epoch"])


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))


def test_train_one_epoch_is_the_plain_loop_it_replaced():
    """The engine without an accelerator takes exactly the steps of the hand-written loops it replaced
    (the baselines' and probes': zero_grad, backward, step), dropout's draws included."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]

    ref = _net()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    torch.manual_seed(5)
    ref.train()
    ref_losses = []
    for xb, yb in batches:
        loss = F.cross_entropy(ref(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())

    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    seen = []
    torch.manual_seed(5)
    result = train_one_epoch(net, batches, opt, lambda m, b: m(b[0]), lambda out, b: F.cross_entropy(out, b[1]),
                             scheduler=sched, step=3, on_step=lambda s, losses, bs: seen.append((s, losses[0].item(), len(bs))))
    assert result.step == 8 and [s for s, _, _ in seen] == [4, 5, 6, 7, 8] and all(n == 1 for _, _, n in seen)
    assert [l for _, l, _ in seen] == ref_losses and result.mean_loss == pytest.approx(sum(ref_losses) / 5)
    assert sched.last_epoch == 5
    for a, b in zip(ref.parameters(), net.parameters()):
        assert torch.equal(a, b)
    other = _net()
    short = train_one_epoch(other, batches, torch.optim.SGD(other.parameters(), lr=0.1), lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                            max_steps=2)
    assert short.step == 2 and len(short.losses) == 2


def test_a_non_finite_loss_raises_before_its_backward():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    batch = (torch.full((2, 4), float("nan")), torch.zeros(2, dtype=torch.long))
    with pytest.raises(NonFiniteLossError, match=r"non-finite probe loss \[nan\] .* at optimizer step 1: batch of 2"):
        train_one_epoch(net, [batch], opt, lambda m, b: F.cross_entropy(m(b[0]), b[1]), what="probe",
                        hint=lambda b: f"batch of {len(b[0])}")
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
