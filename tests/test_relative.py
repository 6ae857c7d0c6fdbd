"""Run-relative inputs (capture.relative): invariant to the network's look, causal, finite on divergence."""
import math

import pytest
import torch

from capture.frames import CHANNELS
from capture.relative import (FRAME_FEATURES, HISTORY_FEATURES, RELATIVE_FEATURES, STEP_LOSS_FEATURES, WEIGHT_FEATURES, RelativeConfig, RunRelative, interval_losses,
                              relative_frames, relative_run, spaced_weight_steps, step_loss_features, unit_patterns)
from capture.schema import CLIP_READOUTS


def _run(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = torch.randn(n, 6, generator=g) * 0.2 + torch.tensor([0.5, 1.0, 2.0, -3.0, -4.0, -5.0])
    patterns = torch.randn(n, 6, 8, 8, generator=g) * 0.6
    readouts = torch.rand(n, len(CLIP_READOUTS), generator=g) + 0.1
    return levels, patterns, readouts


def test_levels_are_relative_to_a_causal_run_reference():
    """rel_level at frame t is the level minus the mean of the first min(t + 1, 4) frames' levels (over the
    level scale, asinh); frames after the reference never move it; frame 0 is its own reference."""
    levels, patterns, readouts = _run()
    _, x = relative_frames(levels, patterns, readouts, 10)
    rel = [RELATIVE_FEATURES.index(f"rel_level_{c}") for c in CHANNELS]
    scale = RelativeConfig().level_scale
    assert torch.allclose(x[0, rel], torch.zeros(6))
    assert torch.allclose(x[2, rel], torch.asinh((levels[2] - levels[:3].mean(0)) / scale), atol=1e-5)
    assert torch.allclose(x[9, rel], torch.asinh((levels[9] - levels[:4].mean(0)) / scale), atol=1e-5)
    d = [RELATIVE_FEATURES.index(f"d_level_{c}") for c in CHANNELS]
    assert torch.allclose(x[5, d], torch.asinh((levels[5] - levels[4]) / scale), atol=1e-5)


def test_a_lagged_reference_measures_change_over_k_frames():
    """reference_lag=k: levels and size readouts relative to the values k frames back once there are k earlier
    frames, the run reference before; so a long run whose levels drift by a constant per frame reads the same
    late as early, where the start reference grows without bound."""
    levels, patterns, readouts = _run(40)
    levels = levels + 0.3 * torch.arange(40.0)[:, None]  # a steady drift of 0.3 decades a frame
    cfg = RelativeConfig(reference_lag=5)
    _, x = relative_frames(levels, patterns, readouts, 10, cfg)
    rel = [RELATIVE_FEATURES.index(f"rel_level_{c}") for c in CHANNELS]
    size = RELATIVE_FEATURES.index("log_ratio_loss")
    assert torch.allclose(x[3, rel], torch.asinh((levels[3] - levels[:4].mean(0)) / cfg.level_scale), atol=1e-5)
    for t in (5, 20, 39):
        assert torch.allclose(x[t, rel], torch.asinh((levels[t] - levels[t - 5]) / cfg.level_scale), atol=1e-5)
        ratio = torch.log(readouts[t, CLIP_READOUTS.index("loss")] / readouts[t - 5, CLIP_READOUTS.index("loss")])
        assert torch.isclose(x[t, size], torch.asinh(ratio), atol=1e-4)
    _, start = relative_frames(levels, patterns, readouts, 10)
    assert start[39, rel].abs().min() > x[39, rel].abs().max() + 1.0  # the start reference drifts off
    with pytest.raises(ValueError, match="reference_lag"):
        RunRelative(10, RelativeConfig(reference_lag=-1))


def test_a_missing_level_has_no_reference_until_one_is_seen():
    levels, patterns, readouts = _run(4)
    levels[0, 0] = math.nan
    _, x = relative_frames(levels, patterns, readouts, 10)
    i = RELATIVE_FEATURES.index("rel_level_act_early")
    assert x[0, i] == 0.0 and x[1, i] == 0.0  # frame 1 is the first finite one: its own reference
    assert torch.isclose(x[2, i], torch.asinh((levels[2, 0] - levels[1:3, 0].mean()) / 0.25), atol=1e-5)


def test_streaming_and_stored_runs_take_the_same_path():
    """The live stream pushes frames one at a time; a stored run goes through the same RunRelative."""
    levels, patterns, readouts = _run()
    p, x = relative_frames(levels, patterns, readouts, 7)
    state = RunRelative(7)
    for t in range(len(levels)):
        q, y = state.push(levels[t], patterns[t], readouts[t])
        assert torch.equal(q, p[t]) and torch.equal(y, x[t])


def test_the_look_of_the_network_cancels():
    """A network whose maps sit 9 decades higher, whose head gradients are 1000x larger and whose patterns
    are 3x wider gives the same relative inputs; only loss and entropy see the class count, through log C."""
    levels, patterns, readouts = _run()
    a = relative_run(levels, patterns, readouts, 10, window=5)
    big = readouts.clone()
    for i, name in enumerate(CLIP_READOUTS):
        if name in ("head_grad_norm", "score_w", "score_z"):  # not the loss: loss / log C sees the classes
            big[:, i] *= 1000.0
    b = relative_run(levels + 9.0, patterns * 3.0, big, 10, window=5)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    assert a[1].shape == (8, 5, len(RELATIVE_FEATURES)) and a[0].shape == (8, 5, 6, 8, 8)


def test_windows_see_no_future():
    levels, patterns, readouts = _run()
    p, x = relative_run(levels, patterns, readouts, 10, window=4)
    l2, p2, r2 = levels.clone(), patterns.clone(), readouts.clone()
    l2[8:] -= 5.0
    p2[8:] = 0.0
    r2[8:] *= 50.0
    q, y = relative_run(l2, p2, r2, 10, window=4)
    assert torch.equal(x[:5], y[:5]) and torch.equal(p[:5], q[:5])  # windows ending at frames 3..7
    assert not torch.equal(x[5], y[5])


def test_divergence_stays_finite_and_unit_patterns():
    levels, patterns, readouts = _run(6)
    levels[-1, 0] = math.inf
    readouts[-1, CLIP_READOUTS.index("loss")] = math.inf
    readouts[-2, CLIP_READOUTS.index("gwa")] = math.nan
    p, x = relative_frames(levels, patterns, readouts, 5)
    assert torch.isfinite(x).all() and torch.isfinite(p).all()
    assert x[-1, RELATIVE_FEATURES.index("loss_over_log_c")] > 10  # asinh(1e6): large, not clamped to a constant
    u = unit_patterns(patterns)
    assert torch.allclose(u.std(dim=(-2, -1), unbiased=False), torch.ones(6, 6), atol=1e-4)
    assert torch.equal(unit_patterns(torch.zeros(1, 6, 8, 8)), torch.zeros(1, 6, 8, 8))


def test_loss_above_best_remembers_a_level_shift_after_it_leaves_the_window():
    levels, patterns, readouts = _run(12)
    loss = CLIP_READOUTS.index("loss")
    readouts[:, loss] = torch.tensor([2.0, 1.0, 0.5, 0.25, 0.25, 0.25, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    x = relative_frames(levels, patterns, readouts, 5)[1][:, RELATIVE_FEATURES.index("loss_above_best")]
    assert torch.all(x[:6] < 0.2)  # improving, then flat at its best
    assert torch.all(x[7:] > 1.0) and x[-1] >= x[7]  # the jump at frame 6 stays remembered, smoothed upward
    expected, ema, best = [], None, math.inf  # the definition: EMA(0.5) of log loss minus its running minimum
    for v in readouts[:, loss].tolist():
        ema = math.log(v) if ema is None else 0.5 * ema + 0.5 * math.log(v)
        best = min(best, ema)
        expected.append(math.asinh(ema - best))
    torch.testing.assert_close(x, torch.tensor(expected), atol=1e-4, rtol=0)


def test_a_leaky_best_forgets_a_dip_and_does_not_fall_with_the_run_length():
    """best_decay > 0: the low closes that share of its gap to the smoothed loss each frame (by hand below);
    0 keeps the run's lowest value, which a long noisy run drives ever lower."""
    n = 8
    levels, patterns, readouts = _run(n)
    loss = CLIP_READOUTS.index("loss")
    readouts[:, loss] = torch.tensor([1.0, math.exp(-1.0)] + [1.0] * (n - 2))  # log loss 0, a dip to -1, back to 0
    col = RELATIVE_FEATURES.index("loss_above_best")
    above = lambda cfg: relative_frames(levels, patterns, readouts, 5, cfg)[1][:, col]  # noqa: E731
    leaky = above(RelativeConfig(loss_smoothing=1.0, best_decay=0.5))
    gaps = [0.0, 0.0] + [0.5 ** k for k in range(1, n - 1)]  # the low -1 closes half its gap to 0 a frame
    torch.testing.assert_close(leaky, torch.asinh(torch.tensor(gaps)), atol=1e-5, rtol=0)
    torch.testing.assert_close(above(RelativeConfig(loss_smoothing=1.0)), torch.asinh(torch.tensor([0.0, 0.0] + [1.0] * (n - 2))),
                               atol=1e-5, rtol=0)  # the default remembers the dip for ever
    g = torch.Generator().manual_seed(0)  # a noisy flat loss: the running low keeps falling, the leaky one does not
    long = _run(400)
    long[2][:, loss] = torch.exp(0.5 * torch.randn(400, generator=g))
    run_low = relative_frames(*long, 5)[1][:, col]
    leaky_low = relative_frames(*long, 5, RelativeConfig(best_decay=0.05))[1][:, col]
    assert run_low[300:].mean() > run_low[50:100].mean() + 0.1 and abs(leaky_low[300:].mean() - leaky_low[50:100].mean()) < 0.1
    with pytest.raises(ValueError, match="best_decay"):
        RunRelative(5, RelativeConfig(best_decay=1.5))


def test_loss_above_best_can_read_the_median_of_the_steps_between_frames():
    """best_from_steps: one noisy step at a frame (its own loss) does not move the low; the steps' median does."""
    levels, patterns, readouts = _run(4)
    loss = CLIP_READOUTS.index("loss")
    readouts[:, loss] = torch.tensor([1.0, 0.1, 1.0, 1.0])  # frame 1's own step is a lucky batch
    steps = [[1.0], [1.0, 1.0, 0.1], [1.0, 1.0, 1.0], [2.0, 2.0, 1.0]]
    col = RELATIVE_FEATURES.index("loss_above_best")
    own = relative_frames(levels, patterns, readouts, 5, RelativeConfig(loss_smoothing=1.0), step_losses=steps)[1][:, col]
    med = relative_frames(levels, patterns, readouts, 5, RelativeConfig(loss_smoothing=1.0, best_from_steps=True),
                          step_losses=steps)[1][:, col]
    torch.testing.assert_close(own, torch.asinh(torch.tensor([0.0, 0.0, math.log(10), math.log(10)])), atol=1e-5, rtol=0)
    torch.testing.assert_close(med, torch.asinh(torch.tensor([0.0, 0.0, 0.0, math.log(2)])), atol=1e-5, rtol=0)
    nan_steps = [[1.0], [math.nan, 1.0], [1.0], [1.0]]  # a non-finite step loss is as the non-finite own loss: +inf
    med = relative_frames(levels, patterns, readouts, 5, RelativeConfig(best_from_steps=True), step_losses=nan_steps)[1][:, col]
    assert med[1] > 10


def test_step_losses_give_the_spike_and_noise_between_frames():
    """A spike that falls between two frames shows in the step-loss features of the frame after it, not in
    the frame's own loss; both features are ratios of losses (scale-free), 0 without step losses."""
    steady = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05])
    spiked = torch.tensor([1.0, 1.1, 8.0, 1.0, 1.05])  # step 2 of 5: the frame's own (last) loss is the same
    s0, n0 = step_loss_features(steady)
    s1, n1 = step_loss_features(spiked)
    assert s1 == pytest.approx(math.log(8.0) - math.log(1.05), rel=1e-6) and s1 > 10 * s0
    assert n0 == pytest.approx(float(torch.log(steady).diff().abs().median()), rel=1e-6)
    assert step_loss_features(spiked * 1e4) == pytest.approx((s1, n1), rel=1e-5)  # the loss's scale cancels
    assert step_loss_features(torch.tensor([1.0, math.nan, 1.0]))[0] == math.inf
    assert step_loss_features(None) == step_loss_features(torch.tensor([2.0])) == (0.0, 0.0)

    levels, patterns, readouts = _run(3)
    cols = [RELATIVE_FEATURES.index(n) for n in STEP_LOSS_FEATURES]
    with_losses = relative_frames(levels, patterns, readouts, 10, step_losses=[steady[:1], steady, spiked])[1]
    without = relative_frames(levels, patterns, readouts, 10)[1]
    assert torch.equal(with_losses[:, :cols[0]], without[:, :cols[0]]) and torch.all(without[:, cols] == 0)
    torch.testing.assert_close(with_losses[2, cols], torch.asinh(torch.tensor([s1, n1])))
    assert interval_losses(torch.arange(10.0), [2, 5, 9])[1].tolist() == [3.0, 4.0, 5.0]  # after the last frame read
    with pytest.raises(ValueError, match="one entry per frame"):
        relative_frames(levels, patterns, readouts, 10, step_losses=[steady])


def test_a_raised_pace_of_the_weights_shows_and_is_remembered():
    """weight_step x30 from frame 12 on: the ratio to the lagged reference jumps and fades once the
    reference has caught up; the height above the running median stays; scale-free; 0 without it."""
    levels, patterns, readouts = _run(30)
    pace = torch.full((30,), 1e-3)
    pace[0], pace[12:] = math.nan, 3e-2
    cfg = RelativeConfig(reference_lag=5)
    cols = [RELATIVE_FEATURES.index(n) for n in WEIGHT_FEATURES]
    x = relative_frames(levels, patterns, readouts, 10, cfg, weight_steps=pace)[1][:, cols]
    jump = math.asinh(math.log(30.0))
    assert torch.all(x[:12].abs() < 1e-4)  # steady (frame 0: no value, 0)
    assert x[12, 0] == pytest.approx(jump, rel=1e-4) and torch.all(x[17:, 0].abs() < 1e-4)  # forgotten after the lag
    torch.testing.assert_close(x[12:22, 1], torch.full((10,), jump), rtol=1e-4, atol=0)  # above the median while the raise
    assert torch.all(x[24:, 1].abs() < 1e-4)  # is the minority of the run's frames; once it is most of them, the new normal
    torch.testing.assert_close(relative_frames(levels, patterns, readouts, 10, cfg, weight_steps=pace * 1e3)[1][:, cols], x)
    assert torch.all(relative_frames(levels, patterns, readouts, 10, cfg)[1][:, cols] == 0)
    # read every 2nd frame: the mean per-step pace of the frames since the previous one read
    torch.testing.assert_close(spaced_weight_steps(torch.tensor([math.nan, 1.0, 3.0, 5.0, 7.0]), [0, 2, 4]),
                               torch.tensor([math.nan, 2.0, 6.0], dtype=torch.float64), equal_nan=True)


def test_the_share_readouts_are_read_as_they_are_and_their_peak_remembers_them():
    """weight_still 0.5 from frame 12 on: the feature is asinh(0.5) there and 0 before (and without it); its
    leaky peak keeps it. batch_repeat and confident_miss the same way, each in its own column; read every 2nd
    frame, each share combines the frames since the previous one read: the least still share, any repeat, the
    mean miss."""
    from capture.relative import SHARE_READOUTS, spaced_shares

    levels, patterns, readouts = _run(30)
    still = torch.zeros(30)
    still[0], still[12:] = math.nan, 0.5
    repeat, miss = torch.zeros(30), torch.zeros(30)
    repeat[20:], miss[5:] = 1.0, 0.25
    x = relative_frames(levels, patterns, readouts, 10, shares={"weight_still": still, "batch_repeat": repeat,
                                                                 "confident_miss": miss})[1]
    col = RELATIVE_FEATURES.index("weight_still")
    assert torch.all(x[:12, col] == 0) and torch.allclose(x[12:, col], torch.full((18,), math.asinh(0.5)))
    assert torch.allclose(x[12:, RELATIVE_FEATURES.index("peak_weight_still")], torch.full((18,), math.asinh(0.5)))
    rep, mis = RELATIVE_FEATURES.index("batch_repeat"), RELATIVE_FEATURES.index("confident_miss")
    assert torch.all(x[:20, rep] == 0) and torch.allclose(x[20:, rep], torch.full((10,), math.asinh(1.0)))
    assert torch.all(x[:5, mis] == 0) and torch.allclose(x[5:, mis], torch.full((25,), math.asinh(0.25)))
    none = relative_frames(levels, patterns, readouts, 10)[1]
    assert all(torch.all(none[:, RELATIVE_FEATURES.index(n)] == 0) for n in SHARE_READOUTS)
    spaced = spaced_shares({"weight_still": torch.tensor([math.nan, 0.0, 0.5, 0.5, 0.5]),
                            "batch_repeat": torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]),
                            "confident_miss": torch.tensor([0.0, 0.1, 0.3, 0.0, 0.5])}, [0, 2, 4])
    torch.testing.assert_close(spaced["weight_still"], torch.tensor([math.nan, 0.0, 0.5], dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(spaced["batch_repeat"], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(spaced["confident_miss"], torch.tensor([0.0, 0.2, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="weight_still must hold one value per frame"):
        relative_frames(levels, patterns, readouts, 10, shares={"weight_still": still[:3]})
    with pytest.raises(ValueError, match="shares must be named from"):
        relative_frames(levels, patterns, readouts, 10, shares={"loss": still})


def test_the_history_traces_remember_a_spike_and_forget_it_slowly():
    """slow_<f> is the EWMA of the frame scalar f from its first value on; peak_<f> jumps to a new high at
    once and then falls towards the current value by peak_decay a frame; a steady run leaves both equal to it."""
    levels, patterns, readouts = _run(40)
    step_losses = [torch.ones(5)] * 40
    step_losses[10] = torch.tensor([1.0, 1.0, 50.0, 1.0, 1.0])  # one step's loss x50 between frames 9 and 10
    cfg = RelativeConfig(history_rate=0.1, peak_decay=0.2)
    x = relative_frames(levels, patterns, readouts, 10, cfg, step_losses=step_losses)[1]
    assert x.shape == (40, len(FRAME_FEATURES) + len(HISTORY_FEATURES)) and len(RELATIVE_FEATURES) == 3 * len(FRAME_FEATURES)
    f = FRAME_FEATURES.index("step_loss_spike")
    own, slow, peak = x[:, f], x[:, RELATIVE_FEATURES.index("slow_step_loss_spike")], x[:, RELATIVE_FEATURES.index("peak_step_loss_spike")]
    spike = math.asinh(math.log(50.0))
    assert own[10] == pytest.approx(spike, rel=1e-5) and torch.all(own[11:] == 0) and torch.all(own[:10] == 0)
    assert torch.all(slow[:10] == 0) and torch.all(peak[:10] == 0)
    assert peak[10] == pytest.approx(spike, rel=1e-5)  # a new high at once
    torch.testing.assert_close(peak[11:15], spike * 0.8 ** torch.arange(1.0, 5.0), rtol=1e-5, atol=0)  # then decays
    torch.testing.assert_close(slow[10:15], 0.1 * spike * 0.9 ** torch.arange(0.0, 5.0), rtol=1e-5, atol=0)
    # every frame scalar has its two traces, computed the same way
    i = FRAME_FEATURES.index("rel_level_act_early")
    ewma = x[0, i].clone()
    for t in range(1, 40):
        ewma = ewma + 0.1 * (x[t, i] - ewma)
    assert x[-1, RELATIVE_FEATURES.index("slow_rel_level_act_early")] == pytest.approx(float(ewma), abs=1e-5)
    with pytest.raises(ValueError, match="history_rate"):
        RunRelative(10, RelativeConfig(history_rate=0.0))


def test_bad_shapes_are_named():
    levels, patterns, readouts = _run(5)
    with pytest.raises(ValueError, match="readouts must have the 8 columns"):
        relative_frames(levels, patterns, readouts[:, :5], 10)
    with pytest.raises(ValueError, match="of one N"):
        relative_frames(levels[:4], patterns, readouts, 10)
    with pytest.raises(ValueError, match="num_classes"):
        relative_frames(levels, patterns, readouts, 1)
    with pytest.raises(ValueError, match="reference_frames"):
        RunRelative(10, RelativeConfig(reference_frames=0))
    with pytest.raises(ValueError, match="expected levels"):
        RunRelative(10).push(levels[0, :5], patterns[0], readouts[0])
    assert relative_run(levels, patterns, readouts, 10, window=9)[1].shape == (0, 9, len(RELATIVE_FEATURES))
