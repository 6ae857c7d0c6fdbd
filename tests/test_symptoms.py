"""Rule symptoms (diagnose/symptoms.py): scripted sequences of values -> expected alerts (STYLE.md 14).
End-to-end runs on a tiny model are in test_monitor.py."""
import math

import numpy as np
import pytest

from diagnose.symptoms import (SYMPTOM_NAMES, Alert, DeadUnits, ExplodingGradients, GradStats, LayerStats, LossNotDecreasing,
                               LossSpike, NonFinite, Observation, SaturatedActivations, SymptomTracker,
                               VanishingGradients, _robust_z, advise, default_symptoms, place, place_name)

NAN = float("nan")


def run(symptom, observations):
    """[(step, name)] of the alerts a tracker with only `symptom` confirms over `observations`."""
    tracker = SymptomTracker([symptom])
    return [(a.step, a.name) for obs in observations for a in tracker.update(obs)]


def losses(values, start=0):
    return [Observation(start + i, loss=v) for i, v in enumerate(values)]


def grads(norms, mean_abs=1e-3, first=1.0, last=1.0):
    return [Observation(i, grads=GradStats(n, mean_abs, first, last)) for i, n in enumerate(norms)]


def test_names_are_unique_and_listed():
    assert SYMPTOM_NAMES == ("nan_inf", "exploding_gradients", "vanishing_gradients", "dead_units",
                             "saturated_activations", "loss_not_decreasing", "loss_spike")
    with pytest.raises(ValueError, match="duplicate"):
        SymptomTracker([LossSpike(), LossSpike(z=5)])


def test_robust_z_matches_numpy_reference():
    past = [1.0, 2.0, 4.0, 3.0, 10.0]
    q1, med, q3 = np.percentile(past, [25, 50, 75])
    z, m, scale = _robust_z(7.0, past)
    assert m == med and scale == pytest.approx((q3 - q1) / 1.349) and z == pytest.approx((7 - med) / scale)
    assert _robust_z(2.0, [1.0, 1.0, 1.0])[0] == math.inf and _robust_z(1.0, [1.0, 1.0])[0] == 0.0


@pytest.mark.parametrize("values, expected", [
    ([1.0, 1.0, NAN, NAN, 1.0, math.inf], [2, 5]),  # fires once per episode, re-arms after a finite loss
    ([1.0, 2.0, 3.0], []),
])
def test_nan_inf_on_losses(values, expected):
    assert run(NonFinite(), losses(values)) == [(s, "nan_inf") for s in expected]


def test_nan_inf_sources():
    tracker = SymptomTracker([NonFinite()])
    (a,) = tracker.update(Observation(3, loss=1.0, grads=GradStats(NAN, 1.0, 1.0, 1.0)))
    assert a.details["sources"] == ["gradients"] and a.step == 3 and a.source == "rule" and a.probability is None
    (b,) = SymptomTracker([NonFinite()]).update(Observation(4, loss=1.0, nonfinite=12.0))
    assert b.details["sources"] == ["captured tensors"]
    assert SymptomTracker([NonFinite()]).update(Observation(5, loss=1.0, nonfinite=0.0)) == []


@pytest.mark.parametrize("norms, expected", [
    ([1.0, 1.1, 0.9, 1.0, 1.05, 1.0, 50.0, 60.0, 1.0, 1.0, 2e5], [6, 10]),  # jump, held (no refire), abs_max
    ([1.0, 300.0, 1.0], []),  # before warm-up (5 checks) only abs_max counts
    ([1.0] * 10 + [1.5], []),  # flat history: infinite z, but not 10x the median
    ([1.0, 2.0, 0.5, 1.5, 0.8, 1.2, 9.0], []),  # z >= 3.5 in log space but < 10x the median
    ([1.0, 2.0, 0.5, 1.5, 0.8, 1.2, 30.0], [6]),
    ([1.0] * 6 + [NAN, math.inf], []),  # non-finite norms are nan_inf's business
])
def test_exploding_gradients(norms, expected):
    assert run(ExplodingGradients(), grads(norms)) == [(s, "exploding_gradients") for s in expected]


def test_exploding_gradients_history_is_log10_of_finite_norms():
    tracker = SymptomTracker([ExplodingGradients()])
    for obs in grads([10.0, NAN, 1000.0, 0.0]):
        tracker.update(obs)
    assert list(tracker.states["exploding_gradients"].history) == [1.0, 3.0]


@pytest.mark.parametrize("stats, fires", [
    (GradStats(1.0, 5e-8, 1.0, 1.0), True),  # SageMaker / DeepDiagnosis: mean |g| < 1e-7
    (GradStats(1.0, 2e-7, 1.0, 1.0), False),
    (GradStats(1.0, 1e-3, 5e-5, 1.0), True),  # AUTOTRAINER: ratio 5e-5 < 1e-3 and first < 1e-4
    (GradStats(1.0, 1e-3, 5e-5, 1e-3), False),  # ratio 0.05
    (GradStats(1.0, 1e-3, 2e-4, 1e3), False),  # ratio tiny but first >= 1e-4
    (GradStats(NAN, NAN, NAN, NAN), False),
])
def test_vanishing_gradients(stats, fires):
    assert run(VanishingGradients(), [Observation(7, grads=stats)]) == ([(7, "vanishing_gradients")] if fires else [])
    assert run(VanishingGradients(), [Observation(0, grads=stats)]) == []  # step 0: zero-initialised heads


def test_dead_units_names_the_worst_layer():
    layers = {"a": LayerStats("relu", dead_fraction=0.3), "b": LayerStats("relu", dead_fraction=0.6),
              "t": LayerStats("bounded", saturated_fraction=0.9)}
    (a,) = SymptomTracker([DeadUnits()]).update(Observation(4, layers=layers))
    assert a.name == "dead_units" and a.details == {"layer": "b", "dead_fraction": 0.6}
    assert run(DeadUnits(), [Observation(0, layers={"a": LayerStats("relu", dead_fraction=0.5)})]) == []  # strict >
    assert run(DeadUnits(), [Observation(0, layers={"t": LayerStats("bounded", saturated_fraction=1.0)})]) == []


@pytest.mark.parametrize("layers, what", [
    ({"t": LayerStats("bounded", saturated_fraction=0.7)}, "saturated_fraction"),
    ({"blk": LayerStats("block", max_abs=2e4)}, "max_abs"),
    ({"t": LayerStats("bounded", saturated_fraction=0.4), "blk": LayerStats("block", max_abs=9e3)}, None),
])
def test_saturated_activations(layers, what):
    alerts = SymptomTracker([SaturatedActivations()]).update(Observation(2, layers=layers))
    assert [list(a.details)[1] for a in alerts] == ([what] if what else [])


def test_loss_not_decreasing_after_patience_of_no_improvement():
    rule = LossNotDecreasing(patience=10, span=2, every=1, min_delta=0.01)
    decreasing = [2.0 * 0.97**i for i in range(40)]
    assert run(rule, losses(decreasing)) == []
    plateau = decreasing[:20] + [decreasing[19]] * 20
    got = run(rule, losses(plateau))
    # the EMA reaches its floor within a few steps of 19; 10 steps later nothing improved by 1 %
    assert [n for _, n in got] == ["loss_not_decreasing"] and 28 <= got[0][0] <= 32
    assert run(rule, losses([1e-4] * 40)) == []  # nothing left to gain below min_loss
    # the schedule: checked only every 50 steps by default
    assert run(LossNotDecreasing(patience=10, span=2), losses([1.0] * 49)) == []
    assert run(LossNotDecreasing(patience=10, span=2), losses([1.0] * 51)) == [(50, "loss_not_decreasing")]


def test_loss_spike():
    rng = np.random.default_rng(0)
    base = list(1.0 + 0.01 * rng.standard_normal(30))
    assert run(LossSpike(), losses(base + [1.5, 1.0, 1.6])) == [(30, "loss_spike"), (32, "loss_spike")]
    assert run(LossSpike(), losses(base + [1.05])) == []  # high z but a rise < 10 % of the median
    assert run(LossSpike(), losses([1.0] * 10 + [5.0])) == []  # before warm-up (20 losses)
    assert run(LossSpike(), losses(base + [NAN, 1.0])) == []  # NaN is nan_inf's, and stays out of the history


def test_loss_spike_floor_is_relative_to_the_starting_loss():
    """Near convergence the batch loss is heavy-tailed: 0.05 -> 0.2 is a huge robust z but not a spike
    (rise 0.15 < 10 % of the starting 2.3); a jump back to 1.0 is."""
    rng = np.random.default_rng(1)
    start = [2.3] * 10
    converged = list(0.05 + 0.005 * rng.standard_normal(40))
    assert run(LossSpike(), losses(start + converged + [0.2])) == []
    assert run(LossSpike(), losses(start + converged + [1.0])) == [(50, "loss_spike")]
    tracker = SymptomTracker([LossSpike()])
    for obs in losses(start + converged):
        tracker.update(obs)
    assert tracker.states["loss_spike"].first == [2.3] * 10 and len(tracker.states["loss_spike"].history) == 50


def test_consecutive_and_schedule():
    """A symptom confirmed by 2 consecutive checks, checked every 2nd step: odd steps never count."""
    rule = LossSpike(warmup=3, consecutive=2, every=2)
    seq = [1.0, 1.0, 1.0, 1.0, 9.0, 1.0, 9.0, 9.0, 9.0]
    # checks at 4 (hit, streak 1), 6 (hit, streak 2 -> fires), 8 (hit, streak 3: no refire)
    assert run(rule, losses(seq)) == [(6, "loss_spike")]


def test_tracker_state_round_trip_and_defaults():
    tracker = SymptomTracker()
    assert [s.name for s in tracker.symptoms] == list(SYMPTOM_NAMES)
    for obs in losses([1.0] * 25):
        tracker.update(obs)
    state = tracker.state_dict()
    again = SymptomTracker()
    again.load_state_dict(state)
    assert again.state_dict() == state and len(state["loss_spike"]["history"]) == 25
    assert tracker.config()[0] == {"name": "nan_inf", "every": 1, "consecutive": 1}
    assert all(s.every >= 1 for s in default_symptoms())


# ---------------------------------------------------------------- where and what to try first (issue 17)

def _scripted_alerts():
    """One scripted alert of every symptom (and both branches of the two-branch ones): (alert, expected where)."""
    rng = np.random.default_rng(0)
    g = lambda norm, mean_abs=1e-3, first=1.0, last=1.0: GradStats(  # noqa: E731
        norm, mean_abs, first, last, largest="layer3.conv.weight", smallest="layer1.conv.weight",
        first="stem.weight", nonfinite="layer2.conv.weight")
    cases = [
        (NonFinite(), [Observation(0, loss=NAN, grads=g(NAN), nonfinite=5.0, layers={
            "act1": LayerStats("relu", dead_fraction=0.0), "layer1": LayerStats("block", max_abs=1.0, nonfinite=0.0),
            "layer2": LayerStats("block", max_abs=1.0, nonfinite=3.0), "layer3": LayerStats("block", nonfinite=9.0)})],
         "layer2 (activations)"),  # the first hook point, in forward order, with non-finite activations
        (NonFinite(), [Observation(0, loss=NAN, grads=g(NAN))], "loss"),
        (NonFinite(), [Observation(0, loss=1.0, grads=g(NAN))], "layer2.conv.weight (gradients)"),
        (NonFinite(), [Observation(0, loss=1.0, nonfinite=4.0, layers={"layer1": LayerStats("block", nonfinite=0.0)})],
         "captured gradients or logits"),
        (NonFinite(), [Observation(0, loss=1.0, nonfinite=4.0)], "captured tensors"),  # no per-point counts
        (ExplodingGradients(), [Observation(i, grads=g(n)) for i, n in enumerate([1.0] * 6 + [100.0])],
         "layer3.conv.weight (gradients)"),
        (VanishingGradients(), [Observation(3, grads=g(1.0, mean_abs=1e-9))], "layer1.conv.weight (gradients)"),
        (VanishingGradients(), [Observation(3, grads=g(1.0, first=1e-6))], "stem.weight (gradients)"),
        (DeadUnits(), [Observation(0, layers={"layer1.relu": LayerStats("relu", dead_fraction=0.9)})],
         "layer1.relu (activations)"),
        (SaturatedActivations(), [Observation(0, layers={"gate": LayerStats("bounded", saturated_fraction=0.9)})],
         "gate (activations)"),
        (SaturatedActivations(), [Observation(0, layers={"layer3": LayerStats("block", max_abs=1e5)})],
         "layer3 (activations)"),
        (LossNotDecreasing(patience=10, span=2, every=1), losses([1.0] * 30), "loss"),
        (LossSpike(), losses(list(1.0 + 0.01 * rng.standard_normal(30)) + [2.0]), "loss"),
    ]
    out = []
    for symptom, observations, where in cases:
        tracker = SymptomTracker([symptom])
        alerts = [a for obs in observations for a in tracker.update(obs)]
        assert alerts, (symptom, where)
        out.append((alerts[0], where))
    return out


def test_every_symptom_says_where_and_what_to_try_first():
    got = _scripted_alerts()
    assert {a.name for a, _ in got} == set(SYMPTOM_NAMES)
    for a, where in got:
        assert a.where == where, (a.name, a.where)
        assert a.remedy and a.remedy == type(next(s for s in default_symptoms() if s.name == a.name)).remedy
        assert a.message.endswith(f"; where: {where}; try first: {a.remedy}"), a.message
    remedies = {a.name: a.remedy for a, _ in got}
    assert len(set(remedies.values())) == len(remedies)  # one remedy per symptom, not one text for all
    assert "clip the gradient norm" in remedies["exploding_gradients"] and "learning rate" in remedies["exploding_gradients"]


def test_where_falls_back_when_names_are_unknown():
    """GradStats without parameter names (a tracker fed by hand): the alert still says "gradients"."""
    (a,) = SymptomTracker([ExplodingGradients()]).update(Observation(0, grads=GradStats(2e5, 1.0, 1.0, 1.0)))
    assert a.where == "gradients" and a.remedy
    (b,) = SymptomTracker([NonFinite()]).update(Observation(0, grads=GradStats(NAN, 1.0, 1.0, 1.0)))
    assert b.where == "gradients"


def test_alert_round_trip_with_where_and_remedy():
    (a, _), *_ = _scripted_alerts()
    assert Alert(**a.to_dict()) == a and {"where", "remedy"} <= set(a.to_dict())
    old = {k: v for k, v in a.to_dict().items() if k not in ("where", "remedy")}  # an alert saved before issue 17
    assert Alert(**old).where is None and Alert(**old).remedy is None
    assert place_name(place("layer1.0.conv1", "gradients")) == "layer1.0.conv1" and place_name("loss") == "loss"
    assert advise("m", None, None) == "m"


def test_a_symptom_without_a_remedy_keeps_its_message():
    """A user's own symptom class that defines no remedy: fields None, message unchanged."""
    class Always(LossSpike):
        name = "always"
        remedy = None

        def check(self, step, value, history, first=()):
            return self.alert(step, "seen")

    (a,) = SymptomTracker([Always()]).update(Observation(0, loss=1.0))
    assert (a.message, a.where, a.remedy) == ("seen", None, None)
