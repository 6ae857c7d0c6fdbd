"""The overhead command (eval/overhead.py) at tiny settings: output structure, that every mode really ran
(frames in the capture modes, TEViD predictions in the TEViD mode, Cockpit's tracked steps, wandb's logged
rows), that a missing peer is left out with a message, and that the cuts made for the overhead compute
what they replaced. No timing assertions."""
import json
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.overhead import (COCKPIT, MODES, TEVID, WANDB, OverheadConfig, _Cockpit, _Job, available_modes, main,
                               run)


def test_every_monitor_mode_runs_and_the_outputs_have_their_structure(tmp_path, one_thread):
    cfg = OverheadConfig(cadences=(2,), steps=4, rounds=2, checkpoint="tiny", warmup_steps=2, profile_steps=4)
    res = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert saved["config"]["cadences"] == [2] and saved["left_out"] == {}
    assert "tiny TEViD built from scratch" in saved["checkpoint"]
    (r,) = res["runs"]
    assert r["cadence"] == 2 and r["modes"].keys() == {"plain", "capture", "monitor", TEVID}
    for mode, done in r["modes"].items():
        assert done["blocks"] == cfg.rounds and done["disabled"] == [], (mode, done)
        assert len(r["ms_per_step"][mode]["wall"]) == len(r["ms_per_step"][mode]["cpu"]) == cfg.rounds
    for mode in ("capture", "monitor", TEVID):  # 2 frames per block of 4 steps at cadence 2
        assert r["modes"][mode]["frames"] == cfg.rounds * cfg.steps // 2
        for kind in ("wall", "cpu", "robust_cpu"):
            q = r["ratios"][kind][mode]
            assert 0 < q["min"] <= q["median"] <= q["max"]
    # the window was filled before timing: TEViD predicted at every timed frame, and only in its mode
    tevid = r["modes"][TEVID]
    assert tevid["tevid_predictions"] == tevid["frames"] > 0
    assert r["modes"]["monitor"]["tevid_predictions"] == 0 and "plain" not in r["ratios"]["cpu"]
    md = (tmp_path / "overhead.md").read_text()
    assert "shared" in md and all(f"| {m} | 2 |" in md for m in ("capture", "monitor", TEVID))
    prof = r["profile"]  # 4 profiled steps of the TEViD mode, 2 of them frames
    assert prof["mode"] == TEVID and prof["frames"] == 2
    funcs = prof["functions"]
    assert funcs["monitor: optimizer step hook (all its work)"]["calls"] == 4 and "cProfile over 4 steps" in md


def test_the_peers_run_beside_the_monitor_at_every_cadence(tmp_path, one_thread):
    pytest.importorskip("backpack")
    pytest.importorskip("wandb")
    cfg = OverheadConfig(cadences=(1, 2), steps=2, rounds=2, modes=(TEVID, COCKPIT, WANDB), arch="cnn",
                         checkpoint="tiny", warmup_steps=2)
    res = run(cfg, tmp_path)
    assert res["left_out"] == {} and set(res["versions"]) == {"cockpit-for-pytorch", "backpack-for-pytorch", "wandb"}
    for r in res["runs"]:
        per_block = cfg.steps // r["cadence"]  # frames, tracked steps, logged rows
        for mode in (TEVID, COCKPIT, WANDB):
            done = r["modes"][mode]
            assert done["blocks"] == cfg.rounds and done["frames"] == cfg.rounds * per_block, (r["cadence"], mode, done)
            assert 0 < r["ratios"]["cpu"][mode]["median"] and 0 < r["ratios"]["wall"][mode]["median"]
        assert r["modes"][TEVID]["tevid_predictions"] == r["modes"][TEVID]["frames"]
    md = (tmp_path / "overhead.md").read_text()
    assert all(f"| {m} | {c} |" in md for m in (TEVID, COCKPIT, WANDB) for c in (1, 2))
    assert "small Sequential CNN" in md and "Left out" not in md


def test_cockpit_blocks_leave_the_model_without_backpack_hooks(one_thread):
    pytest.importorskip("backpack")
    job = _Job(OverheadConfig(cadences=(1,), steps=2, arch="cnn"))
    job.warm_up(1)
    mode = _Cockpit(COCKPIT, job, 1)
    mode.block()
    mode.block()
    assert mode.tracked() == 4  # every step tracked at cadence 1, the global step carried over blocks
    for m in [*job.model.modules(), mode.loss_fn]:
        assert not m._forward_hooks and not m._backward_hooks and not hasattr(m, "_backpack_extend"), m
        assert not hasattr(m, "input0") and not hasattr(m, "output"), m


def test_a_missing_peer_is_left_out_with_a_message(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    modes, left_out = available_modes(("monitor", WANDB))
    assert modes == ["plain", "monitor"] and "wandb is not installed" in left_out[WANDB]
    assert main(["--out", str(tmp_path), "--cadence", "1", "--steps", "2", "--rounds", "1", "--arch", "cnn",
                 "--modes", "monitor", "wandb"]) == 0
    out, err = capsys.readouterr()
    assert f"{WANDB} left out" in err and f"Left out: {WANDB}: wandb is not installed" in out
    assert "| monitor | 1 |" in out and f"| {WANDB} |" not in out
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert set(saved["runs"][0]["modes"]) == {"plain", "monitor"} and WANDB in saved["left_out"]


def test_cli_without_tevid_and_bad_settings(tmp_path, capsys, one_thread):
    assert main(["--out", str(tmp_path), "--cadence", "1", "--steps", "2", "--rounds", "1", "--checkpoint", "none"]) == 0
    out = capsys.readouterr().out
    assert "| monitor | 1 |" in out and f"{TEVID} |" not in out and "TEViD checkpoint: none" in out
    assert set(json.loads((tmp_path / "overhead.json").read_text())["runs"][0]["modes"]) == {"plain", "capture", "monitor"}
    with pytest.raises(ValueError, match="multiple of cadence"):
        OverheadConfig(cadences=(1, 50), steps=120)
    with pytest.raises(ValueError, match="modes: unknown"):
        OverheadConfig(modes=("tensorboard",))
    assert set(MODES) >= {"plain", TEVID, COCKPIT, WANDB}
    with pytest.raises(FileNotFoundError, match="no config.json"):
        main(["--out", str(tmp_path), "--steps", "50", "--rounds", "1", "--checkpoint", str(tmp_path / "nowhere")])


def test_rule_quantiles_are_numpys_bit_for_bit():
    """The loss-spike and exploding-gradient rules run every step; their plain-Python quartiles (cut for
    the overhead) must equal numpy's exactly, ties, tiny and huge values included."""
    import numpy as np

    from diagnose.symptoms import _median, _quartiles

    rng = np.random.default_rng(0)
    for n in list(range(1, 61)) * 20:
        x = rng.lognormal(0, 3, n) * rng.choice([1e-6, 1.0, 1e6])
        if rng.random() < 0.2:
            x = np.round(x, 1)  # ties
        assert _quartiles(x.tolist()) == tuple(np.percentile(x, [25, 50, 75]).tolist())
        assert _median(x.tolist()) == float(np.median(x))


def _with_specials(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    flat = x.view(-1)
    flat[::97] = 0.0
    flat[5], flat[11], flat[17], flat[23] = float("nan"), float("inf"), -float("inf"), -0.0
    return x


def test_the_frame_map_cuts_compute_what_they_replaced():
    """Cut for the overhead (issue 17 part 6): channel groups by a reshape-mean instead of adaptive pooling
    when C divides into them, sqrt through numpy on CPU, the non-finite count skipped when the sum is
    finite, the batch mean taken before the (linear) projection."""
    from capture.frames import Projection, channel_groups, count_nonfinite, resize_map, tensor_to_map, to_grid

    torch.manual_seed(0)
    for c in (3, 8, 16, 64, 96, 768):
        x = torch.randn(3, c, 5, 7) * torch.logspace(-20, 3, c)[None, :, None, None]  # squares down to denormals
        x[:, :, ::2] = 0.0  # max pooling's zero gradients
        ref = F.adaptive_avg_pool3d((x * x)[:, None], (8, 5, 7))[:, 0].sqrt()
        torch.testing.assert_close(channel_groups(x, 8), ref, rtol=1e-6, atol=0)  # float32 summation order
        assert torch.equal(channel_groups(x, 8) == 0, ref == 0)
    for x in (torch.randn(4, 16, 6, 6), _with_specials(torch.randn(4, 16, 6, 6)), torch.full((2, 3), 3e38)):
        for per_sample in (False, True):
            bad, finite = count_nonfinite(x, per_sample)
            ref = (~torch.isfinite(x)).flatten(1).sum(1) if per_sample else (~torch.isfinite(x)).sum()
            assert torch.equal(bad, ref) and bad.dtype == torch.int64
            assert not finite or bool(torch.isfinite(x).all())
    proj = Projection(weight=[0.3, -0.1, 0.2, 0.05, 0.1, 0.15, 0.2, 0.1], bias=0.25, kind="pca")
    for x in (torch.randn(32, 16, 9, 9), _with_specials(torch.randn(8, 64, 4, 4))):
        m, bad = tensor_to_map(x, "bchw", 12, proj)
        clean = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        ref = resize_map(proj.apply(channel_groups(to_grid(clean, "bchw"), 8)).mean(dim=0), 12)
        torch.testing.assert_close(m, ref, rtol=1e-5, atol=1e-6)
        assert int(bad) == int((~torch.isfinite(x)).sum())


def test_the_layer_statistics_cuts_compute_what_they_replaced():
    """The ReLU activity indicator from ceil(min(|x|, 1)) and the skipped non-finite count give the old statistics
    bit for bit, non-finite values included."""
    from diagnose.layer_stats import layer_stats

    torch.manual_seed(0)
    relu, conv = nn.ReLU(), nn.Conv2d(1, 1, 1)
    for x in (torch.randn(8, 16, 6, 6), _with_specials(torch.randn(8, 16, 6, 6)), torch.randn(8, 10)):
        out = torch.relu(x).requires_grad_()
        active = (out.detach() != 0).float()  # the replaced computation
        unit = 1 if x.ndim >= 4 else x.ndim - 1
        activity = active.mean(dim=[d for d in range(x.ndim) if d != unit])
        ref = torch.stack([(activity < 0.01).float().mean(), 1 - active.mean()])
        assert torch.equal(layer_stats("relu", relu, (x,), out, 0.01, 0.99), ref)
        block = x.clone().requires_grad_()
        y = x.abs()
        ref = torch.stack([y.nan_to_num(nan=0.0, posinf=0.0).amax(), (~torch.isfinite(y)).sum().float()])
        assert torch.equal(layer_stats("block", conv, (x,), block, 0.01, 0.99), ref)
