"""Top Hessian eigenvalue (capture/hessian.py) against explicit Hessians; the factory's `hessian_top` series
does not perturb training; the Hessian-TCN baseline (eval/baselines/hessian_tcn.py) trains, streams,
tunes and reports on a tiny corpus generated here."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from capture.config import load_config, save_config
from capture.hessian import LanczosSettings, lanczos_top_eigenvalue, top_hessian_eigenvalue
from capture.recorder import Frame
from capture.store import RunStore, RunStoreError, RunWriter
from eval.baselines import MissingHessianError, TCNConfig, load_hessian_tcn, require_hessian, train_hessian_tcn
from eval.baselines.hessian_tcn import HESSIAN, hessian_features
from eval.baselines.tcn import windows_logits
from eval.replay import load_runs, replay_runs, run_outputs
from eval.tune import main as tune_main, space, tune
from factory.config import FactoryConfig
from factory.generate import plan, write_manifest
from factory.spec import RunSpec
from factory.train import run_one

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


# ---------------------------------------------------------------- the eigenvalue

class Quadratic(nn.Module):
    """L(theta) = 1/2 theta^T A theta (the loss_fn below): Hessian A, whatever theta is."""

    def __init__(self, n: int):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return self.theta


def _spectrum_matrix(eigs: np.ndarray, seed: int = 0) -> torch.Tensor:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigs), len(eigs))))
    return torch.tensor(q @ np.diag(eigs) @ q.T, dtype=torch.float32)


@pytest.mark.parametrize("eigs", [np.linspace(-1.0, 5.0, 40),  # top eigenvalue 5
                                  np.r_[-10.0, np.linspace(-2.0, 3.0, 39)]])  # largest |eig| is negative: 'LA' gives 3
def test_quadratic_with_known_spectrum(eigs):
    a = _spectrum_matrix(eigs)
    value = top_hessian_eigenvalue(Quadratic(len(eigs)), lambda out, y: 0.5 * out @ a @ out, None, None, tol=1e-6)
    assert value == pytest.approx(eigs.max(), rel=1e-4)


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def _explicit_hessian(model: nn.Module, x, y) -> np.ndarray:
    """torch.autograd.functional.hessian of the batch loss over the flattened parameters (train mode,
    buffers cloned as in capture.hessian)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[i:i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(model, {**params, **buffers}, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat).double().numpy()


def test_tiny_model_against_explicit_hessian_and_state_untouched():
    torch.manual_seed(0)
    model = _tiny_net().train()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(3):  # running statistics away from their initial values
        model(x)
    expected = np.linalg.eigvalsh(_explicit_hessian(model, x, y)).max()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    top = lanczos_top_eigenvalue(model, nn.functional.cross_entropy, x, y, LanczosSettings(tol=1e-6, maxiter=200))
    assert top.converged and top.matvecs > 0
    assert top.value == pytest.approx(expected, rel=1e-3)
    for k, v in model.state_dict().items():  # parameters and batch-norm buffers (num_batches_tracked too)
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    # the default (looser) settings, as the factory uses them, are within 1%
    default = top_hessian_eigenvalue(model, nn.functional.cross_entropy, x, y)
    assert default == pytest.approx(expected, rel=1e-2)


def test_dropout_masks_are_fixed_within_one_measurement():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    rng = torch.get_rng_state()
    a = lanczos_top_eigenvalue(model, nn.functional.cross_entropy, x, y, LanczosSettings(tol=1e-8, maxiter=300))
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout draws came from a forked stream
    b = lanczos_top_eigenvalue(model, nn.functional.cross_entropy, x, y, LanczosSettings(tol=1e-8, maxiter=300))
    assert a.converged and a.value == pytest.approx(b.value, rel=1e-6)  # same masks: one fixed operator


def test_non_finite_loss_gives_nan():
    model = _tiny_net()
    x = torch.full((4, 4), float("nan"))
    assert np.isnan(top_hessian_eigenvalue(model, nn.functional.cross_entropy, x, torch.zeros(4, dtype=torch.long)))


# ---------------------------------------------------------------- the factory

def _tiny_factory(hessian_every: int) -> FactoryConfig:
    cfg = load_config(FactoryConfig, ROOT / "configs" / "factory" / "smoke.yaml",
                      ["training.steps=20", "training.batch_size=8", "training.eval_every=5", "training.image_size=16",
                       "training.max_train=200", "training.max_val=32", "training.lyapunov_windows=1",
                       "training.lyapunov_horizon=2", "capture.cadence=5", "capture.frame_size=8",
                       f"training.hessian_every={hessian_every}"])
    return cfg


def test_factory_series_does_not_perturb_training(tmp_path):
    spec = RunSpec("train", "resnet", "digits", "adamw", "instability_lr", 0)  # batch norm + an LR change
    stores = {}
    for every in (0, 1, 2):
        rec = run_one(spec, _tiny_factory(every), tmp_path / f"every{every}")
        stores[every] = RunStore(tmp_path / f"every{every}" / rec["store"])
    off, on, half = stores[0], stores[1], stores[2]
    assert off.frame_array_names == [] and "hessian" not in off.attrs
    for run in (on, half):  # the same trajectory, frames and readouts as without the measurement
        assert torch.equal(run.train_loss(), off.train_loss())
        assert torch.equal(run.frames().float(), off.frames().float())
        assert torch.allclose(run.readouts(), off.readouts(), equal_nan=True)
        assert run.attrs["label"] == off.attrs["label"]
    top = on.frame_array("hessian_top").numpy()
    assert top.dtype == np.float32 and top.shape == (len(on),) == (4,) and np.isfinite(top).all() and (top > 0).all()
    meta = on.attrs["hessian"]
    assert meta["every"] == 1 and meta["frames_computed"] == 4 and meta["seconds"] > 0 and meta["matvecs"] >= 4
    assert meta["seconds"] < on.attrs["seconds"] and 0 < meta["cpu_seconds"] < meta["run_cpu_seconds"]  # included
    every2 = half.frame_array("hessian_top").numpy()
    np.testing.assert_array_equal(every2[::2], top[::2])  # same parameters, batch and start vector
    assert np.isnan(every2[1::2]).all()
    with pytest.raises(ValueError, match="no per-frame array 'hessian_top'"):
        off.frame_array("hessian_top")


def _one_frame_writer(path: Path) -> RunWriter:
    writer = RunWriter(path, frame_size=4)
    writer.append_steps([1.0], [0.1])  # a lone frame at step 0 with no readouts: all-fill chunks are written too
    writer.append_frame(Frame(0, torch.zeros(6, 4, 4, dtype=torch.bfloat16), {}))
    return writer


def test_store_per_frame_arrays(tmp_path):
    writer = _one_frame_writer(tmp_path / "a.zarr")
    writer.set_frame_array("hessian_top", [np.nan])  # e.g. a diverged loss at the only measured frame
    store = RunStore(writer.finalize())
    assert store.frame_array_names == ["hessian_top"] and store.frame_array("hessian_top").isnan().all()
    assert store.frame_step().tolist() == [0] and store.readouts().isnan().all()
    with pytest.raises(RunStoreError, match="reserved"):
        _one_frame_writer(tmp_path / "b.zarr").set_frame_array("frames", [1.0])
    bad = _one_frame_writer(tmp_path / "c.zarr")
    bad.set_frame_array("hessian_top", [1.0, 2.0])
    with pytest.raises(RunStoreError, match="2 values for 1 frames"):
        bad.finalize()


# ---------------------------------------------------------------- the baseline

def test_features_by_hand():
    h = np.array([np.nan, 9.0, np.nan, np.nan, 99.0, np.inf, -3.0], dtype=np.float32)
    f = hessian_features(h, relative=True)  # columns: log_top, dlog_top, fresh, missing, log_top_rel
    l9, l99, lm3 = np.log(10.0), np.log(100.0), -np.log(4.0)
    np.testing.assert_allclose(f[:, 0], [0, l9, l9, l9, l99, l99, lm3], rtol=1e-6)
    np.testing.assert_allclose(f[:, 1], [0, 0, 0, 0, l99 - l9, l99 - l9, lm3 - l99], rtol=1e-6)
    np.testing.assert_array_equal(f[:, 2], [0, 1, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(f[:, 3], [1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(f[:, 4], [0, 0, 0, 0, l99 - l9, l99 - l9, lm3 - l9], rtol=1e-6)
    for t in range(len(h)):  # causal: a row only depends on the past
        np.testing.assert_array_equal(hessian_features(h[:t + 1])[t], f[t])
    assert hessian_features(h, relative=False).shape == (7, 4)


def _generate(cfg: FactoryConfig, corpus: Path) -> None:
    """factory.generate's work in this process (one torch thread): every run of the plan, then the manifest."""
    specs = plan(cfg)
    for spec in specs:
        if not (corpus / "runs" / f"{spec.run_id}.zarr").exists():
            run_one(spec, cfg, corpus)
    save_config(cfg, corpus)
    write_manifest(specs, corpus)


def _tiny_hessian_config(hessian_every: int = 3) -> FactoryConfig:
    """The smoke runs (same training: the train and val runs are the smoke corpus's, labels included) with
    `hessian_top` at every 3rd frame, and a cheap test architecture."""
    return load_config(FactoryConfig, ROOT / "configs" / "factory" / "smoke.yaml",
                       [f"training.hessian_every={hessian_every}", "val.perturbations=[healthy, overfit]",
                        "test.archs=[densenet]", "test.datasets=[textures]", "test.perturbations=[healthy, instability_lr]"])


@pytest.fixture(scope="module")
def hessian_corpus(tmp_path_factory) -> Path:
    """6 runs of 12 frames with `hessian_top`: train resnet healthy / instability_lr, val vit healthy / overfit
    (labelled instability, as in the smoke corpus), test densenet healthy / instability_lr. Read-only."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("hcorpus") / "corpus"
    _generate(_tiny_hessian_config(), out)
    torch.set_num_threads(before)
    return out


def test_baseline_trains_streams_and_round_trips(hessian_corpus, tmp_path):
    train = load_runs(hessian_corpus, "train", frames=False, progress=False)
    test = load_runs(hessian_corpus, "test", frames=False, progress=False)
    assert all(r.frame_arrays["hessian_top"].shape == (12,) for r in train + test)
    det, hist = train_hessian_tcn(train, TCNConfig(epochs=30, channels=16), progress=False)
    assert det.name == "hessian_tcn" and det.kind == "scalar" and det.frame_window == 0
    assert hist["n_train"] >= 3 and hist["train_loss"][-1] < hist["train_loss"][0]
    res = replay_runs(test + train, det, score_from=0, progress=False)
    for run, r in zip(test + train, res):
        assert r.probs.shape == (12, 5) and r.vacuity is None and np.isfinite(r.score).all()
        np.testing.assert_allclose(r.score, 1 - r.probs[:, 0], atol=1e-12)
        np.testing.assert_allclose(r.probs, torch.softmax(windows_logits(det, run), -1).numpy(), atol=1e-5)
    run = test[0]  # no look-ahead: the outputs of a run cut at frame t are those of the full run up to t
    full = run_outputs(run, det)
    for n in (3, 8):
        cut = run_outputs(run.truncated(n), det)
        np.testing.assert_allclose([o.probs for o in cut], [o.probs for o in full[:n]], atol=1e-7)
    det.save(tmp_path / "htcn")
    back = load_hessian_tcn(tmp_path / "htcn")
    np.testing.assert_allclose(replay_runs(test, back, score_from=0, progress=False)[0].probs, res[0].probs, atol=1e-6)
    assert back.features is HESSIAN


def test_tune_and_report(hessian_corpus, tmp_path):
    val = load_runs(hessian_corpus, "val", frames=False, progress=False)
    train = load_runs(hessian_corpus, "train", frames=False, progress=False)
    params, study = tune(space("hessian_tcn", train), val, n_trials=2, seed=0, progress=False)
    assert len(study.trials) == 2 and {"channels", "levels", "relative"} <= set(params)
    assert tune_main(["--corpus", str(hessian_corpus), "--out", str(tmp_path / "tuned" / "hessian_tcn"),
                      "baseline=hessian_tcn", "n_trials=2"]) == 0
    best = json.loads((tmp_path / "tuned" / "hessian_tcn" / "best.json").read_text())
    assert best["baseline"] == "hessian_tcn" and best["config"]["channels"] in (16, 32, 64)

    from eval.report import main as report_main

    out = tmp_path / "report"
    assert report_main(["--corpus", str(hessian_corpus), "--out", str(out), "--tuned", str(tmp_path / "tuned"),
                        "methods=[cusum, hessian_tcn]", "n_resamples=100", "figures=false"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["cusum", "hessian_tcn"] and metrics["hessian_tcn"]["kind"] == "scalar"
    assert metrics["hessian_tcn"]["tuned_params"] == best["params"]
    assert metrics["hessian_tcn"]["n_runs"] == 2 and metrics["hessian_tcn"]["event_auprc"] is not None


def test_corpus_without_the_series_is_a_clear_error(hessian_corpus, tmp_path):
    """One train run regenerated with hessian_every=0: every entry point names the corpus and the key."""
    corpus = shutil.copytree(hessian_corpus, tmp_path / "mixed")
    train = load_runs(corpus, "train", frames=False, progress=False)
    shutil.rmtree(corpus / "runs" / f"{train[0].run_id}.zarr")
    _generate(_tiny_hessian_config(hessian_every=0), corpus)  # only the removed run is made again
    train = load_runs(corpus, "train", frames=False, progress=False)
    assert "hessian_top" not in train[0].frame_arrays and "hessian_top" in train[1].frame_arrays
    pattern = rf"1 of 2 .*runs of corpus {corpus}.*training\.hessian_every"
    with pytest.raises(MissingHessianError, match=pattern):
        train_hessian_tcn(train, TCNConfig(epochs=1), progress=False)
    with pytest.raises(MissingHessianError, match=pattern):
        tune_main(["--corpus", str(corpus), "--out", str(tmp_path / "t"), "baseline=hessian_tcn", "n_trials=1"])
    from eval.report import main as report_main

    with pytest.raises(MissingHessianError, match=pattern):
        report_main(["--corpus", str(corpus), "--out", str(tmp_path / "r"), "methods=[hessian_tcn]", "figures=false"])
    with pytest.raises(MissingHessianError, match="training.hessian_every"):  # a diagnoser streaming such a run
        run_outputs(train[0], train_hessian_tcn(train[1:], TCNConfig(epochs=1), progress=False)[0])
    require_hessian(train[1:])  # the runs that have it pass
