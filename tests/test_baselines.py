"""Scalar and readout baselines (eval/baselines/) on scripted series, and their tuning (eval/tune.py)."""
import itertools
import json
import math

import numpy as np
import optuna
import pytest
import torch
from scipy.special import gammaln

from eval.baselines import (BOCPD, BocpdConfig, CusumConfig, LossResiduals, ResidualConfig, TCNConfig, TCNDetector,
                            cusum, deviation_scores, gwa_config, head_grad_config, make_baseline, train_tcn)
from eval.baselines.tcn import windows_logits
from eval.metrics import alert_frames, event_auprc
from eval.replay import LoadedRun, load_runs, replay_runs, run_outputs
from eval.tune import STUDY, baseline_config, journal, main as tune_main, space, tune


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _loss(n=600, shift_at=None, shift=0.0, seed=0):
    """A slowly decaying training loss with 2% noise, optionally shifted up from `shift_at` on."""
    rng = np.random.default_rng(seed)
    s = np.arange(n)
    loss = 0.5 + 1.5 * np.exp(-s / 150) + 0.02 * rng.standard_normal(n)
    if shift_at is not None:
        loss[shift_at:] += shift
    return loss.astype(np.float32)


def _scores(loss, detector) -> np.ndarray:
    return np.array([o.score for o in run_outputs(_run(loss), detector)])


def _run(loss, cadence=10, readouts=None, names=("loss",)):
    steps = np.arange(0, len(loss), cadence)
    ro = np.asarray(readouts if readouts is not None else loss[steps][:, None], dtype=np.float32)
    return LoadedRun({"run_id": "scripted"}, {"label": "healthy", "epoch_steps": 50}, steps, ro, tuple(names), loss,
                     np.full(len(loss), 1e-3, dtype=np.float32))


# ---------------------------------------------------------------- CUSUM

def test_cusum_fires_on_a_level_shift_not_on_a_stationary_series():
    cfg = CusumConfig(k=0.5)
    for seed in range(3):
        flat = _scores(_loss(seed=seed), make_baseline("cusum", cfg))
        assert flat.max() < 10, f"seed {seed}: stationary series reaches {flat.max():.1f}"
        shifted = _scores(_loss(shift_at=300, shift=0.2, seed=seed), make_baseline("cusum", cfg))
        np.testing.assert_array_equal(shifted[:30], flat[:30])  # frames up to step 290: identical (causal)
        assert shifted[30] > 5  # the frame at step 300 sees one shifted step
        assert (shifted[31:35] > 20).all()  # then it stays high for the next frames (3 consecutive -> alert)


def test_cusum_statistic_by_hand():
    z = np.array([0.0, 2.0, 2.0, 1.0, -3.0, 1.0, 5.0])
    stat, state = cusum(z, k=0.5)
    np.testing.assert_allclose(stat, [0, 1.5, 3.0, 3.5, 0, 0.5, 5.0])
    two, _ = cusum(z, k=0.5, two_sided=True)
    np.testing.assert_allclose(two, [0, 1.5, 3.0, 3.5, 2.5, 1.0, 5.0])  # the lower side catches the -3
    reset, _ = cusum(z, k=0.5, h=2.5)
    np.testing.assert_allclose(reset, [0, 1.5, 3.0, 0.5, 0, 0.5, 5.0])  # 3.0 is reported, then restarts from 0
    cont, _ = cusum(z[3:], k=0.5, state=cusum(z[:3], k=0.5)[1])
    np.testing.assert_allclose(cont, stat[3:])  # streaming in pieces = all at once
    assert state == (5.0, 0.0)


def test_residuals_are_standardised_and_robust():
    rng = np.random.default_rng(1)
    x = 3.0 + 0.1 * rng.standard_normal(2000)
    z = LossResiduals(ResidualConfig()).update(x)
    assert abs(np.std(z[200:]) - 1) < 0.15 and abs(np.mean(z[200:])) < 0.1
    x[1000] = np.nan
    x[1500] = 100.0  # a single spike: clipped, and it barely moves the trend
    res = LossResiduals(ResidualConfig(z_clip=10))
    z = res.update(x)
    assert z[1000] == 10 and z[1500] == 10 and abs(z[1510]) < 4


# ---------------------------------------------------------------- BOCPD

def _segment_log_evidence(x, mu0, k0, a0, b0):
    """log p(x_1..n) under the Normal-Gamma prior, in closed form (Murphy 2007, eq. 95)."""
    n = len(x)
    if n == 0:
        return 0.0
    mean = x.mean()
    kn, an = k0 + n, a0 + n / 2
    bn = b0 + 0.5 * ((x - mean) ** 2).sum() + k0 * n * (mean - mu0) ** 2 / (2 * kn)
    return (gammaln(an) - gammaln(a0) + a0 * np.log(b0) - an * np.log(bn) + 0.5 * (np.log(k0) - np.log(kn))
            - n / 2 * np.log(2 * np.pi))


def _brute_force_run_length(x, lam, prior):
    """P(r_t = r | x_1..t) by enumerating every change pattern (a change after x_s with probability 1/lam)."""
    t, h = len(x), 1 / lam
    post = np.zeros(t + 1)
    for changes in itertools.product([0, 1], repeat=t):
        logp, start = 0.0, 0
        for s, c in enumerate(changes):
            logp += np.log(h if c else 1 - h)
            if c:
                logp += _segment_log_evidence(x[start:s + 1], *prior)
                start = s + 1
        logp += _segment_log_evidence(x[start:], *prior)
        post[t - start] += np.exp(logp)
    return post / post.sum()


def test_bocpd_posterior_equals_brute_force_enumeration():
    x = np.array([0.1, -0.3, 0.2, 2.5, 2.9, 2.4, 3.1])
    prior = (0.0, 1.0, 1.0, 1.0)
    for max_run in (50, 7):
        b = BOCPD(hazard_lambda=10, mu0=0.0, kappa0=1.0, alpha0=1.0, beta0=1.0, max_run=max_run)
        for t in range(1, len(x) + 1):
            post = b.update(x[t - 1])
            np.testing.assert_allclose(post, _brute_force_run_length(x[:t], 10, prior), rtol=1e-9, atol=1e-12)


def test_bocpd_finds_a_scripted_change_point():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 150), rng.normal(3, 1, 150)])
    b = BOCPD(hazard_lambda=100)
    mass, map_r = b.run(x, recent=10)
    assert map_r[140] > 100  # one long run before the change
    assert abs((200 - map_r[200]) - 150) <= 3  # the MAP run at t = 200 started at the change (index 150)
    assert mass[10:150].max() < 0.5 and mass[150:160].max() > 0.95
    assert 150 <= 10 + int(np.argmax(mass[10:] > 0.5)) <= 155  # first crossing after warm-up: at the change
    with pytest.raises(ValueError, match="hazard_lambda"):
        BOCPD(hazard_lambda=1)


def test_bocpd_detector_on_a_loss_jump():
    cfg = BocpdConfig(hazard_lambda=200, recent=10)
    for seed in range(3):
        flat = _scores(_loss(seed=seed), make_baseline("bocpd", cfg))
        jump = _scores(_loss(shift_at=300, shift=0.2, seed=seed), make_baseline("bocpd", cfg))
        assert alert_frames(flat[10:], 0.5) == [] and np.mean(flat[10:] > 0.5) < 0.1  # no confirmed alert
        assert alert_frames(jump[10:], 0.5)[0] == 22 and (jump[30:33] > 0.9).all()  # frames at steps 300, 310, 320


# ---------------------------------------------------------------- readouts alone

def test_readout_deviation_scores():
    head = np.array([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 5.0, 6.0])
    up = deviation_scores(head, head_grad_config(ref_frames=3))
    assert np.abs(up[:6]).max() < 3 and up[6] > 10
    for t in range(len(head)):  # causal
        assert deviation_scores(head[:t + 1], head_grad_config(ref_frames=3))[-1] == up[t]
    gwa = np.array([0.3, 0.31, 0.29, 0.3, np.nan, 0.05])
    down = deviation_scores(gwa, gwa_config(ref_frames=3))
    assert down[5] > 10 and down[4] == down[3]  # a missing frame keeps the last value
    assert deviation_scores([np.nan, np.nan, 0.3], gwa_config())[:2].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- TCN

def test_tcn_trains_streams_and_round_trips(smoke_corpus, tmp_path):
    runs = load_runs(smoke_corpus, None, frames=False, progress=False)
    det, hist = train_tcn(runs, TCNConfig(epochs=30, channels=16), progress=False)
    assert hist["n_train"] >= 10 and sum(c > 0 for c in hist["class_counts"]) >= 2
    assert hist["train_loss"][-1] < 0.5 * hist["train_loss"][0]
    assert train_tcn(runs, TCNConfig(epochs=30, channels=16), progress=False)[1]["train_loss"] == hist["train_loss"]  # seeded
    res = replay_runs(runs, det, score_from=0, progress=False)
    for run, r in zip(runs, res):
        assert r.probs.shape == (12, 5) and r.vacuity is None
        np.testing.assert_allclose(r.probs.sum(1), 1, atol=1e-6)
        np.testing.assert_allclose(r.score, 1 - r.probs[:, 0], atol=1e-12)
        # streaming windows = the batch windows the model was trained on
        np.testing.assert_allclose(r.probs, torch.softmax(windows_logits(det, run), -1).numpy(), atol=1e-5)
    det.save(tmp_path / "tcn")
    back = TCNDetector.load(tmp_path / "tcn")
    again = replay_runs(runs[:2], back, score_from=0, progress=False)
    np.testing.assert_allclose(again[0].probs, res[0].probs, atol=1e-6)


# ---------------------------------------------------------------- tuning

def test_tune_on_the_smoke_corpus(smoke_corpus, tmp_path):
    runs = load_runs(smoke_corpus, None, frames=False, progress=False)
    params, study = tune(space("cusum"), runs, n_trials=4, seed=0, progress=False)
    assert len(study.trials) == 4 and {"k", "two_sided", "residuals.span"} <= set(params)
    assert 0 <= study.best_value <= 1
    best = replay_runs(runs, make_baseline("cusum", baseline_config("cusum", params)), progress=False)
    assert event_auprc(best) == pytest.approx(study.best_value)  # the params rebuild the best trial
    again, _ = tune(space("cusum"), runs, n_trials=4, seed=0, progress=False)
    assert again == params  # seeded
    for name in ("bocpd", "head_grad", "gwa"):
        _, st = tune(space(name), runs, n_trials=2, seed=1, progress=False)
        assert all(math.isfinite(t.value) for t in st.trials)
    with pytest.raises(KeyError, match="not a field"):
        baseline_config("cusum", {"residuals.nope": 1})
    quiet = [r for r in load_runs(smoke_corpus, "test", frames=False, progress=False) if r.truth["label"] == "healthy"]
    with pytest.raises(ValueError, match="no positive frame"):  # Healthy runs only: nothing to detect
        tune(space("gwa"), quiet, n_trials=1, progress=False)
    assert tune_main(["--corpus", str(smoke_corpus), "--out", str(tmp_path / "t"), "baseline=tcn_scalar", "n_trials=2"]) == 0
    best = json.loads((tmp_path / "t" / "best.json").read_text())
    assert best["baseline"] == "tcn_scalar" and best["config"]["channels"] in (16, 32, 64)
    assert len(json.loads((tmp_path / "t" / "trials.json").read_text())) == 2


def test_tune_shares_one_study_across_workers_and_resumes(smoke_corpus, tmp_path):
    """workers=2: two real processes on one journal file, n_trials in total; rerunning resumes the study,
    runs again the trial a killed process left RUNNING, and refuses a study of other settings."""
    out = tmp_path / "t"
    base = ["--corpus", str(smoke_corpus), "--out", str(out), "baseline=cusum"]
    assert tune_main([*base, "n_trials=6", "workers=2"]) == 0
    trials = json.loads((out / "trials.json").read_text())
    # optuna's MaxTrialsCallback counts after each trial, so two workers that start their last trials at the
    # same moment can end one over (seen under heavy load): 6 or 7, never fewer
    n = len(trials)
    assert n in (6, 7) and {t["state"] for t in trials} == {"COMPLETE"} and all(t["seconds"] > 0 for t in trials)
    first = [t["params"] for t in trials]
    assert len({json.dumps(p, sort_keys=True) for p in first}) == n  # the workers sample with different seeds
    best = json.loads((out / "best.json").read_text())
    assert best["event_auprc"] == max(t["value"] for t in trials)
    # a killed process: a trial asked for and never told
    study = optuna.load_study(study_name=STUDY, storage=journal(out / "study.journal"))
    study.ask()
    assert tune_main([*base, "n_trials=9"]) == 0
    trials = json.loads((out / "trials.json").read_text())
    assert [t["state"] for t in trials] == ["COMPLETE"] * n + ["FAIL"] + ["COMPLETE"] * (9 - n)
    assert [t["params"] for t in trials[:n]] == first  # the old trials are kept, not rerun
    with pytest.raises(SystemExit, match="seed=0"):
        tune_main([*base, "n_trials=9", "seed=3"])
