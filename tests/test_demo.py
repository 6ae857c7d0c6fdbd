"""The README's main command (`python -m diagnose.demo`) end to end at tiny scale."""
import json

from diagnose.demo import main


def test_demo_runs_both_jobs_and_writes_the_timeline(tmp_path, one_thread):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "steps=150", "cadence=10", "spike_onset=100", "spike_gap=5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    jobs = {j["job"]: j for j in summary["jobs"]}
    assert set(jobs) == {"healthy", "lr_spike"}
    assert all(j["disabled_reason"] is None and 0 <= j["final_val_acc"] <= 1 for j in jobs.values())
    # x50 learning-rate bursts on a model that has started to learn are loss spikes the rule sees
    assert any(a["name"] == "loss_spike" and a["step"] >= 100 for a in jobs["lr_spike"]["alerts"])
    assert (out / "timeline.png").stat().st_size > 10_000
    assert (out / "healthy" / "monitor.json").exists()
