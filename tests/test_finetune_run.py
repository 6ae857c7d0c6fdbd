"""TEViD (diagnose/): the model and its inputs, MAE initialisation, checkpoint + calibration round trip,
fine-tuning end to end on the smoke corpus under 2 real accelerate processes, resume."""
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from capture.relative import RELATIVE_FEATURES
from diagnose.calibrate import Calibration, load_calibration, save_calibration
from diagnose.evidential import IGNORE as LOSS_IGNORE
from diagnose.finetune import FinetuneConfig, balanced_weights, cap_windows, main as finetune_main, run_contexts, warmup_cosine
from diagnose.tevid import GradientReversal, TEViD, TEViDConfig, TEViDLoadError, build_tevid, load_tevid
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.clips import CLASSES, IGNORE, corpus_runs
from pretrain.encoder import encoder_config
from pretrain.mae import DynamicsMAE

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune" / "tiny.yaml"
FAST = ["batch_size=3", "kl_anneal_epochs=0"]  # lambda = 1 throughout: the loss is comparable across epochs


def _clip(b=2, t=10, s=16):
    frames = torch.randn(b, t, 6, s, s).to(torch.bfloat16)
    readouts = torch.rand(b, t, 8) * 10
    readouts[0, 3, 1] = float("nan")  # a missing readout
    return frames, readouts


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny Dynamics-MAE saved as pretraining saves it."""
    cfg = encoder_config("tiny")
    path = tmp_path_factory.mktemp("mae") / "final"
    save_checkpoint(path, model=DynamicsMAE(cfg), config={"encoder": dataclasses.asdict(cfg)}, step=7)
    return path


def test_adversary_heads_predict_the_context_through_a_reversed_gradient():
    """The context heads (domain-adversarial training) return one logit row per context value beside the class
    and anomaly outputs, which do not change when they are asked for; the reversal negates the gradient."""
    cfg = TEViDConfig(inputs="readouts", representation="relative", anomaly_head=True, adversary={"family": 3, "dataset": 2})
    model = TEViD(cfg).eval()  # no dropout: the same input gives the same logits
    readouts = torch.randn(4, 5, len(RELATIVE_FEATURES), generator=torch.Generator().manual_seed(0))
    f, a, adv = model(None, readouts, with_anomaly=True, with_adversary=True)
    assert f.shape == (4, 5) and a.shape == (4,) and {k: v.shape for k, v in adv.items()} == {"family": (4, 3), "dataset": (4, 2)}
    assert torch.equal(model(None, readouts), f)  # the class logits do not depend on asking for the heads
    x = torch.randn(4, 6, requires_grad=True)
    GradientReversal.apply(x).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, -2 * x.detach())
    with pytest.raises(ValueError, match="adversary"):
        TEViD(TEViDConfig(inputs="readouts"))(None, torch.randn(2, 3, 8), with_adversary=True)
    with pytest.raises(ValueError, match="adversary_weight"):
        FinetuneConfig(adversary=["family"])  # a field without a weight trains nothing
    records = [{"run_id": "a", "family": "mlp"}, {"run_id": "b", "family": "cnn"}, {"run_id": "c", "family": "mlp"}]
    assert run_contexts(records, ["family"]) == {"family": {"a": 1, "b": 0, "c": 1}}
    with pytest.raises(ValueError, match="'dataset' missing"):
        run_contexts(records, ["dataset"])


@pytest.mark.parametrize("inputs", ["both", "video", "readouts"])
def test_model_inputs_shapes_and_backward(inputs):
    model = TEViD(TEViDConfig(encoder="tiny", inputs=inputs))
    frames, readouts = _clip()
    assert (model.encoder is None) == (inputs == "readouts") and (model.readouts is None) == (inputs == "video")
    f = model(frames if inputs != "readouts" else None, readouts if inputs != "video" else None)
    assert f.shape == (2, 5) and torch.isfinite(f).all()
    f.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    out = model.eval().predict(frames, readouts, temperature=2.0)
    torch.testing.assert_close(out["vacuity"], 5 / out["alpha"].sum(-1))
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(2))
    if inputs != "video":
        with pytest.raises(ValueError, match="needs readouts"):
            model(frames, None)
    if inputs != "readouts":
        with pytest.raises(ValueError, match="needs frames"):
            model(None, readouts)


def test_anomaly_head_scores_beside_the_classes():
    model = TEViD(TEViDConfig(encoder="tiny", inputs="readouts", anomaly_head=True))
    _, readouts = _clip()
    logits, a = model(None, readouts, with_anomaly=True)
    assert logits.shape == (2, 5) and a.shape == (2,)
    (logits.sum() + a.sum()).backward()
    assert all(p.grad is not None for p in model.anomaly.parameters())
    out = model.eval().predict(None, readouts)
    torch.testing.assert_close(out["anomaly"], torch.sigmoid(model(None, readouts, with_anomaly=True)[1]))
    torch.testing.assert_close(out["logits"], model(None, readouts))  # the class head is the same with or without
    plain = TEViD(TEViDConfig(encoder="tiny", inputs="readouts")).eval()
    assert "anomaly" not in plain.predict(None, readouts)
    with pytest.raises(ValueError, match="anomaly_head=True"):
        plain(None, readouts, with_anomaly=True)


def test_readouts_branch_uses_the_order_of_frames():
    """The GRU reads the window in time order: reversing the readouts changes the output."""
    model = TEViD(TEViDConfig(encoder="tiny", inputs="readouts")).eval()
    r = torch.randn(1, 10, 8).cumsum(1)
    assert not torch.allclose(model(None, r), model(None, r.flip(1)))


def test_ignore_is_the_clip_value():
    assert LOSS_IGNORE == IGNORE and len(CLASSES) == TEViDConfig().num_classes


def test_encoder_initialised_from_mae(mae_checkpoint):
    mae_weights = load_checkpoint(mae_checkpoint).weights
    model, cfg = build_tevid(TEViDConfig(encoder="tiny", encoder_overrides={"drop_path": 0.1}), mae_checkpoint)
    assert cfg.encoder_cfg().drop_path == 0.1 and cfg.encoder_overrides["embed_dim"] == encoder_config("tiny").embed_dim
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, mae_weights["encoder." + k]), k
    scratch, _ = build_tevid(TEViDConfig(encoder="tiny"))
    assert not torch.equal(scratch.encoder.pos_embed_space, model.encoder.pos_embed_space)
    with pytest.raises(TEViDLoadError, match="do not fit"):
        build_tevid(TEViDConfig(encoder="tiny", encoder_overrides={"embed_dim": 32}), mae_checkpoint)


def test_non_mae_checkpoint_is_refused(tmp_path):
    save_checkpoint(tmp_path / "x", model=torch.nn.Linear(2, 2), config={"lr": 1}, step=0)
    with pytest.raises(TEViDLoadError, match="not a Dynamics-MAE checkpoint"):
        build_tevid(TEViDConfig(), tmp_path / "x")


def test_checkpoint_and_calibration_round_trip_bit_exact(tmp_path):
    cfg = TEViDConfig(encoder="tiny", encoder_overrides={"depth": 1})
    model = TEViD(cfg).eval()
    cal = Calibration(list(CLASSES), [0.61, 0.7, 0.93, 0.5], temperature=1.37, tau=0.41, consecutive=3,
                      report={"calibrated": True, "healthy_runs": 4})
    path = save_checkpoint(tmp_path / "final", model=model, config={"model": dataclasses.asdict(cfg)}, step=12)
    save_calibration(cal, path)
    assert not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))  # safetensors + JSON only
    loaded, cal2 = load_tevid(path)
    assert not loaded.training and cal2 == cal
    ref = model.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    frames, readouts = _clip()
    a, b = model.predict(frames, readouts, cal.temperature), loaded.predict(frames, readouts, cal2.temperature)
    assert all(torch.equal(a[k], b[k]) for k in a)

    (path / "calibration.json").unlink()
    with pytest.raises(FileNotFoundError, match="diagnose.recalibrate"):
        load_tevid(path)
    _, default = load_tevid(path, require_calibration=False)
    assert default.report == {"calibrated": False} and default.tau == 0.35


def test_schedule_and_class_weights():
    assert [round(warmup_cosine(s, 10, 2), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]  # total 10, warm-up 2
    w = balanced_weights([6, 0, 2, 0, 4])
    torch.testing.assert_close(w, torch.tensor([12 / 18, 0, 12 / 6, 0, 12 / 12]))
    with pytest.raises(ValueError, match="data.source"):
        FinetuneConfig(data=dataclasses.replace(FinetuneConfig().data, source="clips"))


def test_cap_windows_keeps_evenly_spaced_windows_of_long_runs_only():
    runs = np.array(["a"] * 3 + ["b"] * 9 + ["c"] * 4, dtype=object)
    keep = np.arange(100, 116)
    out = cap_windows(runs, keep, 4)
    assert out.tolist() == [100, 101, 102, 103, 106, 108, 111, 112, 113, 114, 115]  # b: 103, 106, 108, 111 of 103..111
    assert cap_windows(runs, keep, 9).tolist() == keep.tolist()
    assert cap_windows(runs, keep, 1).tolist() == [100, 103, 112]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_windows_per_run"):
            FinetuneConfig(data=dataclasses.replace(FinetuneConfig().data, max_windows_per_run=bad))
    with pytest.raises(ValueError, match="max_windows_per_run"):
        FinetuneConfig(data=dataclasses.replace(FinetuneConfig().data, source="shards", max_windows_per_run=5))


# ---------------------------------------------------------------- end to end

def _launch(corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "diagnose" / "finetune.py"),
           "--config", str(TINY), "--corpus", str(corpus), "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_run(out: Path, stdout: str, epochs: int):
    assert "world size 2" in stdout, stdout
    rows = _csv(out / "epochs.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]), rows  # the loss goes down
    assert all(0 <= float(r["val_mean_vacuity"]) <= 1 and r["val_window_macro_f1"] != "" and r["val_run_macro_f1"] != "" for r in rows)
    model, cal = load_tevid(out / "final")
    last = load_checkpoint(out / "last")
    assert all(torch.equal(v, last.weights[k]) for k, v in model.state_dict().items())  # final = last weights, bit-exact
    assert cal == load_calibration(out / "final") and len(cal.thresholds) == 4 and 0 < cal.tau <= 1
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved == load_checkpoint(out / "final").config["model"] == dataclasses.asdict(model.cfg)  # the resolved model config
    return model


@pytest.mark.slow
def test_finetune_two_processes_scratch_and_from_mae(smoke_corpus, mae_checkpoint, tmp_path):
    scratch = _launch(smoke_corpus, tmp_path / "scratch", *FAST, "epochs=4")
    mae = _launch(smoke_corpus, tmp_path / "mae", *FAST, "epochs=4", "--checkpoint", str(mae_checkpoint))
    for proc in (scratch, mae):
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        proc.stdout_text = stdout
    _check_run(tmp_path / "scratch", scratch.stdout_text, 4)
    assert "scratch" in scratch.stdout_text and "MAE " in mae.stdout_text
    model = _check_run(tmp_path / "mae", mae.stdout_text, 4)
    assert model.cfg.encoder_overrides["embed_dim"] == encoder_config("tiny").embed_dim


@pytest.mark.parametrize("inputs", ["video", "readouts"])
def test_finetune_in_process_resume_and_inputs(smoke_corpus, tmp_path, capsys, inputs):
    out = tmp_path / "ft"
    base = ["--config", str(TINY), "--corpus", str(smoke_corpus), "--out", str(out), *FAST, f"model.inputs={inputs}"]
    assert finetune_main([*base, "epochs=1"]) == 0
    first = load_checkpoint(out / "last")
    steps = first.step
    assert steps >= 1 and "world size 1" in capsys.readouterr().out

    assert finetune_main([*base, "epochs=2"]) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'last'} at step {steps} (epoch 1)" in printed
    rows = _csv(out / "train.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 2 * steps + 1))  # continues from the saved step
    assert load_checkpoint(out / "last").step == 2 * steps and load_checkpoint(out / "last").extra["epoch"] == 2
    model, cal = load_tevid(out / "final")
    assert model.cfg.inputs == inputs and cal.report["calibrated"]


def test_finetune_caps_the_windows_of_each_run(smoke_corpus, tmp_path, capsys):
    from pretrain.clips import ClipConfig, CorpusClips

    clips = CorpusClips(smoke_corpus, "train", ClipConfig())
    targets, runs = clips.targets(), clips.window_runs()
    kept = {run: int(np.sum((runs == run) & (targets != IGNORE))) for run in set(runs)}
    assert max(kept.values()) > 2  # the cap bites
    out = tmp_path / "ft"
    assert finetune_main(["--config", str(TINY), "--corpus", str(smoke_corpus), "--out", str(out), *FAST, "model.inputs=readouts",
                          "epochs=1", "data.max_windows_per_run=2"]) == 0
    printed = re.search(r"(\d+) training windows/epoch", capsys.readouterr().out)
    assert int(printed.group(1)) == sum(min(n, 2) for n in kept.values())


def test_finetune_relative_with_anomaly_head_at_several_spacings(smoke_corpus, tmp_path, capsys):
    """Relative inputs, windows at spacings 1 and 2, the anomaly head: trained, calibrated in score mode,
    and replayed with the anomaly score as the method's score."""
    from eval.replay import TEViDDiagnoser, load_runs, replay_runs

    out = tmp_path / "ft"
    args = ["--config", str(TINY), "--corpus", str(smoke_corpus), "--out", str(out), *FAST, "epochs=1", "model.inputs=readouts",
            "model.representation=relative", "model.anomaly_head=true", "data.window=4"]
    assert finetune_main([*args, "data.spacings=[1, 2]"]) == 0
    spaced = int(re.search(r"(\d+) training windows/epoch", capsys.readouterr().out).group(1))
    assert finetune_main([*args[:5], str(tmp_path / "one"), *args[6:]]) == 0
    assert spaced > int(re.search(r"(\d+) training windows/epoch", capsys.readouterr().out).group(1))  # spacing 2 adds windows
    model, cal = load_tevid(out / "final")
    assert model.cfg.anomaly_head and cal.score_threshold is not None and "score_threshold_source" in cal.report
    # the frame cadences its windows came at (the corpus's cadence of 5 steps, every frame and every second one),
    # which the live monitor reads for its default cadence
    from diagnose.monitor import default_cadence
    from diagnose.stream import trained_cadences

    assert trained_cadences(out / "final") == (5, 10) and default_cadence(str(out / "final")) == 10
    assert trained_cadences(tmp_path / "one" / "final") == (5,)
    # several fine-tuned models read as one (`diagnose.recalibrate --members`, the shipped seed ensemble): written,
    # calibrated on val, and the members' cadences kept when they agree (else none: the monitor's default cadence)
    from diagnose.ensemble import TEViDEnsemble
    from diagnose.recalibrate import main as recalibrate_main

    twice = tmp_path / "twice"
    assert recalibrate_main(["--members", str(out / "final"), str(out / "final"), "--corpus", str(smoke_corpus), "--out", str(twice)]) == 0
    ens, ens_cal = load_tevid(twice)
    assert isinstance(ens, TEViDEnsemble) and len(ens.members) == 2 and trained_cadences(twice) == (5, 10)
    assert ens_cal.score_threshold == pytest.approx(cal.score_threshold, rel=1e-5)  # two copies of a model are that model
    mixed = tmp_path / "mixed"
    assert recalibrate_main(["--members", str(out / "final"), str(tmp_path / "one" / "final"), "--corpus", str(smoke_corpus),
                             "--out", str(mixed)]) == 0
    assert trained_cadences(mixed) is None and load_tevid(mixed)[1].report["calibrated"]
    with pytest.raises(SystemExit):  # --members writes a new model: no --checkpoint
        recalibrate_main(["--members", str(out / "final"), "--checkpoint", str(out / "final"), "--corpus", str(smoke_corpus), "--out", str(mixed)])
    with pytest.raises(TEViDLoadError, match="already an ensemble"):
        recalibrate_main(["--members", str(twice), "--corpus", str(smoke_corpus), "--out", str(tmp_path / "nested")])
    diagnoser = TEViDDiagnoser.from_checkpoint(out / "final")
    [result] = replay_runs(load_runs(smoke_corpus, "test", progress=False)[:1], diagnoser, progress=False)
    assert np.all((result.score >= 0) & (result.score <= 1))
    assert not np.allclose(result.score, 1 - result.probs[:, 0])  # the score is the anomaly head's, not 1 - p(healthy)
    with pytest.raises(ValueError, match="data.spacings.*relative"):
        finetune_main(["--config", str(TINY), "--corpus", str(smoke_corpus), "--out", str(tmp_path / "x"), "data.spacings=[1, 2]"])


def test_finetune_with_the_context_adversary(smoke_corpus, tmp_path):
    """Fine-tuning with `adversary`: one head per manifest field, as wide as the training runs' values, trained
    and saved with the weights; the saved model loads and predicts as any other."""
    out = tmp_path / "adv"
    assert finetune_main(["--config", str(TINY), "--corpus", str(smoke_corpus), "--out", str(out), *FAST, "epochs=1",
                          "model.inputs=readouts", "data.window=4", "adversary=[perturbation]", "adversary_weight=1.0"]) == 0
    model, cal = load_tevid(out / "final")
    # any manifest field: the smoke corpus has no `family` and one architecture in train, but two perturbations
    values = {r["perturbation"] for r in corpus_runs(smoke_corpus, "train")}
    assert len(values) > 1 and model.cfg.adversary == {"perturbation": len(values)} and cal.report["calibrated"]
    assert model.adversary["perturbation"].fc2.out_features == len(values)


def test_crossfit_calibrates_on_out_of_fold_predictions(smoke_corpus, tmp_path):
    """Two folds over train + val (written into a copy of the manifest), a model per held-out fold, one on
    everything, then diagnose.crossfit: every train + val run predicted once, by the model that did not
    train on it, and the full model calibrated on those predictions."""
    import shutil

    from diagnose.crossfit import main as crossfit_main

    corpus = tmp_path / "corpus"
    shutil.copytree(smoke_corpus, corpus)
    lines = [json.loads(x) for x in (corpus / "manifest.jsonl").read_text().splitlines()]
    trval = [r["run_id"] for r in lines if r["split"] in ("train", "val")]
    folds = {run_id: i % 2 for i, run_id in enumerate(trval)}
    (corpus / "manifest.jsonl").write_text("".join(json.dumps({**r, "fold": folds.get(r["run_id"], -1)}) + "\n" for r in lines))
    def base(out):
        return ["--config", str(TINY), "--corpus", str(corpus), "--out", str(out), *FAST, "epochs=1", "model.inputs=readouts",
                "data.window=4", "data.train_splits=[train, val]"]
    for k in (0, 1):
        assert finetune_main([*base(tmp_path / f"fold{k}"), f"data.holdout_fold={k}"]) == 0
        held = {r["run_id"] for r in map(json.loads, (tmp_path / f"fold{k}" / "val_predictions.jsonl").read_text().splitlines())}
        assert held == {run_id for run_id, f in folds.items() if f == k}
    assert finetune_main(base(tmp_path / "all")) == 0
    out = tmp_path / "cal"
    assert crossfit_main(["--folds", str(tmp_path / "fold0"), str(tmp_path / "fold1"), "--checkpoint", str(tmp_path / "all" / "final"),
                          "--out", str(out)]) == 0
    cal = load_calibration(out)
    assert cal.report["crossfit"] == {"folds": [0, 1], "runs": len(trval),
                                      "healthy_runs": sum(r["label"] == "healthy" for r in corpus_runs(corpus) if r["run_id"] in folds)}
    with pytest.raises(ValueError, match="fold 1 is given twice"):
        crossfit_main(["--folds", str(tmp_path / "fold1"), str(tmp_path / "fold1"), "--checkpoint", str(tmp_path / "all" / "final")])
    with pytest.raises(ValueError, match="not a cross-fitting run"):
        crossfit_main(["--folds", str(tmp_path / "all"), "--checkpoint", str(tmp_path / "all" / "final")])
    with pytest.raises(ValueError, match=r"no run .* is in fold 5; folds present: \[0, 1\]"):
        finetune_main([*base(tmp_path / "x"), "data.holdout_fold=5"])

    # the fold models as one model, calibrated on the same out-of-fold predictions
    from diagnose.ensemble import TEViDEnsemble
    from diagnose.tevid import load_tevid

    ens_dir = tmp_path / "ensemble"
    assert crossfit_main(["--folds", str(tmp_path / "fold0"), str(tmp_path / "fold1"), "--ensemble", "--out", str(ens_dir)]) == 0
    ens, ens_cal = load_tevid(ens_dir)
    assert isinstance(ens, TEViDEnsemble) and len(ens.members) == 2
    assert ens_cal.thresholds == cal.thresholds and ens_cal.tau == cal.tau  # the same out-of-fold predictions
    fold_models = [load_tevid(tmp_path / f"fold{k}" / "final", require_calibration=False)[0] for k in (0, 1)]
    from capture.schema import CLIP_READOUTS

    width = len(RELATIVE_FEATURES if ens.cfg.representation == "relative" else CLIP_READOUTS)
    readouts = torch.randn(3, 4, width, generator=torch.Generator().manual_seed(0))  # (B, T, readouts)
    outs = [m.predict(None, readouts) for m in fold_models]
    mean = ens.predict(None, readouts)
    torch.testing.assert_close(mean["probs"], (outs[0]["probs"] + outs[1]["probs"]) / 2)
    torch.testing.assert_close(mean["vacuity"], (outs[0]["vacuity"] + outs[1]["vacuity"]) / 2)
    assert ens.forward_features(None, readouts).shape[-1] == 2 * fold_models[0].forward_features(None, readouts).shape[-1]
    with pytest.raises(SystemExit):  # --ensemble writes a new model: it needs --out, and takes no --checkpoint
        crossfit_main(["--folds", str(tmp_path / "fold0"), "--ensemble"])


def test_finetune_from_shards(smoke_corpus, tmp_path, capsys):
    from pretrain.clips import export_shards

    counts = export_shards(smoke_corpus, tmp_path / "clips", shard_size=2)
    out = tmp_path / "ft"
    assert finetune_main(["--config", str(TINY), "--corpus", str(smoke_corpus), "--out", str(out), *FAST, "epochs=1",
                          "data.source=shards", f"data.shards={tmp_path / 'clips'}"]) == 0
    printed = capsys.readouterr().out
    known = {c: counts["train"][c] for c in CLASSES}
    assert f"{dict(known)}" in printed and load_checkpoint(out / "last").step == -(-sum(known.values()) // 3)
    with pytest.raises(FileNotFoundError, match="index.json"):
        finetune_main(["--config", str(TINY), "--corpus", str(smoke_corpus), "--out", str(out / "x"), "data.source=shards",
                       f"data.shards={tmp_path}"])
