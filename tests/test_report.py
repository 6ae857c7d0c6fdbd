"""The evaluation report (eval/report.py, eval/figures.py) end to end on the smoke corpus, with a
randomly initialised tiny TEViD saved through the checkpoint API and a default calibration."""
import dataclasses
import json
import math

import numpy as np
import pytest

from diagnose.calibrate import Calibration, save_calibration
from diagnose.tevid import TEViD, TEViDConfig
from eval import figures as FIG
from eval.metrics import RunResult
from eval.report import ReportConfig, main as report_main, make_report
from pretrain.checkpoint import save_checkpoint
from pretrain.clips import CLASSES

KEYS = ("event_auprc", "event_auprc_ci", "median_lead_epochs", "far", "detection_rate", "macro_f1", "unknown_auroc",
        "augrc", "cost", "kind")
TINY_VIDEO = "r2plus1d={width: 8, layers: [1, 1, 1, 1], max_steps: 2, batch_size: 4, norm_clips: 8}"


@pytest.fixture(scope="module")
def tevid_checkpoint(tmp_path_factory):
    cfg = TEViDConfig(encoder="tiny", readout_dim=16, hidden_dim=32, dropout=0.0)
    path = save_checkpoint(tmp_path_factory.mktemp("tevid") / "final", model=TEViD(cfg),
                           config={"model": dataclasses.asdict(cfg)}, step=0)
    save_calibration(Calibration.default(len(CLASSES), CLASSES), path)
    return path


def test_report_command_writes_metrics_tables_figures(smoke_corpus, tevid_checkpoint, tmp_path, capsys):
    tuned = tmp_path / "tuned" / "cusum"
    tuned.mkdir(parents=True)
    (tuned / "best.json").write_text(json.dumps({"baseline": "cusum", "params": {"k": 0.7}}))
    out = tmp_path / "report"
    argv = ["--corpus", str(smoke_corpus), "--checkpoint", str(tevid_checkpoint), "--out", str(out),
            "--tuned", str(tmp_path / "tuned"), "methods=[tevid, cusum, head_grad, tcn_scalar, r2plus1d]",
            "n_resamples=200", "tcn={epochs: 2}", TINY_VIDEO]
    assert report_main(argv) == 0
    assert "Table 3" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["tevid", "cusum", "head_grad", "tcn_scalar", "r2plus1d"]
    kinds = {"tevid": "tevid", "cusum": "scalar", "head_grad": "readout", "tcn_scalar": "scalar", "r2plus1d": "video"}
    test_runs = [json.loads(line) for line in (smoke_corpus / "manifest.jsonl").read_text().splitlines()]
    test_runs = [r for r in test_runs if r["split"] == "test"]
    known = [r for r in test_runs if r["injected"] != "novel" and r["label"] not in ("healthy", "underperforming")]
    n_healthy = sum(r["injected"] != "novel" and r["label"] == "healthy" for r in test_runs)
    for name, m in metrics.items():
        assert set(KEYS) <= set(m), (name, set(KEYS) - set(m))
        assert m["kind"] == kinds[name]
        assert 0.0 <= m["far"] <= 1.0 and m["n_runs"] == 4 and m["n_novel"] == 2 and m["n_healthy"] == n_healthy
        # undefined (null) without a known-anomaly run in the test split; the smoke labels decide
        assert (m["event_auprc"] is None) == (not known)
    assert metrics["cusum"]["tuned_params"] == {"k": 0.7} and metrics["head_grad"]["tuned_params"] is None
    assert metrics["tevid"]["threshold_split"] == "calibration" and metrics["tevid"]["rule"]["tau"] == 0.35
    assert 0.0 <= metrics["tevid"]["unknown_auroc"] <= 1.0 and metrics["tevid"]["augrc"] is not None
    # the smoke val split has no Healthy run: score thresholds come from the Healthy train runs
    assert metrics["cusum"]["threshold_split"] == "train" and math.isfinite(metrics["cusum"]["threshold"])
    assert metrics["tcn_scalar"]["macro_f1"] is not None and metrics["cusum"]["macro_f1"] is None
    assert json.loads((out / "config.json").read_text())["tuned"] == str(tmp_path / "tuned")
    tables = (out / "tables.md").read_text()
    assert "Table 3" in tables and "Table 5" in tables and "| arch | mixer | 2 |" in tables
    assert tables.count("\n| ") >= 1 + 5 + 1 + 5  # header rows + 5 methods; factor rows (arch x2, dataset x2, optimizer)
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    for stem in ("risk_coverage", "lead_vs_far", "confusion_tevid", "timeline_tevid_", "head_grad_vs_val_acc"):
        assert any(f.startswith(stem) for f in figs), (stem, figs)
    assert all((out / "figures" / f).stat().st_size > 5000 for f in figs)
    # the video baseline trained here was saved; a second report loads it instead of training again
    saved = metrics["r2plus1d"]["saved_to"]
    assert saved == str(out / "video" / "r2plus1d")
    cfg = ReportConfig(methods=["r2plus1d"], n_resamples=200, figures=False, video_dirs={"r2plus1d": saved},
                       video_checkpoints={"r2plus1d_saved": saved})
    both = make_report(smoke_corpus, tmp_path / "again", cfg, None, progress=False)
    again, extra = both["r2plus1d"], both["r2plus1d_saved"]
    assert again["loaded_from"] == saved and "train" not in again
    assert again["far"] == metrics["r2plus1d"]["far"] and again["threshold"] == pytest.approx(metrics["r2plus1d"]["threshold"])
    assert extra["kind"] == "video" and extra["loaded_from"] == saved  # a second row of the same saved model
    assert extra["event_auprc"] == pytest.approx(again["event_auprc"]) and extra["threshold"] == pytest.approx(again["threshold"])


def test_report_on_a_split_with_anomalies(smoke_corpus, tevid_checkpoint, tmp_path):
    """Scored on the train split (a healthy and an instability run): AUPRC and its interval are defined."""
    cfg = ReportConfig(methods=["tevid", "cusum"], test_split="train", n_resamples=200, figures=False,
                       tevid_checkpoints={"tevid_scratch": str(tevid_checkpoint)})
    m = make_report(smoke_corpus, tmp_path, cfg, tevid_checkpoint, progress=False)
    assert list(m) == ["tevid", "cusum", "tevid_scratch"] and m["tevid_scratch"]["kind"] == "tevid"
    assert m["tevid_scratch"]["event_auprc"] == m["tevid"]["event_auprc"]  # the same checkpoint twice
    for name in ("tevid", "cusum"):
        s = m[name]
        assert 0.0 < s["event_auprc"] <= 1.0 and s["n_anomalous"] == 1 and s["n_healthy"] == 1
        assert s["detection_rate"] in (0.0, 1.0) and s["cost"] >= -100
        assert len(s["event_auprc_ci"]) == 2
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["cusum"]["event_auprc"] == pytest.approx(m["cusum"]["event_auprc"])
    # every TEViD row is tested against the best baseline on the same runs
    assert saved["tevid"]["paired_vs_best_baseline"]["baseline"] == "cusum"
    assert saved["tevid"]["paired_vs_best_baseline"]["difference"] == pytest.approx(m["tevid"]["event_auprc"] - m["cusum"]["event_auprc"])


def test_hold_scores_frames_by_the_alert_level_so_far(smoke_corpus, tmp_path):
    """hold=true: the AUPRC ranks every frame by the run's alert level so far (eval.metrics.held_scores); the
    alerts, FAR and detection are those of the frame's own score."""
    from eval import metrics as M
    from eval.baselines import make_baseline
    from eval.replay import load_runs, replay_runs

    plain, held = (make_report(smoke_corpus, tmp_path / str(h), ReportConfig(methods=["cusum"], test_split="train", n_resamples=50,
                                                                                figures=False, hold=h), progress=False)["cusum"]
                   for h in (False, True))
    assert (held["far"], held["detection_rate"], held["threshold"]) == (plain["far"], plain["detection_rate"], plain["threshold"])
    raw = replay_runs(load_runs(smoke_corpus, "train", progress=False), make_baseline("cusum"), progress=False)
    want = M.event_auprc([dataclasses.replace(r, score=M.held_scores(r.score, 3)) for r in raw])
    assert held["event_auprc"] == pytest.approx(want) and plain["event_auprc"] == pytest.approx(M.event_auprc(raw))
    assert held["score"] == "held (3 frames)" and "hold=true" in (tmp_path / "True" / "tables.md").read_text()


def test_seed_groups_are_reported_as_mean_and_sd(smoke_corpus, tevid_checkpoint, tmp_path):
    cfg = ReportConfig(methods=["tevid", "cusum"], test_split="train", n_resamples=100, figures=False,
                       tevid_checkpoints={"tevid_s1": str(tevid_checkpoint)}, seed_groups={"tevid_seeds": ["tevid", "tevid_s1"]})
    m = make_report(smoke_corpus, tmp_path, cfg, tevid_checkpoint, progress=False)
    group = json.loads((tmp_path / "comparison.json").read_text())["seed_groups"]["tevid_seeds"]
    assert group["n"] == 2 and group["event_auprc"]["mean"] == pytest.approx(m["tevid"]["event_auprc"])
    assert group["event_auprc"]["sd"] == 0.0  # the same checkpoint twice
    assert m["tevid_s1"]["seed_group"] == "tevid_seeds" and "Seed group `tevid_seeds`" in (tmp_path / "tables.md").read_text()
    with pytest.raises(ValueError, match="seed_groups"):
        ReportConfig(methods=["tevid", "cusum"], seed_groups={"g": ["tevid", "cusum"]})  # a baseline is no seed


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        ReportConfig(methods=["tevid", "lstm"])
    with pytest.raises(ValueError, match="taken by methods"):
        ReportConfig(tevid_checkpoints={"cusum": "x"})
    with pytest.raises(ValueError, match="video_checkpoints: names \\['r2plus1d'\\] are taken"):
        ReportConfig(video_checkpoints={"r2plus1d": "x"})
    with pytest.raises(ValueError, match="in both"):
        ReportConfig(tevid_checkpoints={"a": "x"}, video_checkpoints={"a": "y"})


def _run(run_id, label, novel=False, alerts=(), onset=None, n=6):
    return RunResult(run_id, label, novel, onset, None if label in ("healthy", None) else 40, 10.0,
                     np.arange(n) * 10, np.zeros(n), alerts=list(alerts))


def test_confusion_counts_by_hand():
    runs = [_run("h0", "healthy"), _run("h1", "healthy", alerts=[(20, "instability")]),
            _run("a0", "instability", onset=20, alerts=[(10, "forgetting"), (30, "instability")]),
            _run("a1", "forgetting", onset=20, alerts=[(30, "anomaly")]), _run("a2", "overfitting", onset=0),
            _run("n0", "healthy", novel=True, onset=20), _run("n1", "healthy", novel=True, onset=20)]
    unknown = {"n1": np.array([0, 0, 1, 1, 1, 0], bool), "n0": np.array([1, 1, 0, 0, 0, 0], bool)}
    cm = FIG.confusion_counts(runs, unknown)
    row, col = FIG.TRUE_ROWS.index, FIG.PRED_COLS.index
    assert cm[row("healthy"), col("healthy")] == 1 and cm[row("healthy"), col("instability")] == 1
    assert cm[row("instability"), col("instability")] == 1  # the pre-onset alert does not count
    assert cm[row("forgetting"), col("other")] == 1 and cm[row("overfitting"), col("healthy")] == 1
    assert cm[row("novel"), col("unknown")] == 1 and cm[row("novel"), col("healthy")] == 1  # n0 abstains before onset only
    assert cm.sum() == len(runs)


def test_per_class_table_by_hand():
    from eval.tables import table_by_class

    def scored(run_id, label, score, alerts=(), probs=True):
        n = len(score)
        p = np.tile(np.eye(len(CLASSES))[0], (n, 1)) if probs else None
        return RunResult(run_id, label, False, 0 if label != "healthy" else None, None if label == "healthy" else 40, 10.0,
                         np.arange(n) * 10, np.array(score, float), probs=p, alerts=list(alerts))

    # instability frames all score above the healthy ones: AUPRC 1; one of two runs alerted, naming the class
    runs = [scored("h0", "healthy", [0.1] * 6), scored("h1", "healthy", [0.2] * 6),
            scored("i0", "instability", [0.9] * 6, [(20, "instability")]), scored("i1", "instability", [0.8] * 6),
            scored("f0", "forgetting", [0.0] * 6, [(30, "overfitting")])]
    table = table_by_class({"m": runs})
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {"forgetting", "instability"}
    assert "| 2 | 1.000 (" in rows["instability"] and " / 0.500 / 0.500 |" in rows["instability"]
    assert " / 1.000 / 0.000 |" in rows["forgetting"]  # detected, but named overfitting
    no_probs = table_by_class({"m": [scored("h0", "healthy", [0.1] * 6, probs=False),
                                     scored("i0", "instability", [0.9] * 6, probs=False)]})
    assert no_probs.rstrip().endswith("/ 0.000 / – |")


def test_healthy_by_factor_table_by_hand():
    """One family's healthy runs score like the anomalies: its FAR is 1 and the split's AUPRC without them is 1."""
    from eval.tables import table_healthy_by_factor

    def scored(run_id, label, score, alerts=()):
        return RunResult(run_id, label, False, 0 if label != "healthy" else None, None if label == "healthy" else 40, 10.0,
                         np.arange(len(score)) * 10, np.array(score, float), alerts=list(alerts))

    runs = [scored("h_a", "healthy", [0.1] * 6), scored("h_b", "healthy", [0.9] * 6, [(20, "instability")]),
            scored("i_a", "instability", [0.8] * 6, [(20, "instability")])]
    info = {"h_a": {"arch": "a", "dataset": "d", "optimizer": "o"}, "h_b": {"arch": "b", "dataset": "d", "optimizer": "o"},
            "i_a": {"arch": "a", "dataset": "d", "optimizer": "o"}}
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table_healthy_by_factor({"m": runs}, info).splitlines()[2:]}
    assert set(rows) == {("arch", "a"), ("arch", "b"), ("dataset", "d"), ("optimizer", "o")}
    assert rows[("arch", "b")].endswith("| 1 | 1.000 / 1.000 |")  # b's healthy run alarms; without it the ranking is perfect
    # without a's quiet run, b's 6 frames outrank the anomaly's 4 positive ones (from trigger - 2 epochs): AP 4 / 10
    assert rows[("arch", "a")].endswith("| 1 | 0.000 / 0.400 |")
    assert rows[("dataset", "d")].endswith("| 2 | 0.500 / 1.000 |")  # only the anomaly's scored frames are left
    assert table_healthy_by_factor({"m": [runs[2]]}, info) == "(no Healthy run in the test split)"


def test_missed_table_by_hand():
    """A missed run's row gives the score it held for 3 frames from its onset; detected runs have no row."""
    from eval.tables import table_missed

    def scored(run_id, label, score, onset=0, alerts=()):
        return RunResult(run_id, label, False, onset, 40, 10.0, np.arange(len(score)) * 10, np.array(score, float),
                         alerts=list(alerts))

    runs = [scored("near", "instability", [0.99, 0.9, 0.8, 0.9, 0.7, 0.2], onset=10),  # 0.99 is before the onset
            scored("caught", "forgetting", [0.9] * 6, alerts=[(20, "forgetting")]),
            scored("short", "overfitting", [0.5, 0.6])]
    info = {k: {"arch": "a"} for k in ("near", "caught", "short")}
    table = table_missed(runs, info, {"near": "instability_lr"}, 3, 0.95)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"near", "short"}
    assert rows["near"] == "| near | instability | instability_lr | a | 5 | 0.800 | 0.950 |"
    assert rows["short"] == "| short | overfitting | - | a | 2 | – | 0.950 |"  # fewer frames than a streak
    assert table_missed(runs[1:2], info, {}, 3, None) == "(every known-anomaly run was detected)"


def test_table17_unknown_auroc_per_novel_type_by_hand():
    """Each novel type's Unknown AUROC against every non-novel run: a type whose vacuity is above every known
    frame's scores 1, one whose vacuity ties the known frames' 0.5; without vacuity the column is "–"."""
    from eval.tables import table17

    def run(run_id, label, novel, vacuity, onset=None):
        n = len(vacuity)
        return RunResult(run_id, label, novel, onset, None if label == "healthy" else 40, 10.0, np.arange(n) * 10,
                         np.zeros(n), vacuity=np.array(vacuity, float))

    runs = [run("h0", "healthy", False, [0.2] * 6), run("a0", "instability", False, [0.2] * 6, onset=0),
            run("seen", "healthy", True, [0.2, 0.9, 0.9, 0.9, 0.9, 0.9], onset=10),
            run("unseen", "healthy", True, [0.2] * 6, onset=10)]
    table = table17(runs, None, {"seen": "fp16_overflow", "unseen": "frozen_layers"})
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert rows["fp16_overflow"].endswith("| 1.000 |") and rows["frozen_layers"].endswith("| 0.500 |")
    no_vacuity = [dataclasses.replace(r, vacuity=None) for r in runs]
    assert all(line.endswith("| – |") for line in table17(no_vacuity, None, {"seen": "a"}).splitlines()[2:])


def test_pareto_front_by_hand():
    far = np.array([0.0, 0.0, 0.1, 0.2, 0.3, 0.5])
    lead = np.array([-2.0, -1.0, -1.5, 0.5, 0.2, 1.0])
    f, l = FIG.pareto_front(far, lead)
    assert f.tolist() == [0.0, 0.2, 0.5] and l.tolist() == [-1.0, 0.5, 1.0]
