"""`python -m diagnose.recalibrate`: a fine-tuned checkpoint calibrated on a corpus's validation split."""
import dataclasses
import json

import pytest
import torch

from capture.schema import CLASSES
from diagnose.calibrate import load_calibration
from diagnose.recalibrate import main
from diagnose.tevid import TEViD, TEViDConfig
from pretrain.checkpoint import save_checkpoint


def test_recalibrate_writes_a_calibration_for_the_checkpoint(tmp_path, smoke_corpus, capsys):
    cfg = TEViDConfig(encoder="tiny", encoder_overrides={"depth": 1, "img_size": 16})
    ckpt = tmp_path / "final"
    # trained on windows every 2nd frame; calibrated on every window all the same (the rule streams them all)
    save_checkpoint(ckpt, model=TEViD(cfg).eval(), config={"model": dataclasses.asdict(cfg), "data": {"window": 10, "stride": 2}}, step=1)
    assert main(["--checkpoint", str(ckpt), "--corpus", str(smoke_corpus), "--out", str(ckpt), "tau=0.5"]) == 0
    cal = load_calibration(ckpt)
    from pretrain.clips import ClipConfig, CorpusClips
    assert cal.report["windows"] == len(CorpusClips(smoke_corpus, "val", ClipConfig(window=10, stride=1)))
    assert cal.classes == list(CLASSES) and cal.tau == 0.5 and len(cal.thresholds) == len(CLASSES) - 1
    assert cal.report["calibrated"] and cal.report["tau_source"] == "fixed"
    printed = capsys.readouterr().out
    assert json.loads(printed[: printed.rindex("}") + 1])["windows"] > 0 and "wrote" in printed


def test_recalibrate_with_a_familiarity_bank(tmp_path, smoke_corpus, capsys):
    """--familiarity: a bank of the train split's window features beside the weights, load_tevid attaches it,
    and tau is then the quantile of its distance score over the validation windows."""
    import numpy as np

    from diagnose.familiarity import load_familiarity
    from diagnose.tevid import load_tevid
    from pretrain.clips import ClipConfig, CorpusClips

    cfg = TEViDConfig(encoder="tiny", inputs="readouts")
    ckpt = tmp_path / "final"
    save_checkpoint(ckpt, model=TEViD(cfg).eval(), config={"model": dataclasses.asdict(cfg), "data": {"window": 4}}, step=1)
    assert main(["--checkpoint", str(ckpt), "--corpus", str(smoke_corpus), "--out", str(ckpt), "--familiarity", "--familiarity-k", "3"]) == 0
    bank = load_familiarity(ckpt)
    assert bank.k == 3 and len(bank.bank) == len(CorpusClips(smoke_corpus, "train", ClipConfig(window=4)))
    model, cal = load_tevid(ckpt)
    assert model.familiarity is not None
    val = CorpusClips(smoke_corpus, "val", ClipConfig(window=4))
    u = np.concatenate([model.predict(None, b["readouts"])["vacuity"].numpy() for b in torch.utils.data.DataLoader(val, batch_size=64)])
    assert cal.tau == pytest.approx(float(np.quantile(u, 0.95)), rel=1e-5)


def test_recalibrate_with_an_inputs_bank_and_no_gate(tmp_path, smoke_corpus):
    """--familiarity-reads inputs --no-gate --known-first: the bank holds the train windows' pooled run-relative
    scalars (standardised), the Unknown gate reads it, no familiarity gate is set and a sure class keeps its name;
    a raw-readout model is refused."""
    from diagnose.familiarity import load_familiarity
    from diagnose.tevid import load_tevid
    from pretrain.clips import ClipConfig, CorpusClips

    cfg = TEViDConfig(encoder="tiny", inputs="readouts", representation="relative", weight_still=True)
    ckpt = tmp_path / "final"
    save_checkpoint(ckpt, model=TEViD(cfg).eval(), config={"model": dataclasses.asdict(cfg), "data": {"window": 4}}, step=1)
    assert main(["--checkpoint", str(ckpt), "--corpus", str(smoke_corpus), "--out", str(ckpt), "--familiarity",
                 "--familiarity-k", "3", "--familiarity-reads", "inputs", "--no-gate", "--known-first"]) == 0
    bank = load_familiarity(ckpt)
    n = len(CorpusClips(smoke_corpus, "train", ClipConfig(window=4, representation="relative")))
    assert bank.reads == "inputs" and bank.bank.shape[0] == n and bank.center is not None
    model, cal = load_tevid(ckpt)
    assert model.familiarity.reads == "inputs" and not cal.gate and cal.known_first
    raw = tmp_path / "raw"
    plain = TEViDConfig(encoder="tiny", inputs="readouts")
    save_checkpoint(raw, model=TEViD(plain).eval(), config={"model": dataclasses.asdict(plain), "data": {"window": 4}}, step=1)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(raw), "--corpus", str(smoke_corpus), "--out", str(raw), "--familiarity", "--familiarity-reads", "inputs"])
