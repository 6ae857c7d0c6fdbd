"""TEViD's alerts: a confirmed class (or Unknown) from the decision rule, with where it points and what to
try first.

Where: the channel (activations / gradients x early / mid / late) whose map moved most over the window,
named by its hook point's module. Move = RMS over pixels of (mean map of the last half of the window -
mean map of the first half); the maps are robust z-scores per channel (`capture.RobustNormalizer`), so
the channels are on one scale. Remedy: `diagnose.symptoms.TEVID_REMEDIES`; for overfitting it names the
step head-gradient selection (`diagnose.selection.select_checkpoint`, score_w) picks from the frames so far.
"""
from __future__ import annotations

import math

import torch

from capture.frames import CHANNELS
from diagnose.stream import Prediction
from diagnose.symptoms import TEVID_REMEDIES, Alert, advise, overfitting_remedy, place


def moved_channel(window: torch.Tensor | None, points) -> tuple[str | None, dict[str, float]]:
    """("<hook point module> (activations|gradients)" or None, {channel: move}) of a (T, 6, S, S) window."""
    if window is None:
        return None, {}
    x = window.float()
    h = max(1, x.shape[0] // 2)
    move = (x[-h:].mean(0) - x[:h].mean(0)).square().mean(dim=(1, 2)).sqrt()  # (6,)
    change = dict(zip(CHANNELS, move.tolist()))
    c = int(move.argmax())
    if not move[c] > 0:
        return None, change  # nothing moved (or no maps): no place to name
    kind, position = CHANNELS[c].split("_")
    point = next((p for p in points if p.position == position), None)
    name = point.name if point is not None else position
    return place(name, "activations" if kind == "act" else "gradients"), change


def tevid_remedy(name: str, readouts: list[dict]) -> str | None:
    """The first remedy of a TEViD alert named `name`, given the run's readouts so far (one dict per frame)."""
    if name != "overfitting":
        return TEVID_REMEDIES.get(name)
    from diagnose.selection import select_checkpoint

    steps = [r["step"] for r in readouts]
    scores = [r.get("score_w", math.nan) for r in readouts]
    known = any(math.isfinite(v) for v in scores)
    return overfitting_remedy(select_checkpoint(steps, scores, tail_frac=1.0) if known else None)


def tevid_alerts(pred: Prediction, calibration, window: torch.Tensor | None, points, readouts: list[dict]) -> list[Alert]:
    """The alerts a prediction fires: each class whose streak reached `consecutive`, and Unknown."""
    cal, d, probs, u = calibration, pred.decision, pred.probs, pred.vacuity
    if getattr(cal, "score_threshold", None) is not None:  # score mode: the anomaly score alarms, the class head names it
        found = [(cal.classes[c], probs[c], f"TEViD: {cal.classes[c]} (anomaly score {pred.anomaly:.4f} > "
                  f"{cal.score_threshold:.4f} for {cal.consecutive} frames in a row; kind: p = {probs[c]:.2f}, vacuity {u:.2f})")
                 for c in d.new_alerts]
    else:
        found = [(cal.classes[c], probs[c], f"TEViD: {cal.classes[c]} (p = {probs[c]:.2f} > {cal.thresholds[c - 1]:.2f} "
                  f"for {cal.consecutive} frames in a row, vacuity {u:.2f})") for c in d.new_alerts]
    if d.unfamiliar_alert:
        found.append(("unfamiliar", None, f"TEViD: unfamiliar model: its first {cal.gate} windows are far from every training "
                                          f"run (their median familiarity {d.gate_familiarity:.2f} > tau {cal.tau:.2f}); rule symptoms "
                                          "only from here"))
    if d.unknown_alert and getattr(cal, "score_threshold", None) is not None:
        found.append(("unknown", None, f"TEViD: an anomaly of no known kind (anomaly score {pred.anomaly:.4f} > "
                                       f"{cal.score_threshold:.4f} for {cal.consecutive} frames in a row; vacuity {u:.2f} > "
                                       f"tau {cal.tau:.2f}: the class head lacks the evidence to name it)"))
    elif d.unknown_alert:
        found.append(("unknown", None, f"TEViD: unknown (vacuity {u:.2f} > tau {cal.tau:.2f} for {cal.consecutive} "
                                       f"frames in a row)"))
    if not found:
        return []
    where, change = moved_channel(window, points)
    alerts = []
    for name, p, message in found:
        remedy = tevid_remedy(name, readouts)
        alerts.append(Alert(name, pred.step, "tevid", p, advise(message, where, remedy),
                            {"vacuity": u, "probs": probs, "channel_change": change}, where, remedy))
    return alerts
