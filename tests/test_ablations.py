"""TEViD ablations (eval/ablations.py) and the model/config changes they rest on: channel subsets
(activations only / gradients only), MAE weights adapted to a channel subset and a longer window, the
seeded label subset; the command end to end on the smoke corpus with 2 tiny variants and 1 epoch, and
its outputs in the report's tables."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from capture.frames import CHANNELS
from diagnose.finetune import FinetuneConfig, labelled_subset
from diagnose.tevid import TEViD, TEViDConfig, build_tevid, load_tevid
from eval.ablations import VARIANTS, AblationConfig, main as ablations_main, variant_config
from eval.report import ReportConfig, make_report
from pretrain.checkpoint import save_checkpoint
from pretrain.encoder import encoder_config
from pretrain.mae import DynamicsMAE

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune" / "tiny.yaml"
ACTS, GRADS = list(CHANNELS[:3]), list(CHANNELS[3:])


def _clip(b=2, t=10, s=16):
    return torch.randn(b, t, 6, s, s), torch.rand(b, t, 8) * 5


def _zero_grads(frames):
    out = frames.clone()
    out[:, :, 3:] = 0
    return out


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory) -> Path:
    cfg = encoder_config("tiny")
    path = tmp_path_factory.mktemp("mae") / "final"
    save_checkpoint(path, model=DynamicsMAE(cfg), config={"encoder": dataclasses.asdict(cfg)}, step=1)
    return path


def test_channel_subset_ignores_the_other_channels(one_thread):
    frames, readouts = _clip()
    acts = TEViD(TEViDConfig(encoder="tiny", channels=ACTS)).eval()
    full = TEViD(TEViDConfig(encoder="tiny")).eval()
    assert acts.encoder.patch_embed.proj.weight.shape[1] == 3 and full.encoder.patch_embed.proj.weight.shape[1] == 6
    with torch.no_grad():
        torch.testing.assert_close(acts(_zero_grads(frames), readouts), acts(frames, readouts), rtol=0, atol=0)
        assert not torch.allclose(full(_zero_grads(frames), readouts), full(frames, readouts))
    with pytest.raises(ValueError, match="stored frames"):
        acts(frames[:, :, :3], readouts)  # the model selects channels itself: callers pass all 6
    for bad in ([], ["act_early", "act_early"], ["activations"]):
        with pytest.raises(ValueError, match="channels"):
            TEViDConfig(channels=bad)
    with pytest.raises(ValueError, match="in_chans"):
        TEViDConfig(channels=ACTS, encoder_overrides={"in_chans": 6})


def test_scalar_subset_ignores_the_other_scalars(one_thread):
    """TEViDConfig.scalars: the readout branch reads only the named relative scalars (inputs stay 26 wide)."""
    from capture.relative import RELATIVE_FEATURES

    keep = ["gwa", "loss_above_best", "log_ratio_loss"]
    model = TEViD(TEViDConfig(inputs="readouts", representation="relative", scalars=keep)).eval()
    assert model.readouts.embed[0].in_features == 3
    x = torch.randn(2, 10, len(RELATIVE_FEATURES))
    other = x.clone()
    drop = [i for i, n in enumerate(RELATIVE_FEATURES) if n not in keep]
    other[..., drop] = torch.randn(2, 10, len(drop))
    with torch.no_grad():
        torch.testing.assert_close(model(None, x), model(None, other), rtol=0, atol=0)
        changed = x.clone()
        changed[..., RELATIVE_FEATURES.index("gwa")] += 1.0
        assert not torch.allclose(model(None, x), model(None, changed))
    for bad, representation in ((["nope"], "relative"), ([], "relative"), (["gwa", "gwa"], "relative"), (["gwa"], "frames")):
        with pytest.raises(ValueError, match="scalars"):
            TEViDConfig(inputs="readouts", representation=representation, scalars=bad)


@pytest.mark.parametrize("flag, names", [("step_losses", "STEP_LOSS_FEATURES"), ("weight_step", "WEIGHT_FEATURES"),
                                         ("weight_still", "STILL_FEATURES"), ("batch_features", "BATCH_FEATURES")])
def test_optional_scalars_are_read_only_when_asked(one_thread, flag, names):
    """TEViDConfig.step_losses / weight_step / weight_still / batch_features: off (and in every config saved before they existed), the
    branch reads the other 22 scalars as before, so older checkpoints load; on, it reads those too."""
    import capture.relative as rel

    group = getattr(rel, names)
    cols = [rel.RELATIVE_FEATURES.index(n) for n in group]
    x = torch.randn(2, 10, len(rel.RELATIVE_FEATURES))
    moved = x.clone()
    moved[..., cols] += 3.0
    off = TEViD(TEViDConfig(inputs="readouts", representation="relative")).eval()
    on = TEViD(TEViDConfig(inputs="readouts", representation="relative", **{flag: True})).eval()
    assert off.readouts.embed[0].in_features == 22 and on.readouts.embed[0].in_features == 22 + len(group)
    assert TEViDConfig(representation="relative", scalars=["gwa"], **{flag: True}).scalar_names == ["gwa", *group]
    with torch.no_grad():
        torch.testing.assert_close(off(None, x), off(None, moved), rtol=0, atol=0)
        assert not torch.allclose(on(None, x), on(None, moved))
    with pytest.raises(ValueError, match=flag):
        TEViDConfig(inputs="readouts", **{flag: True})


def test_history_traces_are_read_for_the_scalars_read(one_thread):
    """TEViDConfig.history: the slow average and leaky peak of each scalar the branch reads, after them
    (off: none of the history columns matters, as in every config saved before they existed)."""
    import capture.relative as rel

    cols = [rel.RELATIVE_FEATURES.index(n) for n in rel.HISTORY_FEATURES]
    x = torch.randn(2, 10, len(rel.RELATIVE_FEATURES))
    moved = x.clone()
    moved[..., cols] += 3.0
    off = TEViD(TEViDConfig(inputs="readouts", representation="relative", weight_step=True)).eval()
    on = TEViD(TEViDConfig(inputs="readouts", representation="relative", weight_step=True, history=True)).eval()
    assert off.readouts.embed[0].in_features == 24 and on.readouts.embed[0].in_features == 3 * 24
    cfg = TEViDConfig(representation="relative", scalars=["gwa", "margin"], history=True)
    assert cfg.scalar_names == ["gwa", "margin", "slow_gwa", "slow_margin", "peak_gwa", "peak_margin"]
    with torch.no_grad():
        torch.testing.assert_close(off(None, x), off(None, moved), rtol=0, atol=0)
        assert not torch.allclose(on(None, x), on(None, moved))
    with pytest.raises(ValueError, match="history"):
        TEViDConfig(history=True)  # frames representation: no relative scalars
    # the traces' rates travel with the model, to its clips (fine-tuning, calibration) and its live stream
    from pretrain.clips import ClipConfig
    slow = TEViDConfig(representation="relative", history=True, history_rate=0.01, peak_decay=0.02, best_decay=0.05).relative_config()
    assert (slow.history_rate, slow.peak_decay, slow.best_decay) == (0.01, 0.02, 0.05)
    assert ClipConfig(representation="relative", history_rate=0.01, peak_decay=0.02, best_decay=0.05).relative_config() == slow


def test_mae_init_keeps_channel_slices_and_resamples_time(mae_checkpoint, one_thread):
    from pretrain.checkpoint import load_checkpoint

    w = load_checkpoint(mae_checkpoint).weights
    model, cfg = build_tevid(TEViDConfig(encoder="tiny", channels=GRADS), mae_checkpoint)
    torch.testing.assert_close(model.encoder.patch_embed.proj.weight, w["encoder.patch_embed.proj.weight"][:, 3:])
    torch.testing.assert_close(model.encoder.blocks[0].mlp.fc1.weight, w["encoder.blocks.0.mlp.fc1.weight"])
    assert cfg.encoder_overrides["in_chans"] == 3 and TEViD(cfg).encoder.cfg.in_chans == 3  # rebuilds without the MAE
    long, cfg20 = build_tevid(TEViDConfig(encoder="tiny", encoder_overrides={"num_frames": 20}), mae_checkpoint)
    pe, pe20 = w["encoder.pos_embed_time"], long.encoder.pos_embed_time.detach()
    assert pe20.shape[1] == 20 and cfg20.encoder_overrides["num_frames"] == 20
    torch.testing.assert_close(pe20[:, [0, -1]], pe[:, [0, -1]])  # linear resampling keeps the ends
    torch.testing.assert_close(pe20[:, 1], pe[:, 0] + (pe[:, 1] - pe[:, 0]) * 9 / 19)
    frames, readouts = _clip(t=20)
    assert torch.isfinite(long(frames, readouts)).all()


def test_label_subset_is_seeded_and_per_label(smoke_corpus):
    from pretrain.clips import corpus_runs

    runs = {r["run_id"]: r["label"] for r in corpus_runs(smoke_corpus, "train")}
    assert labelled_subset(smoke_corpus, "train", 1.0, 0) is None
    sub = labelled_subset(smoke_corpus, "train", 0.25, 0)
    assert sub == labelled_subset(smoke_corpus, "train", 0.25, 0)  # seeded
    assert {runs[r] for r in sub} == set(runs.values())  # at least one run of every label
    with pytest.raises(ValueError, match="label_fraction"):
        FinetuneConfig(data=dataclasses.replace(FinetuneConfig().data, source="shards", label_fraction=0.5))


def test_variants_share_everything_but_their_overrides():
    cfg = AblationConfig(variants=["full", "window20", "labels25"], pretrained="x", config=str(TINY), overrides=["epochs=3"])
    full, w20, l25 = (dataclasses.asdict(variant_config(cfg, VARIANTS[n])) for n in cfg.variants)
    assert full["epochs"] == w20["epochs"] == l25["epochs"] == 3 and full["seed"] == w20["seed"]
    assert w20["data"]["window"] == 20 and w20["model"]["encoder_overrides"]["num_frames"] == 20
    assert {k for k in full if full[k] != l25[k]} == {"data"} and l25["data"]["label_fraction"] == 0.25
    with pytest.raises(ValueError, match="--pretrained"):
        AblationConfig(variants=["scratch"])
    with pytest.raises(ValueError, match="unknown"):
        AblationConfig(variants=["full", "nope"])


@pytest.fixture(scope="module")
def ablation_run(smoke_corpus, mae_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations")
    argv = ["--corpus", str(smoke_corpus), "--out", str(out), "--config", str(TINY), "--pretrained", str(mae_checkpoint),
            "--variants", "full,acts_only", "--n-resamples", "50", "epochs=1", "batch_size=3", "threads=1"]
    assert ablations_main(argv) == 0
    return out, argv


def test_ablations_command_outputs_and_variants_differ(ablation_run, capsys):
    out, argv = ablation_run
    ab = json.loads((out / "ablations.json").read_text())
    assert list(ab["variants"]) == ["full", "acts_only"]
    for name, v in ab["variants"].items():
        assert v["init"] == "dynamics-mae" and v["gflops_per_clip"] > 0 and v["window"] == 10
        assert {"event_auprc", "macro_f1", "median_lead_epochs", "far", "detection_rate", "kind"} <= set(v["metrics"])
        assert v["metrics"]["n_runs"] == 4 and v["metrics"]["kind"] == "tevid"
        assert (out / "variants" / name / "final" / "calibration.json").is_file()
    cfgs = {n: json.loads((out / "variants" / n / "config.json").read_text()) for n in ab["variants"]}
    differ = {k for k in cfgs["full"] if cfgs["full"][k] != cfgs["acts_only"][k]}
    assert differ == {"model"} and cfgs["acts_only"]["model"]["channels"] == ACTS
    assert {k for k in cfgs["full"]["model"] if cfgs["full"]["model"][k] != cfgs["acts_only"]["model"][k]} == \
        {"channels", "encoder_overrides"}  # encoder_overrides: in_chans 3 instead of 6
    md = (out / "ablations.md").read_text()
    assert "Table 12" in md and "| acts_only | activations only (A) |" in md and "| 10 |" in md

    frames, readouts = _clip()
    acts, _ = load_tevid(out / "variants" / "acts_only" / "final")
    full, _ = load_tevid(out / "variants" / "full" / "final")
    with torch.no_grad():
        torch.testing.assert_close(acts(_zero_grads(frames), readouts), acts(frames, readouts), rtol=0, atol=0)
        assert not torch.allclose(full(_zero_grads(frames), readouts), full(frames, readouts))

    capsys.readouterr()
    assert ablations_main(argv) == 0  # a rerun with the same settings reuses both results
    assert capsys.readouterr().err.count("reusing") == 2


def test_report_includes_ablations_and_probes(ablation_run, smoke_corpus, tmp_path):
    out, _ = ablation_run
    probes = {"state_to_loss": {"input": "frame", "target": "log loss", "r2_per_run_mean": 0.5, "r2_per_run_sd": 0.1,
                                "r2_pooled": 0.6, "n_test_runs": 4, "n_test": 12},
              "loss_to_state": {"input": "log loss", "target": "means", "r2_per_run_mean": 0.05, "r2_per_run_sd": 0.01,
                                "r2_pooled": 0.02, "n_test_runs": 4, "n_test": 12}}
    (tmp_path / "probes.json").write_text(json.dumps(probes))
    cfg = ReportConfig(methods=["cusum"], n_resamples=50, figures=False, ablations=str(out / "ablations.json"),
                       probes=str(tmp_path / "probes.json"), tevid_checkpoints={"tevid_acts": str(out / "variants/acts_only/final")})
    make_report(smoke_corpus, tmp_path / "report", cfg, progress=False)
    tables = (tmp_path / "report" / "tables.md").read_text()
    for head in ("Table 3", "Table 4", "Table 5", "Table 12", "Table 17", "Table 18", "Table 19", "Sec. 5.4"):
        assert head in tables, head
    assert "| acts_only | activations only (A) |" in tables and "| state -> loss (MLP) | frame | log loss | 0.500 ± 0.100 |" in tables
    assert "(tevid_acts, % of runs)" in tables  # Table 17 for the TEViD method
    t17 = tables.split("## Table 17")[1].split("##")[0]
    assert t17.count("\n| ") >= 2  # header + >= 1 novel type (the smoke test split has 2 novel runs)
