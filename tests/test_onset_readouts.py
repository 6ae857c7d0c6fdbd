"""eval.onset_readouts: a readout's stored level before and after each run's onset, by perturbation."""
import numpy as np
import pytest

from capture.corpus import corpus_runs
from capture.store import RunStore
from eval.onset_readouts import main, onset_table, run_onset_means


def test_the_table_is_each_runs_means_around_its_onset(smoke_corpus, capsys):
    table = onset_table(smoke_corpus, ["loss", "nonfinite"])
    runs = corpus_runs(smoke_corpus)
    assert sum(r["loss"]["runs"] for r in table.values()) == len(runs)
    rec = next(r for r in runs if r.get("onset_step"))
    store = RunStore(smoke_corpus / rec["store"])
    loss = store.readouts().numpy()[:, list(store.readout_names).index("loss")]
    steps = store.frame_step().numpy()
    onset = rec["onset_step"]
    before, after, positive = run_onset_means(store, "loss", onset)
    assert before == pytest.approx(np.nanmean(loss[(steps >= onset / 2) & (steps < onset)]))
    assert after == pytest.approx(np.nanmean(loss[steps >= onset])) and positive
    same = [r for r in runs if r["perturbation"] == rec["perturbation"]]  # the table's cell: the median of their means
    befores = [run_onset_means(RunStore(smoke_corpus / r["store"]), "loss", r.get("onset_step"))[0] for r in same]
    assert table[rec["perturbation"]]["loss"]["before"] == pytest.approx(np.nanmedian(befores))
    with pytest.raises(ValueError, match="no readout 'nope'"):
        run_onset_means(store, "nope", onset)
    assert main(["--corpus", str(smoke_corpus), "--readouts", "loss", "--split", "test"]) == 0
    assert "| perturbation | readout |" in capsys.readouterr().out
