"""Stored readouts before and after each run's onset, by perturbation: what a fault does to a readout.

    python -m eval.onset_readouts --corpus outputs/corpus/cpu --split test --readouts confident_miss confidence
    python -m eval.onset_readouts --corpus outputs/corpus/cpu --readouts batch_repeat        # every split

Per run, a readout's mean over the frames from half the onset step up to it ("before") and over the frames from
the onset on ("after"); a run without an onset (a healthy one) takes `onset_frac` of its last frame's step, the
onset of the label-noise runs. Per perturbation the table gives the runs, the median of each run's before and
after means, the range of their differences, and how many runs ever read the readout above 0. Reads the stores'
readout columns only (`capture.store.RunStore`).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from capture.corpus import corpus_runs
from capture.store import RunStore


def run_onset_means(store: RunStore, readout: str, onset: int | None, onset_frac: float = 0.3) -> tuple[float, float, bool]:
    """(mean before the onset, mean after it, any finite value above 0) of one store's readout column."""
    names = list(store.readout_names)
    if readout not in names:
        raise ValueError(f"run store {store.path}: no readout {readout!r} (it has {names})")
    values = store.readouts().numpy()[:, names.index(readout)].astype(np.float64)
    steps = store.frame_step().numpy()
    onset = int(onset_frac * steps[-1]) if onset is None else int(onset)
    before, after = values[(steps >= onset / 2) & (steps < onset)], values[steps >= onset]
    mean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")  # noqa: E731
    return mean(before), mean(after), bool(np.nan_to_num(values).max(initial=0.0) > 0)


def onset_table(corpus: str | Path, readouts: list[str], split: str | None = None, onset_frac: float = 0.3) -> dict:
    """{perturbation: {readout: {runs, before, after, diff_min, diff_max, above_zero}}} over the usable runs."""
    rows: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for rec in corpus_runs(corpus, split):
        store = RunStore(Path(corpus) / rec["store"])
        for name in readouts:
            rows[rec["perturbation"]][name].append(run_onset_means(store, name, rec.get("onset_step"), onset_frac))
    out = {}
    for pert, by_readout in sorted(rows.items()):
        out[pert] = {}
        for name, runs in by_readout.items():
            b, a, pos = (np.array(x, dtype=np.float64) for x in zip(*runs))
            d = a - b
            out[pert][name] = {"runs": len(runs), "before": float(np.nanmedian(b)), "after": float(np.nanmedian(a)),
                               "diff_min": float(np.nanmin(d)), "diff_max": float(np.nanmax(d)), "above_zero": int(pos.sum())}
    return out


def markdown(table: dict) -> str:
    lines = ["| perturbation | readout | runs | median before | median after | after - before (min, max) | runs ever > 0 |",
             "|---|---|---|---|---|---|---|"]
    for pert, by_readout in table.items():
        for name, r in by_readout.items():
            lines.append(f"| {pert} | {name} | {r['runs']} | {r['before']:.3f} | {r['after']:.3f} | "
                         f"{r['diff_min']:.3f}, {r['diff_max']:.3f} | {r['above_zero']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--split", default=None, help="one split (default: every split)")
    p.add_argument("--readouts", nargs="+", required=True, help="readout names (capture.readouts.READOUT_NAMES)")
    p.add_argument("--onset-frac", type=float, default=0.3, help="the onset of a run without one, as a share of its steps")
    args = p.parse_args(argv)
    print(markdown(onset_table(args.corpus, args.readouts, args.split, args.onset_frac)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
