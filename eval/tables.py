"""Markdown tables of the evaluation report, shaped like the main paper's (Sec. 5, App. C, H, I).

| function | paper | rows x columns | from |
|---|---|---|---|
| `table3` | Table 3 | method x (AUPRC, lead, FAR, detection, macro F1, Unknown AUROC, AUGRC, cost/100), 95% BCa | metrics.json |
| `table4` | Table 4 | held-out factor value x method (event AUPRC, median lead), 95% BCa over the slice's runs | replayed test runs |
| `table_by_class` | - | known class x method (event AUPRC vs its Healthy runs, its constant-score AUPRC, detection, kind named) | replayed test runs |
| `table_healthy_by_factor` | - | held-out factor value x method (FAR on its Healthy runs, the split's event AUPRC without them) | replayed test runs |
| `table5` | Table 5 | window W (steps/frame, GFLOPs/clip, AUPRC, lead, FAR) | ablations.json (`eval.ablations`) |
| `table12` | Table 12 | ablation variant x (macro F1, AUPRC, lead, FAR, detection) | ablations.json (`eval.ablations`) |
| `table_missed` | - | the first TEViD method's missed known-anomaly runs (class, perturbation, family, frames from onset, alert level) | replayed test runs |
| `table17` | Table 17 | novel perturbation x predicted outcome, % of runs; each type's Unknown AUROC | replayed test runs + the rule's Unknown frames |
| `table18` | Table 18 | method x (N_FA, N_MD per 100 runs, mean lead) at the frozen operating point | replayed test runs |
| `table19` | Table 19 | method x expected cost per 100 runs (95% BCa) | metrics.json |
| `probes_table` | Sec. 5.4 | probe x R^2 | probes.json (`eval.probes`) |

A cell is `value [low, high]` with the 95% bootstrap interval over runs (`eval.metrics.bootstrap_ci`),
`–` where the figure is undefined (no known-anomaly run, nothing detected, ...).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from capture.schema import CLASSES
from eval import metrics as M
from eval.figures import run_outcome_class

FACTORS = ("arch", "dataset", "optimizer")
TABLE3 = (("event_auprc", "AUPRC"), ("event_base_rate", "AUPRC of a constant"), ("median_lead_epochs", "Lead (ep)"), ("far", "FAR"), ("detection_rate", "Det."),
          ("macro_f1", "Macro-F1"), ("unknown_auroc", "Unk. AUROC"), ("augrc", "AUGRC"), ("cost_per_100_runs", "Cost/100"))
TABLE12 = (("macro_f1", "Macro F1 (known)"), ("event_auprc", "Event-Time AUPRC"), ("median_lead_epochs", "Med. Lead (ep)"),
           ("far", "FAR"), ("detection_rate", "Det."))
OUTCOMES = (*CLASSES, "other", "unknown")  # columns of Table 17 (eval.figures.run_outcome_class)


def fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def cell(value, ci=None, digits: int = 3) -> str:
    """`value [low, high]`, or the value alone when the interval is missing or undefined."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if not ci or any(c is None or not math.isfinite(c) for c in ci):
        return fmt(value, digits)
    d = min(digits, 2)  # intervals to 2 decimals at most
    return f"{fmt(value, digits)} [{fmt(ci[0], d)}, {fmt(ci[1], d)}]"


def _ci(s: dict, key: str) -> str:
    return cell(s.get(key), s.get(f"{key}_ci"))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ---------------------------------------------------------------- from the report's own runs

def table3(metrics: dict) -> str:
    """Main results (paper Table 3): one row per method, 95% BCa intervals over runs in brackets."""
    return markdown_table(["Method", "kind", *(h for _, h in TABLE3)],
                  [[name, s["kind"], *(_ci(s, k) for k, _ in TABLE3)] for name, s in metrics.items()])


def table4(results: dict[str, list[M.RunResult]], info: dict[str, dict], horizon_epochs: float = M.HORIZON_EPOCHS,
           n_resamples: int = 2000, seed: int = 0) -> str:
    """Generalization to held-out factors (paper Table 4): for each architecture, dataset and optimizer of
    the test split, event AUPRC / median lead (epochs) of each method on that slice's runs, each with its
    95% bootstrap interval over the slice's runs."""
    names = list(results)
    first = next(iter(results.values()), [])
    rows = []
    auprc = functools.partial(M.event_auprc, horizon_epochs=horizon_epochs)  # keyword partial: the fast weighted bootstrap
    for factor in FACTORS:
        for value in sorted({str(info[r.run_id].get(factor)) for r in first}):
            cells = []
            for n in names:
                sub = [r for r in results[n] if str(info[r.run_id].get(factor)) == value]
                a, lead = M.event_auprc(sub, horizon_epochs), M.median_lead_epochs(sub)
                a_ci = M.bootstrap_ci(sub, auprc, n_resamples, seed=seed) if math.isfinite(a) else None
                l_ci = M.bootstrap_ci(sub, M.median_lead_epochs, n_resamples, seed=seed) if math.isfinite(lead) else None
                cells.append(f"{cell(a, a_ci and [a_ci.low, a_ci.high])} / "
                             f"{cell(lead, l_ci and [l_ci.low, l_ci.high], 2)}")
            n_runs = sum(str(info[r.run_id].get(factor)) == value for r in first)
            rows.append([factor, value, str(n_runs), *cells])
    return markdown_table(["factor", "value", "runs", *(f"{n} AUPRC / Lead (ep)" for n in names)], rows)


def table_by_class(results: dict[str, list[M.RunResult]]) -> str:
    """Per known class, where each method wins or loses: the event AUPRC over that class's runs and the
    Healthy runs (beside the AUPRC of a constant score on the same frames), the detection rate, and the
    share of its runs whose first alert from onset names the class (methods without probabilities: –).
    Point values only: the slices are small, the intervals are in Table 3 and 4."""
    names = list(results)
    first = next(iter(results.values()), [])
    rows = []
    for cls in sorted({r.label for r in first if r.kind == "anomaly"}):
        n_runs = sum(r.label == cls for r in first)
        cells = []
        for n in names:
            sub = [r for r in results[n] if r.kind == "healthy" or (r.kind == "anomaly" and r.label == cls)]
            runs = [r for r in sub if r.kind == "anomaly"]
            named = [M.outcome(r).predicted == cls for r in runs]
            kind = fmt(float(np.mean(named))) if all(r.probs is not None for r in runs) else "–"
            cells.append(f"{fmt(M.event_auprc(sub))} ({fmt(M.event_base_rate(sub))}) / "
                         f"{fmt(M.detection_rate(sub))} / {kind}")
        rows.append([cls, str(n_runs), *cells])
    return markdown_table(["class", "runs", *(f"{n} AUPRC (constant) / Det. / named" for n in names)], rows)


def table_healthy_by_factor(results: dict[str, list[M.RunResult]], info: dict[str, dict],
                            horizon_epochs: float = M.HORIZON_EPOCHS) -> str:
    """Where the false alarms and the costly negatives come from: for each architecture, dataset and optimizer
    of the test split, its Healthy runs, each method's FAR on them and the whole split's event AUPRC with them
    left out (every other run kept). Table 4 ranks a slice's frames among themselves; this column shows what
    the slice's healthy frames cost the split's ranking, e.g. a family whose healthy runs score like anomalies.
    Point values only: the slices are small."""
    names = list(results)
    first = next(iter(results.values()), [])
    rows = []
    for factor in FACTORS:
        for value in sorted({str(info[r.run_id].get(factor)) for r in first}):
            def inside(r):
                return r.kind == "healthy" and str(info[r.run_id].get(factor)) == value
            n_healthy = sum(inside(r) for r in first)
            if not n_healthy:
                continue
            cells = [f"{fmt(M.far([r for r in results[n] if inside(r)]))} / "
                     f"{fmt(M.event_auprc([r for r in results[n] if not inside(r)], horizon_epochs))}" for n in names]
            rows.append([factor, value, str(n_healthy), *cells])
    if not rows:
        return "(no Healthy run in the test split)"
    return markdown_table(["factor", "value", "Healthy runs", *(f"{n} FAR / AUPRC without them" for n in names)], rows)


def table_missed(runs: list[M.RunResult], info: dict[str, dict], perturbation: dict[str, str], consecutive: int,
                 threshold: float | None) -> str:
    """The known-anomaly runs with no alert from the onset, one row each: its class, the perturbation injected,
    its architecture, the scored frames from the onset on, and the highest score it held for `consecutive`
    frames in a row from the onset (`eval.metrics.alert_level`; a run alarms when that exceeds the threshold,
    given in the last column when the method's alarm is one score threshold). How far below, and how few
    frames, tells a near miss from a run the method does not see."""
    rows = []
    for r in runs:
        if r.kind != "anomaly" or M.outcome(r).detected:
            continue
        after = np.asarray(r.score)[np.asarray(r.frame_step) >= r.onset]
        level = M.alert_level(after, consecutive)
        rows.append([r.run_id, r.label, perturbation.get(r.run_id, "-"), str(info[r.run_id].get("arch")), str(len(after)),
                     fmt(level) if math.isfinite(level) else "–", fmt(threshold) if threshold is not None else "–"])
    if not rows:
        return "(every known-anomaly run was detected)"
    rows.sort(key=lambda row: (row[1], row[2], row[0]))
    return markdown_table(["run", "class", "perturbation", "arch", "frames from onset",
                           f"score held {consecutive} frames (max)", "threshold"], rows)


def table17(results: list[M.RunResult], unknown: dict[str, np.ndarray] | None, novel_type: dict[str, str],
            horizon_epochs: float = M.HORIZON_EPOCHS) -> str:
    """Novel anomaly types (rows) vs predicted outcome (paper Table 17), % of that type's test runs. One
    outcome per run (`eval.figures.run_outcome_class`, as the confusion figure): Unknown when the rule
    abstained on at least half of the frames from onset, else the class of the first confirmed alert
    from onset ("other": a score-only alert), else healthy. The last column is the Unknown AUROC of the
    type alone (`metrics.unknown_auroc` over its runs and every non-novel run; "–" without vacuity): which
    kinds the Unknown score sees."""
    runs_of: dict[str, list[M.RunResult]] = {}
    for r in results:
        if r.kind == "novel":
            runs_of.setdefault(novel_type.get(r.run_id, "novel"), []).append(r)
    if not runs_of:
        return "(no novel run in the test split)"
    others = [r for r in results if not r.novel]
    has_vacuity = all(r.vacuity is not None for r in results)
    rows = []
    for t, runs in sorted(runs_of.items()):
        outcomes = [run_outcome_class(r, (unknown or {}).get(r.run_id)) for r in runs]
        auroc = fmt(M.unknown_auroc(others + runs, horizon_epochs), 3) if has_vacuity else "–"
        rows.append([t, str(len(runs)), *(f"{100.0 * outcomes.count(o) / len(runs):.1f}" for o in OUTCOMES), auroc])
    return markdown_table(["True novel anomaly", "runs", *(f"{o} (%)" for o in OUTCOMES), "Unknown AUROC"], rows)


def table18(results: dict[str, list[M.RunResult]], metrics: dict) -> str:
    """Raw counts at the frozen operating point (paper Table 18), per 100 Healthy + known-anomaly test runs:
    false alarms N_FA (as the decision cost counts them), missed detections N_MD; mean lead (epochs) of
    the detected runs; and the test FAR the frozen threshold gives (the paper's "at 5% FAR")."""
    rows = []
    for name, runs in results.items():
        s = metrics[name]
        n = s["n_healthy"] + s["n_anomalous"]
        per = (lambda k: fmt(100.0 * s[k] / n, 1)) if n else (lambda k: "–")
        leads = M.leads_epochs(runs)
        rows.append([name, str(n), per("n_false_alarms"), per("n_missed"), fmt(float(leads.mean()), 2) if len(leads) else "–",
                     fmt(s.get("far"), 3)])
    return markdown_table(["Model", "runs", "N_FA / 100", "N_MD / 100", "Avg. lead (ep)", "FAR (test)"], rows)


def table19(metrics: dict) -> str:
    """Expected decision cost per 100 runs under (C_FA, C_MD, C_lead) = (1, 10, -0.5) (paper Table 19), 95% BCa."""
    return markdown_table(["Model", "Expected cost / 100 runs (95% CI)"],
                  [[name, cell(s.get("cost_per_100_runs"), s.get("cost_per_100_runs_ci"), 1)] for name, s in metrics.items()])


# ---------------------------------------------------------------- from eval.ablations / eval.probes outputs

def table12(ablations: dict) -> str:
    """Ablations (paper Table 12 for activations / gradients, extended to every variant of eval.ablations):
    one row per variant, test-split figures with 95% BCa intervals."""
    rows = []
    for name, v in ablations["variants"].items():
        m = v["metrics"]
        rows.append([name, v["label"], v["init"], *(_ci(m, k) for k, _ in TABLE12)])
    return markdown_table(["Variant", "what differs", "init", *(h for _, h in TABLE12)], rows)


def table5(ablations: dict) -> str:
    """Window length (paper Table 5): the variants that differ from the reference only by the window."""
    rows = []
    for name, v in sorted(ablations["variants"].items(), key=lambda kv: kv[1]["window"]):
        if v["group"] not in ("reference", "window"):
            continue
        m = v["metrics"]
        rows.append([str(v["window"]), fmt(v.get("steps_per_frame"), 0), fmt(v.get("gflops_per_clip"), 3),
                     _ci(m, "event_auprc"), cell(m.get("median_lead_epochs"), m.get("median_lead_epochs_ci"), 2),
                     fmt(m.get("far"), 3), name])
    if not rows:
        return "(no window variant in the ablations: run `python -m eval.ablations --variants full,window5,window20`)"
    return markdown_table(["Window W", "Steps/Frame", "GFLOPs/Clip", "Event-Time AUPRC", "Med. Lead (ep)", "FAR (test)", "variant"], rows)


def probes_table(probes: dict) -> str:
    """The two regressibility probes of paper Sec. 5.4 / App. F.2: R^2 on held-out runs, mean +- sd of the
    per-run R^2 (the paper's statistic), its median (a run whose target barely moves has a huge negative
    R^2 that dominates the mean), the pooled R^2 over all held-out frames, runs and frames."""
    rows = []
    for key, title in (("state_to_loss", "state -> loss (MLP)"), ("loss_to_state", "loss history -> state (TCN)")):
        p = probes.get(key)
        if p is None:
            continue
        rows.append([title, p["input"], p["target"], f"{fmt(p['r2_per_run_mean'])} ± {fmt(p['r2_per_run_sd'])}",
                     fmt(p.get("r2_per_run_median")), fmt(p["r2_pooled"]), str(p["n_test_runs"]), str(p["n_test"])])
    return markdown_table(["Probe", "input", "target", "R² per run (mean ± sd)", "R² per run (median)", "R² pooled", "test runs",
                   "test frames"], rows)
