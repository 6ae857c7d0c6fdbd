"""DP telemetry in the live path: `diagnose.watch(..., dp=DPConfig(...))` (diagnose/privacy.py DPTelemetry,
capture's `release`). Releases = frames, epsilon = opacus's accountant over exactly those releases, the
noise really reaches the released frames and readouts, and clip = inf with z = 0 gives the plain values."""
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant

import capture
from capture.readouts import READOUT_NAMES
from diagnose.api import watch
from diagnose.privacy import (DPConfig, DPTelemetry, OuterTerms, per_sample_head_gradients, privatize,
                              privatize_parts)
from test_monitor import MODULES, TinyNet, data

PRIVATE = ("head_grad_norm", "score_w", "score_z", "gwa", "confidence", "entropy", "margin", "loss")


def run(dp, steps=12, cadence=3, before=None, **kw):
    """A plain loop (no monitor calls in it) under a monitor; the same model and batches for every call."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = watch(model, opt, False, cadence=cadence, modules=MODULES, dp=dp, gwa_window="step", **kw)
    for step in range(steps):
        x, y = data(16, seed=step)
        if before is not None:
            x = before(step, x)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    monitor.remove()
    return monitor


def direct_epsilon(z, q, n, delta):
    acc = RDPAccountant()
    for _ in range(n):
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def test_one_release_per_frame_and_epsilon_is_opacus_over_them(one_thread):
    seen = []

    class Spent:  # epsilon as each frame is released
        def on_frame(self, frame):
            seen.append(monitor_ref[0].privacy["epsilon"])

        def on_alert(self, alert):
            pass

    monitor_ref = []
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = watch(model, opt, False, cadence=3, modules=MODULES, dp=DPConfig(clip=1.0, noise_multiplier=1.1, sample_rate=0.02),
                    callbacks=[Spent()])
    monitor_ref.append(monitor)
    for step in range(20):
        x, y = data(16, seed=step)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    monitor.remove()
    frames = len(monitor.readouts)
    assert frames == 7 and monitor.privacy["releases"] == frames  # steps 0, 3, ..., 18
    assert seen == sorted(seen) and len(set(seen)) == frames  # grows with every release
    assert monitor.privacy["epsilon"] == pytest.approx(direct_epsilon(1.1, 0.02, frames, 1e-5), rel=1e-9)
    assert monitor.privacy["mechanism"] == "rdp" and monitor.privacy["delta"] == 1e-5
    # q from the dataset size: the capture batch (16) over it
    again = run(DPConfig(clip=1.0, noise_multiplier=0.8, dataset_size=1600, delta=1e-6), steps=9)
    assert again.privacy["releases"] == len(again.readouts) == 3 and again.privacy["sample_rate"] == 0.01
    assert again.privacy["epsilon"] == pytest.approx(direct_epsilon(0.8, 0.01, 3, 1e-6), rel=1e-9)


def test_noise_changes_the_release_and_no_clip_no_noise_reproduces_it(one_thread):
    plain = run(None)
    exact = run(DPConfig(clip=math.inf, noise_multiplier=0.0, sample_rate=0.01))
    noisy = run(DPConfig(clip=1.0, noise_multiplier=1.0, sample_rate=0.01))
    assert len(plain.readouts) == len(exact.readouts) == len(noisy.readouts) == 4
    for p, e, n in zip(plain.readouts, exact.readouts, noisy.readouts):
        for k in PRIVATE:
            assert math.isfinite(p[k]) and e[k] == pytest.approx(p[k], rel=1e-4, abs=1e-7), k
        assert sum(n[k] != pytest.approx(p[k], rel=1e-3) for k in PRIVATE) >= 7
        assert e["lr"] == n["lr"] == p["lr"] and e["nonfinite"] == p["nonfinite"] == 0
    for p, e, n in zip(plain.frames, exact.frames, noisy.frames):
        # the same maps to one bfloat16 step (the plain path averages over the batch before the 1x1 projection,
        # the release after it: the same linear map in another rounding order); noise moves them further
        torch.testing.assert_close(e.frame.float(), p.frame.float(), rtol=2 ** -8, atol=2 ** -7)
        assert (n.frame.float() - p.frame.float()).abs().max() > 0.1
    assert exact.privacy["epsilon"] == math.inf and exact.privacy["releases"] == 4  # no noise, no privacy
    # the same seed gives the same release; another seed another one
    assert [r["head_grad_norm"] for r in run(DPConfig(clip=1.0, noise_multiplier=1.0, sample_rate=0.01)).readouts] == \
        [r["head_grad_norm"] for r in noisy.readouts]
    other = run(DPConfig(clip=1.0, noise_multiplier=1.0, sample_rate=0.01, seed=1))
    assert other.readouts[0]["head_grad_norm"] != noisy.readouts[0]["head_grad_norm"]


def test_a_dp_run_prints_epsilon_and_delta(tmp_path, capsys, caplog, one_thread):
    with caplog.at_level(logging.INFO, logger="tevid"):
        monitor = run(DPConfig(clip=1.0, noise_multiplier=1.12, sample_rate=0.00128), log_dir=tmp_path / "log")
    out = capsys.readouterr().out
    eps = direct_epsilon(1.12, 0.00128, 4, 1e-5)
    line = f"DP telemetry: epsilon={eps:.4g} delta=1e-05 after 4 releases"
    assert line in out and sum(line in r.getMessage() for r in caplog.records) == 1  # printed and logged
    saved = json.loads((tmp_path / "log" / "privacy.json").read_text())
    assert saved["releases"] == 4 and saved["epsilon"] == pytest.approx(eps) and saved["report"] in out
    assert json.loads((tmp_path / "log" / "monitor.json").read_text())["dp"]["noise_multiplier"] == 1.12
    monitor.remove()  # idempotent: reported once
    assert "DP telemetry" not in capsys.readouterr().out


def test_rules_see_only_the_released_frames(one_thread):
    """Under DP the per-step losses are not released: the loss rules get one private loss per frame, and
    NaN inputs show up through the released count of samples with non-finite values."""
    nan_at = lambda s, x: x * float("nan") if s == 6 else x  # noqa: E731
    monitor = run(DPConfig(clip=1.0, noise_multiplier=1.0, sample_rate=0.01), steps=12, before=nan_at)
    assert [(a.name, a.step) for a in monitor.alerts if a.name == "nan_inf"] == [("nan_inf", 6)]
    assert monitor.readouts[2]["nonfinite"] > 8  # most of the 16 samples at step 6
    # capture alone with the release: the sink gets NaN for every step's loss, the frame its released one
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rel = DPTelemetry(DPConfig(clip=1.0, noise_multiplier=1.0, sample_rate=0.01))
    with capture.attach(model, cadence=2, modules=MODULES, gwa_window="step", release=rel) as cap:
        for step in range(5):
            x, y = data(16, seed=step)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            cap.step(loss)
            opt.step()
            opt.zero_grad()
    assert len(cap.buffer.train_loss) == 5 and all(math.isnan(v) for v in cap.buffer.train_loss)
    assert len(cap.frames) == rel.releases == 3 and all(math.isfinite(f.readouts["loss"]) for f in cap.frames)
    assert set(cap.frames[0].readouts) == set(READOUT_NAMES)


def test_state_dict_keeps_the_privacy_spent(one_thread):
    dp = DPConfig(clip=1.0, noise_multiplier=1.0, sample_rate=0.01)
    first = run(dp)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    again = watch(model, opt, False, cadence=3, modules=MODULES, dp=dp)
    again.load_state_dict(first.state_dict())
    assert again.privacy["releases"] == 4 and again.privacy["epsilon"] == pytest.approx(first.privacy["epsilon"])
    again.remove()


def test_configuration_errors():
    with pytest.raises(ValueError, match="exactly one of sample_rate"):
        DPConfig(clip=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="finite bounds"):
        DPConfig(clip=math.inf, noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="unknown part"):
        DPConfig(sample_rate=0.1, part_clip={"frames": 1.0})
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="gwa_window='step'"):
        watch(model, opt, False, modules=MODULES, dp=DPConfig(sample_rate=0.1), gwa_window="frame")
    with pytest.raises(TypeError, match="DPConfig"):
        watch(model, opt, False, modules=MODULES, dp={"clip": 1.0})


def test_joint_release_is_one_gaussian_mechanism():
    """K parts, each clipped to its own bound C_k, with noise std z C_k sqrt(K) / N per coordinate: one part
    alone is `privatize`; the factored head terms equal the dense per-sample head gradients."""
    x = torch.randn(8, 5)
    one = privatize_parts({"p": x}, {"p": 0.7}, 1.3, torch.Generator().manual_seed(3))["p"]
    torch.testing.assert_close(one, privatize(x, 0.7, 1.3, torch.Generator().manual_seed(3)))
    n, k, z = 10, 4, 1.5
    parts = {f"p{i}": torch.zeros(n, 300) for i in range(k)}
    bounds = {f"p{i}": float(i + 1) for i in range(k)}
    out = privatize_parts(parts, bounds, z, torch.Generator().manual_seed(0))
    for i in range(k):
        assert out[f"p{i}"].std().item() == pytest.approx(z * (i + 1) * math.sqrt(k) / n, rel=0.15)
    # factored per-sample head gradients (token axes: one example = one sequence) against the dense ones
    zz, g = torch.randn(3, 4, 6), torch.randn(3, 4, 5)
    dense = torch.einsum("blc,bld->bcd", g * 3, zz)  # (B, C, d)
    terms = OuterTerms(g * 3, zz)
    torch.testing.assert_close(terms.norms(), dense.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-5)
    w = torch.rand(3)
    torch.testing.assert_close(terms.weighted_sum(w), (dense * w[:, None, None]).sum(0), rtol=1e-4, atol=1e-5)
    flat = per_sample_head_gradients(zz[:, 0], g[:, 0] / 3)  # rows = samples when L = 1
    torch.testing.assert_close(OuterTerms(g[:, :1], zz[:, :1]).norms(), flat.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-5)


def test_dp_under_autocast_and_gradient_accumulation(one_thread):
    """bf16 autocast forward and 2 micro-batches per step: one release per frame (the capture rule: the
    first micro-batch), computed in float32, finite."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, opt, False, cadence=2, modules=MODULES, dp=DPConfig(noise_multiplier=1.0, sample_rate=0.01)) as monitor:
        for step in range(6):
            for micro in range(2):
                x, y = data(8, seed=10 * step + micro)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(x)
                (F.cross_entropy(logits.float(), y) / 2).backward()
            opt.step()
            opt.zero_grad()
    assert monitor.disabled_reason is None and monitor.capture.faults == []
    assert monitor.privacy["releases"] == len(monitor.readouts) == 3
    assert all(math.isfinite(r[k]) for r in monitor.readouts for k in PRIVATE)
