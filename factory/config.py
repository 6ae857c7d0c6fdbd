"""The factory's config dataclasses (one yaml per corpus scale in configs/factory/)."""
from __future__ import annotations

from dataclasses import dataclass, field

from capture.config import FieldError, at_least, positive, within
from factory.contexts import ContextConfig
from factory.spec import SplitConfig


@dataclass
class TrainingConfig:
    """How every run of a corpus trains. One "epoch" here is `eval_every` steps: the unit of the
    validation curves and of the labeling windows (runs are far shorter than the paper's)."""

    steps: int = 300
    batch_size: int = 32
    eval_every: int = 15  # steps per epoch: validation (privileged) after each
    image_size: int = 32
    max_train: int = 3000
    max_val: int = 400
    warmup_frac: float = 0.05  # linear warm-up, then cosine to 10% of the base lr
    base_lr: dict[str, float] = field(default_factory=lambda: {"adamw": 2e-3, "sgd": 0.05, "lion": 3e-4, "adafactor": 1e-2})
    weight_decay: dict[str, float] = field(default_factory=lambda: {"adamw": 0.05, "sgd": 5e-4, "lion": 0.5, "adafactor": 0.0})
    # base_lr times this for "arch/optimizer" (or "arch") keys: the factory's AlexNet has no
    # normalisation layers and is unstable on its own at SGD's 0.05 (second cpu corpus: losses up to
    # 1e8 in healthy and task-switch runs, docs/factory.md); 0.01 is the classic AlexNet SGD rate
    lr_scale: dict[str, float] = field(default_factory=lambda: {"alexnet/sgd": 0.2})
    lm_context: int = 32
    divergence_patience: int = 5  # consecutive non-finite losses before a run stops as diverged
    lyapunov_windows: int = 4  # Lyapunov proxy windows per run (evenly spaced)
    lyapunov_horizon: int = 8  # H steps per window
    # a reference window starting at this fraction of the run (0: none), before the perturbations' onsets
    # (>= 0.3): the labeler raises each later window's margin by the reference's mean log growth, so a run
    # whose recipe keeps it chaotic throughout (a constant LR at the edge of stability) is not instability
    lyapunov_reference: float = 0.0
    lyapunov_eps: float = 1e-3  # perturbation size relative to the parameter norm
    # top Hessian eigenvalue (capture.hessian, Lanczos) at every k-th captured frame on the step's training
    # batch, stored as the public per-frame array `hessian_top` (NaN elsewhere); 0 = off
    hessian_every: int = 0
    # how concept bias marks a sample and how the poisoned / counterfactual validation sets are stamped
    # (factory.perturbations.watermark): "position" (the grid corpus's) or "pattern" (drawn corpora)
    watermark: str = "position"

    def __post_init__(self):
        at_least(self, 1, "steps", "batch_size", "eval_every", "image_size", "max_train", "max_val", "lm_context",
                 "divergence_patience", "lyapunov_horizon")
        at_least(self, 0, "lyapunov_windows", "hessian_every")
        within(self, 0.0, 1.0, "warmup_frac", "lyapunov_reference")
        if self.watermark not in ("position", "pattern"):
            raise ValueError(f"training.watermark must be 'position' or 'pattern', got {self.watermark!r}")
        positive(self, "lyapunov_eps")
        for name, low in (("base_lr", "> 0"), ("weight_decay", ">= 0"), ("lr_scale", "> 0")):
            for key, v in getattr(self, name).items():
                if not (v > 0 if low == "> 0" else v >= 0):
                    raise FieldError(f"{name}.{key}", f"must be {low}, got {v!r}")

    def lr(self, arch: str, optimizer: str) -> float:
        """The base learning rate of one run: `base_lr[optimizer]` times `lr_scale` for the run's
        "arch/optimizer" (else "arch") key."""
        if optimizer not in self.base_lr:
            raise ValueError(f"no base_lr for optimizer {optimizer!r}; configured: {sorted(self.base_lr)}")
        return self.base_lr[optimizer] * self.lr_scale.get(f"{arch}/{optimizer}", self.lr_scale.get(arch, 1.0))


@dataclass
class CaptureSettings:
    cadence: int = 10
    frame_size: int = 32

    def __post_init__(self):
        at_least(self, 1, "cadence", "frame_size")


@dataclass
class LabelConfig:
    """Thresholds of paper Appendix A, with windows scaled to the run length: `*_frac` fields are
    fractions of the run's steps (spikes) or of its epochs (overfitting, forgetting)."""

    # W_ep (paper: 10 epochs). 0.6 of 20 epochs = 12: with 8, MK's smallest p (0.0027, n = 8) times
    # BY's factor over ~10 candidates left slow, steady rises undetected
    overfit_window_frac: float = 0.6
    overfit_min_window: int = 6
    overfit_alpha: float = 0.05
    overfit_gap_sigmas: float = 2.0
    # "std" as in the paper; "mad" or "diff" (epoch-to-epoch changes): robust to the first epochs' fast fall
    overfit_gap_scale: str = "diff"
    # what the overfitting rule asks of the training loss: significant / decreasing / not_rising (factory.labels.overfitting)
    overfit_train_trend: str = "not_rising"
    # memorised (overfitting): the last quarter's validation loss >= memorised_rise x its best with the training
    # loss <= memorised_train_frac x its start (factory.labels.memorised); 0 turns it off. A subset memorised
    # within the first epochs raises the validation loss before the trend test has a history
    memorised_rise: float = 0.0
    memorised_train_frac: float = 0.1
    spike_z: float = 3.5
    spike_window_frac: float = 0.3  # rolling window for the robust statistics (paper: 1000 steps)
    spike_span_frac: float = 0.15  # >= spike_count spikes within this span (paper: 500 steps)
    spike_count: int = 3
    spike_merge_gap: int = 2  # spikes this close form one event (a level shift is not 3 spikes)
    # a spike also rises >= this x the run's starting loss: near-zero memorised losses, and the flat
    # plateaus (IQR ~0.05) on which an ordinary batch 0.3 higher scores z > 3.5 (docs/factory.md)
    spike_min_rise_frac: float = 0.25
    # a jump inside a merged stretch starts a new event (factory.labels.loss_spikes): LR bursts that
    # keep the loss raised between them are several events, a plateau after a level shift is one
    spike_jump_frac: float = 0.5
    # history a robust z needs, as a fraction of the window (paper: 1000-step window, no minimum said);
    # a tenth (9 steps) let the noisy first steps of SGD runs score z >= 3.5 on ordinary batches
    spike_min_history_frac: float = 0.5
    lyapunov_confidence: float = 0.99
    lyapunov_bootstrap: int = 2000
    lyapunov_block: float = 3.0  # expected block length (paper: 10, with H = 50)
    # Lower bound must exceed this. Paper: 0, for its Jacobian of the update map. Here the proxy is a
    # finite difference of the real (adaptive) optimizer update, which separates healthy copies at a
    # small positive rate; the margin is calibrated on healthy reference runs (docs/factory.md).
    lyapunov_margin: float | list[float] = 0.1  # one value, or one per window position
    # Floor under the calibrated margins: late in an annealed run healthy windows sit at ~0.01, so a
    # 95th-percentile margin there is noise-level and any slightly busier run (one learning a new
    # task after a switch) clears it; LR-instability windows sit at 0.2-1.8 (docs/factory.md).
    lyapunov_min_margin: float = 0.1
    # per architecture (calibrated on its own healthy reference runs, like the floors); else the above
    lyapunov_arch_margin: dict[str, list[float]] = field(default_factory=dict)
    # added per optimizer: SGD with momentum separates healthy copies faster than adaptive optimizers (95th
    # percentile of healthy train runs' sustained excess: 0.21 for SGD, <= 0 for Adam, AdamW, RMSprop, the last
    # table of `factory.stats`); without it 18 of the 27 healthy runs labelled instability were SGD (issue 19 corpus)
    lyapunov_optimizer_margin: dict[str, float] = field(default_factory=dict)
    # Windows that must fire; paper: any one, of H = 50 steps. Our windows are H = 8 steps, so one
    # transient (a task switch, a single LR burst) fills a whole window as high as instability does
    # (`factory.stats` per-window medians, docs/factory.md). Two windows ask for sustained separation;
    # short events are left to the spike rule.
    lyapunov_min_windows: int = 2
    # ... and, when set, they must be adjacent window positions: a cosine restart's catapult fires the window
    # just after each restart and not the next (pattern 1010 on 3 of 82 healthy runs of the 190-run drawn
    # pilot), while every Lyapunov-firing instability run there had two adjacent firing windows
    lyapunov_consecutive: bool = False
    # runs with a Lyapunov reference window (drawn corpora): a task switch's learning transient does not
    # count as Lyapunov instability (factory.labeler.offline_label)
    lyapunov_reference_switch: bool = True
    # collapse (instability): had reached >= collapse_learned x chance accuracy, then the last
    # forget_window_frac of the epochs at <= collapse_level x chance with the training loss back at
    # >= collapse_loss_return x its start (factory.labels.collapse)
    collapse: bool = True
    collapse_learned: float = 2.0
    collapse_level: float = 2.0
    collapse_loss_return: float = 0.9
    # blow-up (instability): the validation loss jumps >= blowup_factor x the previous epoch's while
    # accuracy falls to <= collapse_level x chance in a model that had reached collapse_learned x chance;
    # it may recover (factory.labels.blowup: BatchNorm models hit by an LR burst)
    blowup: bool = True
    blowup_factor: float = 10.0
    # loss jump (instability): the training loss's median over jump_span_frac of the run is >= jump_factor x
    # the median over the span before it (factory.labels.loss_jump; not in runs with a task switch); 0: off
    jump_factor: float = 0.0
    jump_span_frac: float = 0.05
    # what the raised level is compared with: "window" the span just before it, "best" the lowest span median
    # so far (LR bursts that raise the loss in steps, each less than jump_factor x the last, add up against it)
    jump_baseline: str = "window"
    jump_min_rise_frac: float | None = None  # the jump's minimum rise, x the starting loss (None: spike_min_rise_frac)
    forget_window_frac: float = 0.25
    # forgetting's post-switch window as a fraction of the epochs (0: forget_window_frac, as collapse's).
    # A switched model forgets over many epochs when the LR is annealed or adaptive; a short window
    # averages in the epochs just after the switch (factory.labeler._forgetting)
    forget_post_frac: float = 0.0
    forget_drop: float = 0.30
    forget_p: float = 0.01
    bias_p: float = 0.01
    bias_learned: float = 2.0  # concept bias needs the poisoned set answered at >= this x chance (0: off)
    # and (when > 0) the poisoned set answered at least this much better than the set it is compared with
    bias_min_gap: float = 0.0
    # and (when set) no class whose own mark it answers worse than another class's mark by more than this (the
    # injection marks every class; a healthy model's chance reading of marks helps some classes and hurts others)
    bias_class_tolerance: float | None = None
    floors: dict[str, float] = field(default_factory=dict)  # "arch/dataset" or "dataset" -> min final val accuracy
    default_floor: float = 0.0

    def __post_init__(self):
        within(self, 0.0, 1.0, "overfit_window_frac", "overfit_alpha", "spike_window_frac", "spike_span_frac",
               "spike_min_history_frac", "lyapunov_confidence", "forget_window_frac", "forget_post_frac", "forget_drop", "forget_p",
               "bias_p", "bias_min_gap", "default_floor")
        if self.bias_class_tolerance is not None:
            within(self, 0.0, 1.0, "bias_class_tolerance")
        at_least(self, 1, "overfit_min_window", "spike_count", "lyapunov_bootstrap", "lyapunov_min_windows")
        at_least(self, 0, "spike_merge_gap", "memorised_rise")
        if self.jump_baseline not in ("window", "best"):
            raise FieldError("labels.jump_baseline", f"must be 'window' or 'best', got {self.jump_baseline!r}")


@dataclass
class FactoryConfig:
    name: str = "smoke"
    training: TrainingConfig = field(default_factory=TrainingConfig)
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    labels: LabelConfig = field(default_factory=LabelConfig)
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    test: SplitConfig = field(default_factory=SplitConfig)
    contexts: ContextConfig = field(default_factory=ContextConfig)  # drawn splits' ranges (factory.contexts)
    data_root: dict[str, str] = field(default_factory=dict)  # dataset -> local path (real datasets)
    subsample: int = 1  # keep every k-th run of the plan (throughput measurements on a spread-out sample)

    def __post_init__(self):
        at_least(self, 1, "subsample")

    @property
    def splits(self) -> dict[str, SplitConfig]:
        return {"train": self.train, "val": self.val, "test": self.test}
