"""Two sets of leave-family-out fold models compared on the runs both held out (issue 20).

A change to the training corpus can be judged on folds of whole families (`data.holdout_fold=k` with
`data.train_splits=[train, val]`) as well as on the validation split (docs/benchmark/inputs.md: the folds agreed
with the test split on the capped long runs and did not on 300 long runs). Each fold model's own figures (its `calibration.json` report) are scored on its
held-out fold, and a corpus that adds runs adds them to the folds too, so before and after would score
different runs. Here each fold model's calibrated rule (`final/calibration.json`: thresholds, tau and
temperature as fitted on its whole fold) is replayed on its validation predictions (`val_predictions.jsonl`)
restricted to the runs that both fold models held out: run macro-F1, detection and FAR on the same runs.

    python -m eval.folds --before outputs/finetune/folds_now --after outputs/finetune/folds_lr300 [--out F.json]

Each directory holds `fold0`, `fold1`, ... (`--prefix` for another name, e.g. `s1_fold`), each a fine-tuning
output. Prints one row per fold and the pooled figures (detection pooled over runs, macro-F1 and FAR averaged
over folds).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from diagnose.calibrate import load_calibration, read_predictions, replay_report, streams_from_records
from eval.tables import fmt, markdown_table


def fold_scores(before: Path, after: Path) -> dict:
    """One fold: the two fine-tuning outputs' rules replayed on the held-out runs both have."""
    records = {name: read_predictions(d / "val_predictions.jsonl") for name, d in (("before", before), ("after", after))}
    ids = {name: {r["run_id"] for r in rs} for name, rs in records.items()}
    common = ids["before"] & ids["after"]
    if not common:
        raise ValueError(f"{before} and {after} held out no run in common: are they folds of the same families?")
    out = {"runs": len(common), "only_before": len(ids["before"] - common), "only_after": len(ids["after"] - common)}
    for name, d in (("before", before), ("after", after)):
        report = replay_report(streams_from_records([r for r in records[name] if r["run_id"] in common]),
                               load_calibration(d / "final"))
        pairs = [tuple(int(n) for n in v.split("/")) for v in report["val_detection"].values()]
        out[name] = {"run_macro_f1": report["val_run_macro_f1"], "far": report.get("val_far"),
                     "detected": sum(p[0] for p in pairs), "anomalous": sum(p[1] for p in pairs),
                     "detection": report["val_detection"]}
    return out


def _mean(values: list) -> float | None:
    """Mean of the defined values (a fold without Healthy runs has no FAR, one without anomalies no macro-F1)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def compare(before: Path, after: Path, folds: list[int], prefix: str = "fold") -> dict:
    """Every fold's `fold_scores` and the pooled figures."""
    per = {k: fold_scores(before / f"{prefix}{k}", after / f"{prefix}{k}") for k in folds}
    pooled = {}
    for name in ("before", "after"):
        rows = [p[name] for p in per.values()]
        pooled[name] = {"run_macro_f1": _mean([r["run_macro_f1"] for r in rows]), "far": _mean([r["far"] for r in rows]),
                        "detection": sum(r["detected"] for r in rows) / max(1, sum(r["anomalous"] for r in rows))}
    return {"before": str(before), "after": str(after), "folds": per, "pooled": pooled}


def table(result: dict) -> str:
    """The comparison as a markdown table: one row per fold, then the pooled figures."""
    rows = [[str(k), str(p["runs"]), f"{fmt(p['before']['run_macro_f1'])} / {fmt(p['after']['run_macro_f1'])}",
             f"{p['before']['detected']}/{p['before']['anomalous']} / {p['after']['detected']}/{p['after']['anomalous']}",
             f"{fmt(p['before']['far'])} / {fmt(p['after']['far'])}"] for k, p in result["folds"].items()]
    b, a = result["pooled"]["before"], result["pooled"]["after"]
    rows.append(["all", str(sum(p["runs"] for p in result["folds"].values())), f"mean {fmt(b['run_macro_f1'])} / {fmt(a['run_macro_f1'])}",
                 f"{fmt(b['detection'])} / {fmt(a['detection'])}", f"mean {fmt(b['far'])} / {fmt(a['far'])}"])
    return markdown_table(["held-out fold", "runs both hold out", "run macro-F1, before / after",
                           "detection, before / after", "FAR, before / after"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, type=Path, help="directory of the fold models before the change")
    p.add_argument("--after", required=True, type=Path, help="directory of the fold models after it")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--prefix", default="fold", help="fold k's directory is PREFIX + k (default: fold)")
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    try:
        result = compare(args.before, args.after, args.folds, args.prefix)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
