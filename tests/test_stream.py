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


def test_the_replay_reads_what_the_live_monitor_read():
    if not (DEFAULT_CHECKPOINT / "config.json").is_file():
        pytest.skip("no shipped model")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    frames = []
    monitor = diagnose.watch(model, opt, cadence=1, callbacks=[type("Keep", (), {"on_frame": lambda self, f: frames.append(f)})()])
    for _ in range(13):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    monitor.remove()
    window = monitor.window
    assert len(monitor.predictions) == len(frames) - window + 1  # live: a prediction once T frames exist

    replay = TEViDDiagnoser(monitor.tevid, monitor.calibration, window=window)
    replay.reset({})
    names = tuple(frames[0].readouts)
    readouts = np.array([[f.readouts[k] for k in names] for f in frames], dtype=np.float32)
    for t, f in enumerate(frames):
        view = PastView(t, np.array([g.step for g in frames[: t + 1]]), torch.stack([f.frame.float()]),
                        readouts[: t + 1].copy(), names, np.zeros(t + 1, np.float32), np.zeros(t + 1, np.float32))
        out = replay.step(view)
        if t >= window - 1:
            live = monitor.predictions[t - window + 1]
            assert live["step"] == f.step
            np.testing.assert_allclose(out.probs, list(live["probs"].values()), rtol=1e-5, atol=1e-6)
            assert out.vacuity == pytest.approx(live["vacuity"], rel=1e-5)


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
