"""The monitor overhead command (diagnose/overhead.py) at tiny settings: output structure, and that every
mode really ran (frames in the capture modes, TEViD predictions in the TEViD mode). No timing assertions."""
import json

import pytest

from diagnose.overhead import MODES, OverheadConfig, main, run


def test_every_mode_runs_and_the_outputs_have_their_structure(tmp_path, one_thread):
    cfg = OverheadConfig(cadence=2, steps=4, rounds=2, checkpoint="tiny", warmup_steps=2, profile_steps=4)
    res = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert saved["config"]["cadence"] == 2 and saved["modes"].keys() == set(MODES)
    assert "tiny TEViD built from scratch" in saved["checkpoint"]
    for mode, done in res["modes"].items():
        assert done["blocks"] == cfg.rounds and done["disabled"] == [], (mode, done)
        assert len(res["ms_per_step"][mode]["wall"]) == len(res["ms_per_step"][mode]["cpu"]) == cfg.rounds
    for mode in ("capture", "monitor", "monitor + TEViD"):  # 2 frames per block of 4 steps at cadence 2
        assert res["modes"][mode]["frames"] == cfg.rounds * cfg.steps // cfg.cadence
        for kind in ("wall", "cpu", "robust_cpu"):
            q = res["ratios"][kind][mode]
            assert 0 < q["min"] <= q["median"] <= q["max"]
    # the window was filled before timing: TEViD predicted at every timed frame, and only in its mode
    tevid = res["modes"]["monitor + TEViD"]
    assert tevid["tevid_predictions"] == tevid["frames"] > 0
    assert res["modes"]["monitor"]["tevid_predictions"] == 0 and "plain" not in res["ratios"]["cpu"]
    md = (tmp_path / "overhead.md").read_text()
    assert "shared" in md and all(f"| {m} |" in md for m in MODES[1:])
    prof = res["profile"]  # 4 profiled steps of the TEViD mode, 2 of them frames
    assert prof["mode"] == "monitor + TEViD" and prof["frames"] == 2
    funcs = prof["functions"]
    assert funcs["monitor: optimizer step hook (all its work)"]["calls"] == 4
    assert funcs["monitor: TEViD window + decision"]["calls"] == 2 and "cProfile over 4 steps" in md


def test_cli_without_tevid_and_bad_settings(tmp_path, capsys, one_thread):
    assert main(["--out", str(tmp_path), "--cadence", "1", "--steps", "2", "--rounds", "1", "--checkpoint", "none"]) == 0
    out = capsys.readouterr().out
    assert "| monitor |" in out and "monitor + TEViD |" not in out and "TEViD checkpoint: none" in out
    assert set(json.loads((tmp_path / "overhead.json").read_text())["modes"]) == {"plain", "capture", "monitor"}
    with pytest.raises(ValueError, match="multiple of cadence"):
        OverheadConfig(cadence=50, steps=120)
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
