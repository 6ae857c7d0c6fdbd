"""The transfer probe (eval.transfer_probe) trains on one split's windows and scores the held-out ones."""
import json
import shutil

import pytest

from eval.transfer_probe import main, split_windows, table, transfer


def test_transfer_on_the_smoke_corpus(smoke_corpus, tmp_path):
    x, y = split_windows(smoke_corpus, "train", window=3, stride=1, progress=False)
    assert set(y.tolist()) == {0, 1} and all(len(v) == len(y) for v in x.values()) and {"raw", "relative"} <= set(x)
    result = transfer(smoke_corpus, "train", ("train", "test"), window=3, stride=1, progress=False)
    row = result["splits"]["train"]
    assert row["base_rate"] == pytest.approx(float(y.mean()), abs=1e-4)
    for view in ("raw", "relative"):
        assert 0.0 <= row[view]["auprc"] <= 1.0 and 0.0 <= row[view]["auroc"] <= 1.0
    assert "base rate" in table(result)
    assert main(["--corpus", str(smoke_corpus), "--out", str(tmp_path), "--eval-splits", "test", "--window", "3", "--stride", "1"]) == 0
    assert (tmp_path / "transfer.md").is_file()


def test_a_train_split_without_anomalies_is_refused(smoke_corpus, tmp_path):
    """A corpus whose manifest keeps only the healthy-labelled runs has no anomalous window to learn from."""
    corpus = tmp_path / "healthy_only"
    shutil.copytree(smoke_corpus, corpus)
    lines = (corpus / "manifest.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("label") == "healthy"]
    assert 0 < len(kept) < len(lines)
    (corpus / "manifest.jsonl").write_text("\n".join(kept) + "\n")
    with pytest.raises(ValueError, match="needs both healthy and anomalous"):
        transfer(corpus, "train", ("test",), window=3, stride=1, progress=False)
