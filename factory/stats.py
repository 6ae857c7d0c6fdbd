"""Corpus statistics for the factory's report (issue 3): labels per split, injected perturbation
against rule label, training-only vs offline label agreement, and the within-run Pearson r between
the head-gradient norm and validation accuracy over healthy classification runs (seed 000 reports
-0.854 +/- 0.038).

    python -m factory.stats --corpus outputs/corpus/cpu [--out stats.md]
    python -m factory.stats --config configs/factory/cpu.yaml       # the plan's distribution, nothing run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr
from statsmodels.stats.proportion import proportion_confint

from capture.corpus import is_usable, read_manifest
from capture.schema import KNOWN_CLASSES as KNOWN
from capture.store import RunStore, read_labeling, read_privileged
from factory.datasets import TEXT_DATASETS
from factory.spec import SPLITS


def table(rows: list[str], cols: list[str], count: dict[tuple[str, str], int], title: str) -> list[str]:
    out = [f"| {title} | " + " | ".join(cols) + " | total |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        n = [count.get((r, c), 0) for c in cols]
        out.append(f"| {r} | " + " | ".join(map(str, n)) + f" | {sum(n)} |")
    return out


def head_grad_val_acc_r(corpus: Path, record: dict, ema_span: int | None = None) -> float | None:
    """Pearson r over the epochs of one run: validation accuracy vs the head-gradient norm of the
    latest frame at or before the end of each epoch."""
    path = corpus / record["store"]
    store, priv = RunStore(path), read_privileged(path)
    steps = store.frame_step().numpy()
    g = store.readouts()[:, store.readout_names.index("head_grad_norm")].numpy()
    if ema_span:  # seed 000 §4 smooths the norm with an EMA (k in 1, 3, 5, 9): one batch per frame is noisy
        import pandas as pd

        g = pd.Series(g).ewm(span=ema_span).mean().to_numpy()
    epoch_step, acc = priv["epoch_step"], priv["val_acc"]
    idx = np.searchsorted(steps, epoch_step, side="right") - 1
    keep = (idx >= 0) & np.isfinite(acc)
    x, y = g[idx[keep]], acc[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0 or not np.isfinite(x).all():
        return None
    return float(pearsonr(x, y).statistic)


INSTABILITY_RULES = ("spikes", "lyapunov", "collapse", "blowup", "jump")


def why(corpus: Path, record: dict) -> str:
    """The rule behind a run's label, for the disagreement table: which instability rules fired, or
    whether the floor was missed (underperforming) or nothing fired (healthy)."""
    rules = read_labeling(corpus / record["store"])
    if record["label"] == "instability":
        fired = [name for name in INSTABILITY_RULES if rules.get(f"instability_{name}", {}).get("fired")]
        return "instability by " + "+".join(fired or ["?"])
    if record["label"] == "underperforming":
        return "no rule fired, below the floor"
    if record["label"] == "healthy":
        return "no rule fired, floor met"
    return f"{record['label']} rule fired"


def instability_kinds(corpus: Path, runs: list[dict]) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Runs labelled instability per split, by the rules that fired: the Lyapunov proxy alone (a privileged
    measurement, often with no mark on the loss), with another rule, or other rules only (loss spikes or jump,
    validation collapse or blow-up). A split whose instability is mostly of one kind tests that kind."""
    kinds = ("Lyapunov alone", "Lyapunov and another rule", "other rules only")
    splits = ("train", "val", "test")
    counts = {k: dict.fromkeys(splits, 0) for k in kinds}
    for r in runs:
        if r["label"] != "instability" or r["split"] not in splits:
            continue
        rules = read_labeling(corpus / r["store"])
        fired = {name for name in INSTABILITY_RULES if rules.get(f"instability_{name}", {}).get("fired")}
        kind = kinds[2] if "lyapunov" not in fired else kinds[0] if fired == {"lyapunov"} else kinds[1]
        counts[kind][r["split"]] += 1
    lines = ["Runs labelled instability, by the rules that fired", "", "| rules \\ split | " + " | ".join(splits) + " |",
             "|---|" + "---|" * len(splits)]
    lines += [f"| {k} | " + " | ".join(str(counts[k][s]) for s in splits) + " |" for k in kinds]
    return lines, counts


def disagreements(corpus: Path, runs: list[dict]) -> tuple[list[str], dict[str, int]]:
    """Known injections whose label differs, grouped by (injected -> label), then by the deciding rule and
    by split / arch / optimizer / dataset: where each disagreement class comes from. Returns the lines
    and the count per "injected->label"."""
    out = ["", "Disagreements on known injections (injected -> label: count; by rule; by split/arch/optimizer/dataset)"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        if r["label"] != r["injected"]:
            groups.setdefault((r["injected"], r["label"]), []).append(r)
    for (inj, lab), rows in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        reasons = Counter(why(corpus, r) for r in rows)
        where = Counter(f"{r['split']}/{r['arch']}/{r['optimizer']}/{r['dataset']}" for r in rows)
        presets = Counter(r["perturbation"] for r in rows)
        out.append(f"- {inj} -> {lab}: {len(rows)}; presets " + ", ".join(f"{k} {v}" for k, v in presets.most_common())
                   + "; " + ", ".join(f"{k} {v}" for k, v in reasons.most_common())
                   + "; " + ", ".join(f"{k} {v}" for k, v in where.most_common()))
    return out, {f"{inj}->{lab}": len(rows) for (inj, lab), rows in groups.items()}


DISTRIBUTION_AXES = ("family", "dataset", "optimizer", "perturbation", "schedule", "batch_size", "fold")


def distribution(records: list[dict], title: str) -> tuple[list[str], dict]:
    """Per split: runs, healthy share (injected healthy; and labelled healthy when labels exist), run
    lengths, and the count of every value of each axis in DISTRIBUTION_AXES (a plan's records or a
    manifest's; grid runs count their `arch` as the family)."""
    lines, numbers = [f"## {title}", ""], {}
    for split in ("train", "val", "test"):
        rows = [r for r in records if r["split"] == split]
        if not rows:
            continue
        inj = sum(r.get("injected") == "healthy" for r in rows)
        labelled = [r for r in rows if r.get("label") is not None]
        lab = sum(r["label"] == "healthy" for r in labelled)
        lengths = [r["max_steps"] for r in rows if r.get("max_steps")]
        head = f"### {split}: {len(rows)} runs, {inj} healthy-injected ({100 * inj / len(rows):.1f}%)"
        if labelled:
            head += f", {lab} labelled healthy ({100 * lab / len(labelled):.1f}% of {len(labelled)} labelled)"
        if lengths:
            head += f"; run length {min(lengths)}-{max(lengths)} steps (median {int(np.median(lengths))})"
        lines += [head, ""]
        numbers[split] = {"runs": len(rows), "healthy_injected": inj, "healthy_labelled": lab if labelled else None}
        for axis in DISTRIBUTION_AXES:
            values = Counter(str(r.get(axis, r.get("arch") if axis == "family" else None)) for r in rows)
            if set(values) == {"None"}:
                continue
            numbers[split][axis] = dict(values)
            lines.append(f"- {axis} ({len(values)}): " + ", ".join(f"{k} {v}" for k, v in sorted(values.items())))
        lines.append("")
    return lines, numbers


def per_class_agreement(ok: list[dict]) -> tuple[list[str], dict]:
    """Label agreement per known class with its 95% Wilson interval, and healthy-injected -> healthy."""
    lines, numbers = ["| injected class | labelled as injected | agreement | 95% Wilson interval |", "|---|---|---|---|"], {}
    for c in (*KNOWN, "healthy"):
        n = sum(r["injected"] == c for r in ok)
        a = sum(r["injected"] == c and r["label"] == c for r in ok)
        if not n:
            continue
        lo, hi = proportion_confint(a, n, 0.05, method="wilson")
        numbers[c] = {"agree": a, "n": n, "rate": a / n, "wilson": [float(lo), float(hi)]}
        lines.append(f"| {c} | {a}/{n} | {100 * a / n:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% |")
    return lines, numbers


def final_loss_over_log_c(store: RunStore) -> float:
    """The median training loss over a run's last 10% of steps, over log C (C: the head's outputs): 1 is a
    model that learned nothing, 0 one that fits its training data (public, as TEViD's `loss_over_log_c`)."""
    loss = store.train_loss().double().numpy()
    tail = loss[-max(1, len(loss) // 10):]
    tail = tail[np.isfinite(tail)]
    return float(np.median(tail)) / math.log(int(store.attrs["num_classes"])) if len(tail) else math.nan


def final_losses(corpus: Path, ok: list[dict]) -> dict[str, float]:
    """`final_loss_over_log_c` of every run, by run id: read once, shared by the tables that use it."""
    return {r["run_id"]: final_loss_over_log_c(RunStore(corpus / r["store"])) for r in ok}


def healthy_accuracy(corpus: Path, ok: list[dict], final: dict[str, float]) -> tuple[list[str], dict]:
    """How far healthy-injected runs learn: median and lower quartile of their final validation accuracy
    (token accuracy for text) per split and dataset, and the median of their final training loss over log C
    (`final_losses`). A split whose healthy runs end near chance has nothing to forget and no fault
    to show; a corpus whose healthy runs stop far from fitting their data teaches that fitting is a fault."""
    acc: dict[tuple[str, str], list[float]] = {}
    fit: dict[tuple[str, str], list[float]] = {}
    for r in ok:
        if r["injected"] == "healthy":
            val = read_privileged(corpus / r["store"]).get("val_acc")
            if val is not None and len(val):
                acc.setdefault((r["split"], r["dataset"]), []).append(float(val[-1]))
                fit.setdefault((r["split"], r["dataset"]), []).append(final[r["run_id"]])
    lines = ["| split | dataset | healthy runs | median final val acc | lower quartile | median final train loss / log C |",
             "|---|---|---|---|---|---|"]
    numbers = {}
    for (split, dataset), v in sorted(acc.items(), key=lambda kv: (SPLITS.index(kv[0][0]), kv[0][1])):
        med, q25 = float(np.median(v)), float(np.quantile(v, 0.25))
        loss = float(np.nanmedian(fit[split, dataset]))
        numbers[f"{split}/{dataset}"] = {"n": len(v), "median": med, "q25": q25, "loss_over_log_c": loss}
        lines.append(f"| {split} | {dataset} | {len(v)} | {med:.3f} | {q25:.3f} | {loss:.2f} |")
    return lines, numbers


FITTED = 0.2  # a run "fits its training data" when its final training loss is below this share of log C


def fit_by_label(ok: list[dict], final: dict[str, float]) -> tuple[list[str], dict]:
    """How far runs of each label fit their training data, per split: the share whose final training loss
    (`final_losses`) ends below FITTED and the median. A label that alone reaches a low loss can teach
    TEViD that a fitted network is that fault, and a user's healthy job trained to a low loss then alarms."""
    fit: dict[tuple[str, str], list[float]] = {}
    for r in ok:
        fit.setdefault((r["split"], r["label"]), []).append(final[r["run_id"]])
    lines = [f"| split | label | runs | final train loss < {FITTED} log C | median final train loss / log C |",
             "|---|---|---|---|---|"]
    numbers = {}
    for (split, label), v in sorted(fit.items(), key=lambda kv: (SPLITS.index(kv[0][0]), kv[0][1])):
        finite = np.asarray(v, dtype=float)
        finite = finite[np.isfinite(finite)]
        share = float(np.mean(finite < FITTED)) if len(finite) else math.nan
        med = float(np.median(finite)) if len(finite) else math.nan
        numbers[f"{split}/{label}"] = {"n": len(v), "fitted_share": share, "median": med}
        lines.append(f"| {split} | {label} | {len(v)} | {100 * share:.0f}% | {med:.2f} |")
    return lines, numbers


def lyapunov_excess(corpus: Path, ok: list[dict]) -> tuple[list[str], dict]:
    """How far healthy-injected train runs' Lyapunov proxy rises over the shared margins, per optimizer:
    per run the largest lower bound (99% stationary bootstrap) that two adjacent windows both exceed, the
    statistic the instability rule fires on when it is > 0. Computed with the corpus's label settings
    less any per-optimizer margin; the 95th percentile is what `labels.lyapunov_optimizer_margin` adds."""
    from dataclasses import replace

    from capture.config import load_config
    from factory.config import FactoryConfig
    from factory.labeler import _instability
    from factory.relabel import load_signals

    saved = corpus / "config.json"
    lc = load_config(FactoryConfig, saved if saved.exists() else None, []).labels
    lc = replace(lc, lyapunov_optimizer_margin={}, lyapunov_bootstrap=min(lc.lyapunov_bootstrap, 500))
    excess: dict[str, list[float]] = {}
    for r in ok:
        if r["injected"] != "healthy" or r["split"] != "train":
            continue
        sig, _ = load_signals(corpus / r["store"])
        if not sig["lyapunov"]:
            continue
        _, lyap = _instability(sig, lc, len(sig["train_loss"]), r["arch"])
        lows = [math.inf if w["lower"] is None else w["lower"] for w in lyap.detail.get("windows", [])]
        pairs = [min(a, b) for a, b in zip(lows, lows[1:])]
        if pairs and np.isfinite(max(pairs)):
            excess.setdefault(r["optimizer"], []).append(max(pairs))
    lines = ["| optimizer | healthy train runs | median | 90% | 95% | 99% | runs > 0 |", "|---|---|---|---|---|---|---|"]
    numbers = {}
    for opt, v in sorted(excess.items()):
        q = np.quantile(v, [0.5, 0.9, 0.95, 0.99])
        numbers[opt] = {"n": len(v), "q50": float(q[0]), "q90": float(q[1]), "q95": float(q[2]), "q99": float(q[3]),
                        "above_zero": int(sum(x > 0 for x in v))}
        lines.append(f"| {opt} | {len(v)} | {q[0]:.3f} | {q[1]:.3f} | {q[2]:.3f} | {q[3]:.3f} | {numbers[opt]['above_zero']} |")
    return lines, numbers


def corpus_stats(corpus: Path) -> tuple[str, dict]:
    records = read_manifest(corpus)
    ok = [r for r in records if is_usable(r)]
    labels = sorted({r["label"] for r in ok})
    lines = [f"Corpus {corpus}: {len(records)} runs in the manifest, {len(ok)} labeled, "
             f"{sum(r.get('status') == 'failed' for r in records)} failed, {sum(r.get('status') == 'diverged' for r in ok)} diverged.", ""]
    lines += table(["train", "val", "test"], labels, Counter((r["split"], r["label"]) for r in ok), "split \\ label")
    train = [r for r in ok if r["split"] == "train"]
    share = {c: sum(r["label"] == c for r in train) / max(1, len(train)) for c in KNOWN}
    lines += ["", "Share of train runs per known class: " + ", ".join(f"{c} {100 * v:.1f}%" for c, v in share.items()), ""]
    injected = sorted({r["injected"] for r in ok})
    lines += table(injected, labels, Counter((r["injected"], r["label"]) for r in ok), "injected \\ label")
    known = [r for r in ok if r["injected"] in KNOWN]
    n_agree = sum(r["label"] == r["injected"] for r in known)
    agree = n_agree / max(1, len(known))
    agree_ci = [float(x) for x in proportion_confint(n_agree, len(known), 0.05, method="wilson")] if known else [math.nan] * 2
    per_class = {c: (sum(r["label"] == c for r in ok if r["injected"] == c), sum(r["injected"] == c for r in ok)) for c in KNOWN}
    healthy_inj = [r for r in ok if r["injected"] == "healthy"]
    lines += ["", f"Agreement, known injected perturbations: {100 * agree:.1f}% ({n_agree}/{len(known)}; 95% Wilson interval "
              f"{100 * agree_ci[0]:.1f}-{100 * agree_ci[1]:.1f}%); "
              + ", ".join(f"{c} {a}/{n}" for c, (a, n) in per_class.items())
              + f"; healthy-injected labeled healthy: {sum(r['label'] == 'healthy' for r in healthy_inj)}/{len(healthy_inj)}"]
    class_lines, class_numbers = per_class_agreement(ok)
    lines += ["", *class_lines]
    kind_lines, kind_numbers = instability_kinds(corpus, ok)
    lines += ["", *kind_lines]
    disagreement_lines, disagreement_counts = disagreements(corpus, known)
    lines += disagreement_lines
    final = final_losses(corpus, ok)
    learn_lines, learn_numbers = healthy_accuracy(corpus, ok, final)
    lines += ["", "Healthy-injected runs: final validation accuracy and training loss", "", *learn_lines]
    fit_lines, fit_numbers = fit_by_label(ok, final)
    lines += ["", "How far the runs of each label fit their training data", "", *fit_lines]
    dist_lines, dist_numbers = distribution(records, f"Distribution of the corpus {corpus}")
    lines += ["", *dist_lines]
    merged = lambda l: "overfitting" if l == "concept_bias" else ("healthy" if l == "underperforming" else l)  # noqa: E731
    online = sum(merged(r["label"]) == r["online_label"] for r in ok) / max(1, len(ok))
    lines += [f"Training-only (online-style) vs offline labels, concept bias folded into overfitting and "
              f"underperforming into healthy: {100 * online:.1f}% agree ({len(ok)} runs)"]
    lines += table(sorted({merged(r["label"]) for r in ok}), sorted({r["online_label"] for r in ok}),
                   Counter((merged(r["label"]), r["online_label"]) for r in ok), "offline \\ online")
    lines += ["", "Lyapunov proxy: median (max) window mean per window position, by injected class"]
    lyap: dict[str, list[np.ndarray]] = {}
    for r in ok:
        priv = read_privileged(corpus / r["store"])
        if "lyapunov_log_alpha" in priv:
            lyap.setdefault(r["injected"], []).append(priv["lyapunov_log_alpha"].mean(axis=1))
    for inj, rows in sorted(lyap.items()):
        width = max(len(x) for x in rows)
        arr = np.array([np.pad(x, (0, width - len(x)), constant_values=np.nan) for x in rows])
        with np.errstate(all="ignore"):
            cells = [f"{np.nanmedian(arr[:, k]):.2f} ({np.nanmax(arr[:, k]):.2f})" for k in range(width)]
        lines.append(f"- {inj} (n = {len(rows)}): " + ", ".join(cells))
    rs = [v for r in ok if r["label"] == "healthy" and r["arch"] not in ("lm", "lm_base") and r["dataset"] not in TEXT_DATASETS
          for v in [head_grad_val_acc_r(corpus, r)] if v is not None]
    r_mean, r_std = (float(np.mean(rs)), float(np.std(rs))) if rs else (float("nan"), float("nan"))
    rs5 = [v for r in ok if r["label"] == "healthy" and r["arch"] not in ("lm", "lm_base") and r["dataset"] not in TEXT_DATASETS
           for v in [head_grad_val_acc_r(corpus, r, ema_span=5)] if v is not None]
    r5_mean, r5_std = (float(np.mean(rs5)), float(np.std(rs5))) if rs5 else (float("nan"), float("nan"))
    lines += ["", f"Within-run Pearson r, head-gradient norm vs validation accuracy, healthy classification runs: "
              f"{r_mean:.3f} +/- {r_std:.3f} raw, {r5_mean:.3f} +/- {r5_std:.3f} with an EMA of span 5 over frames "
              f"(n = {len(rs)}; seed 000: -0.854 +/- 0.038)"]
    excess_lines, excess_numbers = lyapunov_excess(corpus, ok)
    lines += ["", "Lyapunov proxy of healthy-injected train runs: sustained excess over the shared margins, per optimizer "
              "(> 0 fires the instability rule without a per-optimizer margin)", "", *excess_lines]
    return "\n".join(lines), {"agreement_known": agree, "agreement_known_ci": agree_ci, "online_agreement": online, "pearson_r_mean": r_mean,
                              "pearson_r_std": r_std, "pearson_n": len(rs),
                              "pearson_r_ema5_mean": r5_mean, "pearson_r_ema5_std": r5_std, "train_share": share,
                              "disagreements": disagreement_counts, "per_class": class_numbers, "distribution": dist_numbers,
                              "healthy_accuracy": learn_numbers, "fit_by_label": fit_numbers, "lyapunov_excess": excess_numbers,
                              "instability_kinds": kind_numbers}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=None, help="a generated corpus: labels, agreement, distributions")
    p.add_argument("--config", default=None, help="a factory config: the distribution of its plan (nothing runs)")
    p.add_argument("--out", default=None, help="markdown file (default: <corpus>/stats.md; with --config only: stdout)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    if args.corpus is None and args.config is None:
        p.error("give --corpus DIR, --config FILE, or both")
    if args.config is not None:
        from capture.config import load_config
        from factory.config import FactoryConfig
        from factory.generate import plan, plan_record

        cfg = load_config(FactoryConfig, args.config, args.overrides)
        text = "\n".join(distribution([plan_record(s, cfg) for s in plan(cfg)], f"Plan of {args.config}")[0])
        print(text)
        if args.corpus is None:
            if args.out:
                Path(args.out).write_text(text + "\n")
            return 0
    corpus = Path(args.corpus)
    text, numbers = corpus_stats(corpus)
    out = Path(args.out) if args.out else corpus / "stats.md"
    out.write_text(text + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(numbers, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
