"""Hyperband with and without detectors (eval/hpo.py; paper App. M): three real optuna studies at tiny
settings, a forced-unstable first trial pruned by each detector and recorded as such, the output files."""
import json

import optuna
import pytest

from diagnose.monitor import DEFAULT_CHECKPOINT
from eval.baselines.cusum import CusumConfig
from eval.hpo import ARMS, CusumAlarm, HPOConfig, main, resolve_checkpoint


def test_cusum_alarm_confirms_after_consecutive_frames():
    alarm = CusumAlarm(threshold=18.0, cfg=CusumConfig(k=0.5), cadence=2, consecutive=3)
    fired = [alarm.update(2.0 - 0.01 * s) for s in range(20)]  # a smoothly decreasing loss: no alarm
    assert not any(fired)
    fired = [alarm.update(float("nan")) for _ in range(10)]  # each non-finite loss adds z_clip - k = 9.5
    # steps 20..29; frames at even steps; the statistic passes 18 at step 21, so frames 22, 24, 26 are above
    assert fired.index(True) == 6 and sum(fired) == 1


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="arms"):
        HPOConfig(arms=["hyperband", "asha"])
    with pytest.raises(ValueError, match="prune_on"):
        HPOConfig(prune_on=["instabilty"])
    with pytest.raises(ValueError, match="enqueue_lr"):
        HPOConfig(enqueue_lr=[100.0])
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_checkpoint("/nonexistent/tevid")
    assert resolve_checkpoint("none") is None


def test_defaults_are_the_shipped_model_and_the_benchmark_cusum():
    """No developer-local path or uncommitted report: the monitor loads the shipped model, CUSUM runs at
    the operating point of the committed benchmark report."""
    import json
    from pathlib import Path

    expected = str(DEFAULT_CHECKPOINT) if (DEFAULT_CHECKPOINT / "config.json").is_file() else None
    assert resolve_checkpoint(HPOConfig().checkpoint) == expected
    bench = json.loads((Path(__file__).resolve().parents[1] / "docs" / "benchmark" / "issue7" / "metrics.json").read_text())["cusum"]
    cfg = HPOConfig()
    assert cfg.cusum_threshold == bench["threshold"] and bench["threshold_split"] == "val"
    tuned = {**{k: v for k, v in bench["tuned_params"].items() if "." not in k},
             "residuals": {k.split(".")[1]: v for k, v in bench["tuned_params"].items() if "." in k}}
    assert {k: getattr(cfg.cusum, k) for k in tuned if k != "residuals"} == {k: v for k, v in tuned.items() if k != "residuals"}
    assert {k: getattr(cfg.cusum.residuals, k) for k in tuned["residuals"]} == tuned["residuals"]


def test_three_studies_and_detector_pruning(tmp_path, capsys, one_thread):
    out = tmp_path / "hpo"
    # trial 0 of every arm gets lr 1000: its loss explodes within 3 steps and is NaN from step 5 on; the
    # rules see exploding gradients at step 2, CUSUM (z = 10 per NaN step) confirms at the frame of step 10
    assert main(["--out", str(out), "--trials", "3", "--epochs", "2", "--checkpoint", "none", "--seed", "1",
                 "epoch_steps=16", "cadence=2", "max_train=256", "max_val=64", "lr_max=1000", "enqueue_lr=[1000]"]) == 0
    printed = capsys.readouterr().out
    assert "| hyperband+tevid |" in printed and "rule symptoms only" in printed
    for name in ("config.json", "hpo.json", "hpo.md"):
        assert (out / name).is_file()
    result = json.loads((out / "hpo.json").read_text())
    assert list(result["arms"]) == list(ARMS) and result["checkpoint"] is None
    assert result["config"]["seed"] == 1 and result["config"]["trials"] == 3

    for arm, how in [("hyperband+tevid", "monitor"), ("hyperband+cusum", "cusum")]:
        trials = result["arms"][arm]["trials"]
        assert len(trials) == 3
        forced = trials[0]
        assert forced["params"]["lr"] == 1000 and forced["state"] == "PRUNED" and forced["pruned_by"] == how
        assert forced["epochs_run"] < 1 and forced["val_acc"] == []  # stopped inside its first epoch
        summary = result["arms"][arm]["summary"]
        assert summary["pruned_detector"] >= 1 and summary["trials"] == 3
    forced = result["arms"]["hyperband+tevid"]["trials"][0]
    assert forced["pruned_on"]["name"] in ("nan_inf", "exploding_gradients") and forced["pruned_on"]["source"] == "rule"
    assert forced["pruned_on"] in [{k: a[k] for k in ("name", "step", "source")} for a in forced["alerts"]]
    # Hyperband alone cannot prune the first trial of a bracket: it trains the whole budget, at chance
    plain = result["arms"]["hyperband"]["trials"][0]
    assert plain["state"] == "COMPLETE" and plain["epochs_run"] == 2 and plain["pruned_by"] is None
    assert result["arms"]["hyperband"]["summary"]["pruned_detector"] == 0
    # same seed and space: the trials no detector stopped got the same suggestions in every arm
    assert len({json.dumps(result["arms"][a]["trials"][0]["params"]) for a in ARMS}) == 1
    assert "| hyperband | 3 |" in (out / "hpo.md").read_text()


@pytest.fixture
def always_unstable_tevid(tmp_path):
    """A random tiny TEViD saved as fine-tuning saves it (window 4) whose calibration makes "instability"
    fire at its 3rd window (threshold 0) and nothing else (thresholds 1, tau 1)."""
    import dataclasses

    import torch

    from diagnose.calibrate import Calibration, save_calibration
    from diagnose.tevid import TEViD, TEViDConfig
    from pretrain.checkpoint import save_checkpoint
    from capture.schema import CLASSES

    torch.manual_seed(0)
    cfg = TEViDConfig(encoder="tiny", encoder_overrides={"depth": 1}, readout_dim=8, hidden_dim=16)
    path = save_checkpoint(tmp_path / "tevid" / "final", model=TEViD(cfg),
                           config={"model": dataclasses.asdict(cfg), "data": {"window": 4}}, step=0)
    save_calibration(Calibration(list(CLASSES), [1.0, 0.0, 1.0, 1.0], 1.0, 1.0, 3), path)
    return path


def test_tevid_alert_prunes_with_a_checkpoint(tmp_path, always_unstable_tevid, one_thread):
    from eval.hpo import run

    cfg = HPOConfig(trials=1, epochs=2, epoch_steps=6, cadence=1, max_train=128, max_val=32,
                    checkpoint=str(always_unstable_tevid), arms=["hyperband+tevid"])
    result = run(cfg, tmp_path / "out")
    assert result["checkpoint"] == str(always_unstable_tevid) and result["monitor_mode"].startswith("TEViD")
    (trial,) = result["arms"]["hyperband+tevid"]["trials"]
    # frames at every step; windows of 4 from frame 3; the 3rd window (frame 5) confirms: pruned after step 6
    assert trial["state"] == "PRUNED" and trial["pruned_by"] == "monitor" and trial["steps"] == 6
    assert trial["pruned_on"] == {"name": "instability", "step": 5, "source": "tevid"}
    assert {"name": "instability", "step": 5, "source": "tevid"} in trial["alerts"]
    assert trial["monitor_disabled"] is None and result["optuna"] == optuna.__version__
