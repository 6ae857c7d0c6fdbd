"""Shipping a checkpoint as the default model: files, manifest, load check; and the shipped model itself."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from capture.schema import CLASSES, CLIP_READOUTS
from diagnose.calibrate import Calibration, load_calibration, save_calibration
from diagnose.decision import DecisionState, decide
from diagnose.monitor import DEFAULT_CHECKPOINT
from diagnose.tevid import TEViD, TEViDConfig, load_tevid
from eval.ship import FILES, ship
from pretrain.checkpoint import save_checkpoint


def _tiny_checkpoint(path):
    cfg = TEViDConfig(encoder="tiny", encoder_overrides={"depth": 1})
    save_checkpoint(path, model=TEViD(cfg).eval(), config={"model": dataclasses.asdict(cfg)}, step=3)
    save_calibration(Calibration(list(CLASSES), [0.6, 0.7, 0.8, 0.5], temperature=1.2, tau=0.4, consecutive=3), path)
    return path


def test_ship_copies_checks_and_writes_a_manifest(tmp_path, smoke_corpus):
    src = _tiny_checkpoint(tmp_path / "final")
    out = ship(src, smoke_corpus, tmp_path / "default")
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "MANIFEST.json"])
    man = json.loads((out / "MANIFEST.json").read_text())
    assert man["corpus_config"]["name"] == "smoke" and sum(sum(c.values()) for c in man["corpus_labels"].values()) > 0
    assert man["files"]["model.safetensors"]["bytes"] == (src / "model.safetensors").stat().st_size
    assert len(man["commit"] or "x" * 40) == 40 and man["pipeline"]
    model, cal = load_tevid(out)
    assert cal.temperature == pytest.approx(1.2)
    # shipping again replaces the folder atomically; a folder that is not a checkpoint is refused
    ship(src, smoke_corpus, out)
    (src / "calibration.json").unlink()
    with pytest.raises(FileNotFoundError, match="calibration.json"):
        ship(src, smoke_corpus, tmp_path / "other")
    assert not (tmp_path / "other").exists()


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="no default model shipped in this checkout")
def test_the_shipped_default_model_loads_and_matches_its_manifest():
    from diagnose.tevid import file_sha256 as _sha256

    man = json.loads((DEFAULT_CHECKPOINT / "MANIFEST.json").read_text())
    for name, info in man["files"].items():
        assert _sha256(DEFAULT_CHECKPOINT / name) == info["sha256"], name
    model, cal = load_tevid(DEFAULT_CHECKPOINT)
    assert cal.classes == list(CLASSES) and not model.training
    s = model.cfg.encoder_overrides.get("img_size", 32) if hasattr(model, "cfg") else 32
    with torch.no_grad():
        out = model.predict(torch.zeros(1, 10, 6, s, s, dtype=torch.bfloat16), torch.zeros(1, 10, 8), cal.temperature)
    assert torch.isfinite(out["probs"]).all()


# The shipped model's outputs on `synthetic_window(32, 12)` through the live stream (`diagnose.stream.open_stream`):
# (step, probs in CLASSES order, vacuity) of the windows ending at frames 9, 10 and 11. Any change to the
# weights, the calibration's temperature, the readout order or the window assembly moves them. Recorded when
# this test was added (torch 2.14.1 on a 2-core AMD EPYC VM; 1 and 2 threads gave the same 6 digits). One
# forward pass of a fixed input varies across CPUs far below the tolerance, unlike a training run.
PINNED = [
    (90, [0.05633, 0.056103, 0.056103, 0.773793, 0.057671], 0.299705),
    (100, [0.078169, 0.077622, 0.077622, 0.513422, 0.253165], 0.404534),
    (110, [0.062272, 0.061546, 0.061546, 0.752743, 0.061893], 0.327209),
]


def synthetic_window(size: int, frames: int):
    """Seeded frames (T, 6, S, S) bf16 and raw readouts (T, 8) in CLIP_READOUTS order, one of them missing."""
    g = torch.Generator().manual_seed(18)
    maps = torch.randn(frames, 6, size, size, generator=g).to(torch.bfloat16)
    scale = torch.tensor([2.0, 1.0, 1.0, 0.05, 1.0, 2.0, 1.0, 3.0])
    readouts = torch.rand(frames, len(CLIP_READOUTS), generator=g) * scale
    readouts[0, CLIP_READOUTS.index("score_z")] = math.nan
    return maps, readouts


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="no default model shipped in this checkout")
def test_the_shipped_models_outputs_on_a_fixed_input_are_pinned(one_thread):
    from diagnose.stream import open_stream

    stream = open_stream(DEFAULT_CHECKPOINT)
    assert (stream.window, stream.frame_size) == (10, 32)
    maps, readouts = synthetic_window(stream.frame_size, 12)
    preds = [stream.push(10 * t, maps[t], dict(zip(CLIP_READOUTS, readouts[t].tolist()))) for t in range(12)]
    assert preds[:9] == [None] * 9  # live windows are causal and unpadded
    for pred, (step, probs, vacuity) in zip(preds[9:], PINNED):
        assert pred.step == step
        np.testing.assert_allclose(pred.probs, probs, atol=1e-4)
        assert pred.vacuity == pytest.approx(vacuity, abs=1e-4)
    # the stream's window is the model's input as stored: the last T frames and readouts, in order
    out = stream.model.predict(maps[None, 2:], readouts[None, 2:], temperature=stream.calibration.temperature)
    np.testing.assert_allclose(out["probs"][0].double().numpy(), preds[-1].probs, atol=1e-6)


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="no default model shipped in this checkout")
def test_the_shipped_model_in_a_live_job_alerts_exactly_where_its_calibrated_rule_says(tmp_path, one_thread):
    """Mechanics, not a claim about what a learned model says about one run (that is the benchmark's, over
    many runs: docs/benchmark/README.md): the demo's LR-spike job with the shipped model gets one prediction
    per frame once a window is full, and its TEViD alerts are exactly those of `decide` replayed with the
    calibration over those predictions."""
    from diagnose.demo import DemoConfig, _job, load_digits

    cfg = DemoConfig(steps=150, spike_onset=100, spike_gap=5, seed=1)
    res = _job("lr_spike", cfg, load_digits(cfg.seed), tmp_path, None)
    cal = load_calibration(DEFAULT_CHECKPOINT)
    assert res["tevid"] and res["disabled_reason"] is None and res["monitor"] == f"TEViD from {DEFAULT_CHECKPOINT}"
    preds, window = res["predictions"], 10
    assert [p["step"] for p in preds] == list(range(cfg.cadence * (window - 1), cfg.steps, cfg.cadence))  # frame 9 on
    state, expected = DecisionState.start(len(cal.classes)), []
    for p in preds:
        assert list(p["probs"]) == cal.classes and sum(p["probs"].values()) == pytest.approx(1, abs=1e-6)
        assert 0 < p["vacuity"] <= 1
        state, d = decide(state, [p["probs"][c] for c in cal.classes], p["vacuity"], cal.thresholds, cal.tau, cal.consecutive)
        assert p["label"] == ("unknown" if d.unknown else cal.classes[d.label])
        expected += [(cal.classes[c], p["step"]) for c in d.new_alerts] + [("unknown", p["step"])] * d.unknown_alert
    assert [(a["name"], a["step"]) for a in res["alerts"] if a["source"] == "tevid"] == expected
