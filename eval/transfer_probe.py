"""Transfer probe (issue 20): does a view of the windows carry anomalies across held-out contexts?

A logistic probe learns "anomalous or healthy" from the train split's windows of one view (`eval.fingerprint`'s
raw, relative, ... views) and scores the windows of the held-out splits, whose families, datasets and
optimizers train never saw. A view that carries the look of the network learns the train contexts and
transfers badly; one that carries how the network moves should not. Targets are the window targets of
`pretrain.clips.run_targets` (any known class -> 1, healthy -> 0, unscored and novel windows left out).
Every AUPRC is printed beside its base rate (the AUPRC of a constant score).

    python -m eval.transfer_probe --corpus outputs/corpus/cpu --out outputs/transfer [--stride 2]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from capture.corpus import corpus_runs
from capture.schema import IGNORE
from capture.store import RunStore
from eval.fingerprint import VIEWS, run_views, save
from eval.tables import markdown_table
from pretrain.clips import run_targets


def split_windows(corpus: Path, split: str, window: int, stride: int, progress: bool = True) -> tuple[dict, np.ndarray]:
    """({view: (windows, features)}, binary targets) of a split's scored windows."""
    feats: dict[str, list[np.ndarray]] = {}
    ys: list[np.ndarray] = []
    for rec in tqdm(corpus_runs(corpus, split), desc=f"{split} windows", unit="run", disable=not progress, leave=False):
        store = RunStore(corpus / rec["store"])
        steps = store.frame_step().numpy()
        target, novel = run_targets(store.attrs, steps)
        ends = [e for e in range(window - 1, len(steps), stride) if int(target[e]) != IGNORE and not bool(novel[e])]
        views = run_views(store, window, ends)
        if not views:
            continue
        for name, v in views.items():
            feats.setdefault(name, []).append(v)
        ys.append((target[ends].numpy() > 0).astype(np.int64))
    y = np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64)
    return {k: np.concatenate(v) for k, v in feats.items() if sum(len(p) for p in v) == len(y)}, y


def transfer(corpus: str | Path, train_split: str = "train", eval_splits=("val", "test"), window: int = 10, stride: int = 2,
             progress: bool = True) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    corpus = Path(corpus)
    x_tr, y_tr = split_windows(corpus, train_split, window, stride, progress)
    if len(set(y_tr.tolist())) < 2:
        raise ValueError(f"{corpus}: split {train_split!r} needs both healthy and anomalous scored windows, has {np.bincount(y_tr).tolist()}")
    held = {s: split_windows(corpus, s, window, stride, progress) for s in eval_splits}
    result = {"corpus": str(corpus), "train_split": train_split, "window": window, "stride": stride,
              "train_windows": int(len(y_tr)), "train_positives": int(y_tr.sum()), "splits": {}}
    for s, (x_ev, y_ev) in held.items():
        row = {"windows": int(len(y_ev)), "base_rate": round(float(y_ev.mean()), 4) if len(y_ev) else None}
        for view in VIEWS:
            if view not in x_tr or view not in x_ev or len(set(y_ev.tolist())) < 2:
                continue
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced"))
            clf.fit(np.nan_to_num(x_tr[view], posinf=1e6, neginf=-1e6), y_tr)
            p = clf.predict_proba(np.nan_to_num(x_ev[view], posinf=1e6, neginf=-1e6))[:, 1]
            row[view] = {"auprc": round(float(average_precision_score(y_ev, p)), 4), "auroc": round(float(roc_auc_score(y_ev, p)), 4)}
        result["splits"][s] = row
    return result


def table(result: dict) -> str:
    views = [v for v in VIEWS if any(v in r for r in result["splits"].values())]
    rows = [[s, str(r["windows"]), str(r["base_rate"]), *(f"{r[v]['auprc']:.3f} / {r[v]['auroc']:.3f}" if v in r else "-" for v in views)]
            for s, r in result["splits"].items()]
    return (f"Transfer probe on {result['corpus']}: logistic, trained on {result['train_windows']} {result['train_split']} windows "
            f"({result['train_positives']} anomalous; window {result['window']}, stride {result['stride']})\n\n"
            + markdown_table(["split", "windows", "base rate (AUPRC of a constant)", *(f"{v}: AUPRC / AUROC" for v in views)], rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--out", required=True, help="directory for transfer.json and transfer.md")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-splits", nargs="+", default=["val", "test"])
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--stride", type=int, default=2)
    args = parser.parse_args(argv)
    result = transfer(args.corpus, args.train_split, args.eval_splits, args.window, args.stride)
    save(result, table(result), Path(args.out), "transfer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
