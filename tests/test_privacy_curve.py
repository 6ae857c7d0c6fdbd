"""The privacy-utility curve (`python -m eval.privacy_curve`) at tiny scale: real jobs under the
monitor with the shipped TEViD, a no-DP arm and a DP arm; epsilon is opacus's over the releases made."""
import json
import math

import pytest

from eval.privacy_curve import main
from test_monitor_dp import direct_epsilon

TINY = ["steps=60", "cadence=5", "seeds=1", "perturbations=[healthy,instability_spike]", "noise_multipliers=[2.0]",
        "n_resamples=50"]


def test_curve_runs_both_arms_and_accounts_the_releases(tmp_path, one_thread, monkeypatch):
    monkeypatch.delenv("TEVID_DEFAULT_CHECKPOINT", raising=False)
    out = tmp_path / "curve"
    assert main(["--out", str(out), *TINY]) == 0
    report = json.loads((out / "curve.json").read_text())
    plain, clipped, private = report["arms"]
    assert plain["noise_multiplier"] is None and math.isinf(plain["epsilon"]) and plain["releases"] == 0
    assert clipped["noise_multiplier"] == 0 and math.isinf(clipped["epsilon"]) and clipped["releases"] == 12
    assert private["noise_multiplier"] == 2.0 and private["jobs"] == plain["jobs"] == 2
    # 60 steps at cadence 5: 12 frames, each one release of the capture batch (q = 32 / training samples)
    assert private["releases"] == 12 and 0 < private["sample_rate"] < 0.05
    assert private["epsilon"] == pytest.approx(direct_epsilon(2.0, private["sample_rate"], 12, 1e-5), rel=1e-6)
    jobs = [json.loads(line) for line in (out / "jobs.jsonl").read_text().splitlines()]
    assert len(jobs) == 6 and {j["noise_multiplier"] for j in jobs} == {None, 0.0, 2.0}
    assert all(len(j["frames"]) == 3 for j in jobs)  # 12 frames, a window of 10: 3 predictions per job
    for arm in (plain, clipped, private):
        assert arm["disabled"] == 0 and 0 <= arm["event_auprc"] <= 1
        assert arm["event_auprc_ci"][0] <= arm["event_auprc"] + 1e-9 <= arm["event_auprc_ci"][1] + 2e-9
    assert (out / "curve.png").stat().st_size > 5_000
    assert "no DP" in (out / "curve.md").read_text() and "clip only" in (out / "curve.md").read_text()


@pytest.mark.parametrize("preset,problem", [("overfit", "subset"), ("label_noise", "novel")])
def test_presets_the_curve_cannot_score_are_refused_before_any_job(tmp_path, preset, problem):
    with pytest.raises(ValueError, match=problem):
        main(["--out", str(tmp_path / "x"), f"perturbations=[healthy,{preset}]"])
    assert not (tmp_path / "x").exists()
