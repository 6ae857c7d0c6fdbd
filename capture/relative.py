"""Run-relative inputs (issue 20): what a run looks like once the look of the network is taken out.

The frames TEViD read first carry each architecture's constants: levels about 9 orders of magnitude apart,
upsampling blocks, the dataset's mean image, readouts whose size grows with width and class count. A store
also keeps, per frame and map, the raw level (log10 RMS of the batch-mean map) and a standardised 8 x 8
pattern (`capture.frames.summarise_maps`), and the live monitor's frames hold the same (`Frame.levels`,
`Frame.patterns`), so inputs relative to the run are computed frame by frame, causally, from either:

    levels    (6,)        --minus the run reference, asinh-->                  rel_level   (6,)
                          --minus the previous frame's level-->                d_level     (6,)
    patterns  (6, P, P)   --each map to zero mean, unit spatial sd-->          pattern     (6, P, P)
    readouts  (8,)        --head-gradient sizes and the loss as log ratios to the run reference, loss and
                            entropy over log C, confidence above chance, the smoothed log loss above
                            its best so far--> (10,)
    step losses (n,)      --the losses of every optimizer step since the previous frame, in log: the
                            highest above their median, and the median step-to-step change--> (2,)
    weight_step           --the weights' movement per step (capture.weights) as a log ratio to the run
                            reference, and its log above the median of the run's frames so far--> (2,)
    weight_still          --the share of watched weight tensors that stopped moving, as it is--> (1,)
    batch_repeat,         --whether the batch came back (capture.batches) and the share of the batch's
      confident_miss        labels the model contradicts (capture.readouts), as they are--> (2,)
    the 29 above          --each one's slow average over the run so far (EWMA) and its leaky peak--> (58,)

A frame's readouts hold the loss of its own step only: at a cadence of 5, four steps in five are unseen,
and the loss spikes that make a run unstable (the factory's rule reads every step) fall between frames.
The step losses are what the recorder logged since the last frame (`capture.Frame.step_losses`), and in a
store `train_loss` between two frames' steps; both are the training loss, nothing privileged. Without them
(a run store read by frame, a released frame) the two features are 0.

`weight_step` is how fast the weights move (a raised learning rate moves them faster even where the loss
barely shows it). Its ratio to the reference forgets a change after `reference_lag` frames; its height above
the run's running median remembers a change for as long as it has lasted less than the run before it. A
store or frame without it (older corpora, a released frame) gives 0 for both. `weight_still` is already a share
that no network's size sets (0 in a run whose every watched tensor moves), so it is read as it is; a store or
frame without it gives 0. So are `batch_repeat` (0 or 1) and `confident_miss` (a share of rows): the three are the
`SHARE_READOUTS`, passed as `shares` by name; a store or frame without one gives 0 for it.

The run reference of a level (or of a size readout's log) is the mean of its finite values over the run's
first `reference_frames` frames seen so far: frame 0 is its own reference, later frames never move it. With
`reference_lag = k > 0` the reference is instead the value k frames back, once the run has k earlier frames.
Every scalar goes through asinh after non-finite values are replaced: near-linear where healthy runs sit,
logarithmic for a diverging one, never clamped.

A window of `ClipConfig.window` frames forgets what happened before it. The history features keep a trace
of the run so far at a cost that does not grow with it: `slow_<f>` is an exponential moving average of
scalar f (weight `history_rate` per frame, about 1/history_rate frames of memory) and `peak_<f>` its leaky
peak, which jumps to a new high at once and then closes a fraction `peak_decay` of its gap to the current
value each frame.
Both start at the run's first value and are the same for a run of any length once it is a few memories long
(a running maximum over the whole run would drift up with its length, as a fixed start reference did).

`RunRelative` is the one implementation: `push` one frame at a time (the live stream, the replay), and
`relative_frames` pushes a stored run's frames through it (clips, probes). `relative_run` cuts a run's
causal windows from those per-frame arrays.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
from einops import reduce

from capture.frames import CHANNELS
from capture.schema import CLIP_READOUTS

SIZE_READOUTS = ("head_grad_norm", "score_w", "score_z", "loss")  # scale with width, classes, tokens: ratios only
FRAME_FEATURES = (  # one frame's own scalars; the history of each follows them (TEViDConfig.history)
    tuple(f"rel_level_{c}" for c in CHANNELS)
    + tuple(f"d_level_{c}" for c in CHANNELS)
    + tuple(f"log_ratio_{r}" for r in SIZE_READOUTS)
    + ("gwa", "confidence_above_chance", "entropy_over_log_c", "margin", "loss_over_log_c", "loss_above_best")
    + ("step_loss_spike", "step_loss_noise")
    + ("log_ratio_weight_step", "weight_step_above_median")
    + ("weight_still",)
    + ("batch_repeat", "confident_miss")
)
STEP_LOSS_FEATURES = ("step_loss_spike", "step_loss_noise")  # read by a model with TEViDConfig.step_losses
WEIGHT_FEATURES = ("log_ratio_weight_step", "weight_step_above_median")  # read with TEViDConfig.weight_step
STILL_FEATURES = ("weight_still",)  # read with TEViDConfig.weight_still
BATCH_FEATURES = ("batch_repeat", "confident_miss")  # read with TEViDConfig.batch_features
SHARE_READOUTS = STILL_FEATURES + BATCH_FEATURES  # readouts that are shares already: read as they are
HISTORY_FEATURES = tuple(f"slow_{n}" for n in FRAME_FEATURES) + tuple(f"peak_{n}" for n in FRAME_FEATURES)
RELATIVE_FEATURES = FRAME_FEATURES + HISTORY_FEATURES
OPTIONAL_FEATURES = STEP_LOSS_FEATURES + WEIGHT_FEATURES + STILL_FEATURES + BATCH_FEATURES + HISTORY_FEATURES  # models made before them read the other 22
REPRESENTATIONS = ("frames", "relative")  # what TEViD reads: stored frames and raw readouts, or these inputs
BIG = 1e6  # what +-inf becomes before asinh (asinh(1e6) ~ 14.5)
EPS = 1e-12
_READOUT = {name: i for i, name in enumerate(CLIP_READOUTS)}


@dataclass
class RelativeConfig:
    reference_frames: int = 4  # the run reference: mean over the run's first frames
    level_scale: float = 0.25  # decades of level per unit before asinh: 0.25 decade (x1.8) ~ 1
    loss_smoothing: float = 0.5  # EMA weight of the newest frame in the smoothed log loss behind loss_above_best
    # 0: levels and sizes relative to the run reference (its first `reference_frames` frames) for ever; k > 0:
    # relative to the values k frames back once the run has that many (the run reference before). A fixed start
    # reference drifts without bound over a long run: a healthy 1,500-step job sits far outside the 80-320-step
    # runs of the corpus; a lagged one measures change over a span the training windows cover
    reference_lag: int = 0
    history_rate: float = 0.03  # slow_<f>: EWMA weight of the newest frame (memory ~ 1 / history_rate frames)
    peak_decay: float = 0.05  # peak_<f>: the fraction of its gap to the current value the peak closes per frame
    # loss_above_best: 0 = above the lowest smoothed log loss of the run so far; > 0 = above a leaky low that
    # jumps to a new low at once and closes this fraction of its gap to the current value each frame (the lowest
    # value of a noisy loss keeps falling as a run goes on). Tried against the field's long small-batch jobs,
    # not adopted (docs/benchmark/inputs.md, "The loss above its best on long small-batch jobs")
    best_decay: float = 0.0
    # loss_above_best from the median loss of the steps since the previous frame (a frame's step losses, a store's
    # train_loss; its own step's loss when it has none) instead of its own step's, one batch's. Tried, not adopted
    best_from_steps: bool = False


# the RelativeConfig fields a model's config and its clips' config carry (TEViDConfig, ClipConfig), so that
# fine-tuning, calibration, the replay and the live stream make the same inputs; the rest keep their defaults
MODEL_FIELDS = ("reference_lag", "history_rate", "peak_decay", "best_decay", "best_from_steps")


def model_fields(cfg) -> dict:
    """`MODEL_FIELDS` of a config that carries them (a TEViDConfig or a ClipConfig), to pass on to another."""
    return {name: getattr(cfg, name) for name in MODEL_FIELDS}


def relative_config_of(cfg) -> RelativeConfig:
    """The RelativeConfig of a config that carries `MODEL_FIELDS` (a TEViDConfig or a ClipConfig)."""
    return RelativeConfig(**model_fields(cfg))


def _squash(x: torch.Tensor) -> torch.Tensor:
    return torch.asinh(torch.nan_to_num(x, nan=0.0, posinf=BIG, neginf=-BIG))


def unit_patterns(patterns: torch.Tensor) -> torch.Tensor:
    """`(..., 6, P, P)` standardised-then-resized patterns -> each map at zero mean and unit spatial sd (a
    constant map stays zero); resizing shrank the spread by an amount that depends on the native size."""
    p = torch.nan_to_num(patterns.float())
    mean = reduce(p, "... c h w -> ... c 1 1", "mean")
    sd = torch.sqrt(reduce((p - mean) ** 2, "... c h w -> ... c 1 1", "mean"))
    return torch.where(sd > 1e-6, (p - mean) / sd.clamp_min(1e-6), torch.zeros_like(p))


def step_loss_features(losses) -> tuple[float, float]:
    """The losses of the optimizer steps since the previous frame `(n,)` -> (spike, noise) in log loss: the
    highest step above the median step, and the median absolute change from one step to the next. Both
    are ratios of losses, so they do not depend on the loss's scale. A non-finite step loss is a spike
    of +inf; fewer than 2 steps give (0, 0)."""
    if losses is None:
        return 0.0, 0.0
    x = torch.as_tensor(losses, dtype=torch.float64).flatten()
    if len(x) < 2:
        return 0.0, 0.0
    if not torch.isfinite(x).all():
        return math.inf, 0.0
    log = torch.log(x.abs() + EPS)
    return float(log.max() - log.median()), float((log[1:] - log[:-1]).abs().median())


def interval_losses(train_loss, frame_step) -> list:
    """A store's per-step `train_loss` `(N,)` and the steps of the frames read `(T,)` -> per frame, the losses
    of the steps after the previous frame read, up to and including its own (the first frame: from step 0)."""
    loss = torch.as_tensor(train_loss)
    steps = [int(s) for s in frame_step]
    return [loss[(steps[t - 1] + 1 if t else 0):s + 1] for t, s in enumerate(steps)]


def readout_column(readouts, names, name: str):
    """The readout `name` of every frame `(N,)` from readouts `(N, R)` in the order of `names` (a store's
    `readout_names`); None when the store predates the readout."""
    return readouts[:, list(names).index(name)] if name in names else None


def weight_step_column(readouts, names):
    """`readout_column(readouts, names, "weight_step")`."""
    return readout_column(readouts, names, "weight_step")


def _over_gaps(values, idx, reduce) -> torch.Tensor:
    """Per-frame values `(N,)` read at frames `idx`: the first its own value, each later one `reduce` of the
    stored values since the previous frame read (a 1-d float64 tensor without NaNs -> a 0-d one; NaN if none)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    idx = [int(i) for i in idx]

    def finite(a, b):
        gap = v[a + 1:b + 1]
        gap = gap[~torch.isnan(gap)]
        return reduce(gap) if len(gap) else v.new_tensor(math.nan)
    out = [v[idx[0]]] + [finite(a, b) for a, b in zip(idx, idx[1:])]
    return torch.stack(out) if out else v.new_zeros(0)


def spaced_weight_steps(weight_step, idx) -> torch.Tensor:
    """A store's per-frame `weight_step` `(N,)` read at frames `idx` (every k-th): per frame read, the mean
    of the stored per-step rates of the frames since the previous one read (the first: its own value, NaN).
    Within a run the stored rates span equal steps, so this is the movement per step over the longer gap up
    to the noise that cancels over it, a factor the ratio to the run's own reference takes out."""
    return _over_gaps(weight_step, idx, torch.mean)


# how a share readout's frames between two frames read combine (`spaced_shares`): a tensor still over the longer gap
# was still in each shorter one, so the least share bounds the share over the gap from above (the two agree when the
# same tensors stay still, a freeze); a batch that came back in any frame of the gap came back; the misses average
SHARE_OVER_GAPS = {"weight_still": torch.min, "batch_repeat": torch.max, "confident_miss": torch.mean}


def share_columns(readouts, names) -> dict:
    """The `SHARE_READOUTS` a store has, by name: each one's per-frame column `(N,)` (`readout_column`)."""
    return {n: readout_column(readouts, names, n) for n in SHARE_READOUTS if n in names}


def spaced_shares(columns: dict, idx) -> dict:
    """`share_columns` of a store read at frames `idx` (every k-th): per frame read, each share over the frames
    since the previous one read, combined by `SHARE_OVER_GAPS`."""
    return {n: _over_gaps(c, idx, SHARE_OVER_GAPS[n]) for n, c in columns.items()}


class RunRelative:
    """Causal per-frame transform of one run: `push(levels, pattern, readouts, step_losses)` -> (pattern `(6, P, P)`,
    scalars `(len(RELATIVE_FEATURES),)`), float32. `num_classes` is the head's output size (classes, or
    the vocabulary of a language model). Keeps only the reference sums and the previous frame's levels."""

    def __init__(self, num_classes: int, cfg: RelativeConfig = RelativeConfig()):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if cfg.reference_frames < 1:
            raise ValueError(f"reference_frames must be >= 1, got {cfg.reference_frames}")
        if cfg.reference_lag < 0:
            raise ValueError(f"reference_lag must be >= 0 (0: the run reference), got {cfg.reference_lag}")
        for name in ("history_rate", "peak_decay"):
            if not 0.0 < getattr(cfg, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(cfg, name)}")
        if not 0.0 <= cfg.best_decay <= 1.0:
            raise ValueError(f"best_decay must be in [0, 1] (0: the run's lowest loss so far), got {cfg.best_decay}")
        self.num_classes, self.cfg = num_classes, cfg
        self.frames = 0
        n = len(CHANNELS) + len(SIZE_READOUTS) + 1  # levels, log sizes, log weight_step
        self._sum = torch.zeros(n, dtype=torch.float64)  # finite levels and log sizes of the reference frames
        self._count = torch.zeros(n, dtype=torch.float64)
        self._previous: torch.Tensor | None = None  # the last frame's levels
        self._history: deque[torch.Tensor] = deque(maxlen=cfg.reference_lag + 1)  # reference_lag > 0: the lagged values
        self._loss_ema: float | None = None  # smoothed log loss, and its lowest value so far
        self._loss_best = math.inf
        self._weight_logs: list[float] = []  # log weight_step of the frames so far (finite ones)
        self._slow: torch.Tensor | None = None  # the frame scalars' EWMA and leaky peak (HISTORY_FEATURES)
        self._peak: torch.Tensor | None = None

    def push(self, levels: torch.Tensor, pattern: torch.Tensor, readouts: torch.Tensor,
             step_losses=None, weight_step: float | None = None,
             shares: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if levels.shape != (len(CHANNELS),) or readouts.shape != (len(CLIP_READOUTS),) or pattern.ndim != 3:
            raise ValueError(f"expected levels ({len(CHANNELS)},), pattern ({len(CHANNELS)}, P, P) and readouts "
                             f"({len(CLIP_READOUTS)},) in {CLIP_READOUTS} order, got {tuple(levels.shape)}, "
                             f"{tuple(pattern.shape)}, {tuple(readouts.shape)}")
        lv = levels.double()
        r = readouts.double()
        sizes = torch.log(torch.stack([r[_READOUT[n]] for n in SIZE_READOUTS]).abs() + EPS)
        ws = math.nan if weight_step is None else float(weight_step)
        log_ws = math.log(abs(ws) + EPS) if math.isfinite(ws) else math.nan
        values = torch.cat([lv, sizes, r.new_tensor([log_ws])])
        if self.frames < self.cfg.reference_frames:
            ok = torch.isfinite(values)
            self._sum += torch.where(ok, values, torch.zeros_like(values))
            self._count += ok.double()
        self.frames += 1
        reference = self._sum / self._count  # NaN while a value has no finite reference yet
        if self.cfg.reference_lag:
            self._history.append(values)
            if len(self._history) == self._history.maxlen:  # the values reference_lag frames back, where finite
                reference = torch.where(torch.isfinite(self._history[0]), self._history[0], reference)
        relative = values - reference
        n = len(CHANNELS)
        rel_level = relative[:n] / self.cfg.level_scale
        d_level = (lv - self._previous) / self.cfg.level_scale if self._previous is not None else torch.zeros_like(lv)
        self._previous = lv
        log_c = math.log(self.num_classes)
        c = 1.0 / self.num_classes
        above_best = self._above_best(self._best_loss(float(r[_READOUT["loss"]]), step_losses))
        spike, noise = step_loss_features(step_losses)
        if math.isfinite(log_ws):
            self._weight_logs.append(log_ws)
        above_median = log_ws - float(torch.tensor(self._weight_logs).median()) if math.isfinite(log_ws) else math.nan
        shares = shares or {}
        as_is = [math.nan if shares.get(n) is None else float(shares[n]) for n in SHARE_READOUTS]  # NaN, none -> 0 below
        scalars = torch.cat([
            torch.where(torch.isnan(rel_level), torch.zeros_like(rel_level), rel_level),
            torch.where(torch.isnan(d_level), torch.zeros_like(d_level), d_level),
            relative[n:n + len(SIZE_READOUTS)],
            torch.stack([r[_READOUT["gwa"]], (r[_READOUT["confidence"]] - c) / (1.0 - c), r[_READOUT["entropy"]] / log_c,
                         r[_READOUT["margin"]], r[_READOUT["loss"]] / log_c, r.new_tensor(above_best),
                         r.new_tensor(spike), r.new_tensor(noise), relative[-1], r.new_tensor(above_median)]),
            r.new_tensor(as_is),
        ])
        frame = _squash(scalars)
        return unit_patterns(pattern), torch.cat([frame, *self._history_of(frame)]).float()

    def _history_of(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The run so far in two traces of the frame's squashed scalars `(F,)`: their EWMA and leaky peak."""
        if self._slow is None:
            self._slow, self._peak = frame.clone(), frame.clone()
        else:
            self._slow = self._slow + self.cfg.history_rate * (frame - self._slow)
            self._peak = torch.maximum(frame, self._peak + self.cfg.peak_decay * (frame - self._peak))
        return self._slow, self._peak

    def _best_loss(self, loss: float, step_losses) -> float:
        """The loss `loss_above_best` reads: the frame's own (default) or, with `best_from_steps`, the median of the
        finite step losses since the previous frame (non-finite when every one of them is)."""
        if not self.cfg.best_from_steps or step_losses is None or len(step_losses) == 0:
            return loss
        x = torch.as_tensor(step_losses, dtype=torch.float64).flatten()
        finite = x[torch.isfinite(x)]
        return float(finite.median()) if len(finite) == len(x) else math.inf

    def _above_best(self, loss: float) -> float:
        """How far the smoothed log loss sits above its lowest value so far (0 while the run keeps improving):
        a window-length reader forgets a level shift once the jump leaves its window; this remembers it
        (a task switch's loss stays above the best it had reached). With `best_decay` > 0 the low is leaky: it
        closes that fraction of its gap to the smoothed loss each frame, so a long run's noise does not drive it
        ever lower. A non-finite loss gives +inf."""
        if not math.isfinite(loss):
            return math.inf
        log_loss = math.log(abs(loss) + EPS)
        a = self.cfg.loss_smoothing
        self._loss_ema = log_loss if self._loss_ema is None else (1 - a) * self._loss_ema + a * log_loss
        best = self._loss_ema if math.isinf(self._loss_best) else self._loss_best + self.cfg.best_decay * (self._loss_ema - self._loss_best)
        self._loss_best = min(best, self._loss_ema)
        return self._loss_ema - self._loss_best


def relative_frames(levels: torch.Tensor, patterns: torch.Tensor, readouts: torch.Tensor, num_classes: int,
                    cfg: RelativeConfig = RelativeConfig(), step_losses: list | None = None,
                    weight_steps=None, shares: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole stored run, frame by frame through `RunRelative`: levels `(N, 6)`, patterns `(N, 6, P, P)`,
    readouts `(N, 8)` in CLIP_READOUTS order, per frame the step losses since the previous one (N of them,
    `interval_losses`; None: none), the `weight_step` readout `(N,)` (None: none) and `SHARE_READOUTS` by name,
    each `(N,)` (`share_columns`; a name left out: none) -> patterns `(N, 6, P, P)` and scalars `(N, F)`."""
    if levels.ndim != 2 or readouts.ndim != 2 or patterns.ndim != 4 or not len(levels) == len(readouts) == len(patterns):
        raise ValueError(f"expected levels (N, 6), patterns (N, 6, P, P), readouts (N, {len(CLIP_READOUTS)}) of one N, got "
                         f"{tuple(levels.shape)}, {tuple(patterns.shape)}, {tuple(readouts.shape)}")
    if readouts.shape[1] != len(CLIP_READOUTS):
        raise ValueError(f"readouts must have the {len(CLIP_READOUTS)} columns {CLIP_READOUTS}, got {readouts.shape[1]}")
    if step_losses is not None and len(step_losses) != len(levels):
        raise ValueError(f"step_losses must hold one entry per frame ({len(levels)}), got {len(step_losses)}")
    shares = {n: v for n, v in (shares or {}).items() if v is not None}
    unknown = set(shares) - set(SHARE_READOUTS)
    if unknown:
        raise ValueError(f"shares must be named from {SHARE_READOUTS}, got {sorted(unknown)}")
    for name, values in (("weight_steps", weight_steps), *shares.items()):
        if values is not None and len(values) != len(levels):
            raise ValueError(f"{name} must hold one value per frame ({len(levels)}), got {len(values)}")
    state = RunRelative(num_classes, cfg)
    if len(levels) == 0:
        return unit_patterns(patterns), torch.zeros(0, len(RELATIVE_FEATURES))
    pats, scal = zip(*(state.push(levels[t], patterns[t], readouts[t], None if step_losses is None else step_losses[t],
                                  None if weight_steps is None else float(weight_steps[t]),
                                  {n: float(v[t]) for n, v in shares.items()})
                       for t in range(len(levels))))
    return torch.stack(pats), torch.stack(scal)


def relative_run(levels: torch.Tensor, patterns: torch.Tensor, readouts: torch.Tensor, num_classes: int,
                 window: int, cfg: RelativeConfig = RelativeConfig(), step_losses: list | None = None,
                 weight_steps=None, shares: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every causal window of a whole run, ending at frames window-1 .. N-1: patterns `(W, T, 6, P, P)` and
    scalars `(W, T, F)`, cut from `relative_frames`."""
    pats, scal = relative_frames(levels, patterns, readouts, num_classes, cfg, step_losses, weight_steps, shares)
    n = len(levels)
    if n < window:
        return pats.new_zeros((0, window, *pats.shape[1:])), scal.new_zeros((0, window, scal.shape[1]))
    return pats.unfold(0, window, 1).movedim(-1, 1), scal.unfold(0, window, 1).movedim(-1, 1)


def pooled(patterns: torch.Tensor, scalars: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """A window's `(T, 6, P, P)` maps and `(T, F)` scalars -> one vector: the maps averaged over time and
    pooled to grid x grid, the scalars' mean and last value (the probes' view of a window: relative
    patterns and scalars, or raw frames and readout features)."""
    p = reduce(patterns, "t c (h a) (w b) -> (c h w)", "mean", h=grid, w=grid)
    return torch.cat([p, scalars.mean(0), scalars[-1]])


__all__ = ["BATCH_FEATURES", "FRAME_FEATURES", "HISTORY_FEATURES", "MODEL_FIELDS", "OPTIONAL_FEATURES", "RELATIVE_FEATURES", "REPRESENTATIONS", "SHARE_OVER_GAPS", "SHARE_READOUTS", "STEP_LOSS_FEATURES", "STILL_FEATURES", "WEIGHT_FEATURES", "RelativeConfig",
           "RunRelative", "interval_losses", "model_fields", "pooled", "readout_column", "relative_config_of", "relative_frames", "relative_run", "share_columns", "spaced_shares", "spaced_weight_steps",
           "step_loss_features", "unit_patterns", "weight_step_column"]
