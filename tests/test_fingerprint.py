"""The fingerprint probe (eval.fingerprint) runs on a real corpus and reports each view against chance."""
import json

import pytest

from eval.fingerprint import TARGETS, fingerprint, main, table, window_ends


def test_window_ends_are_complete_windows():
    assert window_ends(5, 10, 6) == []
    assert window_ends(30, 10, 3) == [9, 19, 29]
    assert window_ends(10, 10, 6) == [9]


def test_probe_on_the_smoke_corpus(smoke_corpus, tmp_path):
    result = fingerprint(smoke_corpus, splits=("train", "val", "test"), window=3, per_run=3, folds=2, progress=False)
    assert result["runs"] >= 2 and result["windows"] >= 2 * result["runs"] - 1
    for t in TARGETS:
        row = result["targets"][t]
        assert 0 < row["chance"] <= 1 and row["uniform"] == pytest.approx(1 / row["classes"], abs=1e-4)
        for view in ("raw", "relative", "relative_patterns", "relative_scalars"):
            assert 0.0 <= row[view]["accuracy"] <= 1.0
            assert row[view]["x_chance"] == pytest.approx(row[view]["accuracy"] / row["chance"], abs=0.01)
    assert "| family |" in table(result)
    assert main(["--corpus", str(smoke_corpus), "--out", str(tmp_path), "--splits", "train", "val", "test",
                 "--window", "3", "--windows-per-run", "2", "--folds", "2"]) == 0
    assert json.loads((tmp_path / "fingerprint.json").read_text())["folds"] == 2


def test_too_few_runs_is_refused(smoke_corpus):
    with pytest.raises(ValueError, match="healthy runs"):
        fingerprint(smoke_corpus, splits=("val",), folds=50, progress=False)


def test_a_relative_model_reads_its_whole_inputs_while_the_view_pools_each_frames_own(smoke_corpus):
    """A model reading the history traces gets its full relative scalars; the `relative_scalars` view stays the
    frame's own scalars (mean and last), so the probe's input columns mean the same with or without traces."""
    from capture.relative import FRAME_FEATURES
    from capture.store import RunStore
    from diagnose.tevid import TEViD, TEViDConfig
    from eval.fingerprint import run_views
    from pretrain.clips import corpus_runs

    record = corpus_runs(smoke_corpus, "train")[0]
    store = RunStore(smoke_corpus / record["store"])
    model = TEViD(TEViDConfig(inputs="readouts", representation="relative", weight_step=True, history=True)).eval()
    views = run_views(store, 3, [2, 3], model)
    assert views["tevid"].shape == (2, model.cfg.readout_dim)
    assert views["relative_scalars"].shape == (2, 2 * len(FRAME_FEATURES))

