"""The streaming decision rule (docs/architecture.md §8) on scripted sequences, as Lightning's test_early_stopping does,
and its calibration on validation runs (diagnose/calibrate.py)."""
import math

import numpy as np
import pytest

from diagnose.calibrate import (CalibrationConfig, allowed_false_alarms, RunStream, _peak_streak_min, calibrate, fit_temperature, load_calibration,
                                save_calibration, streams_from_records)
from capture.schema import CLASSES, IGNORE
from diagnose.decision import UNKNOWN, Decision, DecisionState, Reason, Rule, alert_names, decide, first_alerts, run_macro_f1

K = 5
THRESHOLDS = (0.6, 0.6, 0.6, 0.6)  # anomaly classes 1..4
TAU = 0.35


def p(c: int, q: float = 0.8) -> tuple[float, ...]:
    """Probability q on class c, the rest spread evenly."""
    rest = (1 - q) / (K - 1)
    return tuple(q if k == c else rest for k in range(K))


H, O, I, F, B = (p(c) for c in range(K))  # Healthy, Overfitting, Instability, Forgetting, concept Bias
LOW_O = p(1, 0.55)  # class 1 is the argmax but below its threshold
U = 0.2  # a confident vacuity
X = 0.9  # an Unknown vacuity


@pytest.mark.parametrize(
    "frames, expected",
    [
        # (probs, vacuity) per frame -> {class: frame of its first alert}
        ([(H, U)] * 8, {}),
        ([(O, U)] * 2, {}),  # two frames are not enough
        ([(O, U)] * 3, {1: 2}),
        ([(H, U), (O, U), (O, U), (O, U), (O, U)], {1: 3}),
        ([(O, U), (O, U), (H, U), (O, U), (O, U), (O, U)], {1: 5}),  # a healthy frame resets the streak
        ([(O, U), (O, U), (O, X), (O, U), (O, U)], {}),  # an Unknown frame breaks the streak
        ([(O, U), (O, U), (O, X), (O, U), (O, U), (O, U)], {1: 5}),
        ([(O, U), (O, U), (LOW_O, U), (O, U)], {}),  # argmax but not above threshold
        ([(O, U), (I, U), (O, U), (I, U), (O, U), (I, U)], {}),  # alternating classes never confirm
        ([(O, U)] * 3 + [(F, U)] * 3, {1: 2, 3: 5}),
        ([(B, U)] * 3 + [(H, U)] + [(B, U)] * 3, {4: 2}),  # first alert only (the second fire is later)
        ([(I, float("nan"))] * 2 + [(I, U)] * 3, {2: 4}),  # non-finite input is Unknown
    ],
)
def test_scripted_sequences(frames, expected):
    rule = Rule(THRESHOLDS, TAU, consecutive=3)
    decisions = rule.replay([f[0] for f in frames], [f[1] for f in frames])
    assert first_alerts(decisions) == expected
    assert [d.frame for d in decisions] == list(range(len(frames)))


def test_fires_once_per_streak_and_again_after_a_break():
    rule = Rule(THRESHOLDS, TAU)
    seq = [O] * 5 + [H] + [O] * 3
    ds = rule.replay(seq, [U] * len(seq))
    fired = [d.frame for d in ds if 1 in d.new_alerts]
    active = [d.frame for d in ds if 1 in d.active]
    assert fired == [2, 8]
    assert active == [2, 3, 4, 8]


def test_both_classes_above_threshold_fire_together():
    both = (0.05, 0.45, 0.45, 0.025, 0.025)
    ds = Rule((0.4, 0.4, 0.9, 0.9), TAU).replay([both] * 3, [U] * 3)
    assert ds[-1].new_alerts == (1, 2) and ds[-1].label in (1, 2)


def test_per_class_thresholds_and_strict_inequality():
    seq = [p(2, 0.7)] * 4
    assert first_alerts(Rule((0.6, 0.75, 0.6, 0.6), TAU).replay(seq, [U] * 4)) == {}
    assert first_alerts(Rule((0.6, 0.7, 0.6, 0.6), TAU).replay(seq, [U] * 4)) == {}  # 0.7 > 0.7 is false
    assert first_alerts(Rule((0.6, 0.69, 0.6, 0.6), TAU).replay(seq, [U] * 4)) == {2: 2}
    assert first_alerts(Rule((0.6, 1.0, 0.6, 0.6), TAU).replay([p(2, 0.999)] * 5, [U] * 5)) == {}  # 1.0 = never


def test_vacuity_boundary_and_labels():
    s = DecisionState.start(K)
    s, d = decide(s, O, TAU, THRESHOLDS, TAU)  # u == tau is not Unknown ("u > tau")
    assert d.reason is Reason.KNOWN and d.label == 1 and not d.unknown
    s, d = decide(s, O, math.nextafter(TAU, 1), THRESHOLDS, TAU)
    assert d.reason is Reason.VACUITY and d.label == UNKNOWN and d.unknown
    assert s.streaks == (0, 0, 0, 0) and s.frames == 2
    _, d = decide(s, (math.inf,) + O[1:], U, THRESHOLDS, TAU)
    assert d.reason is Reason.NONFINITE and d.new_alerts == ()


def test_state_is_immutable_and_decide_is_pure():
    s0 = DecisionState.start(K)
    s1, d1 = decide(s0, O, U, THRESHOLDS, TAU)
    s1b, d1b = decide(s0, O, U, THRESHOLDS, TAU)
    assert s0.streaks == (0, 0, 0, 0) and s1 == s1b and d1 == d1b
    assert isinstance(d1, Decision) and s1.streaks == (1, 0, 0, 0)


def test_consecutive_is_a_parameter():
    assert first_alerts(Rule(THRESHOLDS, TAU, consecutive=1).replay([O], [U])) == {1: 0}
    assert first_alerts(Rule(THRESHOLDS, TAU, consecutive=5).replay([O] * 4, [U] * 4)) == {}


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one per anomaly class"):
        decide(DecisionState.start(K), O, U, (0.5, 0.5), TAU)
    with pytest.raises(ValueError, match="state has 2 streaks"):
        decide(DecisionState((0, 0), 0), O, U, THRESHOLDS, TAU)
    with pytest.raises(ValueError, match="vacuities"):
        Rule(THRESHOLDS, TAU).replay([O, O], [U])


# ---------------------------------------------------------------- calibration of the rule (diagnose/calibrate.py)


def _stream(run_id, label, probs, strength=20.0, novel=False, target=0):
    """A run whose windows have Dirichlet mean `probs` (N, K) and total evidence `strength` (u = K / S)."""
    probs = np.asarray(probs, dtype=float)
    s = np.broadcast_to(np.asarray(strength, dtype=float), (len(probs),))
    alpha = probs * s[:, None]
    return RunStream(run_id, label, np.arange(len(probs)), np.full(len(probs), target), np.full(len(probs), novel), alpha)


def _healthy_runs(n=40, frames=15, seed=0):
    rng = np.random.default_rng(seed)
    runs = []
    for r in range(n):
        logits = rng.normal(0, 1, (frames, K))
        logits[:, 0] += 2.0
        logits[rng.integers(frames - 3):, rng.integers(1, K)] += rng.uniform(0, 4)  # some runs drift late
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        runs.append(_stream(f"h{r}", "healthy", p, rng.uniform(8, 40, frames)))
    return runs


def test_peak_streak_min_is_where_the_rule_starts_firing():
    for run in _healthy_runs(10):
        vac = K / run.alpha.sum(1)
        probs = run.alpha / run.alpha.sum(1, keepdims=True)
        for c in range(1, K):
            m = _peak_streak_min(probs[:, c], vac <= TAU, 3)
            if not np.isfinite(m):
                continue
            thr = [1.0] * (K - 1)
            thr[c - 1] = m
            assert first_alerts(Rule(tuple(thr), TAU).replay(probs, vac)) == {}  # p > m never 3 times in a row
            thr[c - 1] = m - 1e-9
            assert c in first_alerts(Rule(tuple(thr), TAU).replay(probs, vac))
    assert _peak_streak_min(np.array([0.9, 0.9, 0.9]), np.array([True, False, True]), 3) == -np.inf


@pytest.mark.parametrize("far", [0.05, 0.2])
def test_thresholds_meet_the_false_alarm_target_and_are_minimal(far):
    runs = _healthy_runs()
    cfg = CalibrationConfig(far_target=far, fit_temperature=False, tau=0.6, min_threshold=0.0)
    cal = calibrate(runs, cfg)
    rule = cal.rule()
    alarms = [bool(first_alerts(rule.replay(s.alpha / s.alpha.sum(1, keepdims=True), K / s.alpha.sum(1)))) for s in runs]
    assert np.mean(alarms) <= far and cal.report["val_far"] == np.mean(alarms)
    # one rank lower (every threshold at the next smaller order statistic) breaks the target
    lower = []
    for c in range(1, K):
        ms = sorted(_peak_streak_min(s.alpha[:, c] / s.alpha.sum(1), K / s.alpha.sum(1) <= 0.6, 3) for s in runs)
        below = [m for m in ms if m < cal.thresholds[c - 1] - 1.5e-6]  # below the order statistic the threshold sits 1e-6 above
        lower.append(below[-1] + 1e-6 if below else cal.thresholds[c - 1])
    low_rule = Rule(tuple(lower), 0.6)
    low = sum(bool(first_alerts(low_rule.replay(s.alpha / s.alpha.sum(1, keepdims=True), K / s.alpha.sum(1)))) for s in runs)
    assert sum(alarms) <= allowed_false_alarms(len(runs), far) < low  # split conformal: (a + 1) / (n + 1) <= far


def test_tau_is_the_vacuity_quantile_of_known_runs():
    rng = np.random.default_rng(2)
    known = [_stream(f"k{i}", "overfitting", np.full((10, K), 1 / K), rng.uniform(5, 50, 10), target=1) for i in range(5)]
    novel = [_stream("n", "healthy", np.full((10, K), 1 / K), 5.1, novel=True)]  # u ~ 1: ignored for tau
    cal = calibrate(known + novel, CalibrationConfig(fit_temperature=False))
    vac = np.concatenate([K / s.alpha.sum(1) for s in known])
    assert cal.tau == pytest.approx(np.quantile(vac, 0.95))
    assert cal.thresholds == [0.9] * 4 and "no Healthy" in cal.report["threshold_source"]
    assert calibrate(known, CalibrationConfig(fit_temperature=False, tau=0.35)).tau == 0.35


def test_temperature_softens_overconfident_predictions():
    rng = np.random.default_rng(3)
    n = 400
    target = rng.integers(0, K, n)
    pred = np.where(rng.random(n) < 0.6, target, rng.integers(0, K, n))  # 60% right, always very confident
    alpha = np.ones((n, K))
    alpha[np.arange(n), pred] = 60.0
    t, before, after = fit_temperature(alpha, target)
    assert t > 1.5 and after < before
    # the NLL at the fitted T is a minimum on a grid
    logp = np.log(alpha / alpha.sum(1, keepdims=True))
    def nll(temp):
        z = logp / temp
        z = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -z[np.arange(n), target].mean()
    assert nll(t) <= min(nll(x) for x in np.linspace(0.3, 4, 60)) + 1e-4


def test_streams_and_calibration_file_round_trip(tmp_path):
    records = [{"run_id": "b", "label": "healthy", "end_frame": f, "target": 0, "novel": False, "alpha": [5.0, 1, 1, 1, 1]}
               for f in (11, 9, 10)] + [{"run_id": "a", "label": "forgetting", "end_frame": 9, "target": -1, "novel": False,
                                          "alpha": [1.0, 1, 1, 9, 1]}]
    streams = streams_from_records(records)
    assert [s.run_id for s in streams] == ["a", "b"] and list(streams[1].end_frame) == [9, 10, 11]
    cal = calibrate(streams, CalibrationConfig(), ["healthy", "o", "i", "f", "c"])
    path = save_calibration(cal, tmp_path)
    assert load_calibration(tmp_path) == cal and "NaN" not in path.read_text()
    with pytest.raises(FileNotFoundError, match="calibrate the checkpoint"):
        load_calibration(tmp_path / "nothing")


def test_validation_macro_f1_is_the_run_level_one_of_the_test_report():
    """calibrate's val_run_macro_f1 = run_macro_f1 of (label, class of the first alert at/after the onset):
    an alert before the onset does not count, an anomalous run without one is predicted healthy."""
    p_h, p_over, p_inst = [0.96, 0.01, 0.01, 0.01, 0.01], [0.01, 0.96, 0.01, 0.01, 0.01], [0.01, 0.01, 0.96, 0.01, 0.01]
    healthy = [_stream(f"h{i}", "healthy", [p_h] * 8) for i in range(20)]
    target = np.array([0, 0, 0, IGNORE, 1, 1, 1, 1])  # onset at frame 3
    over_right = _stream("o1", "overfitting", [p_h] * 4 + [p_over] * 4)
    over_right.target[:] = target
    over_early = _stream("o2", "overfitting", [p_inst] * 3 + [p_h] * 5)  # instability alert before onset only
    over_early.target[:] = target
    inst_as_over = _stream("i1", "instability", [p_h] * 4 + [p_over] * 4)
    inst_as_over.target[:] = np.where(target > 0, 2, target)
    cal = calibrate(healthy + [over_right, over_early, inst_as_over], CalibrationConfig(fit_temperature=False, tau=1.0), list(CLASSES))
    pairs = [("healthy", "healthy")] * 20 + [("overfitting", "overfitting"), ("overfitting", "healthy"), ("instability", "overfitting")]
    assert cal.report["val_run_macro_f1"] == pytest.approx(run_macro_f1(pairs, CLASSES[1:]))
    assert cal.report["val_run_macro_f1"] == pytest.approx((0.5 + 0) / 2)  # overfitting: 1 of 2 right, 1 of 2 predicted right; instability 0
    assert math.isnan(run_macro_f1([("healthy", "healthy")], CLASSES[1:]))


# ---------------------------------------------------------------- score mode: an anomaly score alarms, the class head names it

@pytest.mark.parametrize(
    "frames, expected",
    [
        # (probs, vacuity, anomaly score) per frame -> {class: first alert frame}; score threshold 0.5
        ([(H, U, 0.9)] * 3, {1: 2}),  # the score alarms though p(healthy) is highest: the kind is the likeliest anomaly class (ties: first)
        ([(I, U, 0.4)] * 5, {}),  # confident class, low score: no alarm (the class thresholds are not used)
        ([(O, U, 0.9), (I, U, 0.9), (I, U, 0.9)], {2: 2}),  # the kind is read at the frame that confirms
        ([(O, U, 0.9), (O, X, 0.9), (O, U, 0.9), (O, U, 0.9)], {1: 2}),  # high vacuity breaks no streak
        ([(O, U, 0.9)] * 2 + [(O, U, float("nan"))] + [(O, U, 0.9)] * 3, {1: 5}),  # a non-finite score is Unknown
        ([(F, U, 0.9)] * 3 + [(F, U, 0.1)] + [(B, U, 0.9)] * 3, {3: 2, 4: 6}),  # fires again after a break
    ],
)
def test_score_mode(frames, expected):
    rule = Rule((0.99,) * 4, TAU, score_threshold=0.5)
    decisions = rule.replay([f[0] for f in frames], [f[1] for f in frames], [f[2] for f in frames])
    assert first_alerts(decisions) == expected
    fired = [d for d in decisions if d.new_alerts]
    assert all(len(d.new_alerts) == 1 for d in fired)
    if fired:  # stays active with the class it fired while the streak lasts
        after = decisions[fired[0].frame + 1] if fired[0].frame + 1 < len(decisions) else None
        assert after is None or after.active in ((), fired[0].new_alerts)
    with pytest.raises(ValueError, match="give scores="):
        rule.replay([H], [U])


def test_score_mode_names_an_alarm_unknown_only_when_it_fires_on_high_vacuity():
    """The anomaly score alarms; a frame above tau names the alarm Unknown instead of a class. High vacuity
    with a low score raises nothing (a job unlike the training runs is not by that an anomaly)."""
    rule = Rule((0.99,) * 4, TAU, score_threshold=0.5)
    quiet = rule.replay([O] * 6, [X] * 6, [0.1] * 6)
    assert not any(d.new_alerts or d.unknown_alert for d in quiet) and all(d.unknown for d in quiet)
    frames = [(O, U, 0.9), (O, U, 0.9), (O, X, 0.9), (O, U, 0.9), (O, U, 0.1), (I, U, 0.9), (I, U, 0.9), (I, U, 0.9)]
    decisions = rule.replay([f[0] for f in frames], [f[1] for f in frames], [f[2] for f in frames])
    assert [d.frame for d in decisions if d.unknown_alert] == [2]  # fired on a high-vacuity frame: named Unknown
    assert [d.active for d in decisions[2:4]] == [(), ()]  # an Unknown alarm activates no class
    assert first_alerts(decisions) == {2: 7}  # after a break the next streak fires with the kind read at frame 7
    assert [alert_names(d) for d in decisions if d.new_alerts or d.unknown_alert] == [["unknown"], ["instability"]]


def test_known_first_keeps_the_name_of_a_class_the_head_is_sure_of(tmp_path):
    """With `known_first` a high-vacuity frame whose likeliest anomaly class is above its threshold is named for that
    class (frame label and alarm); one below its threshold stays Unknown. Without it both are Unknown. The flag
    round-trips in the calibration file and must be a bool."""
    frames = [(I, X, 0.9)] * 3 + [(H, U, 0.1)] + [(LOW_O, X, 0.9)] * 3
    probs, vac, scores = [f[0] for f in frames], [f[1] for f in frames], [f[2] for f in frames]
    plain = Rule(THRESHOLDS, TAU, score_threshold=0.5).replay(probs, vac, scores)
    first = Rule(THRESHOLDS, TAU, score_threshold=0.5, known_first=True).replay(probs, vac, scores)
    assert [d.frame for d in plain if d.unknown_alert] == [2, 6] and first_alerts(plain) == {}
    assert [d.frame for d in first if d.unknown_alert] == [6] and first_alerts(first) == {2: 2}
    assert [d.label for d in first[:3]] == [2, 2, 2] and all(d.unknown for d in first[4:])
    cal = calibrate(_healthy_runs(10), CalibrationConfig(fit_temperature=False, tau=1.0), list(CLASSES))
    cal.known_first = True
    save_calibration(cal, tmp_path)
    assert load_calibration(tmp_path).rule().known_first is True
    with pytest.raises(ValueError, match="known_first"):
        type(cal)(**{**cal.__dict__, "known_first": "yes"})


def test_score_threshold_meets_the_false_alarm_target(tmp_path):
    rng = np.random.default_rng(4)
    runs = _healthy_runs(40)
    for s in runs:
        s.anomaly = np.clip(rng.normal(0.3, 0.15, len(s.target)) + rng.uniform(0, 0.5), 0, 1)
    cfg = CalibrationConfig(fit_temperature=False, tau=1.0)
    cal = calibrate(runs, cfg, list(CLASSES))
    alarms = [bool(first_alerts(cal.rule().replay(s.alpha / s.alpha.sum(1, keepdims=True), K / s.alpha.sum(1), s.anomaly)))
              for s in runs]
    assert 0.5 <= cal.score_threshold < 1 and np.mean(alarms) <= 0.05 and cal.report["val_far"] == np.mean(alarms)
    assert cal.score_threshold > 0.5 + 2e-6  # fitted by the FAR search here, not clipped to min_threshold
    lower = Rule(tuple(cal.thresholds), 1.0, score_threshold=cal.score_threshold - 2e-6)  # just below: one run too many
    assert sum(bool(first_alerts(lower.replay(s.alpha / s.alpha.sum(1, keepdims=True), K / s.alpha.sum(1), s.anomaly)))
               for s in runs) > allowed_false_alarms(len(runs), 0.05) >= sum(alarms)
    save_calibration(cal, tmp_path)
    assert load_calibration(tmp_path) == cal  # score_threshold round-trips; files without it load as class mode


@pytest.mark.parametrize(
    "vacuities, unfamiliar",
    [
        ([U, U, U] + [U] * 4, False),  # a familiar job: its alerts fire as without the gate
        ([X, X, X] + [U] * 4, True),  # far from every training run in its first frames: muted for the rest of the run
        ([X, U, X] + [U] * 4, True),  # the median of the first 3 decides, not one frame
        ([U, X, U] + [X] * 4, False),  # later unfamiliar frames do not reopen the gate (they are Unknown frames)
        ([float("nan"), X, U] + [U] * 4, True),  # a non-finite vacuity counts as unfamiliar
    ],
)
def test_the_familiarity_gate_mutes_an_unfamiliar_job_once_and_for_good(vacuities, unfamiliar):
    seq = [O] * len(vacuities)
    gated = Rule(THRESHOLDS, TAU, consecutive=3, gate=3).replay(seq, vacuities)
    plain = Rule(THRESHOLDS, TAU, consecutive=3).replay(seq, vacuities)
    assert [d.unfamiliar_alert for d in gated] == [False, False, unfamiliar] + [False] * 4
    assert all(d.unfamiliar == (unfamiliar and d.frame >= 2) for d in gated)
    first = sorted(v if math.isfinite(v) else 1.0 for v in vacuities[:3])  # what the gate read (non-finite as 1.0, as decide)
    assert gated[2].gate_familiarity == first[1] and all(d.gate_familiarity != d.gate_familiarity for d in gated if d.frame != 2)
    if unfamiliar:
        assert first_alerts(gated) == {} and not any(d.unknown_alert for d in gated)
        assert first_alerts(plain) or any(d.unknown_alert for d in plain)  # the gate is what muted them
    else:
        assert first_alerts(gated) == first_alerts(plain) and [d.unknown_alert for d in gated] == [d.unknown_alert for d in plain]
    with pytest.raises(ValueError, match="gate"):
        decide(DecisionState.start(K), O, U, THRESHOLDS, TAU, gate=-1)


def test_the_gate_round_trips_in_the_calibration_file(tmp_path):
    cal = calibrate(_healthy_runs(10), CalibrationConfig(fit_temperature=False, tau=1.0), list(CLASSES))
    cal.gate = 3
    save_calibration(cal, tmp_path)
    assert load_calibration(tmp_path).rule().gate == 3
    with pytest.raises(ValueError, match="gate"):
        type(cal)(**{**cal.__dict__, "gate": -1})
