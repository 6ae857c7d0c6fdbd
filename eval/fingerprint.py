"""Fingerprint probe (issue 20): how well a window tells what it is watching instead of how it moves.

A logistic probe predicts the model family, the dataset and the optimizer of healthy windows from one view
of them, scored on runs it never saw (grouped K-fold over runs). A diagnostician should not know what it
watches, only how it moves: the goal for the encoder's features is an accuracy within 1.5x chance.

Views (each one vector per window; `--window` frames ending at evenly spaced frames of each healthy run):
    raw        the inputs TEViD has read so far: frames (T, 6, S, S) averaged over time and pooled to 4 x 4,
               and the model-ready readouts (`diagnose.tevid.readout_features`) averaged and at the last frame
    relative   the run-relative inputs (`capture.relative`): unit patterns pooled the same way, and the
               relative scalars averaged and at the last frame (also scored apart: relative_patterns,
               relative_scalars)
    tevid      with --checkpoint: the model's fused window features (`TEViD.forward_features`)

Chance is the majority class's share of the scored windows (the best constant guess), printed beside 1/K.

    python -m eval.fingerprint --corpus outputs/corpus/cpu [--checkpoint diagnose/default_checkpoint] --out outputs/fingerprint
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from capture.corpus import corpus_runs
from capture.frames import CHANNELS
from capture.relative import FRAME_FEATURES, RelativeConfig, interval_losses, pooled, relative_run, share_columns, weight_step_column
from capture.schema import CLIP_READOUTS, HEALTHY
from capture.store import RunStore
from diagnose.tevid import readout_features
from eval.tables import markdown_table

TARGETS = ("family", "dataset", "optimizer")
VIEWS = ("raw", "relative", "relative_patterns", "relative_scalars", "tevid")
GRID = 4


def healthy_runs(corpus: Path, splits: tuple[str, ...]) -> list[dict]:
    """Manifest records of the runs injected healthy and labelled healthy, in `splits`."""
    runs = [r for r in corpus_runs(corpus) if r["split"] in splits]
    return [r for r in runs if r.get("label") == HEALTHY and r.get("injected", HEALTHY) == HEALTHY]


def window_ends(n_frames: int, window: int, per_run: int) -> list[int]:
    """Up to `per_run` evenly spaced last frames of the run's complete windows."""
    if n_frames < window:
        return []
    return sorted({int(round(e)) for e in np.linspace(window - 1, n_frames - 1, per_run)})


def run_views(store: RunStore, window: int, ends: list[int], model=None) -> dict[str, np.ndarray]:
    """{view: (len(ends), features)} of one run's windows of `window` frames ending at frames `ends`."""
    if not ends:
        return {}
    names = store.readout_names
    all_readouts = store.readouts()
    readouts = all_readouts[:, [names.index(n) for n in CLIP_READOUTS]]
    frames = store.frames().float()
    raw = [pooled(frames[e - window + 1:e + 1], readout_features(readouts[e - window + 1:e + 1]), GRID) for e in ends]
    views = {"raw": torch.stack(raw).numpy()}
    if store.has_summaries:
        rel_cfg = model.cfg.relative_config() if model is not None else RelativeConfig()  # a model's own inputs
        pats, scal = relative_run(store.levels(), store.patterns(), readouts, int(store.attrs["num_classes"]), window, rel_cfg,
                                  interval_losses(store.train_loss(), store.frame_step()),
                                  weight_step_column(all_readouts, names), share_columns(all_readouts, names))
        own = scal[..., :len(FRAME_FEATURES)]  # the view pools each frame's own scalars; the history traces are functions of them
        views["relative"] = torch.stack([pooled(pats[e - window + 1], own[e - window + 1], GRID) for e in ends]).numpy()
        n_pat = len(CHANNELS) * GRID * GRID
        views["relative_patterns"], views["relative_scalars"] = views["relative"][:, :n_pat], views["relative"][:, n_pat:]
    if model is not None:
        with torch.no_grad():
            if model.cfg.representation == "relative":  # the windows it reads: those of the relative view
                if not store.has_summaries:
                    raise ValueError(f"{store.path}: a relative model needs levels and patterns (store layout 2)")
                f, r = pats[[e - window + 1 for e in ends]], scal[[e - window + 1 for e in ends]]
            else:
                f = torch.stack([frames[e - window + 1:e + 1] for e in ends])
                r = torch.stack([readouts[e - window + 1:e + 1] for e in ends])
            views["tevid"] = model.forward_features(f if model.encoder is not None else None, r).float().numpy()
    return views


def probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int = 0) -> float:
    """Accuracy of a standardised logistic regression over grouped K folds (a run's windows stay together)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    hits = 0
    x = np.nan_to_num(x, nan=0.0, posinf=1e6, neginf=-1e6)
    for tr, te in GroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y, groups):
        if len(set(y[tr])) < 2:
            hits += int(np.sum(y[te] == y[tr][0]))
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        clf.fit(x[tr], y[tr])
        hits += int(np.sum(clf.predict(x[te]) == y[te]))
    return hits / len(y)


def fingerprint(corpus: str | Path, splits=("train",), window: int = 10, per_run: int = 6, folds: int = 5,
                checkpoint: str | Path | None = None, progress: bool = True) -> dict:
    corpus = Path(corpus)
    runs = healthy_runs(corpus, tuple(splits))
    if len(runs) < folds:
        raise ValueError(f"{corpus}: {len(runs)} healthy runs in splits {list(splits)}; the probe needs >= {folds} (--folds)")
    model = None
    if checkpoint is not None:
        from diagnose.tevid import load_tevid

        model, _ = load_tevid(checkpoint, require_calibration=False)
        window = model.cfg.encoder_cfg().num_frames if model.encoder is not None else window
    feats: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[str]] = {t: [] for t in TARGETS}
    groups: list[int] = []
    for i, rec in enumerate(tqdm(runs, desc="fingerprint windows", unit="run", disable=not progress, leave=False)):
        store = RunStore(corpus / rec["store"])
        views = run_views(store, window, window_ends(len(store.frame_step()), window, per_run), model)
        if not views:
            continue
        n = len(next(iter(views.values())))
        for name, v in views.items():
            feats.setdefault(name, []).append(v)
        for t in TARGETS:
            labels[t] += [str(rec.get("family") or rec["arch"]) if t == "family" else str(rec[t])] * n
        groups += [i] * n
    g = np.asarray(groups)
    result = {"corpus": str(corpus), "splits": list(splits), "window": window, "windows_per_run": per_run, "folds": folds,
              "runs": int(len(set(groups))), "windows": int(len(g)), "targets": {}}
    for t in TARGETS:
        y = np.asarray(labels[t])
        counts = Counter(labels[t])
        chance = max(counts.values()) / len(y)
        row = {"classes": len(counts), "chance": round(chance, 4), "uniform": round(1 / len(counts), 4)}
        for name, parts in feats.items():
            if sum(len(p) for p in parts) != len(y):
                continue  # a view missing from some runs (stores without summaries) is not scored
            acc = probe(np.concatenate(parts), y, g, folds)
            row[name] = {"accuracy": round(acc, 4), "x_chance": round(acc / chance, 2)}
        result["targets"][t] = row
    return result


def table(result: dict) -> str:
    views = [v for v in VIEWS if any(v in r for r in result["targets"].values())]
    rows = [[t, str(r["classes"]), f"{r['chance']:.3f}",
             *(f"{r[v]['accuracy']:.3f} ({r[v]['x_chance']:.2f}x)" if v in r else "-" for v in views)]
            for t, r in result["targets"].items()]
    return (f"Fingerprint probe on {result['corpus']} ({result['runs']} healthy runs of {result['splits']}, "
            f"{result['windows']} windows of {result['window']} frames, {result['folds']}-fold grouped by run)\n\n"
            + markdown_table(["target", "classes", "chance (majority)", *(f"{v}: accuracy (x chance)" for v in views)], rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--out", required=True, help="directory for fingerprint.json and fingerprint.md")
    parser.add_argument("--checkpoint", default=None, help="a TEViD fine-tuning output (adds the 'tevid' view)")
    parser.add_argument("--splits", nargs="+", default=["train"],
                        help="splits whose healthy runs are probed together (default train: the families, datasets and "
                             "optimizers of one split; the splits hold out different ones)")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--windows-per-run", type=int, default=6)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args(argv)
    result = fingerprint(args.corpus, args.splits, args.window, args.windows_per_run, args.folds, args.checkpoint)
    save(result, table(result), Path(args.out), "fingerprint")
    return 0


def save(result: dict, text: str, out: Path, stem: str) -> None:
    """A probe's result as `<out>/<stem>.json` and its table as `<stem>.md`, the table also printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
