"""Shipping a checkpoint as the default model: files, manifest, load check; and the shipped model itself."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from capture.schema import CLASSES, CLIP_READOUTS
from diagnose.calibrate import Calibration, load_calibration, save_calibration
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


def test_ship_carries_the_familiarity_bank_when_there_is_one(tmp_path, smoke_corpus):
    """A checkpoint calibrated with a bank (`recalibrate --familiarity`) ships it, listed in the manifest, and
    the shipped copy loads with it attached."""
    from diagnose.familiarity import fit_familiarity, save_familiarity

    src = _tiny_checkpoint(tmp_path / "final")
    save_familiarity(fit_familiarity(torch.randn(50, 8), k=3, reads="inputs"), src)
    out = ship(src, smoke_corpus, tmp_path / "default")
    assert "familiarity.safetensors" in json.loads((out / "MANIFEST.json").read_text())["files"]
    model, _ = load_tevid(out)
    assert model.familiarity is not None and model.familiarity.reads == "inputs"


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="no default model shipped in this checkout")
def test_the_shipped_default_model_loads_and_matches_its_manifest():
    from diagnose.tevid import file_sha256 as _sha256

    man = json.loads((DEFAULT_CHECKPOINT / "MANIFEST.json").read_text())
    for name, info in man["files"].items():
        assert _sha256(DEFAULT_CHECKPOINT / name) == info["sha256"], name
    model, cal = load_tevid(DEFAULT_CHECKPOINT)
    assert cal.classes == list(CLASSES) and not model.training
    assert man["test_split"]["event_base_rate"] < man["test_split"]["event_auprc"]  # the AUPRC beside its base rate
    member = getattr(model, "members", [model])[0]  # a seed ensemble's members share one config
    width = member.readouts.n_inputs  # the readout vector it takes: 26 relative scalars (it picks its own), or 8 raw
    s = model.cfg.encoder_overrides.get("img_size", 32)
    with torch.no_grad():
        frames = torch.zeros(1, 10, 6, s, s, dtype=torch.bfloat16) if model.cfg.uses_video else None
        out = model.predict(frames, torch.zeros(1, 10, width), cal.temperature)
    assert torch.isfinite(out["probs"]).all()


# The shipped model's outputs on `synthetic_run(14)` through the live stream (`diagnose.stream.open_stream`):
# (step, probs in CLASSES order, vacuity, anomaly score) of the windows ending at frames 9 .. 13. Any change to the
# weights, the calibration's temperature, the run-relative inputs (capture.relative), the familiarity bank (the vacuity) or
# the window assembly moves them. Recorded when the model was shipped (2026-12-06, seventh shipment: the sixth's pipeline with nine seeds retrained on the corpus with 80 long healthy small-batch runs; sixth: the fifth's members with a bank of the inputs for the vacuity; fifth: the three-seed ensemble reading the run-so-far traces without the activation levels, trained with the corpus's 100 long runs capped at 100 windows a run, calibrated on every window of the 750-run validation split; torch 2.14.1 on a 2-core AMD EPYC VM). One forward pass of a fixed
# input varies across CPUs far below the tolerance, unlike a training run.
PINNED = [
    (90, [0.038549, 0.037818, 0.037829, 0.037818, 0.847986], 0.703101, 0.877616),
    (100, [0.041617, 0.039806, 0.039817, 0.039806, 0.838953], 0.741369, 0.730015),
    (110, [0.012421, 0.012404, 0.950367, 0.012404, 0.012404], 0.739404, 0.95485),
    (120, [0.019165, 0.018082, 0.926589, 0.018082, 0.018082], 0.759001, 0.932042),
    (130, [0.0455, 0.031552, 0.859844, 0.031552, 0.031552], 0.771266, 0.87266),
]


def synthetic_run(frames: int):
    """Seeded inputs of a relative model's stream, one tuple per frame: (step, raw readouts dict in CLIP_READOUTS
    order, levels (6,), pattern (6, 8, 8), the steps' losses since the previous frame, the weights' pace). The loss
    falls, then jumps at frame 11 with the weights' pace; the class count is 10."""
    g = torch.Generator().manual_seed(18)
    scale = torch.tensor([2.0, 1.0, 1.0, 0.05, 1.0, 2.0, 1.0, 3.0])
    out = []
    for t in range(frames):
        readouts = dict(zip(CLIP_READOUTS, (torch.rand(len(CLIP_READOUTS), generator=g) * scale).tolist()))
        loss = 2.3 * math.exp(-0.15 * t) * (4.0 if t >= 11 else 1.0)
        readouts["loss"] = loss
        levels = torch.randn(6, generator=g) * 0.1 - 0.05 * t
        pattern = torch.randn(6, 8, 8, generator=g)
        losses = torch.full((10,), loss) + 0.01 * torch.randn(10, generator=g) if t else torch.tensor([loss])
        out.append((10 * t, readouts, levels, pattern, losses, math.nan if t == 0 else 1e-3 * (8.0 if t >= 11 else 1.0)))
    return out


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="no default model shipped in this checkout")
def test_the_shipped_models_outputs_on_a_fixed_input_are_pinned(one_thread):
    from diagnose.stream import open_stream, trained_cadences

    stream = open_stream(DEFAULT_CHECKPOINT)
    assert stream.window == 10 and stream.relative and trained_cadences(DEFAULT_CHECKPOINT) == (5, 10, 20)
    preds = [stream.push(step, None, r, levels, pattern, 10, losses, ws) for step, r, levels, pattern, losses, ws in synthetic_run(14)]
    assert preds[:9] == [None] * 9  # live windows are causal and unpadded
    got = [(p.step, [round(x, 6) for x in p.probs], round(p.vacuity, 6), round(p.anomaly, 6)) for p in preds[9:]]
    assert len(got) == len(PINNED), got
    for pred, (step, probs, vacuity, anomaly) in zip(preds[9:], PINNED):
        assert pred.step == step
        np.testing.assert_allclose(pred.probs, probs, atol=1e-4)
        assert pred.vacuity == pytest.approx(vacuity, abs=1e-4) and pred.anomaly == pytest.approx(anomaly, abs=1e-4)


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="no default model shipped in this checkout")
def test_the_shipped_model_in_a_live_job_alerts_exactly_where_its_calibrated_rule_says(tmp_path, one_thread):
    """Mechanics, not a claim about what a learned model says about one run (that is the benchmark's, over
    many runs: docs/benchmark/README.md): the demo's LR-spike job with the shipped model gets one prediction
    per frame once a window is full, and its TEViD alerts are exactly those of the calibrated rule replayed
    (`Rule.replay`) over those predictions."""
    from diagnose.demo import DemoConfig, _job, load_digits

    cfg = DemoConfig(steps=150, cadence=10, spike_onset=100, spike_gap=5, seed=1)
    res = _job("lr_spike", cfg, load_digits(cfg.seed), tmp_path, None)
    cal = load_calibration(DEFAULT_CHECKPOINT)
    assert res["tevid"] and res["disabled_reason"] is None and res["monitor"] == f"TEViD from {DEFAULT_CHECKPOINT}"
    preds, window = res["predictions"], 10
    assert [p["step"] for p in preds] == list(range(cfg.cadence * (window - 1), cfg.steps, cfg.cadence))  # frame 9 on
    decisions = cal.rule().replay([[p["probs"][c] for c in cal.classes] for p in preds], [p["vacuity"] for p in preds],
                                  [p["anomaly"] for p in preds])  # the offline replay of the calibrated rule (score mode)
    expected = []
    for p, d in zip(preds, decisions):
        assert list(p["probs"]) == cal.classes and sum(p["probs"].values()) == pytest.approx(1, abs=1e-6)
        assert 0 < p["vacuity"] <= 1
        assert p["label"] == ("unknown" if d.unknown else cal.classes[d.label])
        expected += ([(cal.classes[c], p["step"]) for c in d.new_alerts] + [("unknown", p["step"])] * d.unknown_alert
                     + [("unfamiliar", p["step"])] * d.unfamiliar_alert)
    assert [(a["name"], a["step"]) for a in res["alerts"] if a["source"] == "tevid"] == expected
