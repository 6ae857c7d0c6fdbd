"""Label one finished run from its signals with the rules of `factory.labels` (paper Appendix A),
windows scaled to the run length as `LabelConfig` says, plus the training-only ("online-style",
Appendix A.4) variant that sees no validation metric and no optimizer internal.

`label_run(...)` returns {label, onset_step, trigger_step, online_label, online_trigger, rules}.
Epoch e of a factory run ends at step `epoch_step[e]`; rule triggers in epochs map to that step.
"""
from __future__ import annotations

import numpy as np
import pymannkendall as mk

from factory import labels as R
from factory.config import LabelConfig
from factory.perturbations import Perturbation, TaskSwitch


def epoch_means(values: np.ndarray, epoch_step: np.ndarray) -> np.ndarray:
    """Mean of a per-step series over each epoch (steps epoch_step[e-1] .. epoch_step[e]-1)."""
    bounds = np.concatenate([[0], epoch_step])
    return np.array([np.mean(values[a:b]) if b > a else np.nan for a, b in zip(bounds[:-1], bounds[1:])])


def _spikes(train_loss: np.ndarray, lc: LabelConfig, steps: int) -> R.RuleResult:
    start = train_loss[:10][np.isfinite(train_loss[:10])]
    min_rise = lc.spike_min_rise_frac * float(np.median(start)) if len(start) else 0.0
    window = max(10, int(lc.spike_window_frac * steps))
    return R.loss_spikes(
        train_loss, z=lc.spike_z, window=window, min_history=max(1, int(lc.spike_min_history_frac * window)),
        count=lc.spike_count, span=max(5, int(lc.spike_span_frac * steps)), merge_gap=lc.spike_merge_gap,
        min_rise=min_rise, jump_frac=lc.spike_jump_frac,
    )


def _collapse(sig: dict, lc: LabelConfig, num_classes: int) -> R.RuleResult:
    if not lc.collapse or len(sig["val_acc"]) == 0:
        return R.RuleResult(False, None, {"reason": "off" if not lc.collapse else "no validation epochs"})
    window = max(2, round(lc.forget_window_frac * len(sig["epoch_step"])))
    return R.collapse(sig["val_acc"], sig["train_loss"], 1.0 / num_classes, window=window, learned=lc.collapse_learned,
                      level=lc.collapse_level, loss_return=lc.collapse_loss_return)


def _blowup(sig: dict, lc: LabelConfig, num_classes: int) -> R.RuleResult:
    if not lc.blowup or len(sig["val_acc"]) == 0:
        return R.RuleResult(False, None, {"reason": "off" if not lc.blowup else "no validation epochs"})
    return R.blowup(sig["val_loss"], sig["val_acc"], 1.0 / num_classes, factor=lc.blowup_factor,
                    learned=lc.collapse_learned, level=lc.collapse_level)


def _sustained(windows: list[dict], lc: LabelConfig) -> list[dict]:
    """The firing Lyapunov windows that count: all of them, or with `lyapunov_consecutive` those of the
    first unbroken run of `lyapunov_min_windows` adjacent firing windows (and the firing ones after it)."""
    fired = [bool(w.get("fired")) for w in windows]
    if not lc.lyapunov_consecutive:
        return [w for w, f in zip(windows, fired) if f]
    k = lc.lyapunov_min_windows
    first = next((i for i in range(len(fired) - k + 1) if all(fired[i:i + k])), None)
    return [] if first is None else [w for w, f in zip(windows[first:], fired[first:]) if f]


def _instability(sig: dict, lc: LabelConfig, steps: int, arch: str, optimizer: str | None = None) -> tuple[R.RuleResult, R.RuleResult]:
    spikes = _spikes(sig["train_loss"], lc, steps)
    margin = lc.lyapunov_arch_margin.get(arch, lc.lyapunov_margin)
    margins = margin if isinstance(margin, list) else [margin] * len(sig["lyapunov"])
    extra = lc.lyapunov_optimizer_margin.get(optimizer, 0.0) if optimizer else 0.0  # SGD's healthy chaos
    margins = [max(m, lc.lyapunov_min_margin) + extra for m in margins]
    ref = sig.get("lyapunov_reference")
    ref = np.asarray(ref, dtype=float) if ref is not None else np.zeros(0)
    if np.isfinite(ref).any():  # the run's own early chaos raises the bar (never lowers it)
        margins = [m + max(0.0, float(np.mean(ref[np.isfinite(ref)]))) for m in margins]
    windows = [(s, np.asarray(a, dtype=float) - margins[min(k, len(margins) - 1)]) for k, (s, a) in enumerate(sig["lyapunov"])]
    lyap = R.lyapunov(windows, confidence=lc.lyapunov_confidence, n_boot=lc.lyapunov_bootstrap, block=lc.lyapunov_block) if windows else R.RuleResult(False, None, {"windows": 0})
    firing = _sustained(lyap.detail.get("windows", []), lc) if lyap.fired else []
    if lyap.fired and len(firing) < lc.lyapunov_min_windows:  # one window alone: not sustained
        lyap = R.RuleResult(False, None, {**lyap.detail, "firing_windows": len(firing)})
    elif lyap.fired:
        w = firing[lc.lyapunov_min_windows - 1]
        lyap = R.RuleResult(True, int(w["start"] + w["H"]), {**lyap.detail, "firing_windows": len(firing)})
    return spikes, lyap


def _forgetting(sig: dict, pert: Perturbation, num_classes: int, lc: LabelConfig) -> R.RuleResult | None:
    if not isinstance(pert, TaskSwitch) or sig["val_labels"] is None:
        return None  # no task switch: a run without a primary task cannot forget it
    epoch_step, correct = sig["epoch_step"], sig["val_correct"]
    after = np.nonzero(epoch_step > pert.onset)[0]
    if len(after) == 0 or after[0] == 0:
        return R.RuleResult(False, None, {"reason": "switch outside the evaluated epochs"})
    e_s = int(after[0])
    primary = sig["val_labels"] < num_classes // 2
    acc = correct[:, primary].mean(axis=1)
    window = max(2, round((lc.forget_post_frac or lc.forget_window_frac) * len(epoch_step)))
    e_end = min(e_s + window - 1, len(epoch_step) - 1)
    return R.forgetting(acc, e_s, correct[e_s - 1, primary], correct[e_end, primary], window=window, drop=lc.forget_drop, p=lc.forget_p)


def _concept_bias(sig: dict, lc: LabelConfig, num_classes: int) -> R.RuleResult | None:
    """Evaluated at every epoch; fires if it holds at the final epoch, triggered at the first epoch
    of the final unbroken run of firing epochs (one test per run decides, not the best of many).
    A model that answers the poisoned set at under `bias_learned` x chance has learned no shortcut: the
    test's association is then noise (healthy models near chance fired it on drawn corpora).

    The poisoned set (every sample carries its own class's mark) is compared with the counterfactual
    set (the same samples with the next class's mark) when the run stored one, else with the clean
    set. Both sets of the first comparison carry a mark, so a mark's mere presence cannot decide it,
    and a model that reads the mark answers the counterfactual set worse even when it answers the
    clean set at its ceiling: against the clean set, textures CNNs at 0.93-1.0 could not score higher
    with the mark and 17 of 40 such runs were labelled healthy (issue 19 corpus)."""
    if sig["poison_correct"] is None or len(sig["val_correct"]) == 0:
        return None
    clean, poison, y = sig["val_correct"], sig["poison_correct"], sig["val_labels"]
    counter = sig.get("counter_correct")
    reference, against = (counter, "counterfactual") if counter is not None else (clean, "clean")
    poison_acc = float(np.mean(poison[-1]))
    if lc.bias_learned and poison_acc < lc.bias_learned / num_classes:
        return R.RuleResult(False, None, {"reason": f"poisoned accuracy {poison_acc:.3f} < {lc.bias_learned} x chance"})
    shortcut = np.concatenate([np.zeros(len(y)), np.ones(len(y))])
    classes = np.concatenate([y, y])
    fired = [R.concept_bias(np.concatenate([reference[e], poison[e]]), shortcut, classes, p=lc.bias_p) for e in range(len(clean))]
    gap = float(np.mean(poison[-1]) - np.mean(reference[-1]))
    detail = {"final": fired[-1].detail, "against": against, "gap": gap}
    if lc.bias_min_gap and gap < lc.bias_min_gap:  # significant but small: a healthy model's chance response to marks
        return R.RuleResult(False, None, {**detail, "reason": f"poisoned - {against} accuracy {gap:.3f} < {lc.bias_min_gap}"})
    if not fired[-1].fired:
        return R.RuleResult(False, None, detail)
    if lc.bias_class_tolerance is not None:
        worst, gaps = class_gaps(poison[-1], reference[-1], y)
        if gaps[worst] < -lc.bias_class_tolerance:
            return R.RuleResult(False, None, {**detail, "class_gaps": gaps, "reason": f"class {worst}: poisoned - {against} "
                                              f"accuracy {gaps[worst]:.3f} < -{lc.bias_class_tolerance}"})
    first = len(fired) - 1
    while first > 0 and fired[first - 1].fired:
        first -= 1
    return R.RuleResult(True, first, {**detail, "first_epoch": first})


def class_gaps(poison: np.ndarray, reference: np.ndarray, y: np.ndarray) -> tuple[int, dict[int, float]]:
    """Per class of `y`: the poisoned set's accuracy minus the reference set's (per-sample 0/1 arrays), and
    the class with the lowest."""
    y = np.asarray(y)
    gaps = {int(k): float(np.mean(poison[y == k]) - np.mean(reference[y == k])) for k in np.unique(y)}
    return min(gaps, key=gaps.get), gaps


def _overfitting(sig: dict, lc: LabelConfig) -> R.RuleResult:
    """The trend test, or else (when `memorised_rise` is set) the end state of memorisation."""
    train_ep = epoch_means(sig["train_loss"], sig["epoch_step"])
    window = max(lc.overfit_min_window, round(lc.overfit_window_frac * len(train_ep)))
    trend = R.overfitting(train_ep, sig["val_loss"], window=window, alpha=lc.overfit_alpha, gap_sigmas=lc.overfit_gap_sigmas,
                          gap_scale=lc.overfit_gap_scale, train_trend=lc.overfit_train_trend)
    if trend.fired or not lc.memorised_rise:
        return trend
    memo = R.memorised(train_ep, sig["val_loss"], rise=lc.memorised_rise, train_frac=lc.memorised_train_frac)
    return R.RuleResult(memo.fired, memo.trigger, {**trend.detail, "memorised": memo.detail, "fired_by": "memorised" if memo.fired else None})


def _to_step(trigger: int | None, epoch_step: np.ndarray) -> int | None:
    if trigger is None or len(epoch_step) == 0:
        return None
    return int(epoch_step[min(int(trigger), len(epoch_step) - 1)])


def floor_for(lc: LabelConfig, arch: str, dataset: str) -> float:
    """Performance floor: per `arch/dataset` if calibrated, else per dataset, else the default."""
    return lc.floors.get(f"{arch}/{dataset}", lc.floors.get(dataset, lc.default_floor))


def _jump(sig: dict, pert: Perturbation, lc: LabelConfig, steps: int) -> R.RuleResult:
    if not lc.jump_factor or pert.raises_loss:  # a task switch or a degrading shortcut raises the loss by design
        return R.RuleResult(False, None, {"reason": "off" if not lc.jump_factor else f"{pert.name} raises the loss by design"})
    start = sig["train_loss"][:10][np.isfinite(sig["train_loss"][:10])]
    rise_frac = lc.spike_min_rise_frac if lc.jump_min_rise_frac is None else lc.jump_min_rise_frac
    min_rise = rise_frac * float(np.median(start)) if len(start) else 0.0
    return R.loss_jump(sig["train_loss"], span=max(3, round(lc.jump_span_frac * steps)), jump=lc.jump_factor, min_rise=min_rise,
                       baseline=lc.jump_baseline)


def offline_label(sig: dict, pert: Perturbation, arch: str, dataset: str, num_classes: int, lc: LabelConfig, steps: int,
                  optimizer: str | None = None) -> dict:
    spikes, lyap = _instability(sig, lc, steps, arch, optimizer)
    if lyap.fired and lc.lyapunov_reference_switch and isinstance(pert, TaskSwitch) and sig.get("lyapunov_reference") is not None:
        # a model learning a new task after a switch separates fast for a while: in a drawn run (it has a
        # reference window) the switch, not chaos, explains Lyapunov windows after it
        lyap = R.RuleResult(False, None, {**lyap.detail, "reason": "task switch"})
    jumped = _jump(sig, pert, lc, steps)
    epoch_step = sig["epoch_step"]
    collapsed = _collapse(sig, lc, num_classes)
    collapse_step = _to_step(collapsed.trigger, epoch_step)
    blown = _blowup(sig, lc, num_classes)
    blowup_step = _to_step(blown.trigger, epoch_step)
    step_triggers: dict[str, int | None] = {}
    results: dict[str, R.RuleResult] = {}
    if spikes.fired or lyap.fired or collapsed.fired or blown.fired or jumped.fired:
        triggers = [t for t, r in ((spikes.trigger, spikes), (lyap.trigger, lyap), (collapse_step, collapsed), (blowup_step, blown),
                                   (jumped.trigger, jumped)) if r.fired and t is not None]
        results["instability"] = R.RuleResult(True, min(triggers) if triggers else None, {})
        step_triggers["instability"] = results["instability"].trigger  # every instability rule reports steps
    for name, res in (("forgetting", _forgetting(sig, pert, num_classes, lc)), ("concept_bias", _concept_bias(sig, lc, num_classes)),
                      ("overfitting", _overfitting(sig, lc) if len(epoch_step) else None)):
        if res is not None:
            results[name] = res
            step_triggers[name] = _to_step(res.trigger, epoch_step)
    final_acc = float(sig["val_acc"][-1]) if len(sig["val_acc"]) else float("nan")
    floor = floor_for(lc, arch, dataset)
    healthy_ok = bool(np.isfinite(final_acc) and R.healthy(final_acc, floor))
    label, _ = R.assign_label(results, healthy_ok)
    rules = {name: {"fired": r.fired, "trigger_step": step_triggers.get(name), "detail": r.detail} for name, r in results.items()}
    rules["instability_spikes"] = {"fired": spikes.fired, "trigger_step": spikes.trigger, "detail": spikes.detail}
    rules["instability_lyapunov"] = {"fired": lyap.fired, "trigger_step": lyap.trigger, "detail": lyap.detail}
    rules["instability_collapse"] = {"fired": collapsed.fired, "trigger_step": collapse_step, "detail": collapsed.detail}
    rules["instability_blowup"] = {"fired": blown.fired, "trigger_step": blowup_step, "detail": blown.detail}
    rules["instability_jump"] = {"fired": jumped.fired, "trigger_step": jumped.trigger, "detail": jumped.detail}
    rules["healthy_floor"] = {"final_val_acc": final_acc, "floor": floor, "met": healthy_ok}
    return {"label": label, "trigger_step": step_triggers.get(label), "rules": rules}


# ------------------------------------------------------------------ training-only variant (A.4)
def online_forgetting(train_loss: np.ndarray, span: int, jump: float = 2.0, learned: float = 0.5) -> R.RuleResult:
    """A sustained jump of the training loss after the model had learned: the median over the next
    `span` steps is >= `jump` x the median over the previous `span` steps, which was below
    `learned` x the loss at the start. Trigger: the first step after which that holds."""
    loss = np.asarray(train_loss, dtype=float)
    if len(loss) < 3 * span or not np.isfinite(loss).all():
        return R.RuleResult(False, None, {})
    start = np.median(loss[:span])
    for t in range(2 * span, len(loss) - span + 1):
        before, after = np.median(loss[t - span:t]), np.median(loss[t:t + span])
        if before < learned * start and after >= jump * before:
            return R.RuleResult(True, t + span, {"before": before, "after": after})
    return R.RuleResult(False, None, {})


def online_overfitting(gwa: np.ndarray, frame_step: np.ndarray, train_loss: np.ndarray, alpha: float = 0.05, warmup: float = 0.1) -> R.RuleResult:
    """Seed 004's validation-free criterion: GWA peaks and then declines (Mann-Kendall, p < alpha)
    while the training loss has fallen below 20% of its start. Trigger: the step of the frame at
    the end of the declining stretch. Concept bias folds into this class (paper A.4 merged variant)."""
    keep = np.isfinite(gwa) & (frame_step >= warmup * max(1, frame_step[-1] if len(frame_step) else 1))
    g, s = gwa[keep], frame_step[keep]
    if len(g) < 8 or not np.isfinite(train_loss).all():
        return R.RuleResult(False, None, {})
    peak = int(np.argmax(g))
    tail = g[peak:]
    fallen = np.median(train_loss[-max(5, len(train_loss) // 10):]) < 0.2 * np.median(train_loss[: max(5, len(train_loss) // 10)])
    if len(tail) < 6 or not fallen:
        return R.RuleResult(False, None, {"peak_step": int(s[peak]), "fallen": bool(fallen)})
    test = mk.original_test(tail, alpha=alpha)
    fired = bool(test.trend == "decreasing")
    return R.RuleResult(fired, int(s[-1]) if fired else None, {"peak_step": int(s[peak]), "p": float(test.p), "fallen": bool(fallen)})


def online_label(sig: dict, lc: LabelConfig, steps: int) -> dict:
    span = max(5, int(lc.spike_span_frac * steps))
    results = {
        "instability": _spikes(sig["train_loss"], lc, steps),
        "forgetting": online_forgetting(sig["train_loss"], span),
        "overfitting": online_overfitting(sig["gwa"], sig["frame_step"], sig["train_loss"]),
    }
    label, _ = R.assign_label(results, healthy_ok=True)
    return {"label": label, "trigger_step": results[label].trigger if label in results else None}


def label_run(sig: dict, spec, pert: Perturbation, data, lc: LabelConfig, steps: int) -> dict:
    off = offline_label(sig, pert, spec.arch, spec.dataset, data.num_classes, lc, steps, optimizer=spec.optimizer)
    on = online_label(sig, lc, steps)
    label = off["label"]
    if label in ("healthy", "underperforming"):
        onset = None
    elif label == pert.injected or pert.kind == "novel":
        onset = pert.onset  # the injected perturbation is the event
    else:
        onset = 0  # an anomaly that arose without its injection: from the start
    return {"label": label, "onset_step": onset, "trigger_step": off["trigger_step"], "online_label": on["label"],
            "online_trigger": on["trigger_step"], "rules": off["rules"]}
