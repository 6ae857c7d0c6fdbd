"""The live monitor (diagnose/monitor.py) and its adapters (diagnose/adapters.py): attach with no change to
the loop, loss recovery from the head gradient, alerts end to end, gradient accumulation, autocast,
accelerate (1 and 2 real processes), TEViD with a tiny checkpoint, and fault tolerance.

Run as a script (`accelerate launch tests/test_monitor.py`), this file is the 2-process DDP job."""
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import diagnose
from capture import hooks
from capture import HookPointError
import diagnose.monitor
from diagnose.api import watch
from diagnose.monitor import Monitor, loss_from_logits_grad, recover_loss
from zoo import TinyNet, poison_at

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("no_default_model")  # these tests are of the monitor without a shipped model

MODULES = ["blocks.0", "blocks.2", "blocks.4"]


def data(n=64, size=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def train(model, opt, steps, *, batch=16, size=8, accum=1, before=None, scale=None, observe=None, monitor=None):
    """A plain loop that knows nothing about the monitor. `before(step, x)` may change the input,
    `scale(step)` multiplies the loss; returns the true loss of each micro-batch."""
    torch.manual_seed(1)
    true = []
    for step in range(steps):
        for _ in range(accum):
            x, y = data(batch, size, seed=len(true))
            if before is not None:
                x = before(step, x)
            loss = F.cross_entropy(model(x), y)
            true.append(loss.item())
            if observe is not None:
                observe.observe(loss=loss)
            (loss * (scale(step) if scale else 1.0) / accum).backward()
        opt.step()
        opt.zero_grad()
        if monitor is not None and monitor.should_stop:
            break
    return true


def hooks_of(model, opt):
    """Hooks on the model's modules and on the optimizer: torch's own and those of capture.hooks."""
    mods = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + hooks.active(m) for m in model.modules())
    return mods, len(opt._optimizer_step_post_hooks) + len(opt._optimizer_step_pre_hooks) + hooks.active(opt)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


# ---------------------------------------------------------------- loss from the head gradient

def _grad_of(logits, loss):
    logits.retain_grad()
    loss.backward()
    return logits.grad


def test_loss_from_logits_grad_equals_cross_entropy():
    logits = (torch.randn(12, 5) * 3).requires_grad_()
    y = torch.randint(0, 5, (12,))
    g = _grad_of(logits, F.cross_entropy(logits, y))
    ref = F.cross_entropy(logits.detach(), y)
    torch.testing.assert_close(loss_from_logits_grad(logits.detach(), g), ref)
    # any scale of the loss (GradScaler 2^16, 1/accumulation) leaves the recovered value unchanged
    torch.testing.assert_close(loss_from_logits_grad(logits.detach(), g * 65536.0), ref)
    torch.testing.assert_close(loss_from_logits_grad(logits.detach(), g / 3), ref)


def test_loss_from_logits_grad_language_model_with_ignored_tokens():
    logits = torch.randn(2, 7, 11).requires_grad_()
    y = torch.randint(0, 11, (2, 7))
    y[0, :3] = -100  # padding
    g = _grad_of(logits, F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1), ignore_index=-100))
    ref = F.cross_entropy(logits.detach().reshape(-1, 11), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss_from_logits_grad(logits.detach(), g), ref)


@pytest.mark.parametrize("loss_fn", [
    lambda z, y: F.mse_loss(z, F.one_hot(y, 5).float()),
    lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1),
    lambda z, y: F.cross_entropy(z, y, weight=torch.tensor([1.0, 3.0, 1.0, 0.2, 1.0])),
])
def test_loss_from_logits_grad_is_nan_for_other_losses(loss_fn):
    logits = torch.randn(16, 5).requires_grad_()
    y = torch.arange(16) % 5
    g = _grad_of(logits, loss_fn(logits, y))
    loss, known = recover_loss(logits.detach(), g)
    assert torch.isnan(loss_from_logits_grad(logits.detach(), g)) and torch.isnan(loss) and not known


def test_recover_loss_tells_a_nan_loss_from_an_unknown_one():
    logits, g = torch.randn(4, 3), torch.randn(4, 3)
    logits[1, 2] = float("nan")  # a NaN loss is known to be NaN
    loss, known = recover_loss(logits, g)
    assert torch.isnan(loss) and known
    loss, known = recover_loss(torch.randn(4, 3), g * float("nan"))  # NaN gradients: the loss is unknown
    assert torch.isnan(loss) and not known


def test_non_cross_entropy_loss_gives_no_loss_alerts():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, opt, cadence=2, modules=MODULES) as monitor:
        for step in range(30):
            x, y = data(16, seed=step)
            F.mse_loss(model(x), F.one_hot(y, 4).float()).backward()
            opt.step()
            opt.zero_grad()
    assert monitor.alerts == [] and all(math.isnan(r["loss"]) for r in monitor.readouts)


# ---------------------------------------------------------------- attach with no change to the loop

def test_plain_loop_frames_readouts_and_remove(tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = hooks_of(model, opt)
    monitor = diagnose.watch(model, opt, cadence=3, modules=MODULES, log_dir=tmp_path / "log")
    assert isinstance(monitor, Monitor) and monitor.role == "diagnose" and monitor.tevid is None
    assert not diagnose.monitor.DEFAULT_CHECKPOINT.exists()  # `no_default_model`: rule symptoms only
    true = train(model, opt, 20)
    assert monitor.step_count == 20 and [r["step"] for r in monitor.readouts] == list(range(0, 20, 3))
    for r in monitor.readouts:  # the loss readout is recovered from the head gradient, no observe() needed
        assert r["loss"] == pytest.approx(true[r["step"]], rel=1e-5)
    assert len(monitor.frames) == 7 and all(f.frame.shape == (6, 32, 32) for f in monitor.frames)
    assert monitor.alerts == [] and monitor.disabled_reason is None
    monitor.remove()
    assert hooks_of(model, opt) == before and not monitor.active
    assert (tmp_path / "log" / "monitor.json").is_file()
    assert len((tmp_path / "log" / "readouts.jsonl").read_text().splitlines()) == 7
    monitor.remove()  # idempotent


def test_the_default_cadence_is_the_coarsest_one_the_checkpoint_was_trained_on(tmp_path, caplog):
    from diagnose.monitor import DEFAULT_CADENCE, default_cadence

    def ckpt(name, extra):
        d = tmp_path / name
        d.mkdir()
        (d / "state.json").write_text(json.dumps({"step": 1, "extra": extra}))
        return d

    assert default_cadence(ckpt("trained", {"epoch": 8, "trained_cadences": [10, 5, 20]})) == 20
    assert default_cadence(ckpt("older", {"epoch": 8})) == DEFAULT_CADENCE == 50  # fine-tuned before it was written
    assert default_cadence(False) == default_cadence(None) == DEFAULT_CADENCE  # rules only; no shipped model here
    assert default_cadence(tmp_path / "missing") == DEFAULT_CADENCE
    bad = ckpt("bad", {"trained_cadences": [5, 0]})
    with caplog.at_level(logging.WARNING, logger="tevid"):
        assert default_cadence(bad) == DEFAULT_CADENCE
    assert f"{bad / 'state.json'}: extra.trained_cadences must be a non-empty list of positive integers" in caplog.text
    model = TinyNet()
    monitor = diagnose.watch(model, torch.optim.SGD(model.parameters(), lr=0.05), modules=MODULES)
    train(model, monitor.optimizer, 101)
    assert monitor.config.cadence == 50 and [r["step"] for r in monitor.readouts] == [0, 50, 100]
    monitor.remove()


def test_observe_overrides_the_head_estimate():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, opt, cadence=2, modules=MODULES, loss_from_head=False) as monitor:
        train(model, opt, 4)
    assert [math.isnan(r["loss"]) for r in monitor.readouts] == [True, True]  # neither observed nor recovered
    assert monitor.alerts == []  # an unknown loss is a missing readout, not a NaN loss
    with watch(model, opt, cadence=2, modules=MODULES) as monitor:
        true = train(model, opt, 4, observe=monitor)  # observe() once per micro-batch, before optimizer.step()
    assert [r["loss"] for r in monitor.readouts] == pytest.approx([true[0], true[2]], rel=1e-6)
    with watch(model, opt, cadence=2, modules=MODULES) as monitor:
        x, y = data(8)
        loss = F.cross_entropy(model(x), y)
        monitor.observe(loss=7.0)  # whatever the user calls the loss wins over the recovered one
        loss.backward()
        opt.step()
    assert monitor.readouts[0]["loss"] == 7.0


def test_exploding_gradients_end_to_end_with_stop_and_callbacks(tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen, objects = [], []

    class Collector:
        def on_alert(self, alert):
            objects.append(alert.name)

    monitor = watch(model, opt, cadence=4, grad_every=1, modules=MODULES, callbacks=[seen.append, Collector()],
                    stop_on=["exploding_gradients"], symptoms=None)
    train(model, opt, 40, scale=lambda s: 1e3 if s >= 20 else 1.0, monitor=monitor)
    names = [(a.name, a.step) for a in monitor.alerts]
    assert ("exploding_gradients", 20) in names, names
    assert monitor.should_stop and monitor.step_count == 21  # the loop read the stop request after step 20
    assert [a.name for a in seen] == objects == [a.name for a in monitor.alerts]
    monitor.remove()


def test_nan_end_to_end(tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = watch(model, opt, cadence=3, modules=MODULES, log_dir=tmp_path)
    nan_at = lambda s, x: x * float("nan") if s == 12 else x  # noqa: E731
    true = train(model, opt, 25, before=nan_at)
    assert len(true) == 25 and math.isnan(true[12]) and math.isnan(true[24])  # weights are NaN from step 12 on
    monitor.remove()
    nan_alerts = [a for a in monitor.alerts if a.name == "nan_inf"]
    assert [a.step for a in nan_alerts] == [12], monitor.alerts  # once per episode
    assert "loss" in nan_alerts[0].details["sources"] and monitor.active is False and monitor.disabled_reason is None
    logged = (tmp_path / "alerts.jsonl").read_text()
    assert '"nan_inf"' in logged


def test_gradient_accumulation_counts_only_optimizer_steps():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, opt, cadence=2, modules=MODULES) as monitor:
        true = train(model, opt, 6, accum=3)
    assert monitor.step_count == 6 and [r["step"] for r in monitor.readouts] == [0, 2, 4]
    for r in monitor.readouts:  # the loss of a step is the mean over its micro-batches
        assert r["loss"] == pytest.approx(sum(true[3 * r["step"]: 3 * r["step"] + 3]) / 3, rel=1e-5)


def test_autocast_bf16():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, opt, cadence=2, modules=MODULES) as monitor:
        for step in range(6):
            x, y = data(16, seed=step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 2 == 0:
                assert monitor.readouts[-1]["loss"] == pytest.approx(loss.item(), rel=2e-2)
    assert monitor.disabled_reason is None and all(torch.isfinite(f.frame.float()).all() for f in monitor.frames)


def test_accelerate_single_process_accumulation():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = TinyNet()
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    with watch(model, opt, cadence=2, modules=MODULES) as monitor:  # the wrapped optimizer is unwrapped
        for i in range(8):
            x, y = data(8, seed=i)
            with acc.accumulate(model):
                acc.backward(F.cross_entropy(model(x), y))
                opt.step()
                opt.zero_grad()
    assert monitor.step_count == 4 and [r["step"] for r in monitor.readouts] == [0, 2]
    acc.end_training()


# ---------------------------------------------------------------- TEViD from a checkpoint

def test_tevid_alerts_with_a_checkpoint(tiny_tevid):
    # thresholds 0: every anomaly class holds p > 0 at every frame -> each fires at the 3rd window
    path = tiny_tevid([0.0] * 4, 1.0, "always")
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = watch(model, opt, path, cadence=2, modules=MODULES, stop_on={"instability"})
    assert monitor.tevid is not None and monitor.capture.config.frame_size == 16  # the encoder's S
    train(model, opt, 14)
    monitor.remove()
    tevid = [a for a in monitor.alerts if a.source == "tevid"]
    # frames at steps 0, 2, ..., 12; windows of 4 from the 4th frame (step 6); 3rd window -> step 10
    assert sorted(a.name for a in tevid) == ["concept_bias", "forgetting", "instability", "overfitting"]
    assert {a.step for a in tevid} == {10} and all(0 < a.probability < 1 for a in tevid)
    assert [p["step"] for p in monitor.predictions] == [6, 8, 10, 12] and monitor.should_stop
    state = monitor.state_dict()
    assert state["decision"]["frames"] == 4
    again = watch(model, opt, path, cadence=2, modules=MODULES)
    again.load_state_dict(state)
    assert again.state_dict() == state and again.should_stop
    again.remove()


def test_tevid_reads_every_steps_loss_since_the_last_frame(tiny_tevid):
    """The capture syncs only a frame's own loss; TEViD's stream gets the losses of every step since the previous
    frame (observed here), as a stored run's train_loss gives them to its clips (capture.relative.interval_losses)."""
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = watch(model, opt, tiny_tevid([0.5] * 4, 1.0, "always"), cadence=2, modules=MODULES)
    got, push = [], monitor.stream.push
    monitor.stream.push = lambda *a, **k: got.append(list(a[6])) or push(*a, **k)
    true = train(model, opt, 5, observe=monitor)
    monitor.remove()
    assert got == [pytest.approx([true[0]], rel=1e-6), pytest.approx(true[1:3], rel=1e-6), pytest.approx(true[3:5], rel=1e-6)]


def test_tevid_unknown_and_frame_size_mismatch(tiny_tevid):
    path = tiny_tevid([0.9] * 4, 0.0, "vacuous")  # tau 0: every frame abstains
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="reads 16x16 frames"):
        watch(model, opt, path, frame_size=32, modules=MODULES)
    with watch(model, opt, path, cadence=2, modules=MODULES) as monitor:
        train(model, opt, 14)
    assert [(a.name, a.step, a.probability) for a in monitor.alerts if a.source == "tevid"] == [("unknown", 10, None)]
    assert all(p["label"] == "unknown" for p in monitor.predictions)


def test_an_unfamiliar_job_gets_one_message_and_no_tevid_class_alert(tiny_tevid):
    """Thresholds 0 would fire every class (as above); with tau 0 the job's first windows are all far from
    training, so the familiarity gate says so once and mutes TEViD, while the rule symptoms still run."""
    path = tiny_tevid([0.0] * 4, 0.0, "unfamiliar", gate=3)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, opt, path, cadence=2, modules=MODULES) as monitor:
        train(model, opt, 14)
    tevid = [(a.name, a.step) for a in monitor.alerts if a.source == "tevid"]
    assert tevid == [("unfamiliar", 10)]  # the 3rd window: the gate's last frame
    message = next(a for a in monitor.alerts if a.name == "unfamiliar")
    assert "rule symptoms only" in message.message and message.remedy
    assert "median familiarity" in message.message  # the value the gate read, not the deciding frame's alone
    assert monitor.state_dict()["decision"]["unfamiliar"] is True


# ---------------------------------------------------------------- mistakes in the call raise at watch()

def test_configuration_errors_raise():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(TypeError, match="unknown option"):
        watch(model, opt, modules=MODULES, cadense=3)
    with pytest.raises(ValueError, match="unknown alert name"):
        watch(model, opt, modules=MODULES, stop_on=["exploding_gradient"])
    frozen = TinyNet().requires_grad_(False)
    with pytest.raises(HookPointError, match="TinyNet has no parameter that requires grad"):
        watch(frozen, torch.optim.SGD(TinyNet().parameters(), lr=0.05))
    with pytest.raises(ValueError, match="other_ranks"):
        watch(model, opt, modules=MODULES, other_ranks="all")
    assert hooks_of(model, opt) == (0, 0)


# ---------------------------------------------------------------- faults never reach the training job

@pytest.mark.parametrize("owner, method, where", [
    ("monitor", "_run_symptoms", "optimizer step hook"),  # at a frame, inside optimizer.step()
    ("layers", "_record", "activation hook"),  # inside the forward
    ("monitor", "_head_grad", "head gradient hook"),  # inside the backward
])
def test_injected_fault_switches_the_monitor_off(monkeypatch, caplog, owner, method, where):
    from diagnose.layer_stats import LayerStatsHooks

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(Monitor if owner == "monitor" else LayerStatsHooks, method, boom)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = watch(model, opt, cadence=3, modules=MODULES)
    with caplog.at_level(logging.WARNING, logger="tevid"):
        true = train(model, opt, 12)
    assert len(true) == 12  # every step of the user's loop ran
    faults = [r for r in caplog.records if "switched itself off" in r.getMessage()]
    assert len(faults) == 1 and "injected" in faults[0].getMessage() and "Traceback" in faults[0].getMessage()
    assert not monitor.active and monitor.disabled_reason.startswith(where)
    assert hooks_of(model, opt) == (0, 0)  # all hooks gone, the optimizer's too (removed inside its own step)


def test_nonfinite_activations_alert_without_crash():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    poison = poison_at(model, 6)  # an infinite weight in blocks.2 from step 6 on
    with watch(model, opt, cadence=3, modules=MODULES) as monitor:
        train(model, opt, 12, before=poison)
        assert monitor.disabled_reason is None and monitor.capture.faults == []
    assert [a.step for a in monitor.alerts if a.name == "nan_inf"] == [6]
    assert monitor.readouts[2]["nonfinite"] > 0  # the frame at step 6 counted them


def test_shapes_changing_mid_run():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(0)
    with watch(model, opt, cadence=2, modules=MODULES) as monitor:
        for step, (batch, size) in enumerate([(8, 8)] * 4 + [(5, 8)] * 4 + [(8, 12)] * 4 + [(3, 6)] * 4):
            x, y = data(batch, size, seed=step)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        assert monitor.active and monitor.disabled_reason is None and monitor.capture.faults == []
    assert len(monitor.readouts) == 8 and all(f.frame.shape == (6, 32, 32) for f in monitor.frames)
    assert all(math.isfinite(r["loss"]) for r in monitor.readouts)


@pytest.mark.parametrize("how", ["chmod", "under_a_file"])
def test_unwritable_log_dir(tmp_path, caplog, how):
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("running as root: chmod 555 does not stop root from writing (under_a_file covers it)")
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        log_dir = locked / "log"
    else:
        (tmp_path / "file").write_text("a regular file")
        log_dir = tmp_path / "file" / "log"  # can never be created
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(OSError, match=r"watch\(log_dir=...\): cannot create the log directory"):
        watch(model, opt, cadence=3, modules=MODULES, log_dir=log_dir)  # refused at the call, before training
    assert hooks_of(model, opt) == (0, 0)  # all or nothing: what was attached is removed again
    assert len(train(model, opt, 6)) == 6


# ---------------------------------------------------------------- adapters

def test_accelerate_logger_sends_alerts_and_readouts_to_trackers():
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    from diagnose.adapters import AccelerateLogger, stop_all_ranks

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.logged = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

    rec = Recorder()
    acc = Accelerator(cpu=True, log_with=[rec])
    acc.init_trackers("monitor-test")
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = watch(model, opt, cadence=2, modules=MODULES, callbacks=[AccelerateLogger(acc)], stop_on="nan_inf")
    train(model, opt, 8, before=lambda s, x: x * float("nan") if s == 5 else x)
    monitor.remove()
    alerts = [(s, v) for s, v in rec.logged if "tevid/alert/nan_inf" in v]
    assert alerts == [(5, {"tevid/alert/nan_inf": 1.0})]
    frames = [s for s, v in rec.logged if "tevid/score_w" in v]
    assert frames == [0, 2, 4]  # from step 5 on every readout is NaN and is not logged
    assert stop_all_ranks(acc, monitor) is True
    acc.end_training()


def test_optuna_prunes_a_trial_on_a_confirmed_alert():
    import optuna

    from diagnose.adapters import prune_on_alert

    def objective(trial):
        model = TinyNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        blow_up = trial.number == 1
        with watch(model, opt, cadence=2, modules=MODULES) as monitor:
            for step in range(8):
                x, y = data(16, seed=step)
                if blow_up and step == 3:
                    x = x * float("nan")
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                prune_on_alert(trial, monitor, step, value=loss.item())
        return loss.item()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    study.optimize(objective, n_trials=2)
    healthy, broken = study.trials
    assert healthy.state == optuna.trial.TrialState.COMPLETE
    assert broken.state == optuna.trial.TrialState.PRUNED
    assert broken.user_attrs["tevid_alerts"][0]["name"] == "nan_inf" and max(broken.intermediate_values) == 4


def test_missing_frameworks_give_clear_import_errors():
    from diagnose import adapters

    for cls, pkg, present in [(adapters.TEViDLightningCallback, "lightning", adapters._pl is not None),
                              (adapters.TEViDTrainerCallback, "transformers", adapters._hf is not None)]:
        if present:
            continue
        with pytest.raises(ImportError, match=pkg):
            cls()


def test_package_import_stays_light():
    out = subprocess.run([sys.executable, "-c", "import sys, diagnose; print('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.split() == ["False"], out.stderr
    assert diagnose.watch is watch and diagnose.Monitor is Monitor
    with pytest.raises(AttributeError, match="no attribute 'wach'"):
        diagnose.wach


# ---------------------------------------------------------------- 2 real accelerate processes

def test_ddp_two_processes(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(ROOT / ".venv" / "bin" / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           __file__, str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    # each rank writes its own result file: the two processes share one stdout and their lines can interleave
    results = sorted(tmp_path.glob("result-rank*.json"))
    assert out.returncode == 0 and len(results) == 2, out.stdout + out.stderr
    r0, r1 = (json.loads(p.read_text()) for p in results)
    assert r0["world"] == r1["world"] == "2" and r0["steps"] == r1["steps"] == "12"  # no rank hung or stopped early
    assert r0["role"] == "diagnose" and "exploding_gradients@8" in r0["alerts"].split(",")
    assert r1["role"] == "capture" and r1["alerts"] == "" and int(r1["frames"]) == 6 and r1["stopped"] == "True"
    assert (tmp_path / "alerts.jsonl").is_file() and (tmp_path / "rank1" / "readouts.jsonl").is_file()
    assert not (tmp_path / "rank1" / "alerts.jsonl").exists()


def _ddp_main(log_dir: str) -> None:
    """12 optimizer steps (2 micro-batches each) of a tiny model under DDP; the loss is scaled x1e3
    from step 8 on. Rank 0 diagnoses, rank 1 captures its shard; both stop through stop_all_ranks."""
    from accelerate import Accelerator

    from diagnose.adapters import stop_all_ranks

    torch.set_num_threads(1)
    acc = Accelerator(gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = TinyNet()
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=1e-3))
    monitor = watch(model, opt, cadence=2, grad_every=1, modules=MODULES, other_ranks="capture", log_dir=log_dir,
                    stop_on=["exploding_gradients"])
    micro, stopped = 0, False
    while monitor.step_count < 12 and micro < 100:
        x, y = data(8, seed=100 * acc.process_index + micro)
        with acc.accumulate(model):
            loss = F.cross_entropy(model(x), y) * (1e3 if micro >= 16 else 1.0)
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
        micro += 1
        stopped = stopped or stop_all_ranks(acc, monitor)  # a collective: every rank calls it every step
    monitor.remove()
    alerts = ",".join(f"{a.name}@{a.step}" for a in monitor.alerts)
    result = dict(world=str(acc.num_processes), role=monitor.role, steps=str(monitor.step_count),
                  frames=str(len(monitor.readouts)), stopped=str(stopped), alerts=alerts)
    Path(log_dir, f"result-rank{acc.process_index}.json").write_text(json.dumps(result))
    acc.end_training()


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
