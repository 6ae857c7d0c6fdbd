"""Figures of the evaluation report (paper Sec. 5 figures; App. E.2, H.2, I), matplotlib Agg, PNG.

Each function takes replayed runs (`eval.metrics.RunResult`, alerts filled at the frozen operating
point) and writes one PNG, returning its path:

| function | figure |
|---|---|
| `risk_coverage_figure` | selective risk vs coverage over vacuity, methods with probs and vacuity (AUGRC in the legend) |
| `pareto_figure` | median lead (epochs) vs FAR as the score threshold moves (`eval.metrics.operating_curve`), frozen point marked |
| `confusion_figure` | true class (healthy, known classes, novel) x outcome (healthy, known classes, other alert, Unknown) |
| `timeline_figure` | one run: a strip of its frames (6 channels at a few frames), class probabilities, vacuity, alerts, onset, trigger |
| `head_grad_figure` | head-gradient norm readout vs validation accuracy (privileged: evaluation only) per run |
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from capture.schema import CLASSES  # noqa: E402
from eval import metrics as M  # noqa: E402

TRUE_ROWS = (*CLASSES, "novel")
PRED_COLS = (*CLASSES, "other", "unknown")


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def risk_coverage_figure(methods: dict[str, list[M.RunResult]], path: Path, horizon_epochs: float = M.HORIZON_EPOCHS) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4))
    drawn = 0
    for name, runs in methods.items():
        if not runs or runs[0].probs is None or runs[0].vacuity is None:
            continue
        rc = M.risk_coverage(runs, horizon_epochs)
        if len(rc.coverage):
            ax.plot(np.r_[0.0, rc.coverage], np.r_[rc.risk[0], rc.risk], drawstyle="steps-post",
                    label=f"{name} (AUGRC {M.augrc(runs, horizon_epochs):.3f})")
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no method with probabilities and vacuity", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="coverage (frames accepted, lowest vacuity first)", ylabel="selective risk", xlim=(0, 1), ylim=(0, 1.02),
           title="Risk-coverage (known runs)")
    if drawn:
        ax.legend(fontsize=7)
    return _save(fig, path)


def score_thresholds(runs: list[M.RunResult], n: int = 40) -> np.ndarray:
    """Candidate thresholds: quantiles of the finite scores, plus one above the largest (no alert)."""
    s = np.concatenate([r.score for r in runs]) if runs else np.zeros(0)
    s = s[np.isfinite(s)]
    if not len(s):
        return np.zeros(1)
    return np.unique(np.r_[np.quantile(s, np.linspace(0, 1, n)), s.max() + 1e-9])


def pareto_front(far: np.ndarray, lead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-dominated (FAR, lead) points (lower FAR, higher lead is better), by ascending FAR."""
    order = np.lexsort((-lead, far))  # by FAR, then the best lead first
    keep, best = [], -np.inf
    for i in order:
        if lead[i] > best:
            keep.append(i)
            best = lead[i]
    return far[keep], lead[keep]


def pareto_figure(methods: dict[str, list[M.RunResult]], frozen: dict[str, dict], path: Path) -> Path:
    """Lead vs FAR of each method as its score threshold moves; `frozen[name]` holds the summary at the
    frozen operating point (far, median_lead_epochs) drawn as a star."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (name, runs) in enumerate(methods.items()):
        c, ls = f"C{i % 10}", ("-", "--", ":")[i // 10 % 3]  # past 10 methods the colours repeat: the line style differs
        curve = M.operating_curve(runs, score_thresholds(runs))
        ok = np.isfinite(curve["far"]) & np.isfinite(curve["median_lead_epochs"])
        f, lead = pareto_front(curve["far"][ok], curve["median_lead_epochs"][ok])
        ax.plot(curve["far"][ok], curve["median_lead_epochs"][ok], "o", ms=2, color=c, alpha=0.35)
        ax.plot(f, lead, ls, drawstyle="steps-post", color=c, label=name, lw=1.5)
        s = frozen.get(name) or {}
        if s.get("far") is not None and s.get("median_lead_epochs") is not None and np.isfinite(s["median_lead_epochs"]):
            ax.plot([s["far"]], [s["median_lead_epochs"]], "*", ms=11, color=c, mec="k")
    ax.axvline(0.05, color="grey", ls=":", lw=1)
    ax.set(xlabel="FAR (Healthy runs with an alert)", ylabel="median lead (epochs)", xlim=(-0.02, 1.02),
           title="Lead vs FAR: Pareto front (dots: all thresholds, star: frozen)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def run_outcome_class(run: M.RunResult, unknown: np.ndarray | None = None) -> str:
    """One predicted outcome per run for the confusion matrix: "unknown" when the rule abstained on at
    least half the frames from onset; else the class of the first alert at/after onset ("other" for a
    score-only "anomaly" alert), else "healthy"."""
    from_onset = run.frame_step >= run.onset
    if unknown is not None and from_onset.any() and unknown[from_onset].mean() >= 0.5:
        return "unknown"
    after = [c for s, c in run.alerts if s >= run.onset]
    if not after:
        return "healthy"
    return after[0] if after[0] in CLASSES else "other"


def confusion_counts(runs: list[M.RunResult], unknown: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(len(TRUE_ROWS), len(PRED_COLS)) counts; rows: label (novel runs: "novel"), unscored runs left out."""
    cm = np.zeros((len(TRUE_ROWS), len(PRED_COLS)), dtype=int)
    for r in runs:
        if r.kind == "unscored":
            continue
        row = TRUE_ROWS.index("novel" if r.novel else r.label)
        cm[row, PRED_COLS.index(run_outcome_class(r, (unknown or {}).get(r.run_id)))] += 1
    return cm


def confusion_figure(runs: list[M.RunResult], path: Path, name: str, unknown: dict[str, np.ndarray] | None = None) -> Path:
    cm = confusion_counts(runs, unknown)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color="k" if cm[i, j] < cm.max() / 2 + 1e-9 else "w")
    ax.set_xticks(range(len(PRED_COLS)), PRED_COLS, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(TRUE_ROWS)), TRUE_ROWS, fontsize=8)
    ax.set(xlabel="outcome (first alert from onset / Unknown)", ylabel="true", title=f"Confusion, runs ({name})")
    return _save(fig, path)


def timeline_figure(result: M.RunResult, frames, path: Path, name: str, tau: float | None = None,
                    n_frames_shown: int = 5) -> Path:
    """frames: (T_all, 6, S, S) of the whole run (frame t at row t) or None; result: the replayed run."""
    step = result.frame_step
    shown = []
    if frames is not None:
        first = len(frames) - len(step)  # the result starts at frame score_from
        shown = np.unique(np.linspace(0, len(step) - 1, min(n_frames_shown, len(step))).round().astype(int))
    n_strip = 6 if len(shown) else 0
    fig = plt.figure(figsize=(max(6, 1.2 * len(shown) + 1), 2 + 0.9 * n_strip + 4))
    gs = fig.add_gridspec(n_strip + 2, max(len(shown), 1), height_ratios=[0.9] * n_strip + [2, 1.4])
    for j, k in enumerate(shown):
        img = frames[first + k].float().numpy()
        for c in range(6):
            ax = fig.add_subplot(gs[c, j])
            ax.imshow(img[c], cmap="viridis")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_title(f"step {step[k]}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"ch {c}", fontsize=7)
    ax_p = fig.add_subplot(gs[n_strip, :])
    ax_v = fig.add_subplot(gs[n_strip + 1, :], sharex=ax_p)
    if result.probs is not None:
        for i, cls in enumerate(CLASSES):
            ax_p.plot(step, result.probs[:, i], label=cls, lw=1.2)
        ax_p.set_ylabel("p(class)")
    else:
        ax_p.plot(step, result.score, label="score", color="k")
        ax_p.set_ylabel("score")
    if result.vacuity is not None:
        ax_v.plot(step, result.vacuity, color="purple", label="vacuity")
        if tau is not None:
            ax_v.axhline(tau, color="purple", ls=":", lw=1, label=f"tau {tau:.2f}")
    ax_v.set_ylabel("vacuity")
    for ax in (ax_p, ax_v):
        if result.onset_step is not None and (result.kind in ("anomaly", "novel")):
            ax.axvline(result.onset, color="orange", ls="--", lw=1, label="onset")
        if result.trigger_step is not None:
            ax.axvline(result.trigger_step, color="red", ls="--", lw=1, label="trigger")
        for s, c in result.alerts:
            ax.axvline(s, color="k", lw=1.5, alpha=0.6)
    if result.alerts:
        ax_p.plot([], [], color="k", lw=1.5, alpha=0.6, label="alert")
    ax_p.legend(fontsize=6, ncol=4, loc="upper left")
    ax_v.legend(fontsize=6, loc="upper left")
    ax_v.set_xlabel("training step")
    nov = " (novel)" if result.novel else ""
    fig.suptitle(f"{name}: {result.run_id}, label {result.label}{nov}", fontsize=9)
    return _save(fig, path)


def head_grad_figure(series: list[dict], path: Path, max_runs: int = 6) -> Path:
    """series: dicts with run_id, label, frame_step, head_grad_norm (public readout), epoch_step, val_acc
    (privileged, evaluation only). One panel per run, readout on the left axis, accuracy on the right."""
    series = series[:max_runs]
    n = max(len(series), 1)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel()[len(series):]:
        ax.axis("off")
    for ax, s in zip(axes.ravel(), series):
        ax.plot(s["frame_step"], s["head_grad_norm"], color="C0")
        ax.set_yscale("log")
        ax.set_ylabel("head-grad norm", color="C0", fontsize=8)
        ax2 = ax.twinx()
        if len(s["val_acc"]):
            ax2.plot(s["epoch_step"], s["val_acc"], color="C3", marker=".")
        ax2.set_ylabel("val accuracy", color="C3", fontsize=8)
        ax.set_title(f"{s['run_id'][:32]} ({s['label']})", fontsize=7)
        ax.set_xlabel("step", fontsize=8)
    if not series:
        axes[0, 0].text(0.5, 0.5, "no run", ha="center")
    fig.suptitle("Head-gradient readout vs validation accuracy (evaluation only)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
