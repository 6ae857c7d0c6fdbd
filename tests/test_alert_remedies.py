"""Alerts say where, and what to try first (issue 17): `Alert.where` / `Alert.remedy` from the live monitor.

Real tiny training jobs through `diagnose.watch` (rules), the gradient-statistics plumbing that names
parameters, and the mechanics of TEViD's where / remedy on a random tiny TEViD (not whether it is right).
Scripted symptom-level cases are in test_symptoms.py."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import diagnose
from diagnose.tevid_alerts import moved_channel, tevid_remedy
from capture import CHANNELS
from diagnose.symptoms import TEVID_REMEDIES, ExplodingGradients, place_name
from zoo import TinyNet, poison_at

pytestmark = pytest.mark.usefixtures("no_default_model", "one_thread")

MODULES = ["blocks.0", "blocks.2", "blocks.4"]


def train(model, opt, steps, *, lr_at=None, before=None):
    """A plain loop on a fixed synthetic set; `lr_at = (step, lr)` raises the LR from that step on."""
    g = torch.Generator().manual_seed(0)
    x_all, y_all = torch.randn(256, 3, 8, 8, generator=g), torch.randint(0, 4, (256,), generator=g)
    for step in range(steps):
        if lr_at is not None and step == lr_at[0]:
            for group in opt.param_groups:
                group["lr"] = lr_at[1]
        i = (16 * step) % 256
        x = x_all[i: i + 16] if before is None else before(step, x_all[i: i + 16])
        F.cross_entropy(model(x), y_all[i: i + 16]).backward()
        opt.step()
        opt.zero_grad()


def names_of(model):
    return set(dict(model.named_modules())) | set(dict(model.named_parameters()))


def test_exploding_gradients_in_a_real_job_name_a_parameter_and_the_remedy(tmp_path):
    """LR 0.05 -> 50 at step 20: the gradient norm jumps; the alert names a real parameter of the model
    and its message carries the remedy. Every rule alert of the run has both fields, also in alerts.jsonl."""
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = diagnose.watch(model, opt, checkpoint=False, cadence=1, modules=MODULES, log_dir=tmp_path)
    train(model, opt, 40, lr_at=(20, 50.0))
    monitor.remove()
    assert monitor.disabled_reason is None
    exploding = [a for a in monitor.alerts if a.name == "exploding_gradients"]
    assert exploding and exploding[0].step > 20, monitor.alerts
    a = exploding[0]
    assert a.where.endswith(" (gradients)") and place_name(a.where) in dict(model.named_parameters()), a.where
    assert a.remedy == ExplodingGradients.remedy and a.remedy in a.message and a.where in a.message
    assert "learning rate" in a.remedy and "clip the gradient norm" in a.remedy
    for b in monitor.alerts:  # saturated tanh, loss spikes, ... as the LR blows the run up
        assert b.remedy and b.remedy in b.message and b.where, b
        assert b.where == "loss" or place_name(b.where) in names_of(model), b.where
    logged = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(d["name"], d["where"], d["remedy"]) for d in logged] == [(b.name, b.where, b.remedy) for b in monitor.alerts]
    again = diagnose.watch(model, opt, checkpoint=False, cadence=1, modules=MODULES)
    again.load_state_dict(monitor.state_dict())
    assert again.alerts == monitor.alerts and [b.where for b in again.alerts] == [b.where for b in monitor.alerts]
    again.remove()


def test_nan_inf_names_the_first_hook_point_with_non_finite_activations():
    """An infinite weight in blocks.2 at step 6: blocks.0's activations stay finite, blocks.2's do not."""
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    poison = poison_at(model, 6)  # an infinite weight in blocks.2 from step 6 on
    with diagnose.watch(model, opt, checkpoint=False, cadence=3, modules=MODULES) as monitor:
        train(model, opt, 9, before=poison)
    (a,) = [a for a in monitor.alerts if a.name == "nan_inf"]
    assert a.step == 6 and a.where == "blocks.2 (activations)" and a.remedy in a.message


def test_gradient_statistics_name_the_largest_smallest_and_non_finite_parameters():
    """`GradStatsReader.tensor` keeps positions on the device, `.stats` names them at the frame; parameters
    without a gradient shift the positions and must not shift the names."""
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = diagnose.watch(model, opt, checkpoint=False, cadence=1, modules=MODULES)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-2)
    model.blocks[0].bias.grad = None  # not in this step's list: positions after it move by one
    model.blocks[2].weight.grad.fill_(10.0)  # largest norm
    model.blocks[4].weight.grad.zero_()  # smallest among the weights
    model.blocks[2].bias.grad[0] = float("nan")
    model.blocks[4].bias.grad[0] = float("inf")  # the last non-finite in parameter order
    grads = monitor.evidence.grads
    v = grads.tensor(monitor.step_count)
    assert v.shape == (7,)
    stats = grads.stats(v.tolist(), grads.params_at(monitor.step_count))
    assert (stats.largest, stats.smallest, stats.first, stats.nonfinite) == (
        "blocks.2.bias", "blocks.4.weight", "blocks.0.weight", "blocks.4.bias")  # NaN counts as largest (torch.argmax)
    model.blocks[2].bias.grad.fill_(1e-2)
    model.blocks[4].bias.grad.fill_(1e-2)
    stats = grads.stats(grads.tensor(monitor.step_count).tolist(), grads.params_at(monitor.step_count))
    assert (stats.largest, stats.nonfinite) == ("blocks.2.weight", None) and math.isfinite(stats.norm)
    monitor.remove()


# ---------------------------------------------------------------- TEViD: where and remedy (mechanics)

def test_tevid_class_alerts_carry_the_moved_channel_and_the_class_remedy(tiny_tevid):
    path = tiny_tevid([0.0] * 4, 1.0, "always")  # thresholds 0: every class fires at the 3rd window (step 10)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with diagnose.watch(model, opt, path, cadence=2, modules=MODULES) as monitor:
        train(model, opt, 12)
    tevid = {a.name: a for a in monitor.alerts if a.source == "tevid"}
    assert sorted(tevid) == ["concept_bias", "forgetting", "instability", "overfitting"]
    places = {f"{m} ({kind})" for m in MODULES for kind in ("activations", "gradients")}
    for name, a in tevid.items():
        change = a.details["channel_change"]
        assert list(change) == list(CHANNELS) and all(v >= 0 for v in change.values())
        top = max(change, key=change.get)  # the channel that moved most names the place
        kind, position = top.split("_")
        assert a.where in places and a.where == f"{MODULES[['early', 'mid', 'late'].index(position)]} " \
            f"({'activations' if kind == 'act' else 'gradients'})"
        assert a.remedy and a.remedy in a.message and a.where in a.message
        if name != "overfitting":
            assert a.remedy == TEVID_REMEDIES[name]
    # overfitting: the step head-gradient selection picks over the frames so far (score_w, EMA span 3)
    from diagnose.selection import select_checkpoint

    frames = [r for r in monitor.readouts if r["step"] <= 10]
    pick = select_checkpoint([r["step"] for r in frames], [r["score_w"] for r in frames], tail_frac=1.0)
    assert f"stop at step {pick} where" in tevid["overfitting"].remedy
    assert "lower the learning rate" in tevid["instability"].remedy and "replay" in tevid["forgetting"].remedy


def test_tevid_unknown_alert_has_a_remedy(tiny_tevid):
    path = tiny_tevid([0.9] * 4, 0.0, "vacuous")  # tau 0: every frame abstains
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with diagnose.watch(model, opt, path, cadence=2, modules=MODULES) as monitor:
        train(model, opt, 12)
    (a,) = [a for a in monitor.alerts if a.source == "tevid"]
    assert a.name == "unknown" and a.remedy == TEVID_REMEDIES["unknown"] and a.remedy in a.message
    assert place_name(a.where) in MODULES


def test_moved_channel_on_a_scripted_window():
    """Only grad_mid moves between the two halves of the window -> the mid hook point's gradients;
    a window that does not move names no place."""
    model = TinyNet()
    monitor = diagnose.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint=False, modules=MODULES)
    window = torch.randn(1, 6, 8, 8).repeat(6, 1, 1, 1)  # (T, 6, S, S)
    window[3:, CHANNELS.index("grad_mid")] += 2.0
    window[3:, CHANNELS.index("act_early")] += 1.0
    where, change = moved_channel(window.to(torch.bfloat16), monitor.capture.points)
    assert where == "blocks.2 (gradients)"
    assert change["grad_mid"] == pytest.approx(2.0, rel=1e-2) and change["act_early"] == pytest.approx(1.0, rel=1e-2)
    assert moved_channel(window[:1].repeat(6, 1, 1, 1), monitor.capture.points)[0] is None
    # overfitting's remedy without any finite head-gradient score: no step to name
    assert tevid_remedy("overfitting", monitor.readouts) == TEVID_REMEDIES["overfitting"]
    readouts = [{"step": s, "score_w": v} for s, v in [(0, 5.0), (10, 1.0), (20, 0.9), (30, 4.0), (40, 6.0)]]
    assert "stop at step 20 where" in tevid_remedy("overfitting", readouts)
    monitor.remove()


def test_a_score_mode_alert_shows_the_score_and_threshold_apart():
    """The shipped thresholds sit at 0.99x: the message prints the anomaly score and its threshold to 4 places,
    so a user reads 0.9991 > 0.9955, not 1.00 > 1.00."""
    from diagnose.calibrate import Calibration
    from diagnose.decision import Decision, Reason
    from diagnose.stream import Prediction
    from diagnose.tevid_alerts import tevid_alerts

    classes = ["healthy", "overfitting", "instability", "forgetting", "concept_bias"]
    cal = Calibration(classes, [0.6] * 4, 1.0, 0.7, 3, {}, 0.99547)
    probs = [0.1, 0.1, 0.6, 0.1, 0.1]
    pred = Prediction(200, probs, 0.2, Decision(2, Reason.KNOWN, new_alerts=(2,)), "instability", anomaly=0.99912)
    [alert] = tevid_alerts(pred, cal, None, [], [])
    assert alert.name == "instability" and "anomaly score 0.9991 > 0.9955" in alert.message
