"""eval.metrics against scikit-learn, naive references and hand-made runs (docs/architecture.md §9)."""
import dataclasses
import functools
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from diagnose.calibrate import allowed_false_alarms
from diagnose.decision import Rule
from eval import metrics as M
from eval.metrics import CLASSES, IGNORE, RunResult

STEPS = np.arange(6) * 100  # 0, 100, ..., 500


def run(label, score, *, steps=STEPS, onset=None, trigger=None, epoch=100, novel=False, probs=None, vac=None,
        alerts=(), rid=None):
    return RunResult(rid or f"{label}-{id(score)}", label, novel, onset, trigger, epoch, steps, score, probs, vac, list(alerts))


def onehot_probs(classes):
    p = np.full((len(classes), len(CLASSES)), 0.05)
    p[np.arange(len(classes)), classes] = 0.8
    return p


# --------------------------------------------------------------------------- targets and RunResult

def test_targets_follow_design_section_9():
    # overfitting, onset 100, trigger 500, H = 2 epochs of 100 steps: positives from max(100, 300) = 300
    t, nv = run("overfitting", np.zeros(6), onset=100, trigger=500).targets()
    assert t.tolist() == [0, IGNORE, IGNORE, 1, 1, 1] and not nv.any()
    assert run("overfitting", np.zeros(6), onset=100, trigger=500).targets(horizon_epochs=4.0)[0].tolist() == [0, 1, 1, 1, 1, 1]
    assert run("healthy", np.zeros(6)).targets()[0].tolist() == [0] * 6
    assert run("underperforming", np.zeros(6)).targets()[0].tolist() == [IGNORE] * 6
    t, nv = run("healthy", np.zeros(6), onset=200, novel=True).targets()
    assert t.tolist() == [0, 0, IGNORE, IGNORE, IGNORE, IGNORE] and nv.tolist() == [False, False, True, True, True, True]


def test_run_result_rejects_bad_inputs():
    with pytest.raises(ValueError, match="score has 5 frames"):
        run("healthy", np.zeros(5))
    with pytest.raises(ValueError, match="probs has shape"):
        run("healthy", np.zeros(6), probs=np.zeros((6, 3)))
    with pytest.raises(ValueError, match="unknown label 'exploding'"):
        run("exploding", np.zeros(6))
    with pytest.raises(ValueError, match="strictly increasing"):
        run("healthy", np.zeros(6), steps=np.array([0, 100, 100, 200, 300, 400]))
    with pytest.raises(ValueError, match="epoch_steps"):
        run("instability", np.zeros(6), onset=0, trigger=300, epoch=None)


def test_from_attrs_takes_a_novel_runs_onset_from_its_perturbation():
    attrs = {"label": "healthy", "onset_step": None, "trigger_step": None, "epoch_steps": 50,
             "perturbation": {"kind": "novel", "name": "label_noise", "onset": 200}}
    r = RunResult.from_attrs("n0", attrs, STEPS, np.zeros(6))
    assert r.novel and r.onset_step == 200 and r.kind == "novel"
    assert r.targets()[1].tolist() == [False, False, True, True, True, True]


# --------------------------------------------------------------------------- event-time AUPRC

def test_event_auprc_matches_sklearn_on_hand_made_runs():
    runs = [
        run("healthy", [.1, .2, .3, .2, .1, .9]),
        run("overfitting", [.2, .8, .1, .7, .6, .95], onset=100, trigger=500),  # frames 100, 200 not scored
        run("healthy", [.05, .3, .99, .99, .99, .99], onset=200, novel=True),  # from onset: novel, not in AUPRC
        run("underperforming", [.9] * 6),  # not scored
    ]
    y = [0] * 6 + [0, 1, 1, 1] + [0, 0]
    s = [.1, .2, .3, .2, .1, .9, .2, .7, .6, .95, .05, .3]
    assert M.event_auprc(runs) == pytest.approx(average_precision_score(y, s))
    assert M.n_frames_scored(runs) == 12
    # the base rate beside it: a constant score's AUPRC, 3 positives of the 12 scored frames
    assert M.event_base_rate(runs) == pytest.approx(3 / 12) == pytest.approx(average_precision_score(y, [0.5] * 12))
    assert math.isnan(M.event_base_rate(runs[3:]))
    # NaN scores rank lowest; no positive frame -> undefined
    nan_runs = [run("healthy", [np.nan, .2, .3, .2, .1, .9]), run("overfitting", [.2, .8, .1, np.nan, .6, .95], onset=100, trigger=500)]
    assert M.event_auprc(nan_runs) == pytest.approx(average_precision_score(y[:10], [-1, .2, .3, .2, .1, .9, .2, -1, .6, .95]))
    assert math.isnan(M.event_auprc(runs[:1]))


# --------------------------------------------------------------------------- alerts and the FAR threshold

@pytest.mark.parametrize("score, threshold, consecutive, first", [
    ([.9, .9, .9], .5, 3, 2),
    ([.9, .9, .4, .9, .9, .9], .5, 3, 5),
    ([.9, .9], .5, 3, None),
    ([.5, .5, .5, .5], .5, 3, None),  # strictly above
    ([.9, np.nan, .9, .9, .9], .5, 3, 4),  # NaN breaks a streak
    ([.1, .6], .5, 1, 1),
])
def test_alerts_from_scores_scripted(score, threshold, consecutive, first):
    assert M.alerts_from_scores(score, threshold, consecutive) == first


def test_alert_frames_fire_once_per_streak_like_the_decision_rule():
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = rng.choice([.2, .7, .9], size=25)
        rule = Rule(thresholds=(.6,), tau=1.0, consecutive=3)
        expected = [d.frame for d in rule.replay([[1 - x, x] for x in s], [0.0] * len(s)) if d.new_alerts]
        assert M.alert_frames(s, .6, 3) == expected
    assert M.alert_frames([.9] * 3 + [.1] + [.9] * 5, .5, 3) == [2, 6]


def _naive_alarms(runs, threshold, consecutive):
    healthy = [r for r in runs if r.kind == "healthy"]
    return sum(M.alerts_from_scores(r.score, threshold, consecutive) is not None for r in healthy)


def test_threshold_for_far_is_the_lowest_threshold_meeting_the_far():
    """Split conformal: the lowest threshold at which a Healthy runs of n alarm with (a + 1) / (n + 1) <= far."""
    rng = np.random.default_rng(0)
    runs = [run("healthy", np.round(rng.random(n), 2), steps=np.arange(n)) for n in rng.integers(1, 15, size=40)]
    runs += [run("overfitting", np.ones(6), onset=0, trigger=300)]  # anomalous runs do not count
    n = 40
    for far, consecutive in [(0.05, 3), (0.1, 2), (0.0, 3), (0.5, 1)]:
        thr = M.threshold_for_far(runs, far, consecutive)
        candidates = sorted({-np.inf, *np.concatenate([r.score for r in runs])})
        ok = lambda a: (a + 1) / (n + 1) <= far or a == 0  # noqa: E731 (0 alarms: the best any threshold can do)
        naive = next(t for t in candidates if ok(_naive_alarms(runs, t, consecutive)))
        assert thr == naive
        assert ok(_naive_alarms(runs, thr, consecutive)) and not ok(_naive_alarms(runs, np.nextafter(thr, -np.inf), consecutive))
    assert [allowed_false_alarms(n, 0.05) for n in (18, 19, 39, 85, 300)] == [0, 0, 1, 3, 14]
    assert M.threshold_for_far(runs[:3], far=1.0) == -np.inf
    with pytest.raises(ValueError, match="no Healthy"):
        M.threshold_for_far(runs[-1:])


def test_held_scores_are_the_alert_level_so_far():
    """held_scores(t) > threshold exactly when the run has alerted by frame t (`consecutive` frames above it),
    for every threshold and frame; it never falls, and one high frame alone does not raise it."""
    rng = np.random.default_rng(1)
    for consecutive in (1, 2, 3):
        for _ in range(20):
            score = np.round(rng.random(rng.integers(1, 15)), 1)
            score[rng.random(len(score)) < 0.1] = np.nan
            held = M.held_scores(score, consecutive)
            assert all(b >= a for a, b in zip(held, held[1:]))  # never falls (-inf included)
            for t in range(len(score)):
                for thr in (-0.05, 0.05, 0.35, 0.55, 0.85):
                    assert (held[t] > thr) == bool(M.alert_frames(score[:t + 1], thr, consecutive))
    assert M.held_scores(np.array([0.1, 0.9, 0.1, 0.1]), 3).tolist() == [-np.inf, -np.inf, 0.1, 0.1]


def test_alerts_at_threshold_classes_and_steps():
    probs = onehot_probs([0, 0, 3, 3, 3, 3])
    r = run("forgetting", [.1, .2, .9, .9, .9, .1], onset=0, trigger=500, probs=probs)
    assert M.alerts_at_threshold([r], .5)[0].alerts == [(400, "forgetting")]
    bare = run("forgetting", [.1, .2, .9, .9, .9, .1], onset=0, trigger=500)
    assert M.alerts_at_threshold([bare], .5)[0].alerts == [(400, "anomaly")]
    assert bare.alerts == []  # copies, the input is unchanged


# --------------------------------------------------------------------------- run-level metrics

def hand_made_runs():
    z = np.zeros(6)
    return [
        run("healthy", z, rid="H1"),
        run("healthy", z, alerts=[(300, "overfitting")], rid="H2"),
        run("overfitting", z, onset=0, trigger=1000, alerts=[(600, "overfitting")], rid="A1"),  # lead 4
        run("instability", z, onset=500, trigger=900, alerts=[(200, "instability"), (1100, "forgetting")], rid="A2"),  # FA + lead -2
        run("forgetting", z, onset=300, trigger=800, rid="A3"),  # missed
        run("concept_bias", z, onset=0, trigger=700, alerts=[(500, "concept_bias")], rid="A4"),  # lead 2
        run("healthy", z, onset=200, novel=True, alerts=[(300, "overfitting")], rid="N1"),  # not counted
        run("underperforming", z, alerts=[(100, "instability")], rid="U1"),  # not counted
    ]


def test_far_detection_leads_cost_by_hand():
    runs = hand_made_runs()
    assert M.far(runs) == 0.5
    assert M.detection_rate(runs) == 0.75
    assert M.leads_epochs(runs).tolist() == [4.0, -2.0, 2.0]
    assert M.median_lead_epochs(runs) == 2.0
    # N_FA = H2 + A2 (alert before onset) = 2, N_MD = A3 = 1, sum(lead) = 4
    assert M.decision_cost(runs) == pytest.approx(1 * 2 + 10 * 1 - 0.5 * 4)
    assert M.decision_cost(runs, c_fa=2, c_md=5, c_lead=-1) == pytest.approx(2 * 2 + 5 - 4)
    assert M.decision_cost(runs, per_runs=100) == pytest.approx(10 * 100 / 6)
    assert math.isnan(M.far(runs[2:])) and math.isnan(M.median_lead_epochs(runs[:2]))
    # an alert only before onset (even if its streak lasts past onset: an alert fires once per streak)
    # is a false alarm and a miss
    early = run("forgetting", np.zeros(6), onset=300, trigger=500, alerts=[(200, "forgetting")])
    o = M.outcome(early)
    assert (o.false_alarm, o.detected, o.missed, o.predicted) == (True, False, True, "healthy") and math.isnan(o.lead)
    assert M.decision_cost([early]) == 1 + 10


def test_macro_f1_matches_sklearn():
    runs = hand_made_runs()
    y_true = ["healthy", "healthy", "overfitting", "instability", "forgetting", "concept_bias"]
    y_pred = ["healthy", "overfitting", "overfitting", "forgetting", "healthy", "concept_bias"]
    expected = f1_score(y_true, y_pred, labels=list(CLASSES[1:]), average="macro", zero_division=0)
    assert M.macro_f1(runs) == pytest.approx(expected) == pytest.approx((2 / 3 + 0 + 0 + 1) / 4)
    # a class neither true nor predicted is left out; a score-only alert ("anomaly") is a wrong class
    two = [runs[0], runs[2]]
    assert M.macro_f1(two) == 1.0
    anon = [runs[0], run("overfitting", np.zeros(6), onset=0, trigger=1000, alerts=[(600, "anomaly")])]
    assert M.macro_f1(anon) == 0.0


# --------------------------------------------------------------------------- open set and selective classification

def test_unknown_auroc_matches_sklearn():
    runs = [
        run("healthy", np.zeros(3), steps=STEPS[:3], vac=[.1, .2, .3]),
        run("overfitting", np.zeros(6), onset=100, trigger=500, vac=[.2, .9, .9, .4, .5, .6]),  # .9 frames not scored
        run("healthy", np.zeros(4), steps=STEPS[:4], onset=200, novel=True, vac=[.1, .1, .7, .3]),  # pre-onset left out
    ]
    expected = roc_auc_score([0] * 7 + [1, 1], [.1, .2, .3, .2, .4, .5, .6, .7, .3])
    assert M.unknown_auroc(runs) == pytest.approx(expected)
    runs[2].vacuity[3] = np.nan  # non-finite vacuity = abstain first
    assert M.unknown_auroc(runs) == pytest.approx(roc_auc_score([0] * 7 + [1, 1], [.1, .2, .3, .2, .4, .5, .6, .7, 10]))
    assert math.isnan(M.unknown_auroc(runs[:2]))
    with pytest.raises(ValueError, match="have no vacuity"):
        M.unknown_auroc([run("healthy", np.zeros(6))])
    # a run shorter than a window (a diverged one) has no scored frame, so nothing to give: it adds nothing
    short = run("instability", np.zeros(0), steps=STEPS[:0], onset=0, trigger=10)
    assert M.unknown_auroc(runs + [short]) == M.unknown_auroc(runs)


def test_risk_coverage_and_augrc_by_hand():
    runs = [
        run("healthy", np.zeros(3), steps=STEPS[:3], probs=onehot_probs([0, 1, 0]), vac=[.1, .5, .3]),
        run("overfitting", np.zeros(2), steps=STEPS[:2], onset=0, probs=onehot_probs([1, 2]), vac=[.2, .5]),
        run("healthy", np.zeros(2), steps=STEPS[:2], onset=0, novel=True, probs=onehot_probs([3, 3]), vac=[0., 0.]),
    ]
    rc = M.risk_coverage(runs)
    np.testing.assert_allclose(rc.threshold, [.1, .2, .3, .5])
    np.testing.assert_allclose(rc.coverage, [.2, .4, .6, 1.])
    np.testing.assert_allclose(rc.risk, [0, 0, 0, .4])
    np.testing.assert_allclose(rc.generalized_risk, [0, 0, 0, .4])
    assert M.augrc(runs) == pytest.approx(0.4 * 0.4 / 2)


def _naive_augrc(vac, err):
    """O(n^2): for each distinct threshold, count accepted frames and accepted errors from scratch."""
    n, points = len(vac), [(0.0, 0.0)]
    for t in sorted(set(vac)):
        accepted = [i for i in range(n) if vac[i] <= t]
        points.append((len(accepted) / n, sum(err[i] for i in accepted) / n))
    return sum((c1 - c0) * (g0 + g1) / 2 for (c0, g0), (c1, g1) in zip(points, points[1:]))


def random_runs(seed, n_runs=24, with_novel=True):
    rng = np.random.default_rng(seed)
    labels = ["healthy", "overfitting", "instability", "forgetting", "concept_bias", "underperforming"]
    runs = []
    for i in range(n_runs):
        label = labels[i % len(labels)] if i < n_runs - 3 or not with_novel else "healthy"
        novel = with_novel and i >= n_runs - 3
        t = int(rng.integers(3, 12))
        steps = np.arange(t) * 50
        onset = int(rng.choice([0, 100, 200]))
        trigger = onset + int(rng.integers(0, 300)) if label in CLASSES[1:] else None
        score = np.round(rng.random(t), 1)  # ties on purpose
        score[rng.random(t) < 0.05] = np.nan
        alerts = [(int(s), str(rng.choice(CLASSES[1:] + ("anomaly",)))) for s in sorted(rng.choice(steps, size=rng.integers(0, 3), replace=False))]
        runs.append(RunResult(f"r{i}", label, novel, onset, trigger, 100, steps, score, rng.dirichlet(np.ones(5), t),
                              np.round(rng.random(t), 1), alerts))
    return runs


def test_augrc_against_naive_reference_and_closed_form():
    for seed in range(5):
        runs = random_runs(seed)
        run_idx, vac, err = M._selective(runs, 2.0)
        assert M.augrc(runs) == pytest.approx(_naive_augrc(list(vac), list(err)))
        # Traub et al. 2024: AUGRC = (1 - AUROC_f) acc (1 - acc) + (1 - acc)^2 / 2, AUROC_f of -vacuity for correctness
        acc = 1 - err.mean()
        closed = (1 - roc_auc_score(err == 0, -vac)) * acc * (1 - acc) + (1 - acc) ** 2 / 2
        assert M.augrc(runs) == pytest.approx(closed)


# --------------------------------------------------------------------------- weighted forms and the bootstrap

WEIGHTED = [M.event_auprc, M.unknown_auroc, M.augrc, M.far, M.detection_rate, M.median_lead_epochs, M.macro_f1,
            M.decision_cost, functools.partial(M.decision_cost, c_md=3.0, per_runs=100),
            functools.partial(M.event_auprc, horizon_epochs=1.0)]


@pytest.mark.parametrize("metric", WEIGHTED, ids=lambda m: getattr(m, "__name__", None) or m.func.__name__)
def test_weighted_form_equals_metric_on_resampled_runs(metric):
    runs = random_runs(3)
    weighted = M._prepared(metric, runs)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(runs), size=(25, len(runs)))
    idx[0] = np.arange(len(runs))  # the runs themselves
    idx[1] = [0, 6, 12, 18] * 6  # Healthy runs only: no positives, no novel, no anomaly
    got = weighted(M._resample_counts(idx, len(runs)))
    expected = [metric([runs[i] for i in row]) for row in idx]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_bootstrap_fast_path_equals_scipy_on_resampled_lists():
    runs = random_runs(4)
    for metric in (M.event_auprc, M.macro_f1, M.median_lead_epochs):
        fast = M.bootstrap_ci(runs, metric, n_resamples=199, seed=3)
        slow = M.bootstrap_ci(runs, lambda rs, m=metric: m(rs), n_resamples=199, seed=3)  # not registered: list per resample
        assert fast.method == slow.method
        np.testing.assert_allclose(fast[:2], slow[:2], rtol=1e-9)


def test_bootstrap_ci_bca_percentile_and_undefined():
    runs = random_runs(5, n_runs=60)
    ci = M.bootstrap_ci(runs, M.event_auprc, n_resamples=300)
    assert ci.method == "BCa" and ci.low < M.event_auprc(runs) < ci.high
    # FAR 0 in every resample: BCa undefined -> percentile (0, 0)
    quiet = [r for r in hand_made_runs() if r.run_id in ("H1", "A1", "A3")]
    assert M.bootstrap_ci(quiet, M.far, n_resamples=100) == (0.0, 0.0, "percentile")
    # one positive run among 10: ~35% of the resamples have no positive frame -> dropped, percentile
    one = [run("overfitting", [.2, .9, .8, .7, .9, .9], onset=0, trigger=300)] + \
          [run("healthy", np.random.default_rng(i).random(6) * 0.8) for i in range(9)]
    ci, undefined = M._bootstrap(one, M.event_auprc, 200, 0.95, 0)
    assert ci.method == "percentile" and 30 < undefined < 120 and 0 <= ci.low <= ci.high <= 1
    # undefined on the runs themselves, or too few runs
    assert M.bootstrap_ci(one[1:], M.event_auprc, n_resamples=50).method == "undefined"
    assert M.bootstrap_ci(one[:1], M.event_auprc, n_resamples=50).method == "undefined"


def test_paired_difference_resamples_runs_once_for_both_methods():
    runs = random_runs(6, n_runs=60)
    same = M.paired_difference(runs, list(reversed(runs)), M.event_auprc, n_resamples=200)
    assert same.difference == 0 and same.ci.low == same.ci.high == 0 and same.n_runs == 60  # a method against itself
    # a better score (+0.1 on the anomalous frames) against the original: positive, paired interval above 0
    better = [dataclasses.replace(r, score=np.where(r.targets()[0] > 0, np.minimum(r.score + 0.1, 1.0), r.score))
              if r.kind == "anomaly" else r for r in runs]
    p = M.paired_difference(better, runs, M.event_auprc, n_resamples=300)
    assert p.difference == pytest.approx(M.event_auprc(better) - M.event_auprc(runs)) and p.difference > 0
    assert 0 < p.ci.low <= p.difference <= p.ci.high
    # unpaired intervals overlap where the paired one does not: the pairing is what makes the test sharp
    assert M.bootstrap_ci(runs, M.event_auprc, 300).high > M.bootstrap_ci(better, M.event_auprc, 300).low
    with pytest.raises(ValueError, match="different runs"):
        M.paired_difference(runs[1:], runs[:-1], M.event_auprc)


# --------------------------------------------------------------------------- summary

KEYS = {"event_auprc", "median_lead_epochs", "far", "detection_rate", "macro_f1", "unknown_auroc", "augrc", "cost"}


def test_summarize_values_intervals_and_missing_outputs():
    runs = random_runs(6, n_runs=30)
    s = M.summarize(runs, n_resamples=60, progress=False)
    assert KEYS | {k + "_ci" for k in KEYS} | {"n_runs", "n_frames_scored"} <= set(s)
    assert s["n_runs"] == 30 and s["n_frames_scored"] == M.n_frames_scored(runs)
    assert s["event_base_rate"] == M.event_base_rate(runs)
    assert s["n_healthy"] + s["n_anomalous"] + s["n_novel"] + s["n_unscored"] == 30
    assert s["n_detected"] + s["n_missed"] == s["n_anomalous"]
    assert s["event_auprc"] == M.event_auprc(runs) and s["cost"] == M.decision_cost(runs)
    for k in KEYS:
        low, high = s[k + "_ci"]
        assert s["ci_method"][k] in ("BCa", "percentile") and low <= high, k
    bare = [RunResult(r.run_id, r.label, r.novel, r.onset_step, r.trigger_step, r.epoch_steps, r.frame_step, r.score,
                      alerts=r.alerts) for r in runs]
    s = M.summarize(bare, n_resamples=20, progress=False)
    assert s["macro_f1"] is None and s["unknown_auroc"] is None and s["augrc"] is None and s["augrc_ci"] is None
    assert s["event_auprc"] == M.event_auprc(runs)
    with pytest.raises(ValueError, match="have no probs but other runs do"):
        M.summarize(runs[:5] + bare[5:], n_resamples=20, progress=False)


def test_operating_curve_trades_far_for_detection():
    runs = random_runs(7, n_runs=36, with_novel=False)
    curve = M.operating_curve(runs, np.linspace(0, 1, 11))
    # FAR can only fall as the threshold rises; the detection rate need not (an alert that fires before
    # onset and stays on through it is a false alarm, not a detection)
    assert np.all(np.diff(curve["far"]) <= 0) and curve["far"][0] > 0.5
    assert curve["far"][-1] == curve["detection_rate"][-1] == 0 and np.isnan(curve["median_lead_epochs"][-1])
    thr = M.threshold_for_far(runs, 0.05)
    point = M.operating_curve(runs, [thr])
    alerted = M.alerts_at_threshold(runs, thr)
    assert point["far"][0] == M.far(alerted) <= 0.05
    assert point["median_lead_epochs"][0] == M.median_lead_epochs(alerted) or np.isnan(point["median_lead_epochs"][0])
