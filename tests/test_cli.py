"""The README's main command at tiny scale, and the shared config loader (docs/architecture.md §11)."""
import json
import runpy
import sys
from dataclasses import dataclass, field

import pytest

from capture.config import ConfigError, load_config
from capture.recorder import CaptureConfig
from capture.store import RunStore


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    monkeypatch.setattr(sys, "argv", ["capture.demo", "--out", str(out), "steps=25", "capture.cadence=5", "capture.frame_size=16"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("capture.demo", run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "frames: (5, 6, 16, 16) torch.bfloat16" in printed and "run store:" in printed
    store = RunStore(out / "demo_run.zarr")
    assert len(store) == 5 and len(store.train_loss()) == 25
    assert json.loads((out / "config.json").read_text())["capture"]["cadence"] == 5


@dataclass
class Inner:
    depth: int = 2
    name: str = "x"


@dataclass
class Outer:
    lr: float = 0.1
    model: Inner = field(default_factory=Inner)
    capture: CaptureConfig = field(default_factory=CaptureConfig)


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.5\nmodel:\n  name: y\n")
    cfg = load_config(Outer, f, ["model.depth=4", "capture.cadence=10"])
    assert cfg.lr == 0.5 and cfg.model == Inner(4, "y") and cfg.capture.cadence == 10


def test_unknown_keys_are_errors_that_list_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['dept'\]; valid keys: \['depth', 'name'\]"):
        load_config(Outer, None, ["model.dept=3"])
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(Outer, f)
    with pytest.raises(ConfigError, match="cadence must be >= 1"):
        load_config(Outer, None, ["capture.cadence=0"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_yaml_exponent_without_a_dot_is_a_float(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 3e-4\n")  # YAML 1.1 (PyYAML) reads this as the string "3e-4"
    assert load_config(Outer, f).lr == pytest.approx(3e-4)
    assert load_config(Outer, None, ["lr=1e-3"]).lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"lr: expected a number, got 'fast'"):
        load_config(Outer, None, ["lr=fast"])
