"""Rule-based symptoms: what existing training debuggers report, with no learned model.

Each symptom is a small frozen dataclass (its thresholds) with a schedule (`every`: checked at the
steps where `step % every == 0`) and a pure `check(step, value, history, first) -> Alert | None`: the
tracked value at this step and the values kept from earlier steps (a rolling window, and the first
few as a fixed reference) in, an alert (or None) out, no state (cockpit's quantities with schedules, Lightning's `_evaluate_stopping_criteria`; STYLE.md 7-8).
`SymptomTracker` holds the state: per symptom a bounded history and a confirmation streak; an alert
is confirmed when its condition holds at `consecutive` checks in a row, fires once, and fires again
only after the condition has cleared (like the streaming rule of docs/architecture.md §8).

References and their defaults (checked against the sources where stated):
- SageMaker Debugger built-in rules (docs.aws.amazon.com/sagemaker/latest/dg/debugger-built-in-rules.html
  and the per-rule pages): VanishingGradient: mean |gradient| < threshold, default 1e-7 (checked).
  DeadRelu: a ReLU is dead when active less than `threshold_inactivity` = 1.0 % of the time; the rule
  fires when more than `threshold_layer` = 50.0 % of a layer's ReLUs are dead (checked; the percentages
  are 1.0 and 50.0, not 0.4). SaturatedActivation: tanh / sigmoid inputs outside (-9.4999, 9.4999) /
  (-23, 16.99999), derived from a 1e-7 gradient (checked). ExplodingTensor: NaN / infinite tensors
  (parameters not checked: the page was not in the search index). LossNotDecreasing: compares the loss
  with the loss `num_steps` saved steps earlier (semantics checked; the default `num_steps`,
  `diff_percent` and `increase_threshold_percent` values could not be read in the index).
- AUTOTRAINER (Zhang et al., ICSE 2021; shiningrain/AUTOTRAINER `utils/monitor.py`, checked): NaN or
  infinite loss, or loss >= 1e5, counts as an explosion; vanishing gradient when the gradient-norm
  ratio first/last layer < beta_1 = 1e-3 and the first layer's norm < beta_2 = 1e-4; exploding when the
  ratio > beta_3 = 70; dying ReLU when >= gamma = 0.7 of the gradients are zero; unstable loss zeta =
  0.03, eta = 0.2; slow convergence delta = 0.01.
- DeepDiagnosis (Wardat et al., ICSE 2022; DeepDiagnosis/ICSE2022 `callback/callbacks.py`, checked):
  vanishing gradient mean |g| < 1e-7; dead layer when >= 0.7 of its outputs are <= 0; saturated when
  more than 0.5 of a tanh/sigmoid layer's inputs are beyond +-5; numerical errors: NaN / inf.
Where the rules here differ from those, the class docstring says how and why.

Every alert says where and what to try first (issue 17): `Alert.where` names the module, parameter or
hook point it concerns, with "(activations)" or "(gradients)" when it knows which (or "loss"), and
`Alert.remedy` is a one-line first remedy: a rule's `Symptom.remedy`, TEViD's `TEVID_REMEDIES`. Both are
appended to the message too (`advise`), so a log line alone says what to do.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

IQR_TO_SIGMA = 1.349  # IQR of a standard normal: robust z = (x - median) / (IQR / 1.349)


@dataclass(frozen=True)
class Alert:
    """One alert of the monitor's stream (docs/architecture.md §8 for "tevid"; this module for "rule")."""

    name: str  # a TEViD class, "unknown", "unfamiliar", or a symptom name ("exploding_gradients", ...)
    step: int  # optimizer step the evidence belongs to (0-based, real optimizer steps only)
    source: str  # "tevid" | "rule"
    probability: float | None  # TEViD class probability; None for rules and for "unknown"
    message: str  # what was seen, then "; where: ...; try first: ..." when those are known (`advise`)
    details: dict = field(default_factory=dict, compare=False)
    where: str | None = None  # "<module / parameter / hook point> (activations|gradients)", "loss", or None
    remedy: str | None = None  # a one-line first remedy

    def to_dict(self) -> dict:
        return asdict(self)


def place(name: str, kind: str | None = None) -> str:
    """An `Alert.where`: a module / parameter name, with the kind of tensor ("activations" / "gradients")."""
    return f"{name} ({kind})" if kind else name


def place_name(where: str) -> str:
    """The module / parameter name of an `Alert.where` built by `place` (inverse of `place`)."""
    return where.rsplit(" (", 1)[0] if where.endswith(")") else where


def advise(message: str, where: str | None, remedy: str | None) -> str:
    """The alert message with its place and first remedy appended (what a log line shows)."""
    return "; ".join([message] + ([f"where: {where}"] if where else []) + ([f"try first: {remedy}"] if remedy else []))


def overfitting_remedy(stop_step: int | None = None) -> str:
    """TEViD's overfitting remedy; `stop_step`: the step head-gradient selection picks so far, when known."""
    at = f"step {stop_step}" if stop_step is not None else "the step"
    return (f"regularise more (weight decay, dropout, data augmentation, more data), or stop at {at} where the "
            f"smoothed head-gradient score was lowest (diagnose.selection.select_checkpoint)")


# First remedies of TEViD's class alerts and "unknown" (the rules carry theirs as `Symptom.remedy`).
TEVID_REMEDIES = {
    "overfitting": overfitting_remedy(),
    "instability": "lower the learning rate, add LR warmup, or clip the gradient norm",
    "forgetting": "replay / mix in data of the earlier task(s), or lower the learning rate on the new task",
    "concept_bias": "check the inputs for label-leaking features or shortcuts (a saliency map or an ablation "
                    "of input regions / features)",
    "unknown": "not enough evidence for a diagnosis: look at the rule symptoms and the readouts "
               "(monitor.readouts) around this step",
    "unfamiliar": "TEViD was trained on nothing like this job: rely on the rule symptoms, or add jobs like it to "
                  "the corpus (factory) and fine-tune",
}


@dataclass(frozen=True)
class GradStats:
    """Gradient statistics of one optimizer step, over the parameters the optimizer updates."""

    norm: float  # global L2 norm of all gradients
    mean_abs: float  # mean |g| over all gradient elements
    first_norm: float  # L2 norm of the gradient of the first weight (ndim >= 2), in parameter order
    last_norm: float  # ... and of the last one (usually the classifier head)
    largest: str | None = None  # the parameter with the largest gradient norm (a non-finite norm is largest)
    smallest: str | None = None  # the weight (ndim >= 2) with the smallest gradient norm
    first: str | None = None  # the first weight (whose norm is `first_norm`)
    nonfinite: str | None = None  # the last parameter, in parameter order, with a non-finite gradient: backward
    # runs from the loss toward the input, so that is where the gradients first went bad


@dataclass(frozen=True)
class LayerStats:
    """Activation statistics of one hooked module at a capture step (NaN where not applicable)."""

    kind: str  # "relu" (ReLU-like), "bounded" (tanh / sigmoid / hardtanh), "block" (a capture hook point)
    dead_fraction: float = math.nan  # fraction of units active on < 1 % of their outputs (relu)
    zero_fraction: float = math.nan  # fraction of outputs exactly 0 (relu)
    saturated_fraction: float = math.nan  # fraction of inputs in the saturated range (bounded)
    max_abs: float = math.nan  # largest finite |activation| (block)
    nonfinite: float = math.nan  # non-finite activations (block)


@dataclass(frozen=True)
class Observation:
    """What the monitor knows about one optimizer step; fields it did not measure are None."""

    step: int
    loss: float | None = None
    grads: GradStats | None = None
    layers: dict[str, LayerStats] | None = None  # at capture steps
    nonfinite: float | None = None  # the frame readout `nonfinite` (capture steps)


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's linear interpolation between order statistics (`numpy.percentile`, method "linear")."""
    d = b - a
    return b - d * (1 - t) if t >= 0.5 else a + d * t


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """`np.percentile(values, [25, 50, 75])`, bit for bit, in plain Python: a rule runs every step, and
    for 50 values numpy's call overhead is ~9x the arithmetic."""
    v = sorted(float(x) for x in values)
    out = []
    for q in (0.25, 0.5, 0.75):
        pos = q * (len(v) - 1)
        lo = math.floor(pos)
        out.append(_lerp(v[lo], v[min(lo + 1, len(v) - 1)], pos - lo))
    return out[0], out[1], out[2]


def _median(values: Sequence[float]) -> float:
    """`np.median(values)`, bit for bit (the mean of the two middle values for an even count)."""
    v = sorted(float(x) for x in values)
    m = len(v) // 2
    return v[m] if len(v) % 2 else (v[m - 1] + v[m]) / 2


def _robust_z(x: float, past: Sequence[float]) -> tuple[float, float, float]:
    """(z, median, scale) of x against `past`: z = (x - median) / (IQR / 1.349)."""
    q1, med, q3 = _quartiles(past)
    scale = (q3 - q1) / IQR_TO_SIGMA
    if scale <= 0:
        return (math.inf if x > med else 0.0), float(med), 0.0
    return float((x - med) / scale), float(med), float(scale)


class Symptom:
    """Base: `name`, schedule `every`, `consecutive` checks to confirm, `window` values of rolling
    history, `keep_first` values kept from the start (a fixed reference such as the starting loss)."""

    name: ClassVar[str]
    remedy: ClassVar[str | None] = None  # the one-line first remedy its alerts carry
    every: int = 1
    consecutive: int = 1
    window: int = 0
    keep_first: ClassVar[int] = 0

    def value(self, obs: Observation) -> Any | None:
        """The value this symptom tracks at `obs`, or None if `obs` does not carry it."""
        raise NotImplementedError

    def remember(self, value: Any) -> float | None:
        """What goes into the history after the check (None: nothing)."""
        return None

    def check(self, step: int, value: Any, history: tuple, first: tuple = ()) -> Alert | None:
        """Pure: the alert for `value` at `step`, given the last `window` remembered values (`history`)
        and the first `keep_first` ones (`first`), or None."""
        raise NotImplementedError

    def scheduled(self, step: int) -> bool:
        return step % self.every == 0

    def alert(self, step: int, message: str, where: str | None = None, **details) -> Alert:
        """The alert, with `where` and this symptom's remedy in its fields and appended to `message`."""
        return Alert(self.name, step, "rule", None, advise(message, where, self.remedy), details, where, self.remedy)


@dataclass(frozen=True)
class NonFinite(Symptom):
    """NaN / Inf in the loss, in the gradients, or in captured activations / gradients / logits
    (the frame readout `nonfinite` > 0). SageMaker ExplodingTensor, AUTOTRAINER nan_loss / nan_gradient
    (which also counts a loss >= 1e5: here that is left to `exploding_gradients` and `loss_spike`),
    DeepDiagnosis numerical errors."""

    name: ClassVar[str] = "nan_inf"
    remedy: ClassVar[str] = ("lower the learning rate or clip the gradient norm, and look for log(0) / division by "
                             "zero / bad inputs at that step (under fp16: a GradScaler, or bf16)")
    every: int = 1
    consecutive: int = 1

    def value(self, obs):
        """({source: non-finite?}, where): where = the first hook point (forward order) with non-finite
        activations, else "loss" if the loss is, else the parameter where the gradients went bad."""
        parts = {}
        if obs.loss is not None:
            parts["loss"] = not math.isfinite(obs.loss)
        if obs.grads is not None:
            parts["gradients"] = not (math.isfinite(obs.grads.norm) and math.isfinite(obs.grads.mean_abs))
        if obs.nonfinite is not None and not math.isnan(obs.nonfinite):
            parts["captured tensors"] = obs.nonfinite > 0
        if not parts:
            return None
        counted = {k: s.nonfinite for k, s in (obs.layers or {}).items() if s.kind == "block" and _finite(s.nonfinite)}
        act = next((k for k, n in counted.items() if n > 0), None)  # layers are in forward (hook call) order
        if act is not None:
            where = place(act, "activations")
        elif parts.get("loss"):
            where = "loss"
        elif parts.get("gradients") and obs.grads.nonfinite:
            where = place(obs.grads.nonfinite, "gradients")
        elif parts.get("gradients"):
            where = "gradients"
        elif counted:  # the capture counted them, but no hook point's activations had any
            where = "captured gradients or logits"
        else:  # no per-hook-point counts (e.g. under DP telemetry)
            where = "captured tensors"
        return parts, where

    def check(self, step, value, history, first=()):
        parts, where = value
        bad = [k for k, v in parts.items() if v]
        if bad:
            return self.alert(step, f"non-finite values in {', '.join(bad)} at step {step}", where, sources=bad)
        return None


@dataclass(frozen=True)
class ExplodingGradients(Symptom):
    """The global gradient norm jumps far above its own recent history, or passes an absolute ceiling.

    Fires when the norm g (finite) is >= `abs_max`, or, after `warmup` earlier checks, when its robust
    z-score in log10 space against the last `window` checked norms is >= `z` AND g >= `factor` x their
    median (the z-score alone fires on tiny relative moves when the history is very flat).
    References: AUTOTRAINER beta_3 = 70 on the first/last layer norm ratio and its loss >= 1e5 ceiling
    (an absolute scale; a running history adapts to each model's own scale, which a fixed ratio cannot);
    SageMaker ExplodingTensor only looks at NaN/Inf (here `nan_inf`).
    """

    name: ClassVar[str] = "exploding_gradients"
    remedy: ClassVar[str] = "lower the learning rate, or clip the gradient norm (torch.nn.utils.clip_grad_norm_)"
    z: float = 3.5
    factor: float = 10.0
    abs_max: float = 1e5
    warmup: int = 5
    window: int = 50
    every: int = 1
    consecutive: int = 1

    def value(self, obs):
        return obs.grads

    def remember(self, value: GradStats):
        return math.log10(value.norm) if _finite(value.norm) and value.norm > 0 else None

    def check(self, step, value: GradStats, history, first=()):
        norm, where = value.norm, (place(value.largest, "gradients") if value.largest else "gradients")
        if not _finite(norm):
            return None  # nan_inf reports it
        if norm >= self.abs_max:
            return self.alert(step, f"gradient norm {norm:.3g} >= {self.abs_max:.3g} at step {step}", where, norm=norm)
        if len(history) < self.warmup or norm <= 0:
            return None
        z, med, _ = _robust_z(math.log10(norm), history)
        if z >= self.z and norm >= self.factor * 10**med:
            return self.alert(step, f"gradient norm {norm:.3g} at step {step} is {norm / 10**med:.1f}x the "
                              f"median {10**med:.3g} of the last {len(history)} checks (robust z {z:.1f} in log10)",
                              where, norm=norm, median=10**med, z=z)
        return None


@dataclass(frozen=True)
class VanishingGradients(Symptom):
    """Gradients too small to train: mean |g| < `threshold` (SageMaker VanishingGradient and
    DeepDiagnosis: 1e-7), or AUTOTRAINER's test: first/last weight gradient-norm ratio < `ratio`
    (beta_1 = 1e-3) with the first weight's gradient norm < `first_max` (beta_2 = 1e-4). Steps before
    `min_step` (1) are not checked: a zero-initialised classifier head (timm's MLP-Mixer) gives every
    other layer exactly zero gradient at step 0, by design."""

    name: ClassVar[str] = "vanishing_gradients"
    remedy: ClassVar[str] = ("add normalisation layers or residual connections, use a non-saturating activation and "
                             "He / Kaiming initialisation, or raise the learning rate")
    threshold: float = 1e-7
    ratio: float = 1e-3
    first_max: float = 1e-4
    min_step: int = 1
    every: int = 1
    consecutive: int = 1

    def value(self, obs):
        return obs.grads

    def check(self, step, value: GradStats, history, first=()):
        if step < self.min_step or not (_finite(value.mean_abs) and _finite(value.first_norm) and _finite(value.last_norm)):
            return None
        if value.mean_abs < self.threshold:
            where = place(value.smallest, "gradients") if value.smallest else "gradients"
            return self.alert(step, f"mean |gradient| {value.mean_abs:.3g} < {self.threshold:.3g} at step {step}",
                              where, mean_abs=value.mean_abs)
        if value.last_norm > 0 and value.first_norm / value.last_norm < self.ratio and value.first_norm < self.first_max:
            where = place(value.first, "gradients") if value.first else "first layer (gradients)"
            return self.alert(step, f"first-layer gradient norm {value.first_norm:.3g} is {value.first_norm / value.last_norm:.2g} "
                              f"of the last layer's at step {step} (AUTOTRAINER: < {self.ratio:g} and < {self.first_max:g})",
                              where, first_norm=value.first_norm, last_norm=value.last_norm)
        return None


@dataclass(frozen=True)
class DeadUnits(Symptom):
    """Dead ReLU units in a hooked ReLU-like module: a unit (channel of a conv map, feature of a token /
    vector output) is dead when it is non-zero on fewer than `inactivity` (1 %) of its outputs in the
    capture batch; the rule fires when more than `threshold_layer` (50 %) of a module's units are dead
    (SageMaker DeadRelu defaults, as fractions). DeepDiagnosis and AUTOTRAINER count zero outputs /
    gradients element-wise (>= 0.7); a ReLU is normally ~half zeros element-wise, so the per-unit rule
    separates "sparse" from "dead" more cleanly. Checked at capture steps (the monitor measures
    `inactivity`: see `diagnose.monitor`)."""

    name: ClassVar[str] = "dead_units"
    remedy: ClassVar[str] = ("lower the learning rate, or use LeakyReLU / GELU or a normalisation layer before this "
                             "ReLU (and check its initialisation)")
    threshold_layer: float = 0.5
    inactivity: float = 0.01
    every: int = 1
    consecutive: int = 1

    def value(self, obs):
        if not obs.layers:
            return None
        dead = {k: s.dead_fraction for k, s in obs.layers.items() if s.kind == "relu" and _finite(s.dead_fraction)}
        return dead or None

    def check(self, step, value: dict, history, first=()):
        layer, frac = max(value.items(), key=lambda kv: kv[1])
        if frac > self.threshold_layer:
            return self.alert(step, f"{frac:.0%} of the units of {layer} are dead at step {step} "
                              f"(> {self.threshold_layer:.0%})", place(layer, "activations"), layer=layer,
                              dead_fraction=frac)
        return None


@dataclass(frozen=True)
class SaturatedActivations(Symptom):
    """Saturated bounded activations, or activations of huge magnitude at the capture hook points.

    Fires when more than `threshold_layer` (0.5) of a tanh / sigmoid module's inputs lie beyond
    +-`bound` (5; DeepDiagnosis's values; SageMaker SaturatedActivation uses the wider +-9.5 tanh /
    -23..17 sigmoid range of a 1e-7 gradient), or a hardtanh's inputs lie outside its range; or when
    the largest finite |activation| at a hook point reaches `max_abs` (1e4: within 6.5x of float16's
    65504, so an autocast run is near overflow; no reference tool has this check).
    """

    name: ClassVar[str] = "saturated_activations"
    remedy: ClassVar[str] = ("normalise the inputs of this module (BatchNorm / LayerNorm) or lower the learning rate; "
                             "prefer a non-saturating activation")
    threshold_layer: float = 0.5
    bound: float = 5.0  # read by the monitor when it measures tanh / sigmoid inputs
    max_abs: float = 1e4
    every: int = 1
    consecutive: int = 1

    def value(self, obs):
        if not obs.layers:
            return None
        sat = {k: s.saturated_fraction for k, s in obs.layers.items() if s.kind == "bounded" and _finite(s.saturated_fraction)}
        mags = {k: s.max_abs for k, s in obs.layers.items() if s.kind == "block" and _finite(s.max_abs)}
        return (sat, mags) if (sat or mags) else None

    def check(self, step, value, history, first=()):
        sat, mags = value
        if sat:
            layer, frac = max(sat.items(), key=lambda kv: kv[1])
            if frac > self.threshold_layer:
                return self.alert(step, f"{frac:.0%} of the inputs of {layer} are saturated at step {step} "
                                  f"(> {self.threshold_layer:.0%})", place(layer, "activations"), layer=layer,
                                  saturated_fraction=frac)
        if mags:
            layer, big = max(mags.items(), key=lambda kv: kv[1])
            if big >= self.max_abs:
                return self.alert(step, f"activation magnitude {big:.3g} at {layer} at step {step} (>= {self.max_abs:.3g})",
                                  place(layer, "activations"), layer=layer, max_abs=big)
        return None


@dataclass(frozen=True)
class LossNotDecreasing(Symptom):
    """No improvement of the smoothed training loss over `patience` steps.

    The loss is smoothed by an EMA of span `span` over the kept history (finite losses only); the rule
    fires when the best smoothed loss of the last `patience` steps is not below the best before them
    by at least `min_delta` (relative), unless the loss is already below `min_loss` (nothing left to
    gain). Checked every `every` steps. SageMaker LossNotDecreasing compares the loss with the one
    `num_steps` saved steps earlier; AUTOTRAINER's slow convergence looks at accuracy gains < 0.01.
    """

    name: ClassVar[str] = "loss_not_decreasing"
    remedy: ClassVar[str] = ("retune the learning rate (try 3-10x higher and lower) and its schedule, and check that "
                             "the labels match the inputs")
    patience: int = 1000
    min_delta: float = 0.01
    span: int = 50
    min_loss: float = 1e-3
    every: int = 50
    consecutive: int = 1

    @property
    def window(self) -> int:  # type: ignore[override]
        return 2 * self.patience + self.span

    def value(self, obs):
        return obs.loss

    def remember(self, value):
        return value if _finite(value) else None

    def check(self, step, value, history, first=()):
        series = list(history) + ([value] if _finite(value) else [])
        if len(series) < self.patience + self.span:
            return None
        alpha = 2.0 / (self.span + 1)
        ema, e = np.empty(len(series)), series[0]
        for i, x in enumerate(series):
            e = alpha * x + (1 - alpha) * e
            ema[i] = e
        before, recent = float(ema[: -self.patience].min()), float(ema[-self.patience:].min())
        if recent < self.min_loss:
            return None
        if recent > before - self.min_delta * abs(before):
            return self.alert(step, f"smoothed loss has not improved by {self.min_delta:.0%} over {self.patience} steps "
                              f"(best {recent:.4g} in the last {self.patience}, {before:.4g} before)",
                              "loss", recent_best=recent, best_before=before)
        return None


@dataclass(frozen=True)
class LossSpike(Symptom):
    """A loss far above its recent level: robust z = (loss - median) / (IQR / 1.349) >= `z` (3.5) over
    the last `window` (50) finite losses, after `warmup` (20) of them, and a rise above the median of
    at least `min_rise` (10 %) of the starting loss (the median of the first `keep_first` = 10 finite
    losses). The floor is the factory's labelling rule (`spike_min_rise_frac`): near convergence the
    per-batch loss is heavy-tailed (a 0.07 median with 0.26 batches gave z ~ 10 on a healthy ResNet),
    and a floor relative to the current median would call that a spike. The price: once the loss has
    fallen far below 10 % of its start, only rises back to that level count. AUTOTRAINER's unstable-loss
    rule (zeta 0.03, eta 0.2) looks at oscillation of accuracy instead."""

    name: ClassVar[str] = "loss_spike"
    remedy: ClassVar[str] = ("lower the learning rate or add warmup, clip the gradient norm, and check the batch of "
                             "that step for bad samples")
    z: float = 3.5
    window: int = 50
    warmup: int = 20
    min_rise: float = 0.1
    every: int = 1
    consecutive: int = 1
    keep_first: ClassVar[int] = 10

    def value(self, obs):
        return obs.loss

    def remember(self, value):
        return value if _finite(value) else None

    def check(self, step, value, history, first=()):
        if not _finite(value) or len(history) < self.warmup:
            return None
        z, med, _ = _robust_z(value, history)
        start = _median(first) if first else med
        if z >= self.z and value - med >= self.min_rise * abs(start):
            return self.alert(step, f"loss {value:.4g} at step {step} is a spike: robust z {z:.1f} over the median "
                              f"{med:.4g} of the last {len(history)} steps (starting loss {start:.4g})",
                              "loss", loss=value, median=med, z=z)
        return None


def default_symptoms() -> list[Symptom]:
    return [NonFinite(), ExplodingGradients(), VanishingGradients(), DeadUnits(), SaturatedActivations(),
            LossNotDecreasing(), LossSpike()]


SYMPTOM_NAMES = tuple(type(s).name for s in default_symptoms())


@dataclass
class _State:
    history: deque
    first: list = field(default_factory=list)
    streak: int = 0


class SymptomTracker:
    """The state around pure symptoms: bounded histories, confirmation streaks, edge-triggered alerts.

    `update(obs)` feeds one step's observation (steps in increasing order) and returns the alerts
    confirmed at it. A check counts toward a streak only when the symptom is scheduled at that step and
    `obs` carries its value; a clean check resets the streak (and re-arms the alert).
    """

    def __init__(self, symptoms: Sequence[Symptom] | None = None):
        self.symptoms = list(default_symptoms() if symptoms is None else symptoms)
        names = [s.name for s in self.symptoms]
        if len(set(names)) != len(names):
            raise ValueError(f"SymptomTracker: duplicate symptom names {names}")
        self.states = {s.name: _State(deque(maxlen=max(1, s.window))) for s in self.symptoms}

    def update(self, obs: Observation) -> list[Alert]:
        alerts = []
        for s in self.symptoms:
            v = s.value(obs)
            if v is None:
                continue
            st = self.states[s.name]
            if s.scheduled(obs.step):
                hit = s.check(obs.step, v, tuple(st.history) if s.window else (), tuple(st.first))
                st.streak = st.streak + 1 if hit is not None else 0
                if hit is not None and st.streak == s.consecutive:
                    alerts.append(hit)
            if s.window or s.keep_first:
                h = s.remember(v)
                if h is not None:
                    if s.window:
                        st.history.append(h)
                    if len(st.first) < s.keep_first:
                        st.first.append(h)
        return alerts

    def state_dict(self) -> dict:
        return {k: {"history": list(st.history), "first": list(st.first), "streak": st.streak}
                for k, st in self.states.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if k in self.states:
                self.states[k].history.clear()
                self.states[k].history.extend(v["history"])
                self.states[k].first = list(v.get("first", []))
                self.states[k].streak = int(v["streak"])

    def config(self) -> list[dict]:
        return [{"name": s.name, **asdict(s)} for s in self.symptoms]
