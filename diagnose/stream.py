"""The TEViD stream: the last T frames -> TEViD -> the calibrated decision rule, one frame at a time.

One code path for the live monitor and the evaluation's replay (`eval.replay.TEViDDiagnoser`), so the
benchmark exercises the live code:

    stream = TEViDStream(model, calibration, window=10)
    for frame in frames:                  # capture.Frame, or (step, (6, S, S) frame, readouts dict)
        pred = stream.push(frame.step, frame.frame, frame.readouts)
        if pred is not None: pred.probs, pred.vacuity, pred.decision.new_alerts, pred.decision.unknown_alert

Windows are causal. Live (`pad_start=False`) the first T-1 frames get no prediction; the replay scores
every frame (`pad_start=True`: frame 0 repeated on the left until T frames exist). That is the only
difference between the two.

A model of the relative representation (`TEViDConfig.representation`) reads the run-relative inputs of
`capture.relative`: `push` then also takes the frame's `levels`, `pattern` and the head's `num_classes`
(a `capture.Frame` has them), and the stream keeps the run's causal reference (`RunRelative`) from its
first frame, exactly as the clips it was trained on were made from the stores.
"""
from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from diagnose.decision import Decision, DecisionState


@dataclass(frozen=True)
class Prediction:
    step: int
    probs: list[float]  # (K,) tempered by the calibration
    vacuity: float
    decision: Decision | None  # None when the stream has no calibration (probabilities only)
    label: str  # a class name, or "unknown"
    anomaly: float | None = None  # the anomaly head's score (a model with one), else None


def _readout_names() -> tuple[str, ...]:
    from capture.schema import CLIP_READOUTS

    return CLIP_READOUTS


class TEViDStream:
    """Ring buffer of the last `window` frames, TEViD's prediction on it, and the calibrated rule (`Rule.step`) with its state."""

    def __init__(self, model, calibration=None, window: int = 10, device="cpu", pad_start: bool = False,
                 temperature: float = 1.0):
        if window < 1:
            raise ValueError(f"TEViDStream: window must be >= 1, got {window}")
        self.model, self.calibration, self.window, self.device, self.pad_start = model, calibration, window, device, pad_start
        self.uses_video = bool(getattr(getattr(model, "cfg", None), "uses_video", True))
        self.relative = getattr(getattr(model, "cfg", None), "representation", "frames") == "relative"
        self.run_state = None  # relative: the run's RunRelative, from its first frame
        self.readout_names = _readout_names()
        self.ring: deque[tuple[int, torch.Tensor | None, torch.Tensor]] = deque(maxlen=window)
        self.state = DecisionState.start(len(calibration.classes)) if calibration is not None else None
        self.frame_size: int | None = None  # the encoder's frame side, when known (`open_stream`)
        self.temperature = temperature  # used when there is no calibration (the replay tempers, the rule runs later)

    def reset(self) -> None:
        self.ring.clear()
        self.run_state = None
        if self.calibration is not None:
            self.state = DecisionState.start(len(self.calibration.classes))

    def readout_vector(self, readouts: dict) -> torch.Tensor:
        """(8,) float32 in the model's readout order; a missing readout is NaN (the model masks it)."""
        return torch.tensor([float(readouts.get(k, math.nan)) for k in self.readout_names], dtype=torch.float32)

    def add(self, step: int, frame: torch.Tensor | None, readouts, levels: torch.Tensor | None = None,
            pattern: torch.Tensor | None = None, num_classes: int | None = None, step_losses=None,
            weight_step: float | None = None, shares: dict | None = None) -> None:
        """Put a frame in the ring without predicting (restoring a previous monitor's last frames).
        `levels` (6,), `pattern` (6, P, P), `num_classes`, `step_losses` (the losses of the optimizer steps
        since the previous frame, `capture.Frame.step_losses`; None: not known), `weight_step` and `shares`
        (`capture.relative.SHARE_READOUTS` by name; None: the readouts dict's, if any) are read by a relative model only."""
        if isinstance(readouts, dict):
            from capture.relative import SHARE_READOUTS

            weight_step = readouts.get("weight_step") if weight_step is None else weight_step
            shares = {n: readouts.get(n) for n in SHARE_READOUTS} if shares is None else shares
        vec = readouts if isinstance(readouts, torch.Tensor) else self.readout_vector(readouts)
        if self.relative:
            frame, vec = self._relative(levels, pattern, vec, num_classes, step_losses, weight_step, shares)
        self.ring.append((step, frame if self.uses_video else None, vec))

    def _relative(self, levels, pattern, vec, num_classes, step_losses=None, weight_step=None, shares=None):
        from capture.relative import RunRelative

        if levels is None or pattern is None:
            raise ValueError("TEViDStream: this model reads run-relative inputs; push needs the frame's levels (6,) and "
                             "pattern (6, P, P) (capture.Frame.levels / .patterns)")
        if self.run_state is None:
            if not num_classes:
                raise ValueError("TEViDStream: this model reads run-relative inputs; the first push needs num_classes "
                                 "(the head's outputs: capture.Frame.num_classes)")
            self.run_state = RunRelative(int(num_classes), self.model.cfg.relative_config())  # as its training clips
        return self.run_state.push(levels.float(), pattern.float(), vec.float(), step_losses, weight_step, shares)

    def window_frames(self) -> torch.Tensor | None:
        """(T, 6, S, S) frames of the current window (left-padded by repeating the first), or None."""
        entries = self._entries()
        if not entries or entries[0][1] is None:
            return None
        return torch.stack([f for _, f, _ in entries])

    def _entries(self):
        entries = list(self.ring)
        if self.pad_start and entries and len(entries) < self.window:
            entries = [entries[0]] * (self.window - len(entries)) + entries
        return entries

    def push(self, step: int, frame: torch.Tensor | None, readouts, levels: torch.Tensor | None = None,
             pattern: torch.Tensor | None = None, num_classes: int | None = None, step_losses=None,
             weight_step: float | None = None, shares: dict | None = None) -> Prediction | None:
        """Add one frame; the prediction for the window ending at it (None until T frames, live)."""
        self.add(step, frame, readouts, levels, pattern, num_classes, step_losses, weight_step, shares)
        entries = self._entries()
        if len(entries) < self.window:
            return None  # windows are causal and unpadded live: the first T-1 frames get no prediction
        frames = torch.stack([f for _, f, _ in entries])[None] if self.uses_video else None  # (1, T, 6, S, S) or (1, T, 6, P, P)
        vecs = torch.stack([v for _, _, v in entries])[None]  # (1, T, 8) raw, or (1, T, 81) relative
        temperature = self.calibration.temperature if self.calibration is not None else self.temperature
        dev = torch.device(self.device)
        with torch.inference_mode(), torch.autocast(device_type=dev.type, enabled=False):
            out = self.model.predict(None if frames is None else frames.to(dev), vecs.to(dev), temperature=temperature)
        probs = out["probs"][0].double().tolist()
        u = float(out["vacuity"][0])
        score = float(out["anomaly"][0]) if "anomaly" in out else None
        if self.calibration is None:
            return Prediction(step, probs, u, None, "", score)
        cal = self.calibration
        self.state, d = cal.rule().step(self.state, probs, u, score)
        return Prediction(step, probs, u, d, "unknown" if d.unknown else cal.classes[d.label], score)

    def state_dict(self) -> dict | None:
        s = self.state
        return None if s is None else {"streaks": list(s.streaks), "frames": s.frames, "unknown_streak": s.unknown_streak,
                                       "anomaly_streak": s.anomaly_streak, "anomaly_class": s.anomaly_class,
                                       "gate": list(s.gate), "unfamiliar": s.unfamiliar}

    def load_state_dict(self, state: dict | None, unknown_streak: int | None = None) -> None:
        if state and self.state is not None:
            self.state = DecisionState(tuple(state["streaks"]), int(state["frames"]),
                                       int(state.get("unknown_streak", unknown_streak or 0)),
                                       int(state.get("anomaly_streak", 0)), int(state.get("anomaly_class", 0)),
                                       tuple(float(u) for u in state.get("gate", ())), bool(state.get("unfamiliar", False)))


def trained_cadences(path: str | Path) -> tuple[int, ...] | None:
    """The frame cadences (optimizer steps between frames) a fine-tuned TEViD directory was trained on: its
    corpus's capture cadence times each frame spacing of its windows (`state.json`, `extra.trained_cadences`,
    written by `diagnose.finetune`). None when the directory does not say (models fine-tuned before it did,
    or no readable `state.json`); a value that is not a list of positive integers is an error naming the file."""
    state = Path(path) / "state.json"
    try:
        extra = json.loads(state.read_text()).get("extra") or {}
    except (OSError, ValueError, AttributeError):
        return None
    value = extra.get("trained_cadences")
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in value):
        raise ValueError(f"{state}: extra.trained_cadences must be a non-empty list of positive integers, got {value!r}")
    return tuple(sorted(set(value)))


def open_stream(path: str | Path, frame_size: int | None = None, device="cpu", window: int = 10) -> TEViDStream:
    """The live stream of a fine-tuned TEViD directory (`diagnose.tevid.load_tevid`): its window length from
    the saved data config (default `window`), on `device` (a device, or a callable giving one). The stream's
    `frame_size` is the encoder's; a different explicit `frame_size` is refused. A relative model's encoder
    reads the frames' P x P patterns, so its stream takes any `frame_size` (None when unset)."""
    from diagnose.tevid import load_tevid

    path = Path(path)
    model, cal = load_tevid(path)
    enc = getattr(model, "encoder", None)
    size = frame_size
    if enc is not None and model.cfg.representation == "frames":  # a relative model reads patterns, not frames
        if frame_size not in (None, enc.cfg.img_size):
            raise ValueError(f"frame_size={frame_size} but the TEViD checkpoint {path} reads "
                             f"{enc.cfg.img_size}x{enc.cfg.img_size} frames: leave frame_size unset or match it")
        size = enc.cfg.img_size
    config = json.loads((path / "config.json").read_text())
    window = int((config.get("data") or {}).get("window", window))
    device = device() if callable(device) else device
    stream = TEViDStream(model.to(device).eval().requires_grad_(False), cal, window, device)
    stream.frame_size = size
    return stream
