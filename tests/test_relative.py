"""Run-relative inputs (capture.relative): invariant to the network's look, causal, finite on divergence."""
import math

import pytest
import torch

from capture.relative import RELATIVE_FEATURES, relative_run, relative_window, run_reference, unit_patterns
from capture.schema import CLIP_READOUTS


def _run(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = torch.randn(n, 6, generator=g) * 0.2 + torch.tensor([0.5, 1.0, 2.0, -3.0, -4.0, -5.0])
    patterns = torch.randn(n, 6, 8, 8, generator=g) * 0.6
    readouts = torch.rand(n, len(CLIP_READOUTS), generator=g) + 0.1
    return levels, patterns, readouts


def test_reference_is_causal_and_frame_zero_is_its_own():
    levels, _, _ = _run()
    ref = run_reference(levels, 4)
    assert torch.allclose(ref[0], levels[0])
    assert torch.allclose(ref[2], levels[:3].mean(0))
    assert torch.allclose(ref[-1], levels[:4].mean(0))
    later = levels.clone()
    later[5:] += 7.0
    assert torch.equal(run_reference(later, 4), ref)  # frames after the reference never move it


def test_reference_skips_missing_levels():
    levels = torch.tensor([[math.nan, 1.0], [2.0, 3.0], [4.0, 5.0]])
    ref = run_reference(levels, 2)
    assert math.isnan(ref[0, 0]) and ref[1, 0] == 2.0 and ref[1, 1] == 2.0 and ref[2, 0] == 2.0


def test_the_look_of_the_network_cancels():
    """A network whose maps sit 9 decades higher, whose head gradients are 1000x larger and whose patterns
    are 3x wider gives the same relative inputs; only loss and entropy see the class count, through log C."""
    levels, patterns, readouts = _run()
    a = relative_run(levels, patterns, readouts, 10, window=5)
    big = readouts.clone()
    for i, name in enumerate(CLIP_READOUTS):
        if name in ("head_grad_norm", "score_w", "score_z"):
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
    p, x = relative_window(levels, patterns, readouts, 5, run_reference(levels)[-1])
    assert torch.isfinite(x).all() and torch.isfinite(p).all()
    assert x[-1, RELATIVE_FEATURES.index("loss_over_log_c")] > 10  # asinh(1e6): large, not clamped to a constant
    u = unit_patterns(patterns)
    assert torch.allclose(u.std(dim=(-2, -1), unbiased=False), torch.ones(6, 6), atol=1e-4)
    assert torch.equal(unit_patterns(torch.zeros(1, 6, 8, 8)), torch.zeros(1, 6, 8, 8))


def test_bad_shapes_are_named():
    levels, patterns, readouts = _run(5)
    with pytest.raises(ValueError, match="readouts must have the 8 columns"):
        relative_window(levels, patterns, readouts[:, :5], 10, levels[0])
    with pytest.raises(ValueError, match="of one T"):
        relative_window(levels[:4], patterns, readouts, 10, levels[0])
    with pytest.raises(ValueError, match="num_classes"):
        relative_window(levels, patterns, readouts, 1, levels[0])
    with pytest.raises(ValueError, match="reference_frames"):
        run_reference(levels, 0)
    assert relative_run(levels, patterns, readouts, 10, window=9)[1].shape == (0, 9, len(RELATIVE_FEATURES))
