"""The TEViD stream is one code path for the live monitor and the evaluation's replay: fed the same frames,
`eval.replay.TEViDDiagnoser` gives the live monitor's probabilities and vacuity at every frame with a full
window, and `decide` keeps the Unknown streak."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import diagnose
from diagnose.decision import DecisionState, Reason, decide
from diagnose.monitor import DEFAULT_CHECKPOINT
from diagnose.stream import TEViDStream
from eval.replay import PastView, TEViDDiagnoser


def _watched_job(steps: int, cadence: int = 1, **watch_options):
    """A small CNN trained `steps` steps under `diagnose.watch(cadence=...)`: (the removed monitor, its frames)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    frames = []
    monitor = diagnose.watch(model, opt, cadence=cadence, callbacks=[type("Keep", (), {"on_frame": lambda self, f: frames.append(f)})()],
                             **watch_options)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    monitor.remove()
    return monitor, frames


def _live_and_replayed(checkpoint, steps: int, cadence: int):
    """A job watched live with `checkpoint`, then its frames replayed through `TEViDDiagnoser` as the benchmark
    does (readouts, the steps' losses, levels and patterns of each frame): [(replayed probs, live probs)] per
    frame with a full window, after checking that the vacuity agrees too."""
    monitor, frames = _watched_job(steps, cadence=cadence, checkpoint=checkpoint)
    window = monitor.window
    assert len(monitor.predictions) == len(frames) - window + 1  # live: a prediction once T frames exist
    replay = TEViDDiagnoser.from_checkpoint(checkpoint)
    replay.reset({"num_classes": frames[0].num_classes})
    names = tuple(frames[0].readouts)
    readouts = np.array([[f.readouts[k] for k in names] for f in frames], dtype=np.float32)
    levels = np.stack([f.levels.numpy() for f in frames]).astype(np.float32)
    assert frames[0].step == 0 and all(len(f.step_losses) == f.step - g.step for g, f in zip(frames, frames[1:]))
    pairs = []
    for t, f in enumerate(frames):
        losses = np.concatenate([g.step_losses for g in frames[: t + 1]]).astype(np.float32)  # steps 0 .. f.step
        view = PastView(t, np.array([g.step for g in frames[: t + 1]]), torch.stack([f.frame.float()]),
                        readouts[: t + 1].copy(), names, losses, np.zeros(len(losses), np.float32),
                        levels=levels[: t + 1].copy(), pattern=f.patterns.float())
        out = replay.step(view)
        if t >= window - 1:
            live = monitor.predictions[t - window + 1]
            assert live["step"] == f.step and out.vacuity == pytest.approx(live["vacuity"], rel=1e-5)
            pairs.append((out.probs, list(live["probs"].values())))
    return pairs


def test_the_replay_reads_what_the_live_monitor_read():
    if not (DEFAULT_CHECKPOINT / "config.json").is_file():
        pytest.skip("no shipped model")
    for replayed, live in _live_and_replayed(DEFAULT_CHECKPOINT, 40, cadence=3):
        np.testing.assert_allclose(replayed, live, rtol=1e-5, atol=1e-6)


def test_the_unknown_streak_lives_in_decide():
    state, fired = DecisionState.start(3), []
    for u in (0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.9):  # tau 0.5, consecutive 3: a known frame breaks the streak
        state, d = decide(state, [0.5, 0.3, 0.2], u, [0.9, 0.9], tau=0.5, consecutive=3)
        fired.append(d.unknown_alert)
        assert d.reason is (Reason.VACUITY if u > 0.5 else Reason.KNOWN)
    assert fired == [False, False, False, False, False, True, False]  # once per streak


def test_a_stream_waits_for_a_full_window_unless_padded():
    class Fixed(nn.Module):
        cfg = type("Cfg", (), {"uses_video": True})()

        def predict(self, frames, readouts, temperature=1.0):
            b = readouts.shape[0]
            return {"probs": torch.full((b, 3), 1 / 3), "vacuity": frames.float().mean().reshape(1)}

    live, padded = TEViDStream(Fixed(), None, window=3), TEViDStream(Fixed(), None, window=3, pad_start=True)
    for t in range(4):
        frame = torch.full((6, 2, 2), float(t))
        a, b = live.push(t, frame, {}), padded.push(t, frame, {})
        assert (a is None) == (t < 2) and b is not None
        assert b.vacuity == pytest.approx(np.mean([max(0, s) for s in range(t - 2, t + 1)]))  # frame 0 repeated


def _relative_checkpoint(path, window=4, reference_lag=0, optional=False):
    """A randomly initialised relative TEViD saved as a fine-tuning output (weights, config, calibration)."""
    from capture.config import to_dict
    from capture.schema import CLASSES
    from diagnose.calibrate import Calibration, save_calibration
    from diagnose.tevid import TEViD, TEViDConfig
    from pretrain.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = TEViDConfig(encoder="tiny", encoder_overrides={"img_size": 8, "patch_size": 2}, representation="relative",
                      reference_lag=reference_lag, step_losses=optional, weight_step=optional)
    model = TEViD(cfg).eval()
    with torch.no_grad():  # large head weights: outputs that differ from window to window
        for p in model.head.parameters():
            p.normal_(0, 3.0)
    out = save_checkpoint(path, model=model, config={"model": to_dict(cfg), "data": {"window": window}}, step=0)
    save_calibration(Calibration.default(5, CLASSES), out)
    return out


def test_a_relative_model_reads_the_same_inputs_live_and_in_the_replay(tmp_path):
    """A relative TEViD watching a live job (levels, patterns and the class count from the capture) gives the
    probabilities the replay gives from the same frames' summaries, steps' losses and weights' pace: one
    RunRelative path for both."""
    ckpt = _relative_checkpoint(tmp_path / "rel", optional=True)
    pairs = _live_and_replayed(ckpt, 25, cadence=3)  # 9 frames, each after 3 steps' losses
    assert len(pairs) == 9 - 4 + 1
    for replayed, live in pairs:
        np.testing.assert_allclose(replayed, live, rtol=1e-5, atol=1e-6)
    assert np.std([r for r, _ in pairs], axis=0).max() > 1e-3  # the comparison has teeth


def test_a_relative_stream_takes_the_reference_its_model_was_trained_with(tmp_path):
    """The stream computes the relative scalars with the checkpoint's reference_lag, as training did (clips)."""
    from capture.relative import RelativeConfig, relative_frames
    from diagnose.stream import open_stream

    g = torch.Generator().manual_seed(0)
    n = 12
    levels = torch.randn(n, 6, generator=g) + 0.3 * torch.arange(float(n))[:, None]
    patterns = torch.randn(n, 6, 8, 8, generator=g)
    readouts = torch.rand(n, 8, generator=g) + 0.1
    for lag in (0, 3):
        stream = open_stream(_relative_checkpoint(tmp_path / f"lag{lag}", reference_lag=lag), frame_size=32)
        for t in range(n):
            stream.push(t, None, readouts[t], levels[t], patterns[t], num_classes=10)
        _, want = relative_frames(levels, patterns, readouts, 10, RelativeConfig(reference_lag=lag))
        got = torch.stack([v for _, _, v in stream.ring])
        assert torch.allclose(got, want[-len(got):], atol=1e-6)


def test_a_relative_stream_names_what_it_lacks(tmp_path):
    from diagnose.stream import open_stream

    stream = open_stream(_relative_checkpoint(tmp_path / "rel"), frame_size=32)  # any frame size: it reads patterns
    with pytest.raises(ValueError, match="levels"):
        stream.push(0, None, {})
    with pytest.raises(ValueError, match="num_classes"):
        stream.push(0, None, {}, torch.zeros(6), torch.zeros(6, 8, 8))
