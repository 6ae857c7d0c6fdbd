"""Video baselines (eval/baselines/video.py): R(2+1)D and Video-Swin from torchvision on 6-channel
clips, trained a few steps on the smoke corpus, streamed through the replay, saved and loaded."""
import numpy as np
import pytest
import torch
from torchvision.models.video import r2plus1d_18

from eval.baselines.video import VideoClassifier, VideoConfig, VideoDetector, parameter_count, train_video
from eval.replay import load_runs, replay_runs
from pretrain.clips import CLASSES

TINY = {"r2plus1d": dict(arch="r2plus1d", width=8, layers=[1, 1, 1, 1]),
        "video_swin": dict(arch="video_swin", embed_dim=12, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])}


def test_full_width_r2plus1d_has_r2plus1d_18_shapes():
    """width 64, layers [2,2,2,2] = torchvision r2plus1d_18 except the stem's first conv (6 channels) and the head."""
    ours = VideoClassifier(VideoConfig(arch="r2plus1d")).backbone.state_dict()
    ref = r2plus1d_18(num_classes=len(CLASSES)).state_dict()
    assert set(ours) == set(ref)
    differ = [k for k in ref if ours[k].shape != ref[k].shape]
    assert differ == ["stem.0.weight"] and ours["stem.0.weight"].shape[1] == 6


@pytest.mark.parametrize("arch", ["r2plus1d", "video_swin"])
@pytest.mark.parametrize("size", [16, 32])
def test_forward_backward_at_small_sizes(arch, size):
    cfg = VideoConfig(**TINY[arch])
    model = VideoClassifier(cfg)
    frames = torch.randn(2, 10, 6, size, size).to(torch.bfloat16)
    logits = model(frames)
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="frames must be"):
        model(torch.randn(2, 10, 3, size, size))


def test_swin3d_t_layout_runs_at_32x32x10():
    """swin3d_t's own sizes (patch 2x4x4, window 8x7x7, dim 96, depths 2-2-6-2) run on a (10, 32, 32) clip."""
    cfg = VideoConfig(arch="video_swin", patch_size=[2, 4, 4], window_size=[8, 7, 7], embed_dim=96,
                      depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])
    model = VideoClassifier(cfg).eval()
    assert 27e6 < parameter_count(cfg) < 29e6  # swin3d_t: 27.9 M
    with torch.no_grad():
        assert model(torch.randn(1, 10, 6, 32, 32)).shape == (1, len(CLASSES))


@pytest.mark.parametrize("arch", ["r2plus1d", "video_swin"])
def test_train_stream_save_load(smoke_corpus, tmp_path, arch):
    cfg = VideoConfig(**TINY[arch], batch_size=4, max_steps=3, norm_clips=8, threads=1)
    det, history = train_video(smoke_corpus, cfg, progress=False)
    assert len(history["loss"]) == 3 and all(np.isfinite(history["loss"]))
    assert det.kind == "video" and det.name == arch and det.frame_window == 10
    assert torch.all(det.model.channel_std > 0) and not torch.all(det.model.channel_mean == 0)

    runs = load_runs(smoke_corpus, "test", progress=False)[:1]
    results = replay_runs(runs, det, progress=False)
    r, run = results[0], runs[0]
    assert r.probs.shape == (len(run) - 9, len(CLASSES)) and r.vacuity is None
    np.testing.assert_allclose(r.probs.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(r.score, 1.0 - r.probs[:, 0])
    # streaming outputs = the batched windows of the run (frames t-9..t)
    windows = torch.stack([run.frames[t - 9:t + 1] for t in range(9, len(run))]).float()
    batched = torch.softmax(det.logits(windows), -1).double().numpy()
    np.testing.assert_allclose(r.probs, batched, atol=1e-5)

    det.save(tmp_path / arch)
    again = VideoDetector.load(tmp_path / arch)
    for k, v in det.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    np.testing.assert_allclose(replay_runs(runs, again, progress=False)[0].probs, r.probs, atol=0)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


def test_config_refuses_unknown_arch():
    with pytest.raises(ValueError, match="arch must be one of"):
        VideoConfig(arch="i3d")


def test_tune_a_video_baseline_and_report_it_with_the_tuned_params(smoke_corpus, tmp_path):
    """eval.tune trains the video baseline in each trial under the `video` budget; the report trains it with
    the best params (+ its own overrides) and records them."""
    import json

    from eval.report import main as report_main
    from eval.tune import main as tune_main

    budget = "video={width: 8, layers: [1, 1, 1, 1], batch_size: 4, max_steps: 2, norm_clips: 8, threads: 1}"
    tuned = tmp_path / "tuned" / "r2plus1d"
    assert tune_main(["--corpus", str(smoke_corpus), "--out", str(tuned), "baseline=r2plus1d", "n_trials=2", budget]) == 0
    best = json.loads((tuned / "best.json").read_text())
    trials = json.loads((tuned / "trials.json").read_text())
    assert len(trials) == 2 and {"lr", "weight_decay", "epochs", "width"} == set(best["params"])
    assert best["config"]["arch"] == "r2plus1d" and best["config"]["lr"] == best["params"]["lr"]
    with pytest.raises(SystemExit, match="video baselines"):
        tune_main(["--corpus", str(smoke_corpus), "--out", str(tmp_path / "bad"), "baseline=cusum", budget])

    out = tmp_path / "report"
    assert report_main(["--corpus", str(smoke_corpus), "--out", str(out), "--tuned", str(tmp_path / "tuned"),
                        "methods=[r2plus1d]", "r2plus1d={width: 8, layers: [1, 1, 1, 1], batch_size: 4, max_steps: 2, "
                        "norm_clips: 8, threads: 1}", "n_resamples=100", "figures=false"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["r2plus1d"]["tuned_params"] == best["params"]
    saved = json.loads((out / "video" / "r2plus1d" / "config.json").read_text())
    assert saved["video"]["lr"] == best["params"]["lr"] and saved["video"]["width"] == 8  # report override wins
