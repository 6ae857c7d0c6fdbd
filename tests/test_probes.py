"""The regressibility probes of paper Sec. 5.4 (eval/probes.py): high R^2 where the target is a known
function of the input, the per-run R^2 against sklearn, the loss-history windows, and the command on
the smoke corpus (files, structure, finite R^2)."""
import json

import numpy as np
import pytest
from sklearn.metrics import r2_score

from eval.probes import (ProbeConfig, fit_history_to_state, fit_state_to_loss, loss_histories, main as probes_main,
                         r2_by_run, transform_loss)

SMALL = ProbeConfig(mlp_hidden=[32, 16], mlp_max_iter=300, tcn_channels=8, tcn_epochs=30, history_steps=16, batch_size=64)


def test_state_to_loss_mlp_recovers_a_known_function(one_thread):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 12))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + 0.3 * x[:, 3]
    model = fit_state_to_loss(x[:900], y[:900], SMALL)
    r = r2_by_run(y[900:], model.predict(x[900:]), np.repeat(np.arange(10), 30), [f"r{i}" for i in range(10)])
    assert r["r2_pooled"] > 0.9 and r["r2_per_run_mean"] > 0.8 and r["n_runs_with_r2"] == 10


def test_loss_to_state_tcn_recovers_a_known_function(one_thread):
    rng = np.random.default_rng(1)
    h = np.cumsum(rng.normal(size=(900, 1, 16)), axis=-1)  # random-walk loss histories
    h = np.concatenate([h, np.zeros_like(h)], axis=1)  # (N, 2, H): value, non-finite flag
    y = np.stack([h[:, 0, -8:].mean(-1), h[:, 0, -1] - h[:, 0, -5]], axis=1)  # recent level and slope
    predict = fit_history_to_state(h[:600], y[:600], SMALL)
    r = r2_by_run(y[600:], predict(h[600:]), np.repeat(np.arange(10), 30), list("abcdefghij"))
    assert r["r2_pooled"] > 0.9


def test_r2_per_run_matches_sklearn_and_skips_constant_runs():
    rng = np.random.default_rng(2)
    y, pred = rng.normal(size=20), rng.normal(size=20)
    run = np.repeat([0, 1, 2, 3], 5)
    y[15:] = 1.0  # run 3: a constant target has no R^2
    r = r2_by_run(y, pred, run, ["a", "b", "c", "d"])
    expected = [r2_score(y[run == i], pred[run == i]) for i in range(3)]
    assert list(r["per_run"]) == ["a", "b", "c"] and r["per_run"]["b"] == pytest.approx(expected[1])
    assert r["r2_per_run_mean"] == pytest.approx(np.mean(expected)) and r["r2_pooled"] == pytest.approx(r2_score(y, pred))
    assert r["r2_per_run_sd"] == pytest.approx(np.std(expected, ddof=1)) and r["n_test_runs"] == 4


def test_loss_histories_are_causal_and_fill_nonfinite():
    loss = transform_loss(np.array([1.0, 2.0, np.inf, 4.0, np.nan, 8.0]), "log")
    h = loss_histories(loss, np.array([0, 3, 5]), 3)
    assert h.shape == (3, 2, 3)
    np.testing.assert_allclose(h[0, 0], np.log([1.0, 1.0, 1.0]))  # left-padded with step 0
    np.testing.assert_allclose(h[1, 0], np.log([2.0, 2.0, 4.0]))  # step 2 (inf) carries step 1 forward
    np.testing.assert_array_equal(h[1, 1], [0, 1, 0])
    np.testing.assert_allclose(h[2, 0], np.log([4.0, 4.0, 8.0]))
    np.testing.assert_array_equal(h[2, 1], [0, 1, 0])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # 20 MLP epochs on purpose
def test_probes_command_on_the_smoke_corpus(smoke_corpus, tmp_path, one_thread):
    out = tmp_path / "probes"
    assert probes_main(["--corpus", str(smoke_corpus), "--out", str(out), "pool=4", "mlp_hidden=[16]", "mlp_max_iter=20",
                        "tcn_epochs=2", "tcn_channels=8", "history_steps=16"]) == 0
    p = json.loads((out / "probes.json").read_text())
    for key in ("state_to_loss", "loss_to_state"):
        r = p[key]
        assert r["n_test_runs"] == 4 and r["n_test"] > 0 and r["n_train"] > 0
        assert np.isfinite(r["r2_pooled"]) and np.isfinite(r["r2_per_run_mean"]) and r["n_runs_with_r2"] >= 1
        assert all(np.isfinite(v) for v in r["per_run"].values())
    assert "state -> loss (MLP)" in (out / "probes.md").read_text()
    assert json.loads((out / "config.json").read_text())["pool"] == 4
