"""Fault injection on the live monitor (issue 21's cases, each reproduced): no lost alerts, no silently
wrong readout, the public API cannot crash the loop on data, watch() is all or nothing, and every bad
argument is named. (Saving / copying a watched model: tests/test_watched_models_save.py; stores, configs
and checkpoints: tests/test_fault_injection_data.py.)"""
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import diagnose
from capture import hooks
from diagnose.callbacks import MonitorCallback
from diagnose.symptoms import Symptom, default_symptoms

pytestmark = pytest.mark.usefixtures("no_default_model")


class Net(nn.Module):
    def __init__(self, outputs: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh())
        self.fc = nn.Linear(16, outputs)

    def forward(self, x):
        return self.fc(self.body(x))


def _opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.05)


def no_hooks(model, opt) -> bool:
    return sum(hooks.active(m) + len(m._forward_hooks) for m in model.modules()) + hooks.active(opt) == 0


# ---------------------------------------------------------------- alerts are never lost
def test_a_raising_on_frame_does_not_stop_later_alerts(caplog):
    model = Net()
    opt = _opt(model)

    class Flaky(MonitorCallback):
        def on_frame(self, frame):
            if frame.step == 4:
                raise ConnectionError("dashboard down")

    seen = []
    with caplog.at_level(logging.WARNING, logger="tevid"):
        monitor = diagnose.watch(model, opt, checkpoint=False, cadence=1, callbacks=[Flaky(), seen.append])
        for step in range(18):
            x = torch.randn(8, 6) * (math.nan if step >= 5 else 1.0)  # 13 NaN steps after the raise
            loss = F.cross_entropy(model(x), torch.arange(8) % 4)
            loss.backward()
            opt.step()
            opt.zero_grad()
        monitor.remove()
    assert any(a.name == "nan_inf" for a in monitor.alerts), "alerts after the callback's exception were lost"
    assert [a.name for a in seen] == [a.name for a in monitor.alerts]  # the other callback got every alert
    assert sum("dashboard down" in r.getMessage() for r in caplog.records) == 1  # reported once


def test_a_raising_on_alert_does_not_drop_the_other_alerts_of_the_step():
    model = Net()
    opt = _opt(model)
    got = []

    def boom(alert):
        raise RuntimeError("first callback fails")

    @dataclass(frozen=True)
    class AtSix(Symptom):  # a scripted symptom: fires at step 6
        name: ClassVar[str] = "at_six"

        def value(self, obs):
            return obs.step

        def check(self, step, value, history, first=()):
            return self.alert(step, "step six") if value == 6 else None

    monitor = diagnose.watch(model, opt, checkpoint=False, cadence=1, callbacks=[boom, got.append],
                             symptoms=[*default_symptoms(), AtSix()])
    x = torch.randn(8, 6)
    for step in range(10):
        loss = F.cross_entropy(model(x * (math.nan if step == 6 else 1.0)), torch.arange(8) % 4)
        loss.backward()
        opt.step()
        opt.zero_grad()
    monitor.remove()
    at = sorted(a.name for a in monitor.alerts if a.step == 6)
    assert at == ["at_six", "nan_inf"], at  # two alerts due at step 6; the first callback raises on each
    assert [a.name for a in got] == [a.name for a in monitor.alerts]


# ---------------------------------------------------------------- no silently wrong readout
@pytest.mark.parametrize("case", ["mse", "bce_one_logit", "two_heads"])
def test_the_loss_read_from_the_head_is_right_or_missing(case, caplog):
    torch.manual_seed(0)
    model = Net(1 if case != "two_heads" else 4)
    opt = _opt(model)
    x, x2 = torch.randn(16, 6), torch.randn(16, 6)
    losses = {"mse": lambda: F.mse_loss(model(x).squeeze(1), 40 + x[:, 0]),
              "bce_one_logit": lambda: F.binary_cross_entropy_with_logits(model(x).squeeze(1), (x[:, 0] > 0).float()),
              "two_heads": lambda: F.cross_entropy(model(x), torch.arange(16) % 4) + F.cross_entropy(model(x2), torch.arange(16) % 4)}
    with caplog.at_level(logging.WARNING, logger="tevid"):
        monitor = diagnose.watch(model, opt, checkpoint=False, cadence=1)
        for _ in range(3):
            loss = losses[case]()
            loss.backward()
            opt.step()
            opt.zero_grad()
        monitor.remove()
    read = monitor.readouts[-1]["loss"]
    if case == "two_heads":  # two forwards of one head in one step: micro-batches, averaged
        assert not math.isnan(read)
    else:
        assert math.isnan(read), f"{case}: read {read} as a cross-entropy (was 0.0 before)"
        assert sum("observe(loss=loss)" in r.getMessage() for r in caplog.records) == 1


def test_two_heads_in_one_forward_add_up():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
            self.fc = nn.Linear(16, 4)

        def forward(self, a, b):
            return self.fc(self.body(a)), self.fc(self.body(b))

    torch.manual_seed(0)
    model = TwoHeads()
    opt = _opt(model)
    monitor = diagnose.watch(model, opt, checkpoint=False, cadence=1)
    for _ in range(3):
        h1, h2 = model(torch.randn(16, 6), torch.randn(16, 6))
        loss = F.cross_entropy(h1, torch.arange(16) % 4) + F.cross_entropy(h2, torch.arange(16) % 4)
        loss.backward()
        opt.step()
        opt.zero_grad()
    monitor.remove()
    assert monitor.readouts[-1]["loss"] == pytest.approx(loss.item(), rel=1e-4)  # 3.51, not the mean 2.34


def test_a_validation_forward_with_grad_does_not_empty_the_gradient_maps():
    torch.manual_seed(0)
    model = Net()
    opt = _opt(model)
    monitor = diagnose.watch(model, opt, checkpoint=False, cadence=2)
    for step in range(8):
        model.eval()
        model(torch.randn(32, 6))  # validation without torch.no_grad(), between training steps
        model.train()
        F.cross_entropy(model(torch.randn(16, 6)), torch.arange(16) % 4).backward()
        opt.step()
        opt.zero_grad()
    monitor.remove()
    for f in monitor.frames:
        assert f.complete
        assert f.frame[3:].float().std() > 0, "gradient channels constant"
    assert all(math.isfinite(r["head_grad_norm"]) for r in monitor.readouts)


def test_a_frame_without_a_training_backward_is_incomplete():
    model = Net()
    opt = _opt(model)
    monitor = diagnose.watch(model, opt, checkpoint=False, cadence=1)
    model(torch.randn(4, 6))  # a forward with grad, never backpropagated
    opt.step()  # a step without backward
    monitor.remove()
    assert monitor.frames and not monitor.frames[-1].complete


# ---------------------------------------------------------------- the public API cannot crash the loop on data
def test_observe_takes_what_it_documents_and_reports_anything_else_once(caplog):
    model = Net()
    opt = _opt(model)
    with caplog.at_level(logging.WARNING, logger="tevid"):
        monitor = diagnose.watch(model, opt, checkpoint=False, cadence=1)
        for value in (np.array([1.0, 2.0]), "0.5x", torch.ones(3), np.float32(0.7), torch.tensor([0.4]), 2):
            monitor.observe(loss=value)  # never raises
            F.cross_entropy(model(torch.randn(4, 6)), torch.arange(4)).backward()
            opt.step()
            opt.zero_grad()
        monitor.remove()
    assert monitor.active is False and monitor.disabled_reason is None  # removed, never switched off by a fault
    assert sum("observe(loss=...)" in r.getMessage() for r in caplog.records) == 1
    assert [r["loss"] for r in monitor.readouts[3:]] == pytest.approx([0.7, 0.4, 2.0])


# ---------------------------------------------------------------- watch() is all or nothing; arguments are named
@pytest.mark.parametrize("kwargs, error, names", [
    ({"log_dir": 123}, TypeError, "log_dir"),
    ({"max_activation_modules": -1}, ValueError, "max_activation_modules"),
    ({"cadence": "5"}, TypeError, "cadence"),
    ({"cadence": True}, TypeError, "cadence"),  # None is the default: the cadence the model was trained on
    ({"cadence": 0}, ValueError, "cadence"),
    ({"cadence": 2.5}, TypeError, "cadence"),
    ({"frame_size": "32"}, TypeError, "frame_size"),
    ({"frame_size": 0}, ValueError, "frame_size"),
    ({"callbacks": 5}, TypeError, "callbacks"),
    ({"callbacks": ["print"]}, TypeError, "callbacks"),
    ({"groups": 0}, ValueError, "groups"),
    ({"head": "fc"}, TypeError, "head"),
    ({"head": nn.Linear(16, 4)}, ValueError, "head"),  # not a module of the model
    ({"symptoms": "nan_inf"}, TypeError, "symptoms"),
    ({"stop_on": 3}, TypeError, "stop_on"),
    ({"checkpoint": 3}, TypeError, "checkpoint"),
])
def test_bad_arguments_are_named_and_nothing_stays_attached(kwargs, error, names):
    model = Net()
    opt = _opt(model)
    with pytest.raises(error, match=names):
        diagnose.watch(model, opt, **kwargs)
    assert no_hooks(model, opt)
    F.cross_entropy(model(torch.randn(4, 6)), torch.arange(4)).backward()
    opt.step()  # nothing left to count steps


def test_an_optimizer_that_is_a_list_and_a_model_that_is_a_function_are_named():
    model = Net()
    with pytest.raises(TypeError, match="optimizer"):
        diagnose.watch(model, [_opt(model)])
    assert no_hooks(model, _opt(model))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        diagnose.watch(lambda x: x, None)


def test_a_failure_halfway_removes_what_was_attached(monkeypatch):
    import diagnose.monitor as monitor_module

    model = Net()
    opt = _opt(model)

    def boom(self, log_dir):
        raise OSError("disk full")

    monkeypatch.setattr(monitor_module.Monitor, "_open_log", boom)
    with pytest.raises(OSError, match="disk full"):
        diagnose.watch(model, opt, checkpoint=False, log_dir="somewhere")
    assert no_hooks(model, opt) and hooks.active() == 0
