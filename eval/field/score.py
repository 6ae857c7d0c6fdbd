"""Scores of the field benchmark, from the run records of `eval.field.run` (results.json), and its tables.

Per run, with `onset` the fault's first step (healthy runs carry the same onset, so they are scored
over the same stretch):
- detected: some alert at a step >= onset (any source; and per source "rule" / "tevid");
- right kind: some alert at a step >= onset whose name is in `faults.EXPECTED[fault]`;
- delay: first such alert's step - onset (right kind, and any alert);
- detected soon: some alert in [onset, onset + NEAR): on healthy runs, the chance rate of that window;
- new (not in the healthy twin): some alert at a step >= onset that the healthy run of the same job and
  seed did not raise (same name and source within TWIN steps). Runs of one job and seed are identical
  up to the onset (same weights, same batches; the task switch aside, whose first half differs), so
  this separates what the fault caused from what the job raises anyway;
- false alarms: alerts at steps < onset (every run), and every alert of a healthy run.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from eval.field.faults import EXPECTED

SOURCES = ("rule", "tevid")
NEAR = 250  # steps after the onset for "detected soon": 5 frames at cadence 50, 12 at the shipped model's 20; room for TEViD's 3-frame rule
TWIN = 100  # an alert is the healthy twin's too when the twin raised its name (same source) within this many steps


def _in_twin(alert: dict, twin: dict) -> bool:
    return any(b["name"] == alert["name"] and b["source"] == alert["source"] and abs(b["step"] - alert["step"]) <= TWIN
               for b in twin["alerts"])


def twins(runs: list[dict]) -> dict[tuple[str, int], dict]:
    """(job, seed) -> the healthy run of that job and seed."""
    return {(r["job"], r["seed"]): r for r in runs if r["fault"] == "healthy"}


def score_run(run: dict, twin: dict | None = None) -> dict:
    """The scores of one run (module docstring); `twin`: the healthy run of its job and seed, if any
    (None for a healthy run: its "new" scores are None)."""
    onset, fault = run["onset"], run["fault"]
    after = [a for a in run["alerts"] if a["step"] >= onset]
    before = [a for a in run["alerts"] if a["step"] < onset]
    expected = EXPECTED.get(fault, frozenset())
    right = [a for a in after if a["name"] in expected]
    out = {"detected": bool(after), "right": bool(right), "soon": any(a["step"] < onset + NEAR for a in after),
           "soon_right": any(a["step"] < onset + NEAR for a in right),
           "delay": after[0]["step"] - onset if after else None,
           "delay_right": right[0]["step"] - onset if right else None,
           "pre_onset_alerts": len(before)}
    new = None if twin is None or run["fault"] == "healthy" else [a for a in after if not _in_twin(a, twin)]
    out["new"] = None if new is None else bool(new)
    out["new_right"] = None if new is None else any(a["name"] in expected for a in new)
    for s in SOURCES:
        out[f"new_right_{s}"] = None if new is None else any(a["name"] in expected and a["source"] == s for a in new)
        mine = [a for a in after if a["source"] == s]
        out[f"detected_{s}"] = bool(mine)
        out[f"right_{s}"] = any(a["name"] in expected for a in mine)
        out[f"pre_onset_{s}"] = sum(a["source"] == s for a in before)
        out[f"alerts_{s}"] = sum(a["source"] == s for a in run["alerts"])
    return out


def _frac(flags: list[bool]) -> str:
    return f"{sum(flags)}/{len(flags)}" if flags else "-"


def _median(values: list) -> str:
    v = [x for x in values if x is not None]
    return f"{int(np.median(v))}" if v else "-"


def _mean(values: list) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def _scored(runs: list[dict]) -> dict[str, list[dict]]:
    """fault -> the scores of its runs, each against its healthy twin."""
    tw = twins(runs)
    by_fault = defaultdict(list)
    for r in runs:
        by_fault[r["fault"]].append(score_run(r, tw.get((r["job"], r["seed"]))))
    return by_fault


def summary(runs: list[dict], faults: list[str]) -> dict:
    """Per fault kind (over jobs and seeds): the rates and delays of the main table, as numbers."""
    by_fault = _scored(runs)
    out = {}
    for f in faults:
        s = by_fault.get(f, [])
        if not s:
            continue
        out[f] = {"runs": len(s), **{k: sum(x[k] for x in s) for k in
                                     ("detected", "detected_rule", "detected_tevid", "right", "right_rule", "right_tevid",
                                      "soon", "soon_right")},
                  **{k: sum(bool(x[k]) for x in s) for k in ("new", "new_right", "new_right_rule", "new_right_tevid")},
                  "runs_with_pre_onset_alert": sum(x["pre_onset_alerts"] > 0 for x in s),
                  "median_delay_right": _median([x["delay_right"] for x in s]),
                  "median_delay_any": _median([x["delay"] for x in s])}
    return out


def main_table(runs: list[dict], faults: list[str]) -> str:
    """Rows: fault kinds. Healthy's "detected" columns are alarms from its (fault-free) onset on."""
    by_fault = _scored(runs)
    lines = ["| fault | expected alert names | runs | detected (any) | by rule | by TEViD | right kind (rule / TEViD) "
             f"| not raised by the healthy twin: any (right kind, rule / TEViD) | within {NEAR} steps: any (right kind) "
             "| median delay, right kind (any alert) | runs with an alert before onset |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in faults:
        s = by_fault.get(f, [])
        if not s:
            continue
        names = ", ".join(sorted(EXPECTED[f])) if f in EXPECTED else "(none: every alert is a false alarm)"
        right = (f"{_frac([x['right'] for x in s])} ({_frac([x['right_rule'] for x in s])} / "
                 f"{_frac([x['right_tevid'] for x in s])})") if f in EXPECTED else "-"
        delay = f"{_median([x['delay_right'] for x in s])} ({_median([x['delay'] for x in s])})" if f in EXPECTED \
            else f"- ({_median([x['delay'] for x in s])})"
        soon = _frac([x["soon"] for x in s]) + (f" ({_frac([x['soon_right'] for x in s])})" if f in EXPECTED else "")
        paired = [x for x in s if x["new"] is not None]
        new = (f"{_frac([x['new'] for x in paired])} ({_frac([x['new_right_rule'] for x in paired])} / "
               f"{_frac([x['new_right_tevid'] for x in paired])})") if paired else "-"
        lines.append(f"| {f} | {names} | {len(s)} | {_frac([x['detected'] for x in s])} | "
                     f"{_frac([x['detected_rule'] for x in s])} | {_frac([x['detected_tevid'] for x in s])} | {right} | "
                     f"{new} | {soon} | {delay} | {_frac([x['pre_onset_alerts'] > 0 for x in s])} |")
    return "\n".join(lines)


def matrix_table(runs: list[dict], jobs: list[str], faults: list[str]) -> str:
    """Jobs x faults: detected / right kind over the seeds, and the names that fired after the onset."""
    cells = defaultdict(list)
    for r in runs:
        cells[(r["job"], r["fault"])].append(r)
    lines = ["| job | " + " | ".join(faults) + " |", "|---|" + "---|" * len(faults)]
    for j in jobs:
        row = []
        for f in faults:
            rs = cells.get((j, f), [])
            if not rs:
                row.append("-")
                continue
            sc = [score_run(r) for r in rs]
            names = Counter(f"{a['source'][0]}:{a['name']}" for r in rs for a in r["alerts"] if a["step"] >= r["onset"])
            text = ", ".join(sorted(names)) or "none"
            head = _frac([x["detected"] for x in sc]) if f == "healthy" else \
                f"{_frac([x['detected'] for x in sc])} · {_frac([x['right'] for x in sc])}"
            row.append(f"{head}<br>{text}")
        lines.append(f"| {j} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def healthy_table(runs: list[dict], jobs: list[str]) -> str:
    """False alarms of the healthy runs, whole run, by source and name (count of alerts over the seeds)."""
    lines = ["| job | runs | runs with any alert | with a rule alert | with a TEViD alert | rule alerts | TEViD alerts |",
             "|---|---|---|---|---|---|---|"]
    for j in jobs:
        rs = [r for r in runs if r["job"] == j and r["fault"] == "healthy"]
        if not rs:
            continue
        per = {s: Counter(a["name"] for r in rs for a in r["alerts"] if a["source"] == s) for s in SOURCES}
        fmt = {s: ", ".join(f"{n} x{c}" for n, c in sorted(per[s].items())) or "-" for s in SOURCES}
        lines.append(f"| {j} | {len(rs)} | {_frac([bool(r['alerts']) for r in rs])} | "
                     f"{_frac([any(a['source'] == 'rule' for a in r['alerts']) for r in rs])} | "
                     f"{_frac([any(a['source'] == 'tevid' for a in r['alerts']) for r in rs])} | {fmt['rule']} | {fmt['tevid']} |")
    rs = [r for r in runs if r["fault"] == "healthy"]
    if rs:
        lines.append(f"| all | {len(rs)} | {_frac([bool(r['alerts']) for r in rs])} | "
                     f"{_frac([any(a['source'] == 'rule' for a in r['alerts']) for r in rs])} | "
                     f"{_frac([any(a['source'] == 'tevid' for a in r['alerts']) for r in rs])} | | |")
    return "\n".join(lines)


def tevid_labels_table(runs: list[dict], jobs: list[str], faults: list[str]) -> str:
    """What TEViD said frame by frame: the share of its predictions per label, before and after the onset
    (over jobs and seeds), per fault kind."""
    labels = ["healthy", "overfitting", "instability", "forgetting", "concept_bias", "unknown"]
    lines = ["| fault | frames | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for f in faults:
        for part, keep in (("before onset", lambda s, o: s < o), ("from onset", lambda s, o: s >= o)):
            preds = [p for r in runs if r["fault"] == f for p in r["predictions"] if keep(p["step"], r["onset"])]
            if not preds:
                continue
            c = Counter(p["label"] for p in preds)
            lines.append(f"| {f}, {part} | {len(preds)} | " + " | ".join(f"{c[x] / len(preds):.0%}" for x in labels) + " |")
    return "\n".join(lines)


def tevid_healthy_jobs_table(runs: list[dict], jobs: list[str]) -> str:
    """TEViD's frame labels on the healthy runs, per job (every predicted frame of the run)."""
    labels = ["healthy", "overfitting", "instability", "forgetting", "concept_bias", "unknown"]
    lines = ["| job (healthy runs) | frames | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for j in jobs:
        preds = [p for r in runs if r["job"] == j and r["fault"] == "healthy" for p in r["predictions"]]
        if preds:
            c = Counter(p["label"] for p in preds)
            lines.append(f"| {j} | {len(preds)} | " + " | ".join(f"{c[x] / len(preds):.0%}" for x in labels) + " |")
    return "\n".join(lines)


def effect_table(runs: list[dict], jobs: list[str], faults: list[str]) -> str:
    """Did each fault do what it says? Means over seeds of the validation probes at the onset and the
    end, and of the training loss in the 50 steps before and after the onset."""
    lines = ["| job | fault | val acc onset → end | first-task acc onset → end | shortcut at end | train loss 50 before → 50 after onset → last 50 |",
             "|---|---|---|---|---|---|"]

    def pair(rs, key):
        a = _mean([r["probes"].get("onset", {}).get(key) for r in rs])
        b = _mean([r["probes"].get("end", {}).get(key) for r in rs])
        return f"{a:.2f} → {b:.2f}"

    for j in jobs:
        for f in faults:
            rs = [r for r in runs if r["job"] == j and r["fault"] == f]
            if not rs:
                continue
            lo = {k: _mean([r["loss_summary"][k] for r in rs]) for k in ("before", "after", "last")}
            lines.append(f"| {j} | {f} | {pair(rs, 'val_acc')} | {pair(rs, 'first_task_acc')} | "
                         f"{_mean([r['probes'].get('end', {}).get('shortcut') for r in rs]):.2f} | "
                         f"{lo['before']:.3g} → {lo['after']:.3g} → {lo['last']:.3g} |")
    return "\n".join(lines)


def monitor_table(runs: list[dict], jobs: list[str]) -> str:
    """How the monitor attached to each job (first run of the job): hook points, head, TEViD, loss."""
    lines = ["| job | hook points (rule) | head | TEViD predictions per run | frames with a finite loss readout | monitor faults |",
             "|---|---|---|---|---|---|"]
    for j in jobs:
        rs = [r for r in runs if r["job"] == j]
        if not rs:
            continue
        m = rs[0]["monitor"]
        pts = ", ".join(m["hook_points"]) + (f" ({m['hook_rule']})" if m.get("hook_rule") else "")
        known = _mean([r["monitor"]["loss_known_fraction"] for r in rs])
        faults = sum(bool(r["monitor"]["disabled_reason"]) or bool(r["monitor"]["capture_faults"]) for r in rs)
        lines.append(f"| {j} | {pts} | {m['head']} | {_median([len(r['predictions']) for r in rs])} | {known:.0%} | "
                     f"{faults}/{len(rs)} runs |")
    return "\n".join(lines)


def tables(runs: list[dict], jobs: list[str], faults: list[str]) -> str:
    """Every table of the field benchmark as one markdown document."""
    return "\n\n".join([
        "## Per fault kind\n\n" + main_table(runs, faults),
        "## Per job and fault\n\nCell: runs detected · runs with the right kind (healthy: runs with any alert from "
        "the onset on), then the alerts from the onset on (r: rule, t: TEViD).\n\n" + matrix_table(runs, jobs, faults),
        "## Healthy runs: false alarms over the whole run\n\n" + healthy_table(runs, jobs),
        "## TEViD's frame labels\n\nShare of TEViD's per-frame labels (argmax class, or unknown when the vacuity "
        "is above tau; an alert needs its class above the class threshold on 3 frames in a row).\n\n"
        + tevid_labels_table(runs, jobs, faults) + "\n\n" + tevid_healthy_jobs_table(runs, jobs),
        "## Did the faults take?\n\n" + effect_table(runs, jobs, faults),
        "## How the monitor attached\n\n" + monitor_table(runs, jobs),
    ]) + "\n"
