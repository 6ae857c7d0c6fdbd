"""Shipping a checkpoint as the default model: files, manifest, load check; and the shipped model itself."""
import dataclasses
import json

import pytest
import torch

from diagnose.calibrate import Calibration, save_calibration
from diagnose.monitor import DEFAULT_CHECKPOINT
from eval.ship import FILES, ship
from diagnose.tevid import TEViD, TEViDConfig, load_tevid
from pretrain.checkpoint import save_checkpoint
from pretrain.clips import CLASSES


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
    from eval.ship import _sha256

    man = json.loads((DEFAULT_CHECKPOINT / "MANIFEST.json").read_text())
    for name, info in man["files"].items():
        assert _sha256(DEFAULT_CHECKPOINT / name) == info["sha256"], name
    model, cal = load_tevid(DEFAULT_CHECKPOINT)
    assert cal.classes == list(CLASSES) and not model.training
    s = model.cfg.encoder_overrides.get("img_size", 32) if hasattr(model, "cfg") else 32
    with torch.no_grad():
        out = model.predict(torch.zeros(1, 10, 6, s, s, dtype=torch.bfloat16), torch.zeros(1, 10, 8), cal.temperature)
    assert torch.isfinite(out["probs"]).all()


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="no default model shipped in this checkout")
def test_the_shipped_model_flags_an_lr_spike_job_and_stays_quiet_on_a_healthy_one(tmp_path, one_thread):
    """Fresh runs (seed 1: the corpus never saw this job) through the live monitor: TEViD raises
    `instability` on the LR-spike job after the first spike and no alert of any class on the healthy job
    (the shipped cpu model did so on demo seeds 0, 1 and 2; docs/benchmark/README.md)."""
    from diagnose.demo import DemoConfig, _job
    from factory.train import cached_dataset

    cfg = DemoConfig(seed=1)
    data = cached_dataset(cfg.dataset, 32, 3000, 256, None)
    spiked = _job("lr_spike", cfg, data, tmp_path, None)
    healthy = _job("healthy", cfg, data, tmp_path, None)
    assert spiked["tevid"] and healthy["tevid"]
    unstable = [a for a in spiked["alerts"] if a["source"] == "tevid" and a["name"] == "instability"]
    assert unstable and unstable[0]["step"] >= cfg.spike_onset
    assert not [a for a in healthy["alerts"] if a["source"] == "tevid"]
