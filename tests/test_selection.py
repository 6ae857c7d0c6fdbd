"""Label-free selection: EMA against pandas, scripted sequences for checkpoint selection and GWA early
stopping (offline and streaming), tuning, and the corpus measurement on a tiny synthetic corpus."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from capture.readouts import READOUT_NAMES
from capture.recorder import Frame
from capture.store import RunWriter
from diagnose.selection import (GWAStopper, RunReadouts, ema, gwa_gap, gwa_stop, main, streaming_gwa, mean_gap, select_checkpoint,
                                selected_accuracy, selection_gap, tail_start, tune_selection)


@pytest.mark.parametrize("span", [1, 2, 3, 9])
def test_ema_matches_pandas_including_nan(span):
    x = np.array([np.nan, 1, 2, np.nan, 5, 3, np.nan, np.nan, 0, 1, 7, -2.0])
    expected = x if span <= 1 else pd.Series(x).ewm(span=span).mean().to_numpy()
    np.testing.assert_allclose(ema(x, span), expected, equal_nan=True)


def test_tail_window_sizes():
    assert tail_start(30, 80 / 300) == 22  # the last 8 of 30 frames
    assert tail_start(30, 1.0) == 0 and tail_start(30, 0.01) == 29 and tail_start(10, 0.5) == 5
    with pytest.raises(ValueError, match="tail_frac"):
        tail_start(10, 0.0)


def test_select_checkpoint_argmin_inside_tail():
    steps = np.arange(10) * 10
    score = np.array([0.0, 5, 5, 5, 5, 5, 4, 1, 3, 2])  # global min at step 0 lies outside the tail
    assert select_checkpoint(steps, score, span=1, tail_frac=0.5) == 70
    assert select_checkpoint(steps, score, span=1, tail_frac=1.0) == 0
    # the EMA smooths a one-frame dip away: with span 9 the late frames win
    spiky = np.array([9, 9, 9, 9, 9, 0.0, 9, 5, 5, 5])
    assert select_checkpoint(steps, spiky, span=1, tail_frac=0.6) == 50
    assert select_checkpoint(steps, spiky, span=9, tail_frac=0.6) != 50


def test_select_checkpoint_nan_and_errors():
    steps = np.arange(5) * 10
    assert select_checkpoint(steps, np.full(5, np.nan), 3, 0.5) == 40  # nothing finite: keep the last
    assert select_checkpoint(steps, np.array([3, 1, np.nan, 2, np.nan]), 1, 1.0) == 10
    with pytest.raises(ValueError, match="entries"):
        select_checkpoint(steps, np.ones(4), 3, 0.5)
    with pytest.raises(ValueError, match="at least one frame"):
        select_checkpoint([], [], 3, 0.5)


def test_gwa_stop_warmup_and_finetune():
    steps = np.arange(20) * 10  # total 190: warm-up excludes steps < 19
    gwa = np.array([50.0] + [float(v) for v in range(1, 20)])
    gwa[12:] = 2.0  # peak at index 11
    assert gwa_stop(steps, gwa) == 110  # the early spike at step 0 is inside the warm-up
    assert gwa_stop(steps, gwa, warmup_frac=0.0) == 0
    ft = np.array([5, 4, 3, 2, 1, 2, 3, 4, 3, 2.0] * 2)  # fine-tuning: dip, rise, dip, rise
    ft[:3] = [9, 9, 9]
    # plain rule: the global max after warm-up; fine-tuning rule: the max after the minimum
    s = np.arange(20) * 10
    assert gwa_stop(s, ft, warmup_frac=0.0) == 0
    lo = int(np.argmin(ft))
    expected = s[lo + int(np.argmax(ft[lo:]))]
    assert gwa_stop(s, ft, warmup_frac=0.0, finetune=True) == expected
    assert gwa_stop(s, np.full(20, np.nan)) == 190


SCRIPTED = [
    [0.1, 0.2, 0.5, 0.9, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2],  # unimodal
    [0.9, 0.1, 0.2, 0.3, 0.3, 0.25, 0.35, 0.1, 0.0, 0.0],  # warm-up spike, tie, later peak
    [0.5, 0.4, 0.3, 0.2, 0.1, 0.2, 0.4, 0.6, 0.5, 0.4],  # fine-tuning shape
    [0.3, np.nan, 0.2, 0.8, np.nan, 0.1, 0.9, 0.9, 0.2, 0.1],  # NaN frames
    [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # monotone down
]


@pytest.mark.parametrize("finetune", [False, True])
@pytest.mark.parametrize("span", [1, 3])
def test_streaming_agrees_with_offline(finetune, span):
    rng = np.random.default_rng(0)
    seqs = [np.asarray(s, dtype=float) for s in SCRIPTED] + [rng.normal(size=25).cumsum() for _ in range(20)]
    for seq in seqs:
        steps = np.arange(len(seq)) * 10
        stopper = GWAStopper(total_steps=int(steps[-1]), span=span, patience=None, finetune=finetune)
        for st, v in zip(steps, seq):
            assert stopper.update(int(st), float(v)) is False  # patience None: never stops
        assert stopper.best_step == gwa_stop(steps, seq, span=span, finetune=finetune), seq


def test_streaming_stops_patience_frames_after_the_max_and_only_looks_back():
    seq = [0.1, 0.2, 0.5, 0.9, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    stopper = GWAStopper(total_steps=90, patience=3)
    decisions = [stopper.update(10 * i, v) for i, v in enumerate(seq)]
    assert decisions.index(True) == 6  # max at frame 3, three frames without a new max
    assert stopper.stopped_at == 60 and stopper.best_step == 30 == gwa_stop(np.arange(10) * 10, seq)
    # the future cannot change a decision already made
    twin = GWAStopper(total_steps=90, patience=3)
    for i, v in enumerate(seq[:7] + [5.0, 6.0, 7.0]):
        twin.update(10 * i, v)
    assert twin.stopped_at == 60
    # inside the warm-up nothing counts
    early = GWAStopper(total_steps=1000, patience=1)
    assert not any(early.update(10 * i, v) for i, v in enumerate(seq))
    # fine-tuning: falling values never trigger a stop; a rise then a fall does
    ft = GWAStopper(total_steps=90, patience=2, finetune=True, warmup_frac=0.0)
    assert not any(ft.update(10 * i, v) for i, v in enumerate([5, 4, 3, 2, 1.0]))
    assert [ft.update(10 * (5 + i), v) for i, v in enumerate([2, 3, 2, 1.5])] == [False, False, False, True]
    assert ft.best_step == 60
    with pytest.raises(ValueError, match="in order"):
        ft.update(0, 1.0)


def _run(frame_step, acc_by_epoch, epoch_len, **readouts) -> RunReadouts:
    n_ep = len(acc_by_epoch)
    return RunReadouts("r", "resnet", "train", "healthy", np.asarray(frame_step),
                       {k: np.asarray(v, float) for k, v in readouts.items()},
                       np.arange(1, n_ep + 1) * epoch_len, np.asarray(acc_by_epoch, float))


def test_selected_accuracy_uses_the_epoch_ending_at_or_after_the_frame():
    epoch_step, acc = np.array([15, 30, 45]), np.array([0.1, 0.5, 0.3])
    assert selected_accuracy(0, epoch_step, acc) == 0.1
    assert selected_accuracy(15, epoch_step, acc) == 0.1
    assert selected_accuracy(16, epoch_step, acc) == 0.5
    assert selected_accuracy(99, epoch_step, acc) == 0.3  # past the last epoch: the last one
    run = _run(np.arange(5) * 10, [0.1, 0.5, 0.3], 15, score_w=np.zeros(5))
    assert selection_gap(run, 20) == pytest.approx(0.0)
    assert selection_gap(run, 40) == pytest.approx(20.0)  # percentage points
    assert selection_gap(run, 40, from_step=31) == pytest.approx(0.0)  # tail oracle: epochs ending >= 31


def _synthetic_runs(n=6, seed=0):
    """Runs whose head-gradient score bottoms out where validation accuracy peaks (frame 12 of 30),
    with a later, shallower local minimum: the paper's short tail (last 8 frames) misses the peak."""
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(n):
        t = np.arange(30)
        score = 1.0 + 0.02 * (t - 12) ** 2 / 10 + rng.normal(0, 0.01, 30)
        score[26] = score[12] + 0.3
        acc = 0.9 - 0.002 * (np.arange(20) * 1.5 - 12) ** 2  # peak near step 120
        runs.append(_run(t * 10, acc, 15, score_w=score, gwa=-score))
    return runs


def test_streaming_replay_matches_offline_without_early_stop():
    for run in _synthetic_runs(3):
        gap, seen = streaming_gwa(run, span=3, patience=10**6)
        assert seen == 1.0 and gap == pytest.approx(gwa_gap(run, span=3))
        gap5, seen5 = streaming_gwa(run, span=3, patience=5)
        assert seen5 < 1.0  # -score peaks at frame 12: the stopper stops well before the end


def test_tuning_finds_the_window_and_beats_universal():
    runs = _synthetic_runs()
    universal = mean_gap(runs, "head", {"span": 3, "tail_frac": 80 / 300})
    best = tune_selection(runs, n_trials=25, seed=0)
    assert best["gap"] <= universal and universal > 1.0
    assert best["tail_frac"] > 0.55 and best["gap"] < 0.5
    assert tune_selection(runs, n_trials=25, seed=0) == best  # seeded TPE: reproducible
    g = tune_selection(runs, n_trials=10, seed=0, method="gwa")
    assert set(g) >= {"span", "warmup_frac", "gap", "finetune"}
    assert g["gap"] <= mean_gap(runs, "gwa", {"span": 1, "warmup_frac": 0.1})


def _write_corpus(root, n_per_split=3):
    rng = np.random.default_rng(0)
    (root / "runs").mkdir(parents=True)
    records = []
    specs = [(split, arch, label) for split in ("train", "val", "test") for arch, label in
             [("resnet", "healthy"), ("vit", "overfitting"), ("lm", "healthy"), ("resnet", "instability")]]
    for i, (split, arch, label) in enumerate(specs):
        run_id = f"{arch}-{split}-{label}-{i}"
        w = RunWriter(root / "runs" / f"{run_id}.zarr", 4)
        for t in range(30):
            r = {k: math.nan for k in READOUT_NAMES}
            r.update(score_w=1 + 0.002 * (t - 12) ** 2 + rng.normal(0, 0.01), score_z=1 + 0.01 * t, gwa=-0.001 * (t - 15) ** 2)
            w.append_frame(Frame(step=10 * t, frame=torch.ones(6, 4, 4, dtype=torch.bfloat16), readouts=r))
        w.append_steps([1.0] * 300, [0.1] * 300)
        w.write_privileged("epoch_step", np.arange(1, 21) * 15)
        w.write_privileged("val_acc", 0.9 - 0.002 * (np.arange(20) * 1.5 - 12) ** 2)
        w.finalize(label=label, status="complete")
        records.append({"run_id": run_id, "split": split, "arch": arch, "label": label, "status": "complete",
                        "store": f"runs/{run_id}.zarr"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_cli_measures_a_corpus(tmp_path, capsys):
    corpus = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "sel" / "selection.json"
    assert main(["--corpus", str(corpus), "--out", str(out), "n_trials=6"]) == 0
    res = json.loads(out.read_text())
    assert res["runs"] == {"test": 2, "train": 2, "val": 2}  # lm and instability runs are skipped
    assert res["config"]["n_trials"] == 6
    for key in ("head_score_w", "head_score_z", "gwa", "gwa_finetune"):
        for kind in ("universal", "tuned"):
            for split in ("train", "val", "test"):
                cell = res[key][kind][split]
                assert cell["n"] == 2 and 0.0 <= cell["mean_gap"] < 100.0
                if key.startswith("head"):
                    assert 0.0 <= cell["mean_gap_tail_oracle"] <= cell["mean_gap"]
    # tuned on train is never worse on train than the universal configuration (its first trial)
    assert res["head_score_w"]["tuned"]["train"]["mean_gap"] <= res["head_score_w"]["universal"]["train"]["mean_gap"]
    st = res["gwa_streaming"]["test"]
    assert st["n"] == 2 and 0 < st["mean_frames_seen"] <= 1
    assert "mean gap to the oracle" in capsys.readouterr().out
    with pytest.raises(Exception, match="unknown key"):
        main(["--corpus", str(corpus), "spam=1"])
