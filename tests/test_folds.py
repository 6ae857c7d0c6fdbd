"""eval.folds: two sets of fold models scored on the held-out runs both have (by hand, no model)."""
import json

import pytest

from diagnose.calibrate import Calibration, save_calibration
from eval.folds import compare, main

CLASSES = ["healthy", "overfitting", "instability", "forgetting", "concept_bias"]


def _fold(directory, runs: dict[str, tuple[str, list[float], int | None]]):
    """A fine-tuning output: `runs` maps run id -> (label, anomaly score per window, onset window or None)."""
    records = []
    for run_id, (label, scores, onset) in runs.items():
        cls = CLASSES.index(label)
        for t, score in enumerate(scores):
            target = cls if onset is not None and t >= onset else 0
            alpha = [1.0] * len(CLASSES)
            alpha[target if score > 0.5 else 0] = 50.0  # a confident class head: the alarm's kind is the target's
            records.append({"run_id": run_id, "label": label, "end_frame": 9 + t, "target": target, "novel": False,
                            "alpha": alpha, "anomaly": score})
    (directory / "final").mkdir(parents=True)
    (directory / "val_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_calibration(Calibration(CLASSES, [0.9] * 4, 1.0, 0.9, 3, {}, 0.8), directory / "final")


def test_only_the_runs_both_held_out_are_scored(tmp_path):
    quiet, loud = [0.1] * 8, [0.1] * 3 + [0.99] * 5
    _fold(tmp_path / "before/fold0", {"h0": ("healthy", quiet, None), "a0": ("instability", loud, 3),
                                      "h_only_before": ("healthy", loud, None)})
    _fold(tmp_path / "after/fold0", {"h0": ("healthy", quiet, None), "a0": ("instability", quiet, 3),
                                     "h_only_after": ("healthy", loud, None)})
    result = compare(tmp_path / "before", tmp_path / "after", [0])
    fold = result["folds"][0]
    assert (fold["runs"], fold["only_before"], fold["only_after"]) == (2, 1, 1)
    assert fold["before"]["detected"] == 1 and fold["after"]["detected"] == 0 and fold["after"]["anomalous"] == 1
    assert fold["before"]["far"] == 0 and fold["after"]["far"] == 0  # the alarming healthy runs are each in one fold only
    assert fold["before"]["run_macro_f1"] > fold["after"]["run_macro_f1"]
    assert result["pooled"]["before"]["detection"] == 1.0 and result["pooled"]["after"]["detection"] == 0.0


def test_errors_name_the_missing_file_and_disjoint_folds(tmp_path, capsys):
    _fold(tmp_path / "a/fold0", {"x": ("healthy", [0.1] * 4, None)})
    _fold(tmp_path / "b/fold0", {"y": ("healthy", [0.1] * 4, None)})
    with pytest.raises(ValueError, match="no run in common"):
        compare(tmp_path / "a", tmp_path / "b", [0])
    assert main(["--before", str(tmp_path / "a"), "--after", str(tmp_path / "c")]) == 2
    assert "c/fold0/val_predictions.jsonl not found" in capsys.readouterr().err


def test_a_fold_without_healthy_runs_has_no_far(tmp_path):
    from eval.folds import table

    loud = [0.1] * 3 + [0.99] * 5
    for side in ("before", "after"):
        _fold(tmp_path / side / "fold0", {"a0": ("instability", loud, 3)})
    result = compare(tmp_path / "before", tmp_path / "after", [0])
    assert result["folds"][0]["before"]["far"] is None and result["pooled"]["after"]["far"] is None
    assert table(result).splitlines()[-1].endswith("| mean – / – |")
