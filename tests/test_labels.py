"""Labeling rules (paper Appendix A) on scripted signal sequences: each rule fires where it should,
stays quiet where it should not, and its statistics are the libraries' own."""
import json

import numpy as np
import pymannkendall as mk
import pytest
import torch
from capture.config import FieldError
import statsmodels.api as sm
from arch.bootstrap import StationaryBootstrap
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from factory.labels import (
    PRIORITY,
    RuleResult,
    assign_label,
    blowup,
    collapse,
    concept_bias,
    forgetting,
    healthy,
    loss_spikes,
    lyapunov,
    overfitting,
)


def _strict_json(result: RuleResult) -> None:
    json.dumps(result.detail, allow_nan=False)


# ------------------------------------------------------------------ overfitting
def _u_shape(epochs: int = 30, minimum: int = 12, noise: float = 0.005, seed: int = 1):
    """Train loss falls linearly; val loss falls to `minimum`, then rises (a V with slight noise)."""
    e = np.arange(epochs)
    rng = np.random.default_rng(seed)
    train = 1.5 - 0.04 * e + noise * rng.normal(size=epochs)
    val = np.where(e < minimum, 2.0 - 0.08 * e, 2.0 - 0.08 * minimum + 0.05 * (e - minimum)) + noise * rng.normal(size=epochs)
    return train, val


def test_overfitting_fires_on_u_shape_at_window_end():
    train, val = _u_shape()
    res = overfitting(train, val, window=10)
    assert res.fired
    # e0 = 9: the first window (epochs 9..18) with 7 of its 10 epochs past the minimum at epoch 12
    assert res.detail["decisive"]["e0"] == 9
    assert res.trigger == 9 + 10 - 1
    _strict_json(res)


def test_overfitting_statistics_are_the_libraries():
    train, val = _u_shape()
    res = overfitting(train, val, window=10)
    d = res.detail["decisive"]
    direct = mk.trend_free_pre_whitening_modification_test(val[9:19], alpha=0.05)
    assert d["p_val"] == pytest.approx(direct.p) and d["z_val"] == pytest.approx(direct.z)
    # BY over every candidate, wrong-direction trends entering as p = 1
    p_val = []
    for e0 in res.detail["e0"]:
        r = mk.trend_free_pre_whitening_modification_test(val[e0:e0 + 10])
        p_val.append(r.p if r.z > 0 else 1.0)
    np.testing.assert_allclose(res.detail["p_val_adj"], multipletests(p_val, alpha=0.05, method="fdr_by")[1])
    gap = val - train
    assert d["gap_excess"] == pytest.approx(gap[18] - np.median(gap[:9]))
    assert d["gap_threshold"] == pytest.approx(2.0 * np.std(gap[:9], ddof=1))


def test_overfitting_quiet_on_flat_noisy_val():
    rng = np.random.default_rng(0)
    e = np.arange(40)
    res = overfitting(1.5 - 0.03 * e + 0.01 * rng.normal(size=40), 1.0 + 0.05 * rng.normal(size=40))
    assert not res.fired and res.trigger is None
    assert res.detail["n_candidates"] == 40 - 10 + 1 - 3


def test_overfitting_by_correction_blocks_a_lone_borderline_window():
    # val wiggles without trend, then rises cleanly over the last 8 epochs: one candidate is
    # significant on its own (p < 0.05, practical gap too), but not after BY over 10 candidates
    e = np.arange(20)
    val = np.where(e < 12, 1.0 + 0.1 * (-1.0) ** e, 1.0 + 0.1 * (e - 11))
    res = overfitting(1.5 - 0.04 * e, val, window=8)
    d = res.detail["decisive"]
    assert d["p_val"] < 0.05 and d["p_train"] < 0.05 and d["practical"]
    assert d["p_val_adj"] > 0.05
    assert not res.fired


def test_overfitting_skips_windows_with_nonfinite_values():
    train, val = _u_shape()
    val[15] = np.nan
    res = overfitting(train, val, window=10)
    assert res.detail["n_skipped_nonfinite"] == 10  # the windows starting at 6..15
    assert res.fired and res.trigger - 10 + 1 > 15


def test_overfitting_short_and_constant_series():
    assert not overfitting(np.ones(8), np.ones(8), window=10).fired  # no candidate fits
    res = overfitting(np.zeros(20), np.ones(20), window=6)  # constant windows: "no trend", no warning
    assert not res.fired and res.detail["n_candidates"] == 12
    with pytest.raises(ValueError):
        overfitting(np.ones(20), np.ones(20), window=2)
    with pytest.raises(ValueError):
        overfitting(np.ones(20), np.ones(19))



def _memorised(epochs: int = 20, seed: int = 3):
    """A short run that memorises a tiny subset: both losses fall fast for 3 epochs (the transient),
    then the training loss sits near zero with noise while the validation loss climbs steadily."""
    e = np.arange(epochs)
    rng = np.random.default_rng(seed)
    train = np.where(e < 3, 2.3 - 0.7 * e, 0.02 * np.exp(-0.05 * (e - 3))) + 0.004 * rng.normal(size=epochs)
    val = np.where(e < 3, 2.3 - 0.5 * e, 0.8 + 0.06 * (e - 3)) + 0.01 * rng.normal(size=epochs)
    return np.abs(train), val


def test_overfitting_diff_scale_and_train_direction_catch_a_memorised_subset():
    train, val = _memorised()
    paper = overfitting(train, val, window=8)  # std over a history that is mostly the transient
    assert not paper.fired
    res = overfitting(train, val, window=8, gap_scale="diff", train_trend="decreasing")
    assert res.fired
    d = res.detail["decisive"]
    hist = (val - train)[: d["e0"]]
    from scipy.stats import median_abs_deviation

    assert d["gap_threshold"] == pytest.approx(2.0 * median_abs_deviation(np.diff(hist), scale="normal") / np.sqrt(2))
    assert d["z_train"] < 0 and d["p_val_adj"] < 0.05


def test_overfitting_train_direction_still_required():
    train, val = _memorised()
    rising_train = train + 0.05 * np.arange(len(train))  # training loss gets worse too: not overfitting
    assert not overfitting(rising_train, val, window=8, gap_scale="diff", train_trend="decreasing").fired
    assert not overfitting(rising_train, val, window=8, gap_scale="diff", train_trend="not_rising").fired
    with pytest.raises(ValueError, match="gap_scale"):
        overfitting(train, val, window=8, gap_scale="iqr")
    with pytest.raises(ValueError, match="train_trend"):
        overfitting(train, val, window=8, train_trend="falling")


def test_overfitting_not_rising_catches_a_flat_memorised_training_loss():
    """Memorised by epoch 3: the training loss then sits at ~0.02 with noise and a drift too small
    to be significant, while the validation loss climbs. Its MK direction is noise (here z > 0 at
    every candidate), so "decreasing" misses the run; "not_rising" asks only that it not rise
    significantly."""
    e = np.arange(20)
    rng = np.random.default_rng(15)
    train = np.abs(np.where(e < 3, 2.3 - 0.7 * e, 0.02 + 0.001 * (e - 3)) + 0.01 * rng.normal(size=20))
    val = np.where(e < 3, 2.3 - 0.5 * e, 0.8 + 0.06 * (e - 3)) + 0.01 * rng.normal(size=20)
    assert not overfitting(train, val, window=8, gap_scale="diff", train_trend="decreasing").fired
    res = overfitting(train, val, window=8, gap_scale="diff", train_trend="not_rising")
    assert res.fired and res.detail["decisive"]["z_train"] > 0

# ------------------------------------------------------------------ loss spikes
def _smooth(steps: int = 3000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 2.0 * np.exp(-np.arange(steps) / 800) + 0.3 + 0.01 * rng.normal(size=steps)


def test_spikes_three_within_span_fire_at_the_third():
    loss = _smooth()
    loss[[1200, 1300, 1400]] += 3.0
    res = loss_spikes(loss)
    assert res.fired and res.trigger == 1400
    assert res.detail["firing_spikes"] == [1200, 1300, 1400]
    _strict_json(res)


def test_spikes_spread_wider_than_span_do_not_fire():
    loss = _smooth()
    loss[[1200, 1800, 2400]] += 3.0
    res = loss_spikes(loss)
    assert not res.fired
    assert res.detail["spike_steps"] == [1200, 1800, 2400]


def test_spike_events_merge_a_level_shift_but_not_divergence():
    loss = _smooth()
    loss[1500:1530] += 3.0  # a sustained jump (task switch): 30 spike steps, one event
    assert loss_spikes(loss).fired
    merged = loss_spikes(loss, merge_gap=2)
    assert not merged.fired and merged.detail["spike_steps"][0] == 1500
    bursts = _smooth()
    bursts[[1200, 1201, 1300, 1301, 1400]] += 3.0  # three separate bursts
    assert loss_spikes(bursts, merge_gap=2).trigger == 1400
    nan_tail = _smooth()
    nan_tail[1500:] = np.nan
    assert loss_spikes(nan_tail, merge_gap=2).trigger == 1502


def test_spikes_nan_tail_fires():
    loss = _smooth()
    loss[1500:] = np.nan
    res = loss_spikes(loss)
    assert res.fired and res.trigger == 1502
    assert res.detail["n_nonfinite"] == 1500 and len(res.detail["spike_steps"]) == 100  # list capped
    _strict_json(res)


@pytest.mark.parametrize("curve", ["smooth", "drift"])
def test_spikes_quiet_on_smooth_and_drifting_curves(curve):
    rng = np.random.default_rng(3)
    t = np.arange(5000)
    loss = _smooth(5000) if curve == "smooth" else 1.0 + 1e-4 * t + 0.05 * rng.normal(size=5000)
    assert not loss_spikes(loss).fired


def test_spike_z_matches_a_direct_computation():
    loss = _smooth()
    loss[2000] += 2.0
    res = loss_spikes(loss, count=1)
    assert res.trigger == 2000
    prev = loss[1000:2000]
    q25, q75 = np.percentile(prev, [25, 75])
    assert res.detail["spike_z"][0] == pytest.approx((loss[2000] - np.median(prev)) / ((q75 - q25) / 1.349 + 1e-6))


def test_spikes_need_history_but_count_early_nonfinite():
    loss = _smooth()
    loss[50] += 5.0  # before min_history (100) steps exist: no z, no spike
    assert 50 not in loss_spikes(loss).detail["spike_steps"]
    loss[0] = np.inf
    assert loss_spikes(loss).detail["spike_steps"][0] == 0



def test_spikes_min_rise_ignores_jitter_of_a_memorised_near_zero_loss():
    rng = np.random.default_rng(5)
    loss = 0.002 + 0.0002 * rng.normal(size=300)
    loss[[150, 170, 190]] = 0.01  # z ~ 30 against a tiny IQR, but a rise of only 0.008
    assert loss_spikes(loss, window=90, span=60).fired
    quiet = loss_spikes(loss, window=90, span=60, min_rise=0.2)
    assert not quiet.fired and quiet.detail["n_spikes"] == 0
    loss[[150, 170, 190]] = 1.0  # real spikes rise far above the floor
    assert loss_spikes(loss, window=90, span=60, min_rise=0.2).fired

def test_spike_jumps_inside_a_raised_stretch_are_events_of_their_own():
    rng = np.random.default_rng(4)
    loss = 0.3 + 0.02 * rng.normal(size=300)
    for t in (150, 162, 174):  # bursts 12 steps apart; the loss stays raised between them
        loss[t] = 8.0
        loss[t + 1:t + 12] = np.linspace(4.0, 2.0, 11)
    merged = loss_spikes(loss, window=90, span=45, merge_gap=2, min_rise=0.5)
    assert not merged.fired and merged.detail["n_spikes"] == 1
    jumps = loss_spikes(loss, window=90, span=45, merge_gap=2, min_rise=0.5, jump_frac=0.5)
    assert jumps.fired and jumps.detail["firing_spikes"] == [150, 162, 174]
    shift = 0.3 + 0.02 * rng.normal(size=300)
    shift[150:] += 2.0  # a level shift: one jump, then a raised plateau
    assert loss_spikes(shift, window=90, span=45, merge_gap=2, min_rise=0.5, jump_frac=0.5).detail["n_spikes"] == 1


def test_spikes_min_history_silences_the_noisy_first_steps():
    rng = np.random.default_rng(2)
    loss = 2.3 + 0.02 * rng.normal(size=300)
    loss[[12, 16, 20]] += 0.6  # ordinary early batches against 9 steps of a tiny IQR
    assert loss_spikes(loss, window=90, span=45, min_history=9).fired
    assert not loss_spikes(loss, window=90, span=45, min_history=45).fired


# ------------------------------------------------------------------ collapse
def _collapse_run(final_acc: float, final_loss: float, epochs: int = 20, steps: int = 300):
    acc = np.concatenate([np.linspace(0.2, 0.9, epochs // 2), np.full(epochs - epochs // 2, final_acc)])
    loss = np.concatenate([np.linspace(2.3, 0.3, steps // 2), np.full(steps - steps // 2, final_loss)])
    return acc, loss


def test_collapse_fires_when_a_learned_model_ends_at_chance():
    acc, loss = _collapse_run(0.1, 2.31)
    res = collapse(acc, loss, 0.1, window=5)
    assert res.fired and res.trigger == 10 and res.detail["peak_acc"] == pytest.approx(0.9)
    _strict_json(res)


@pytest.mark.parametrize("final_acc, final_loss, why", [
    (0.45, 1.2, "a forgetting run: half the classes still right"),
    (0.12, 0.4, "training loss still low: the model fits its data (e.g. a task switch to unlearned classes)"),
    (0.9, 0.3, "healthy"),
])
def test_collapse_quiet_otherwise(final_acc, final_loss, why):
    acc, loss = _collapse_run(final_acc, final_loss)
    assert not collapse(acc, loss, 0.1, window=5).fired, why


def test_collapse_needs_a_model_that_had_learned_and_a_sustained_end():
    never = np.full(20, 0.1)
    assert not collapse(never, np.full(300, 2.3), 0.1, window=5).fired  # never above chance
    acc, loss = _collapse_run(0.1, 2.31)
    acc[-2] = 0.5  # recovers within the last window
    assert not collapse(acc, loss, 0.1, window=5).fired
    assert not collapse(acc[:4], loss, 0.1, window=5).fired  # too few epochs


# ------------------------------------------------------------------ blow-up (transient divergence)
# a ResNet on mnist1d (10 classes) hit by LR bursts at epoch 8: its validation loss and accuracy (cpu corpus)
BURST_LOSS = [2.28, 2.28, 2.21, 2.07, 1.88, 1.92, 1.64, 1.45, 17.43, 5.27, 5.55, 1.74, 1.39, 1.32, 1.26, 1.2]
BURST_ACC = [0.11, 0.14, 0.2, 0.29, 0.29, 0.23, 0.38, 0.46, 0.14, 0.26, 0.11, 0.3, 0.51, 0.55, 0.59, 0.61]


def test_blowup_fires_on_a_transient_divergence_that_recovers():
    res = blowup(BURST_LOSS, BURST_ACC, 0.1)
    assert res.fired and res.trigger == 8 and res.detail["loss"] == pytest.approx(17.43)
    assert not collapse(np.array(BURST_ACC), np.full(300, 1.2), 0.1, window=5).fired  # it recovered: no collapse
    _strict_json(res)
    nan_loss = list(BURST_LOSS)
    nan_loss[8] = float("nan")  # a non-finite validation loss is a blow-up too
    assert blowup(nan_loss, BURST_ACC, 0.1).trigger == 8


@pytest.mark.parametrize("loss, acc, why", [
    # a memorising model (EfficientNet on a 16-sample subset): validation loss x 8 over 3 epochs, never x 10 in one
    ([1.82, 2.65, 10.77, 14.66, 13.8, 13.7], [0.16, 0.2, 0.24, 0.17, 0.21, 0.27], "gradual rise, however large"),
    (BURST_LOSS[:8] + [17.43] + BURST_LOSS[9:], BURST_ACC[:8] + [0.41] + BURST_ACC[9:], "accuracy kept: no loss of function"),
    ([2.3, 2.3, 2.3, 30.0, 2.3], [0.1, 0.11, 0.12, 0.1, 0.12], "never learned (peak < 2x chance)"),
    ([2.0, 1.5, 1.2, 1.0, 0.9, 0.8], [0.3, 0.5, 0.7, 0.8, 0.85, 0.9], "healthy"),
])
def test_blowup_quiet_otherwise(loss, acc, why):
    assert not blowup(loss, acc, 0.1).fired, why


def test_blowup_checks_its_inputs():
    with pytest.raises(ValueError, match="equal length"):
        blowup([1.0, 2.0], [0.5], 0.1)
    assert not blowup([1.0], [0.5], 0.1).fired  # one epoch: nothing to jump from


# ------------------------------------------------------------------ Lyapunov proxy
def _windows(means, h=50, sd=0.2, seed=0):
    rng = np.random.default_rng(seed)
    return [(500 * (i + 1), m + sd * rng.normal(size=h)) for i, m in enumerate(means)]


def test_lyapunov_positive_growth_fires_at_window_end():
    res = lyapunov(_windows([0.5, 0.5]), n_boot=200)
    assert res.fired and res.trigger == 500 + 50
    assert all(w["lower"] > 0 for w in res.detail["windows"])
    _strict_json(res)


@pytest.mark.parametrize("mean,sd", [(-0.5, 0.2), (0.0, 1.0)])
def test_lyapunov_negative_or_noisy_growth_is_quiet(mean, sd):
    res = lyapunov(_windows([mean] * 3, sd=sd), n_boot=200)
    assert not res.fired and res.trigger is None
    assert all(w["lower"] <= 0 for w in res.detail["windows"])


def test_lyapunov_first_firing_window_in_step_order():
    neg, pos = _windows([-0.5, 0.5])
    res = lyapunov([pos, neg], n_boot=200)  # given out of order
    assert res.trigger == pos[0] + 50
    assert [w["start"] for w in res.detail["windows"]] == [neg[0], pos[0]]


def test_lyapunov_nonfinite_growth_fires():
    (start, a), = _windows([-0.5])
    a[30] = np.nan
    res = lyapunov([(start, a)], n_boot=200)
    assert res.fired and res.trigger == start + 50 and res.detail["windows"][0]["nonfinite"]
    _strict_json(res)


def test_lyapunov_bounds_are_arch_percentile_interval():
    (start, a), = _windows([0.05], sd=0.5)
    res = lyapunov([(start, a)], confidence=0.99, n_boot=300, block=10.0, seed=7)
    ci = StationaryBootstrap(10.0, a, seed=7).conf_int(np.mean, reps=300, method="percentile", size=0.99)
    w = res.detail["windows"][0]
    assert w["lower"] == pytest.approx(ci[0, 0]) and w["upper"] == pytest.approx(ci[1, 0])
    assert w["mean"] == pytest.approx(a.mean())


# ------------------------------------------------------------------ catastrophic forgetting
def _paired(n: int, lost: int, gained: int, right_both: int):
    """Paired correctness before/after with the given discordant counts."""
    before = np.zeros(n, dtype=bool)
    after = np.zeros(n, dtype=bool)
    before[:lost] = True  # right -> wrong
    after[lost:lost + gained] = True  # wrong -> right
    before[lost + gained:lost + gained + right_both] = after[lost + gained:lost + gained + right_both] = True
    return before, after


def test_forgetting_large_drop_with_many_flips_fires():
    acc = np.r_[np.linspace(0.3, 0.8, 10), np.full(10, 0.4)]
    before, after = _paired(500, lost=220, gained=20, right_both=180)
    res = forgetting(acc, 10, before, after, window=10)
    assert res.fired and res.trigger == 19
    assert res.detail["rel_drop"] == pytest.approx(0.5)
    direct = mcnemar([[180, 220], [20, 80]], exact=False, correction=True)
    assert res.detail["mcnemar_p"] == pytest.approx(direct.pvalue) and not res.detail["exact"]
    _strict_json(res)


def test_forgetting_small_drop_does_not_fire():
    acc = np.r_[np.full(10, 0.8), np.full(10, 0.72)]  # 10% drop
    before, after = _paired(500, lost=100, gained=20, right_both=300)  # McNemar alone would say yes
    res = forgetting(acc, 10, before, after)
    assert res.detail["mcnemar_p"] < 0.01 and not res.fired


def test_forgetting_large_drop_on_tiny_set_is_not_significant():
    acc = np.r_[np.full(5, 1.0), np.full(5, 0.5)]
    before, after = _paired(6, lost=3, gained=0, right_both=3)
    res = forgetting(acc, 5, before, after)
    assert res.detail["exact"] and res.detail["mcnemar_p"] == pytest.approx(0.25)
    assert not res.fired


def test_forgetting_trigger_clipped_to_run_and_degenerate_switch():
    acc = np.r_[np.full(10, 0.8), np.full(4, 0.3)]
    before, after = _paired(500, lost=250, gained=5, right_both=150)
    assert forgetting(acc, 10, before, after, window=10).trigger == 13
    assert not forgetting(acc, 0, before, after).fired  # nothing before the switch
    assert not forgetting(acc, 10, after, before).fired  # more gained than lost: not forgetting


# ------------------------------------------------------------------ concept bias
def _bias_data(acc_clean: float, acc_poison: float, n_per_class: int = 200, classes: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    shortcut = np.r_[np.zeros(len(y)), np.ones(len(y))]
    cls = np.r_[y, y]
    # class-dependent difficulty on top of the shortcut effect
    base = np.r_[acc_clean + 0.05 * (y - 2) / 2, acc_poison + 0.05 * (y - 2) / 2]
    correct = rng.random(len(cls)) < np.clip(base, 0, 1)
    return correct, shortcut, cls


def test_concept_bias_fires_when_the_shortcut_drives_correctness():
    correct, shortcut, cls = _bias_data(0.6, 0.9)
    res = concept_bias(correct, shortcut, cls)
    assert res.fired and res.trigger is None and res.detail["method"] == "logit"
    # same coefficient and p as a direct Logit(correct ~ 1 + shortcut + C(class))
    X = np.column_stack([np.ones_like(shortcut), shortcut, (cls[:, None] == np.arange(1, 5)).astype(float)])
    fit = sm.Logit(correct.astype(float), X).fit(disp=0)
    assert res.detail["coef"] == pytest.approx(fit.params[1]) and res.detail["pvalue"] == pytest.approx(fit.pvalues[1])
    _strict_json(res)


@pytest.mark.parametrize("acc_poison", [0.7, 0.4])
def test_concept_bias_quiet_when_independent_or_harmful(acc_poison):
    res = concept_bias(*_bias_data(0.7, acc_poison))
    assert not res.fired and res.detail["method"] == "logit"


@pytest.mark.filterwarnings("error")
def test_concept_bias_separated_data_falls_back_without_crashing():
    correct, shortcut, cls = _bias_data(0.5, 0.9)
    correct[shortcut == 1] = True  # every poisoned sample right: the MLE does not exist
    res = concept_bias(correct, shortcut, cls)
    assert res.fired and res.detail["method"] == "mantel_haenszel"
    assert res.detail["fallback_reason"] == "shortcut separates the outcome"
    _strict_json(res)
    # complete separation in a single class: Fisher's exact test
    res = concept_bias(np.r_[np.zeros(10), np.ones(10)], np.r_[np.zeros(10), np.ones(10)], np.zeros(20))
    assert res.fired and res.detail["method"] == "fisher_exact"
    _strict_json(res)


def test_concept_bias_degenerate_inputs():
    n = 100
    shortcut = np.r_[np.zeros(n), np.ones(n)]
    cls = np.tile(np.arange(4), n // 2)
    all_right = concept_bias(np.ones(2 * n), shortcut, cls)
    assert not all_right.fired and "reason" in all_right.detail
    no_contrast = concept_bias(np.random.default_rng(0).random(2 * n) < 0.5, np.zeros(2 * n), cls)
    assert not no_contrast.fired
    # easy classes (all right) are dropped before the fit, the rest still decides
    correct, shortcut, cls = _bias_data(0.6, 0.9)
    correct[cls == 4] = True
    res = concept_bias(correct, shortcut, cls)
    assert res.fired and res.detail["dropped_classes"] == [4]
    with pytest.raises(ValueError):
        concept_bias(np.ones(3), np.ones(2), np.ones(3))


# ------------------------------------------------------------------ healthy and the final label
def test_healthy_floor():
    assert healthy(0.80, 0.78) and not healthy(0.70, 0.78)
    assert healthy(60.0, 65.0, higher_is_better=False) and not healthy(70.0, 65.0, higher_is_better=False)
    assert not healthy(float("nan"), 0.0)


def _r(fired: bool) -> RuleResult:
    return RuleResult(fired, 1 if fired else None, {})


def test_assign_label_priority():
    assert PRIORITY == ("instability", "forgetting", "concept_bias", "overfitting")
    every = {name: _r(True) for name in PRIORITY}
    assert assign_label(every, healthy_ok=True) == ("instability", "instability")
    assert assign_label({"overfitting": _r(True), "concept_bias": _r(True)}, True) == ("concept_bias", "concept_bias")
    assert assign_label({"instability": _r(False), "overfitting": _r(True)}, False) == ("overfitting", "overfitting")
    # Table 7's priority swap
    swapped = ("instability", "forgetting", "overfitting", "concept_bias")
    assert assign_label({"overfitting": _r(True), "concept_bias": _r(True)}, True, priority=swapped)[0] == "overfitting"
    assert assign_label({"instability": _r(False)}, True) == ("healthy", None)
    assert assign_label({}, False) == ("underperforming", None)


# ------------------------------------------------------------------ the labeler's instability settings
def test_labeler_lyapunov_needs_two_windows_and_uses_per_arch_margins():
    from factory.config import LabelConfig
    from factory.labeler import _instability

    rng = np.random.default_rng(0)
    calm = lambda level: level + 0.01 * rng.normal(size=8)  # noqa: E731
    transient = [(150, calm(0.9)), (190, calm(0.02)), (230, calm(0.01)), (270, calm(0.01))]  # a task switch
    sustained = [(150, calm(0.9)), (190, calm(0.6)), (230, calm(0.5)), (270, calm(0.01))]  # an LR blow-up
    sig = lambda w: {"train_loss": np.linspace(2, 0.5, 300), "lyapunov": w}  # noqa: E731
    lc = LabelConfig(lyapunov_margin=[0.3, 0.1, 0.05, 0.01], lyapunov_bootstrap=200)
    assert not _instability(sig(transient), lc, 300, "resnet")[1].fired
    lyap = _instability(sig(sustained), lc, 300, "resnet")[1]
    assert lyap.fired and lyap.trigger == 190 + 8 and lyap.detail["firing_windows"] == 3
    # the floor under the margins: late windows at 0.01-level noise never count
    assert [w["fired"] for w in lyap.detail["windows"]][-1] is False
    # an architecture whose own healthy runs separate this fast is not unstable
    lc.lyapunov_arch_margin = {"vit": [1.0, 0.8, 0.7, 0.1]}
    assert not _instability(sig(sustained), lc, 300, "vit")[1].fired
    assert _instability(sig(sustained), lc, 300, "resnet")[1].fired


def test_labeler_collapse_makes_an_lr_blow_up_instability():
    from types import SimpleNamespace

    from factory.config import LabelConfig
    from factory.labeler import offline_label
    from factory.perturbations import make_perturbation

    acc, loss = _collapse_run(0.1, 2.31)
    sig = {"train_loss": loss, "lyapunov": [], "epoch_step": np.arange(15, 301, 15), "val_loss": np.full(20, 2.3),
           "val_acc": acc, "val_correct": np.zeros((20, 4), bool), "poison_correct": None, "val_labels": None}
    pert = make_perturbation("instability_lr", 300)
    off = offline_label(sig, pert, "resnet", "digits", 10, LabelConfig(), 300)
    assert off["label"] == "instability" and off["rules"]["instability_collapse"]["fired"]
    assert off["trigger_step"] == 165  # first epoch at chance (10) ends at step 165
    off = offline_label(sig, pert, "resnet", "digits", 10, LabelConfig(collapse=False), 300)
    assert off["label"] != "instability"


def test_labeler_blowup_makes_a_recovered_lr_burst_instability():
    from factory.config import LabelConfig
    from factory.labeler import offline_label
    from factory.perturbations import make_perturbation

    epochs = len(BURST_LOSS)
    sig = {"train_loss": np.linspace(2.3, 1.2, 15 * epochs), "lyapunov": [], "epoch_step": np.arange(15, 15 * epochs + 1, 15),
           "val_loss": np.array(BURST_LOSS), "val_acc": np.array(BURST_ACC), "val_correct": np.zeros((epochs, 4), bool),
           "poison_correct": None, "val_labels": None}
    pert = make_perturbation("instability_spike", 15 * epochs)
    off = offline_label(sig, pert, "resnet", "mnist1d", 10, LabelConfig(), 15 * epochs)
    assert off["label"] == "instability" and off["rules"]["instability_blowup"]["fired"]
    assert not off["rules"]["instability_collapse"]["fired"] and not off["rules"]["instability_spikes"]["fired"]
    assert off["trigger_step"] == 135  # epoch 8 ends at step 135
    assert offline_label(sig, pert, "resnet", "mnist1d", 10, LabelConfig(blowup=False), 15 * epochs)["label"] != "instability"


# ------------------------------------------------------------------ labeler guards for drawn corpora
def test_a_lyapunov_reference_window_raises_the_bar_for_a_run_chaotic_throughout():
    """Windows at +0.3 log growth fire on their own; with a reference window of the same run at +0.3
    (a constant LR at the edge of stability from the start) they do not; a reference at -0.2 never
    lowers the bar below the configured margin."""
    from factory.config import LabelConfig
    from factory.labeler import _instability

    rng = np.random.default_rng(0)
    windows = [(s, 0.3 + 0.02 * rng.standard_normal(8)) for s in (50, 60, 70, 80)]
    lc = LabelConfig(lyapunov_bootstrap=400)
    sig = {"train_loss": np.linspace(2.0, 1.0, 100), "lyapunov": windows}
    assert _instability({**sig, "lyapunov_reference": None}, lc, 100, "any")[1].fired
    assert not _instability({**sig, "lyapunov_reference": np.full(8, 0.3)}, lc, 100, "any")[1].fired
    calm = [(s, 0.05 + 0.02 * rng.standard_normal(8)) for s in (50, 60, 70, 80)]
    assert not _instability({**sig, "lyapunov": calm, "lyapunov_reference": np.full(8, -0.2)}, lc, 100, "any")[1].fired


def test_concept_bias_needs_a_model_that_answers_the_poisoned_set():
    """A model near chance on the poisoned set has learned no shortcut, whatever the association says."""
    from factory.config import LabelConfig
    from factory.labeler import _concept_bias

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(6), 150)
    clean = rng.random((3, len(y))) < 0.15
    strong = rng.random((3, len(y))) < 0.9  # the shortcut answered: fires
    weak = rng.random((3, len(y))) < 0.3  # more often right than clean, but under 2 x chance (1/6)
    sig = {"val_correct": clean, "val_labels": y}
    lc = LabelConfig()
    assert _concept_bias({**sig, "poison_correct": strong}, lc, 6).fired
    quiet = _concept_bias({**sig, "poison_correct": weak}, lc, 6)
    assert not quiet.fired and "chance" in quiet.detail["reason"]
    assert _concept_bias({**sig, "poison_correct": weak}, LabelConfig(bias_learned=0.0), 6).fired


def test_loss_jump_fires_on_a_sustained_level_shift_but_not_on_a_small_or_early_one():
    from factory.labels import loss_jump

    rng = np.random.default_rng(2)
    base = np.concatenate([np.linspace(2.3, 1.0, 40), np.full(60, 1.0)]) + 0.05 * rng.standard_normal(100)
    raised = base.copy()
    raised[60:] += 2.0  # an LR burst whose loss stays up: 1.0 -> 3.0
    res = loss_jump(raised, span=5, jump=2.0, min_rise=0.5)
    assert res.fired and 60 <= res.trigger <= 66
    assert not loss_jump(base, span=5, jump=2.0, min_rise=0.5).fired
    tiny = np.full(100, 0.05) + 0.001 * rng.standard_normal(100)
    tiny[60:] = 0.11  # a memorised model's loss doubling at a warm restart: below min_rise
    assert not loss_jump(tiny, span=5, jump=2.0, min_rise=0.5).fired
    assert loss_jump(tiny, span=5, jump=2.0, min_rise=0.0).fired
    nan_tail = base.copy()
    nan_tail[70:] = np.nan  # divergence counts as an infinite level
    assert loss_jump(nan_tail, span=5, jump=2.0).fired
    assert not loss_jump(raised[:12], span=5).fired  # too short for a baseline


def test_loss_jump_against_the_best_level_adds_up_a_staircase_of_bursts():
    """Three bursts each raise the loss 1.3x over the level just before it (2.2x over the best level): the
    window baseline misses the staircase at jump 1.5, the best-level baseline catches it at the second step."""
    from factory.labels import loss_jump

    rng = np.random.default_rng(4)
    loss = np.concatenate([np.linspace(4.0, 3.0, 40), np.full(20, 3.0), np.full(20, 3.9), np.full(20, 5.1), np.full(20, 6.6)])
    loss = loss + 0.03 * rng.standard_normal(len(loss))
    assert not loss_jump(loss, span=5, jump=1.5, min_rise=0.5).fired
    res = loss_jump(loss, span=5, jump=1.5, min_rise=0.5, baseline="best")
    assert res.fired and 80 <= res.trigger <= 86  # the second step: 5.1 >= 1.5 x 3.0
    with pytest.raises(ValueError, match="baseline"):
        loss_jump(loss, span=5, baseline="median")


def _lyapunov_run(seed: int, level: float, epochs: int = 16, n: int = 160) -> dict:
    """A healthy-looking run's labeler signals whose 4 Lyapunov windows sit at `level` (+- 0.02), with a zero
    reference window."""
    rng = np.random.default_rng(seed)
    return {"train_loss": np.linspace(2.0, 0.5, n), "epoch_step": np.arange(1, epochs + 1) * 10,
            "val_loss": np.linspace(2.0, 0.6, epochs), "val_acc": np.linspace(0.2, 0.8, epochs),
            "val_correct": rng.random((epochs, 60)) < 0.8, "val_labels": np.arange(60) % 6, "poison_correct": None,
            "lyapunov": [(s, level + 0.02 * rng.standard_normal(8)) for s in (80, 100, 120, 140)],
            "lyapunov_reference": np.zeros(8)}


def test_an_optimizer_margin_raises_the_lyapunov_bar_for_that_optimizer_only():
    from factory.config import LabelConfig
    from factory.labeler import offline_label
    from factory.perturbations import make_perturbation

    n = 160
    sig = _lyapunov_run(seed=5, level=0.35)
    lc = LabelConfig(lyapunov_bootstrap=300, lyapunov_optimizer_margin={"sgd": 0.3})
    fired = {opt: offline_label(sig, make_perturbation("healthy", n), "any", "any", 6, lc, n, optimizer=opt)["rules"]["instability_lyapunov"]["fired"]
             for opt in ("sgd", "adam", None)}
    assert fired == {"sgd": False, "adam": True, None: True}
    with pytest.raises(FieldError, match="jump_baseline"):
        LabelConfig(jump_baseline="median")


def test_a_task_switch_explains_lyapunov_windows_in_runs_with_a_reference():
    """The same signals fire Lyapunov instability in a healthy-preset run and not in a task-switch run (whose
    new task is learnt fast after the switch), when the run has a reference window; without one (grid
    corpora, calibrated margins) the task switch changes nothing."""
    from factory.config import LabelConfig
    from factory.labeler import offline_label
    from factory.perturbations import make_perturbation

    n = 160
    sig = _lyapunov_run(seed=3, level=0.4)
    lc = LabelConfig(lyapunov_bootstrap=300)
    args = ("any", "any", 6, lc, n)
    assert offline_label(sig, make_perturbation("healthy", n), *args)["rules"]["instability_lyapunov"]["fired"]
    switch = make_perturbation("forgetting", n)
    switch.bind(torch.as_tensor(sig["val_labels"]), 6, 0)
    assert not offline_label(sig, switch, *args)["rules"]["instability_lyapunov"]["fired"]
    assert offline_label({**sig, "lyapunov_reference": None}, switch, *args)["rules"]["instability_lyapunov"]["fired"]


def test_consecutive_lyapunov_windows_tell_a_restart_catapult_from_sustained_chaos():
    """Windows firing at positions 1 and 3 (each just after a cosine restart) make instability with two
    windows anywhere, and not when the two must be adjacent; adjacent firing windows (an LR raise that
    stays) fire either way, triggered at the second of them."""
    from factory.config import LabelConfig
    from factory.labeler import _instability

    rng = np.random.default_rng(4)
    hot, calm = (lambda: 0.6 + 0.02 * rng.standard_normal(8)), (lambda: -0.3 + 0.02 * rng.standard_normal(8))
    sig = {"train_loss": np.linspace(2.0, 1.0, 200), "lyapunov_reference": None}
    alternating = {**sig, "lyapunov": [(100, hot()), (130, calm()), (160, hot()), (190, calm())]}
    sustained = {**sig, "lyapunov": [(100, calm()), (130, hot()), (160, hot()), (190, calm())]}
    anywhere, adjacent = LabelConfig(lyapunov_bootstrap=300), LabelConfig(lyapunov_bootstrap=300, lyapunov_consecutive=True)
    assert _instability(alternating, anywhere, 200, "any")[1].fired
    assert not _instability(alternating, adjacent, 200, "any")[1].fired
    fired = _instability(sustained, adjacent, 200, "any")[1]
    assert fired.fired and fired.trigger == 160 + 8


def test_memorised_fires_on_an_early_rise_the_trend_test_cannot_see():
    """A subset memorised in the first three epochs: the validation loss jumps from 4 to 7 and stays, the
    training loss goes to ~0. The trend test has no history before the rise and misses it; `memorised`
    fires at the first epoch from which both conditions hold. A healthy run (validation loss at its best
    at the end) and one whose training loss never fell do not fire."""
    from factory import labels as R
    from factory.config import LabelConfig
    from factory.labeler import _overfitting

    val = np.array([4.0, 4.8, 5.6, 7.4, 7.1, 6.8, 6.7, 6.6, 6.5, 6.5, 6.5, 6.6, 6.6, 6.7, 6.7, 6.7])
    train = np.array([2.3, 2.0, 0.9, 0.3, 0.07, 0.004] + [0.001] * 10)
    res = R.memorised(train, val)
    assert res.fired and res.trigger == 4  # epoch 3: train still at 0.3 > 0.1 x 2.3
    assert not R.memorised(train, np.linspace(2.0, 1.0, 16)).fired
    assert not R.memorised(np.full(16, 2.0), val).fired
    assert not R.memorised(train, np.r_[val[:-1], np.nan]).fired
    sig = {"train_loss": np.repeat(train, 10), "epoch_step": np.arange(1, 17) * 10, "val_loss": val}
    assert not _overfitting(sig, LabelConfig()).fired
    both = _overfitting(sig, LabelConfig(memorised_rise=1.5))
    assert both.fired and both.detail["fired_by"] == "memorised"


def test_concept_bias_at_the_ceiling_is_read_from_the_counterfactual_set():
    """A model right on every clean and poisoned sample cannot score higher with its mark, so the clean
    comparison stays quiet; the same model answering the counterfactual set (the next class's mark)
    worse is relying on the mark, and fires. A model whose answers do not depend on which mark a
    sample carries stays quiet."""
    from factory.config import LabelConfig
    from factory.labeler import _concept_bias

    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(6), 100)
    ceiling = rng.random((3, len(y))) < 0.99
    sig = {"val_correct": ceiling, "poison_correct": ceiling.copy(), "val_labels": y}
    lc = LabelConfig()
    assert not _concept_bias(sig, lc, 6).fired  # no counterfactual set stored: the clean comparison
    misled = rng.random((3, len(y))) < 0.6
    res = _concept_bias({**sig, "counter_correct": misled}, lc, 6)
    assert res.fired and res.detail["against"] == "counterfactual"
    same = rng.random((3, len(y))) < 0.99
    assert not _concept_bias({**sig, "counter_correct": same}, lc, 6).fired
    small = _concept_bias({**sig, "counter_correct": misled}, LabelConfig(bias_min_gap=0.5), 6)  # gap ~0.39
    assert not small.fired and 0.3 < small.detail["gap"] < 0.5 and "0.5" in small.detail["reason"]


def test_concept_bias_needs_every_class_to_favour_its_own_mark():
    """A shortcut learned from marks on every class answers each class's own mark better than another's;
    a healthy model's chance reading of marks helps some classes and hurts others. With
    `bias_class_tolerance`, a class whose own mark is answered worse than the other's by more than it
    keeps the rule quiet, even when the pooled test fires."""
    from factory.config import LabelConfig
    from factory.labeler import _concept_bias, class_gaps

    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(6), 100)
    clean = rng.random((3, len(y))) < 0.5
    poison = np.where(y < 3, rng.random((3, len(y))) < 0.95, rng.random((3, len(y))) < 0.4)  # helps 0-2, hurts 3-5
    counter = rng.random((3, len(y))) < 0.5
    sig = {"val_correct": clean, "poison_correct": poison, "counter_correct": counter, "val_labels": y}
    assert _concept_bias(sig, LabelConfig(), 6).fired  # pooled, the own mark is answered better
    quiet = _concept_bias(sig, LabelConfig(bias_class_tolerance=0.05), 6)
    assert not quiet.fired and "class" in quiet.detail["reason"] and min(quiet.detail["class_gaps"].values()) < -0.05
    every = {**sig, "poison_correct": rng.random((3, len(y))) < 0.95}
    assert _concept_bias(every, LabelConfig(bias_class_tolerance=0.05), 6).fired
    worst, gaps = class_gaps(poison[-1], counter[-1], y)
    assert worst >= 3 and set(gaps) == set(range(6))


def test_a_degrading_shortcut_or_a_task_switch_is_not_a_loss_jump():
    """The loss rises at the onset of a task switch and of a shortcut that degrades the content by design;
    the loss-jump rule counts that rise for other runs only."""
    from factory.config import LabelConfig
    from factory.labeler import _jump
    from factory.perturbations import Perturbation, TaskSwitch, Watermark

    loss = np.concatenate([np.linspace(2.3, 0.5, 50), np.full(50, 2.0)])
    sig = {"train_loss": loss}
    lc = LabelConfig(jump_factor=2.0)
    assert _jump(sig, Perturbation(), lc, 100).fired
    assert _jump(sig, Watermark(content=1.0), lc, 100).fired  # marks alone change no content
    for pert in (TaskSwitch(onset=50), Watermark(content=0.2, onset=50)):
        res = _jump(sig, pert, lc, 100)
        assert not res.fired and "by design" in res.detail["reason"]


def test_forgetting_post_switch_window_can_be_longer_than_collapses():
    """A model that forgets gradually after the switch (primary accuracy 0.9 falling by 0.05 an epoch)
    has lost under 30% over the 4 epochs right after it, and well over 30% over 8."""
    from factory.config import LabelConfig
    from factory.labeler import _forgetting
    from factory.perturbations import TaskSwitch

    epochs, n = 16, 400
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(4), n // 4)
    acc = np.r_[np.linspace(0.3, 0.9, 8), 0.9 - 0.08 * np.arange(1, 9)]
    correct = rng.random((epochs, n)) < acc[:, None]
    pert = TaskSwitch(onset=80)
    pert.bind(torch.as_tensor(y), 4, 0)
    sig = {"epoch_step": 10 * np.arange(1, epochs + 1), "val_correct": correct, "val_labels": y}
    assert not _forgetting(sig, pert, 4, LabelConfig()).fired
    assert _forgetting(sig, pert, 4, LabelConfig(forget_post_frac=0.5)).fired
