"""The evaluation report: every method on the same held-out runs, same protocol (docs/architecture.md §8-§9, §11;
paper Sec. 5, Tables 3, 4, 5, 12, 17-19, App. E, H, I).

    python -m eval.report --corpus outputs/corpus/cpu --checkpoint outputs/finetune/cpu/final --out outputs/report/cpu \
        [--tuned outputs/tune] [--ablations FILE] [--probes FILE] [--config FILE] [key=value ...]

For each method of `ReportConfig.methods`:

1. build it: TEViD from `--checkpoint` (`eval.replay.TEViDDiagnoser`, its calibration); `cusum`, `bocpd`,
   `head_grad`, `gwa` with the tuned params of `--tuned DIR/<name>/best.json` (`python -m eval.tune`) or
   their defaults; `tcn_scalar`, `hessian_tcn` (opt-in: runs with `hessian_top`), `r2plus1d`, `video_swin`
   trained on the train split (with their tuned params if any; a video baseline loaded from
   `video_dirs[name]` when given);
2. replay the test split frame by frame (`eval.replay.replay_runs`), and the validation split for the
   methods whose operating point is set here;
3. freeze the operating point on validation: TEViD keeps its calibrated rule (per-class thresholds, tau);
   every other method gets `eval.metrics.threshold_for_far(val, far)` on its score. A validation split
   without Healthy runs has no FAR: the threshold then comes from the Healthy runs of the train split
   (recorded as `threshold_split`);
4. `eval.metrics.summarize` on test (BCa intervals over runs).

Writes into --out: `config.json` (this ReportConfig), `metrics.json` (one entry per method: summarize's
figures plus `kind`, `threshold` / `rule`, `threshold_split`; a TEViD row also `paired_vs_best_baseline`, and
`seed_group` when it is one of `seed_groups`), `comparison.json` (`compare`: the best baseline, each seed group's
mean and sd), `tables.md` (`tables_md`: the paper's Tables
3, 4, 17, 18, 19 from these runs; Tables 5 and 12 from `--ablations`, the Sec. 5.4 probes from `--probes`),
`figures/*.png` (eval.figures). JSON has no NaN: undefined figures are null.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from capture.config import cli_parser, from_dict, load_config, save_config
from eval import figures as FIG
from eval import metrics as M
from eval import tables as TAB
from eval.replay import SCORE_FROM, LoadedRun, TEViDDiagnoser, frame_window, load_runs, replay_runs, unknown_mask, with_alerts

METHODS = ("tevid", "cusum", "bocpd", "head_grad", "gwa", "tcn_scalar", "hessian_tcn", "r2plus1d", "video_swin")
KINDS = {"tevid": "tevid", "cusum": "scalar", "bocpd": "scalar", "tcn_scalar": "scalar", "hessian_tcn": "scalar",
         "head_grad": "readout", "gwa": "readout", "r2plus1d": "video", "video_swin": "video"}
# not in the default list: hessian_tcn needs runs with `hessian_top` (a corpus made with training.hessian_every > 0)
OPT_IN = ("hessian_tcn",)


@dataclass
class ReportConfig:
    methods: list = field(default_factory=lambda: [m for m in METHODS if m not in OPT_IN])
    test_split: str = "test"
    val_split: str = "val"
    train_split: str = "train"
    far: float = 0.05  # FAR target of the frozen threshold of score-only methods
    consecutive: int = 3
    n_resamples: int = 2000
    seed: int = 0
    horizon_epochs: float = M.HORIZON_EPOCHS
    score_from: int = SCORE_FROM
    tuned: str | None = None  # eval.tune outputs: <tuned>/<method>/best.json (or --tuned)
    tcn: dict = field(default_factory=dict)  # TCNConfig overrides (over tuned params)
    hessian_tcn: dict = field(default_factory=dict)  # TCNConfig overrides of hessian_tcn (over tuned params)
    r2plus1d: dict = field(default_factory=dict)  # VideoConfig overrides
    video_swin: dict = field(default_factory=dict)
    video_dirs: dict = field(default_factory=dict)  # method -> saved VideoDetector dir (then not trained here)
    tevid_checkpoints: dict = field(default_factory=dict)  # more TEViDs: name -> fine-tuned dir (e.g. tevid_scratch)
    # TEViD rows that are one model trained with different seeds: group -> [method names]; reported as mean +- sd
    seed_groups: dict = field(default_factory=dict)
    video_checkpoints: dict = field(default_factory=dict)  # more video rows: name -> saved VideoDetector dir (e.g. r2plus1d_defaults)
    ablations: str | None = None  # ablations.json of `python -m eval.ablations` (Tables 5, 12; or --ablations)
    probes: str | None = None  # probes.json of `python -m eval.probes` (Sec. 5.4; or --probes)
    figures: bool = True
    timeline_runs: int = 1  # per-run timelines (anomalous runs first)
    threads: int | None = 1  # torch threads (the CPU is shared)
    # every method's frames scored by the run's alert level so far (eval.metrics.held_scores: the highest score
    # held for `consecutive` frames up to the frame) in the AUPRC metrics; alerts, FAR and detection unchanged
    hold: bool = False

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"ReportConfig.methods: unknown {unknown}; choose from {list(METHODS)}")
        for key, example in (("tevid_checkpoints", "tevid_scratch"), ("video_checkpoints", "r2plus1d_defaults")):
            clash = [m for m in getattr(self, key) if m in METHODS]
            if clash:
                raise ValueError(f"ReportConfig.{key}: names {clash} are taken by methods; use e.g. {example}")
        both = sorted(set(self.tevid_checkpoints) & set(self.video_checkpoints))
        if both:
            raise ValueError(f"ReportConfig: {both} named in both tevid_checkpoints and video_checkpoints")
        if not self.all_methods:
            raise ValueError("ReportConfig: no method to evaluate (methods, tevid_checkpoints and video_checkpoints are empty)")
        for group, members in self.seed_groups.items():
            if not isinstance(members, list) or not members or any(m not in self.all_methods or self.kind(m) != "tevid" for m in members):
                raise ValueError(f"ReportConfig.seed_groups[{group!r}]: members must be a non-empty list of TEViD rows of this "
                                 f"report (tevid, tevid_checkpoints), got {members!r}")

    @property
    def all_methods(self) -> list[str]:
        return list(self.methods) + list(self.tevid_checkpoints) + list(self.video_checkpoints)

    def kind(self, name: str) -> str:
        return "video" if name in self.video_checkpoints else KINDS.get(name, "tevid")


# ---------------------------------------------------------------- building the methods

def tuned_params(tuned: str | Path | None, name: str) -> dict | None:
    """Best params of `python -m eval.tune ... baseline=<name>` under `tuned` (DIR/<name>/best.json or DIR/best.json)."""
    if tuned is None:
        return None
    for p in (Path(tuned) / name / "best.json", Path(tuned) / "best.json"):
        if p.is_file():
            best = json.loads(p.read_text())
            if best.get("baseline", name) == name:
                return dict(best["params"])
    return None


def build_method(name: str, cfg: ReportConfig, corpus: Path, checkpoint: Path | None, train_runs, progress: bool,
                 out: Path | None = None):
    """(diagnoser, notes) of one method. A video baseline trained here is saved to `out/video/<name>`
    (when `out` is given), so a later report can load it with `video_dirs` instead of training again."""
    from eval.baselines import TCNConfig, make_baseline, train_hessian_tcn, train_tcn
    from eval.tune import baseline_config

    params = tuned_params(cfg.tuned, name)
    notes = {"tuned_params": params}
    if name in cfg.tevid_checkpoints:
        return TEViDDiagnoser.from_checkpoint(cfg.tevid_checkpoints[name], name=name), notes
    if name == "tevid":
        if checkpoint is None:
            raise SystemExit("method tevid needs --checkpoint DIR (a fine-tuned TEViD: diagnose.finetune's out/final)")
        return TEViDDiagnoser.from_checkpoint(checkpoint), notes
    if name in ("cusum", "bocpd", "head_grad", "gwa"):
        bcfg = baseline_config(name, params) if params else None
        return make_baseline(name, bcfg), notes
    if name in ("tcn_scalar", "hessian_tcn"):
        base = dataclasses.asdict(baseline_config(name, params) if params else TCNConfig())
        overrides, train = (cfg.tcn, train_tcn) if name == "tcn_scalar" else (cfg.hessian_tcn, train_hessian_tcn)
        tcfg = from_dict(TCNConfig, {**base, **overrides}, f"report.{'tcn' if name == 'tcn_scalar' else name}")
        det, hist = train(train_runs, tcfg, progress=progress)
        notes["train"] = {"n_train": hist["n_train"], "final_loss": hist["train_loss"][-1] if hist["train_loss"] else None}
        return det, notes
    from eval.baselines.video import VideoConfig, VideoDetector, train_video

    saved = cfg.video_dirs.get(name) or cfg.video_checkpoints.get(name)
    if saved:
        notes["loaded_from"] = str(saved)
        return VideoDetector.load(saved, name), notes
    base = dataclasses.asdict(baseline_config(name, params or {}))  # the defaults when not tuned
    vcfg = from_dict(VideoConfig, {**base, **getattr(cfg, name)}, f"report.{name}")
    det, hist = train_video(corpus, vcfg, cfg.train_split, progress=progress, name=name)
    notes["train"] = {"n_train": hist["n_train"], "steps": len(hist["loss"]), "final_loss": hist["loss"][-1]}
    if out is not None:
        notes["saved_to"] = str(det.save(out / "video" / name))
    return det, notes


# ---------------------------------------------------------------- evaluating one method

def freeze_threshold(val: list[M.RunResult], train_healthy: list[M.RunResult], far: float, consecutive: int):
    """(threshold, split it came from): FAR <= far on validation; train Healthy runs if validation has none."""
    if any(r.kind == "healthy" for r in val):
        return M.threshold_for_far(val, far, consecutive), "val"
    if train_healthy:
        return M.threshold_for_far(train_healthy, far, consecutive), "train"
    return math.inf, "none"  # no Healthy run anywhere: never alert


def evaluate_method(name: str, diagnoser, runs: dict[str, list[LoadedRun]], cfg: ReportConfig, progress: bool):
    """(test results with alerts, summary dict, unknown masks per run or None)."""
    kw = dict(score_from=cfg.score_from, progress=progress)
    test = replay_runs(runs["test"], diagnoser, **kw)
    info: dict = {"kind": cfg.kind(name)}
    unknown = None
    if isinstance(diagnoser, TEViDDiagnoser):  # its operating point was calibrated on validation by diagnose.finetune
        rule = diagnoser.calibration.rule()
        test = with_alerts(test, rule=rule)
        unknown = {r.run_id: unknown_mask(r, rule) for r in test}
        info.update(rule={"thresholds": list(rule.thresholds), "tau": rule.tau, "consecutive": rule.consecutive,
                          "score_threshold": rule.score_threshold, "gate": rule.gate},
                    threshold=None, threshold_split="calibration")
    else:
        val = replay_runs(runs["val"], diagnoser, **kw)
        train_res = []
        if not any(r.kind == "healthy" for r in val):  # fallback: the Healthy train runs, with frames when needed
            healthy = [r for r in runs["train"] if r.truth.get("label") == "healthy"]
            if healthy and frame_window(diagnoser) != 0 and healthy[0].frames is None:
                healthy = load_runs(runs["corpus"], cfg.train_split, [r.run_id for r in healthy], progress=False)
            train_res = replay_runs(healthy, diagnoser, **kw)
        thr, where = freeze_threshold(val, [r for r in train_res if r.kind == "healthy"], cfg.far, cfg.consecutive)
        test = M.alerts_at_threshold(test, thr, cfg.consecutive)
        info.update(threshold=thr, threshold_split=where)
    if cfg.hold:  # after the alerts: they come from the frame's own score, as live
        test = [dataclasses.replace(r, score=M.held_scores(r.score, cfg.consecutive)) for r in test]
        info["score"] = f"held ({cfg.consecutive} frames)"
    summary = M.summarize(test, cfg.n_resamples, horizon_epochs=cfg.horizon_epochs, seed=cfg.seed, progress=progress)
    return test, {**info, **summary}, unknown


# ---------------------------------------------------------------- seeds and paired tests

SEED_METRICS = ("event_auprc", "event_base_rate", "far", "detection_rate", "macro_f1", "unknown_auroc")


def compare(results: dict[str, list[M.RunResult]], metrics: dict, cfg: ReportConfig) -> dict:
    """Each TEViD row against the best baseline (the non-TEViD row with the highest test event AUPRC) on the
    same test runs: the AUPRC difference with a paired bootstrap interval (`eval.metrics.paired_difference`),
    stored in the row's metrics as `paired_vs_best_baseline`; and per `cfg.seed_groups` group the mean and sd
    (ddof 1) over its seeds of the main figures and of that difference (the row's metrics get `seed_group`)."""
    baselines = [n for n in results if metrics[n]["kind"] != "tevid" and math.isfinite(metrics[n].get("event_auprc") or math.nan)]
    best = max(baselines, key=lambda n: metrics[n]["event_auprc"]) if baselines else None
    out: dict = {"best_baseline": best, "seed_groups": {}}
    auprc = functools.partial(M.event_auprc, horizon_epochs=cfg.horizon_epochs)
    for name in results:
        if metrics[name]["kind"] == "tevid" and best is not None:
            p = M.paired_difference(results[name], results[best], auprc, cfg.n_resamples, seed=cfg.seed)
            metrics[name]["paired_vs_best_baseline"] = {"baseline": best, "metric": "event_auprc", "difference": p.difference,
                                                        "ci": [p.ci.low, p.ci.high], "ci_method": p.ci.method, "runs": p.n_runs}
    for group, members in cfg.seed_groups.items():
        rows = [{**metrics[m], "paired_difference": metrics[m].get("paired_vs_best_baseline", {}).get("difference")} for m in members]
        summary: dict = {"members": list(members), "n": len(members)}
        for key in (*SEED_METRICS, "paired_difference"):
            vals = [math.nan if r.get(key) is None else float(r[key]) for r in rows]
            summary[key] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan, "values": vals}
        summary["paired_ci_above_zero"] = sum(r.get("paired_vs_best_baseline", {}).get("ci", [math.nan])[0] > 0 for r in rows)
        for m in members:
            metrics[m]["seed_group"] = group
        out["seed_groups"][group] = summary
    return out


def comparison_md(comparison: dict, metrics: dict) -> str:
    """tables.md's section: each TEViD row's paired test, then each seed group's mean +- sd."""
    best = comparison["best_baseline"]
    if best is None:
        return "(no baseline row: no paired test)"
    rows = [[name, TAB.fmt(s["event_auprc"]), TAB.fmt(metrics[best]["event_auprc"]),
             f"{TAB.fmt(s['paired_vs_best_baseline']['difference'])} [{TAB.fmt(s['paired_vs_best_baseline']['ci'][0])}, "
             f"{TAB.fmt(s['paired_vs_best_baseline']['ci'][1])}]"]
            for name, s in metrics.items() if "paired_vs_best_baseline" in s]
    parts = [f"Best baseline by test event AUPRC: `{best}`. Paired bootstrap over the same test runs (each resample scores "
             "both rows on one draw of runs), 95% BCa.\n",
             TAB.markdown_table(["TEViD row", "event AUPRC", f"{best}", "difference [95% paired CI]"], rows)]
    for group, g in comparison["seed_groups"].items():
        ms = lambda k: f"{TAB.fmt(g[k]['mean'])} +- {TAB.fmt(g[k]['sd'])}"  # noqa: E731
        parts += ["", f"Seed group `{group}` ({g['n']} seeds: {', '.join(g['members'])}): event AUPRC {ms('event_auprc')} "
                      f"(constant score {ms('event_base_rate')}), FAR {ms('far')}, detection {ms('detection_rate')}, "
                      f"run macro-F1 {ms('macro_f1')}, Unknown AUROC {ms('unknown_auroc')}; AUPRC - {best} "
                      f"{ms('paired_difference')}, paired interval above 0 for {g['paired_ci_above_zero']} of {g['n']} seeds."]
    return "\n".join(parts)


# ---------------------------------------------------------------- JSON

def jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer)):
        return jsonable(obj.item())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


# ---------------------------------------------------------------- figures

def head_grad_series(corpus: Path, runs: list[LoadedRun]) -> list[dict]:
    """Public head-gradient readout and privileged validation accuracy of each run (evaluation only)."""
    from capture.store import read_privileged
    from pretrain.clips import corpus_runs

    stores = {r["run_id"]: Path(corpus) / r["store"] for r in corpus_runs(corpus)}
    out = []
    for run in runs:
        if "head_grad_norm" not in run.readout_names:
            continue
        priv = read_privileged(stores[run.run_id])
        out.append({"run_id": run.run_id, "label": run.truth.get("label"), "frame_step": run.frame_step,
                    "head_grad_norm": run.readouts[:, run.readout_names.index("head_grad_norm")],
                    "epoch_step": np.asarray(priv.get("epoch_step", [])), "val_acc": np.asarray(priv.get("val_acc", []))})
    first = {}  # one run per label first, so the panels show different labels
    for s in out:
        first.setdefault(s["label"], s)
    return list(first.values()) + [s for s in out if first.get(s["label"]) is not s]


def write_figures(out: Path, corpus: Path, results: dict, metrics: dict, unknown: dict, runs: dict, cfg: ReportConfig) -> list[Path]:
    fig_dir = out / "figures"
    paths = [FIG.risk_coverage_figure(results, fig_dir / "risk_coverage.png", cfg.horizon_epochs),
             FIG.pareto_figure(results, metrics, fig_dir / "lead_vs_far.png")]
    main = "tevid" if "tevid" in results else next(iter(results))
    paths.append(FIG.confusion_figure(results[main], fig_dir / f"confusion_{main}.png", main, unknown.get(main)))
    by_id = {r.run_id: r for r in runs["test"]}
    order = sorted(results[main], key=lambda r: {"anomaly": 0, "novel": 1, "healthy": 2}.get(r.kind, 3))
    tau = metrics[main].get("rule", {}).get("tau") if metrics[main].get("rule") else None
    for r in order[:cfg.timeline_runs]:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in r.run_id)
        paths.append(FIG.timeline_figure(r, by_id[r.run_id].frames, fig_dir / f"timeline_{main}_{safe}.png", main, tau))
    paths.append(FIG.head_grad_figure(head_grad_series(corpus, runs["test"]), fig_dir / "head_grad_vs_val_acc.png"))
    return paths


# ---------------------------------------------------------------- the report

def _read_json(path: str | Path | None, what: str) -> dict | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"report: {what} file {path} does not exist")
    return json.loads(Path(path).read_text())


def tables_md(corpus: Path, checkpoint, cfg: ReportConfig, test_runs: list[LoadedRun], results: dict, metrics: dict,
              unknown: dict) -> str:
    """tables.md: the paper's Tables 3, 4, 17, 18-19 from this report's runs; Tables 5 and 12 and the Sec. 5.4
    probes from `cfg.ablations` / `cfg.probes` when given, else the command that produces them."""
    info = {r.run_id: r.info for r in test_runs}
    perturbation = {r.run_id: str((r.truth.get("perturbation") or {}).get("name", "-")) for r in test_runs}
    novel_type = {k: ("novel" if v == "-" else v) for k, v in perturbation.items()}
    main = next((n for n in results if metrics[n]["kind"] == "tevid"), next(iter(results)))
    ablations, probes = _read_json(cfg.ablations, "ablations"), _read_json(cfg.probes, "probes")
    t4 = TAB.table4(results, info, cfg.horizon_epochs, cfg.n_resamples, cfg.seed)
    parts = [f"# Evaluation report\n\ncorpus `{corpus}`, checkpoint `{checkpoint}`; test split `{cfg.test_split}` "
             f"({len(test_runs)} runs), thresholds frozen on `{cfg.val_split}` (FAR <= {cfg.far}); "
             f"{cfg.n_resamples} bootstrap resamples over runs, 95% BCa."
             + (f" Every method's frames are scored by the run's alert level so far (the highest score held for "
                f"{cfg.consecutive} frames up to the frame: `hold=true`); alerts come from the frame's own score." if cfg.hold else "")
             + "\n",
             "## Table 3: main results\n", TAB.table3(metrics), "",
             "## Table 4: per held-out factor (event AUPRC / median lead in epochs, 95% BCa over the slice's runs)\n", t4, "",
             "## Per known class (the class's runs and the Healthy runs: event AUPRC (of a constant score) / detection / "
             "share of its runs whose first alert names the class)\n", TAB.table_by_class(results), "",
             "## Healthy runs per held-out factor (FAR on them / the split's event AUPRC without them)\n",
             TAB.table_healthy_by_factor(results, info, cfg.horizon_epochs), ""]
    if ablations is not None:
        parts += [f"## Table 5: window length (from `{cfg.ablations}`)\n", TAB.table5(ablations), "",
                  f"## Table 12: ablations (from `{cfg.ablations}`)\n", TAB.table12(ablations), ""]
    else:
        parts += ["## Table 5: window length; Table 12: ablations\n",
                  "Not computed by the report: `python -m eval.ablations --corpus DIR --out DIR --pretrained CKPT` writes "
                  "ablations.json; pass it with `--ablations FILE`.", ""]
    rule = metrics[main].get("rule") or {}
    threshold = rule.get("score_threshold") if rule else metrics[main].get("threshold")
    parts += [f"## Missed known anomalies ({main}: its known-anomaly runs without an alert from the onset)\n",
              TAB.table_missed(results[main], info, perturbation, rule.get("consecutive", cfg.consecutive), threshold), ""]
    parts += [f"## Table 17: novel anomaly types vs predicted outcome ({main}, % of runs)\n",
              TAB.table17(results[main], unknown.get(main), novel_type, cfg.horizon_epochs), "",
              "## Table 18: counts per 100 runs at the frozen operating point\n", TAB.table18(results, metrics), "",
              f"## Table 19: expected cost per 100 runs, (C_FA, C_MD, C_lead) = {tuple(M.COSTS)}\n", TAB.table19(metrics), ""]
    if probes is not None:
        parts += [f"## Sec. 5.4: regressibility probes (from `{cfg.probes}`)\n", TAB.probes_table(probes), ""]
    else:
        parts += ["## Sec. 5.4: regressibility probes\n",
                  "Not computed by the report: `python -m eval.probes --corpus DIR --out DIR` writes probes.json; "
                  "pass it with `--probes FILE`.", ""]
    return "\n".join(parts) + "\n"


def make_report(corpus: str | Path, out: str | Path, cfg: ReportConfig, checkpoint: str | Path | None = None,
                progress: bool = True) -> dict:
    """Replay, score and write the report directory; returns metrics.json's content."""
    corpus, out = Path(corpus), Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    save_config(cfg, out)
    t0 = time.time()
    runs = {"test": load_runs(corpus, cfg.test_split, progress=progress),
            "val": load_runs(corpus, cfg.val_split, progress=progress),
            "train": load_runs(corpus, cfg.train_split, frames=False, progress=progress), "corpus": corpus}
    if "hessian_tcn" in cfg.methods:  # fail before any method runs, naming the corpus and the config key
        from eval.baselines import require_hessian

        for split in ("train", "val", "test"):
            require_hessian(runs[split], getattr(cfg, f"{split}_split"))
    info = {r.run_id: r.info for r in runs["test"]}
    results, metrics, unknown = {}, {}, {}
    for name in cfg.all_methods:
        t = time.time()
        diagnoser, notes = build_method(name, cfg, corpus, Path(checkpoint) if checkpoint else None, runs["train"], progress, out)
        test, summary, unk = evaluate_method(name, diagnoser, runs, cfg, progress)
        results[name], metrics[name] = test, {**summary, **notes, "seconds": round(time.time() - t, 2)}
        if unk is not None:
            unknown[name] = unk
        print(f"{name}: event AUPRC {TAB.fmt(summary['event_auprc'])} (constant score: {TAB.fmt(summary['event_base_rate'])}), FAR {TAB.fmt(summary['far'], 2)}, "
              f"detection {TAB.fmt(summary['detection_rate'], 2)} ({time.time() - t:.1f} s)", file=sys.stderr)
    comparison = compare(results, metrics, cfg)
    (out / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=1, allow_nan=False) + "\n")
    (out / "comparison.json").write_text(json.dumps(jsonable(comparison), indent=1, allow_nan=False) + "\n")
    (out / "tables.md").write_text(tables_md(corpus, checkpoint, cfg, runs["test"], results, metrics, unknown)
                                   + "## Seeds and paired tests against the best baseline\n\n" + comparison_md(comparison, metrics) + "\n")
    if cfg.figures:
        write_figures(out, corpus, results, metrics, unknown, runs, cfg)
    print(f"wrote {out / 'metrics.json'}, {out / 'tables.md'} ({time.time() - t0:.1f} s)", file=sys.stderr)
    return metrics


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    parser = cli_parser("Evaluation report: TEViD and the baselines on the test split (docs/architecture.md §9)",
                        corpus=True, checkpoint=True)
    parser.add_argument("--tuned", default=None, help="directory of `python -m eval.tune` outputs (<tuned>/<method>/best.json)")
    parser.add_argument("--ablations", default=None, help="ablations.json of `python -m eval.ablations` (Tables 5 and 12)")
    parser.add_argument("--probes", default=None, help="probes.json of `python -m eval.probes` (Sec. 5.4 probes)")
    args = parser.parse_args(argv)
    cfg = load_config(ReportConfig, args.config, args.overrides)
    given = {k: getattr(args, k) for k in ("tuned", "ablations", "probes") if getattr(args, k)}
    cfg = dataclasses.replace(cfg, **given)
    make_report(args.corpus, args.out, cfg, args.checkpoint)
    print(Path(args.out) / "tables.md")
    print((Path(args.out) / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
