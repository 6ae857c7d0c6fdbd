"""`python -m diagnose.recalibrate`: a fine-tuned checkpoint calibrated on a corpus's validation split."""
import dataclasses
import json

from capture.schema import CLASSES
from diagnose.calibrate import load_calibration
from diagnose.recalibrate import main
from diagnose.tevid import TEViD, TEViDConfig
from pretrain.checkpoint import save_checkpoint


def test_recalibrate_writes_a_calibration_for_the_checkpoint(tmp_path, smoke_corpus, capsys):
    cfg = TEViDConfig(encoder="tiny", encoder_overrides={"depth": 1, "img_size": 16})
    ckpt = tmp_path / "final"
    save_checkpoint(ckpt, model=TEViD(cfg).eval(), config={"model": dataclasses.asdict(cfg), "data": {"window": 10}}, step=1)
    assert main(["--checkpoint", str(ckpt), "--corpus", str(smoke_corpus), "--out", str(ckpt), "tau=0.5"]) == 0
    cal = load_calibration(ckpt)
    assert cal.classes == list(CLASSES) and cal.tau == 0.5 and len(cal.thresholds) == len(CLASSES) - 1
    assert cal.report["calibrated"] and cal.report["tau_source"] == "fixed"
    printed = capsys.readouterr().out
    assert json.loads(printed[: printed.rindex("}") + 1])["windows"] > 0 and "wrote" in printed
