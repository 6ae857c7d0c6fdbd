"""Fine-tune TEViD on a corpus's clips, then calibrate it on the validation split (docs/architecture.md §7-§9;
paper Sec. 4.3, Appendix D.2, Table 14).

    accelerate launch diagnose/finetune.py --config configs/finetune/cpu.yaml --corpus outputs/corpus/cpu \
        --checkpoint outputs/pretrain/cpu/final --out outputs/finetune/cpu [key=value ...]
    python -m diagnose.finetune --config configs/finetune/tiny.yaml --corpus DIR --out DIR   # from scratch

Two real CPU processes (plain `--cpu` starts one):
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no diagnose/finetune.py --config ... --corpus ... --out ...

Training clips come from the corpus's zarr stores (`data.source: zarr`, small corpora) or from
webdataset shards written by `python -m pretrain.clips export` (`data.source: shards`); validation
always reads the val split from the stores (it is small, and calibration needs each run's windows in
order). The corpus is imbalanced: each class is weighted in the loss by n / (K_present * n_c) over
the training windows (sklearn's "balanced"), which works the same for a map-style dataset and for a
stream (a sampler cannot reweight a stream) and keeps every clip once per epoch. Windows with target
IGNORE are dropped from the map-style training set and masked out of the loss on shards.

`data.label_fraction` < 1 fine-tunes on a seeded per-label subset of the training runs (the label-
efficiency ablation, paper App. C.2 / Fig. 3b: "25% of labels"); the other training runs are not read.

In Python, `finetune(cfg, corpus, out, checkpoint)` does what the command does and returns out/final.

Outputs in --out: config.json (resolved), train.csv (every `log_every` optimizer steps), epochs.csv
(per epoch: train loss, validation loss / macro F1 / accuracy / mean vacuity, clips/s), last/
(atomic checkpoint after every epoch, with optimizer and scheduler: a rerun resumes from it), and
final/ (weights + calibration.json, loaded by `diagnose.tevid.load_tevid`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from capture.config import cli_parser, load_config, save_config, to_dict
from capture.relative import model_fields
from diagnose.calibrate import (PREDICTIONS_FILE, CalibrationConfig, calibrate, predict_records, save_calibration,
                                streams_from_records, window_metrics, write_predictions)
from diagnose.evidential import evidential_loss, kl_anneal
from diagnose.tevid import TEViD, TEViDConfig, build_tevid, tevid_config_from
from pretrain.checkpoint import checkpoint_exists, load_checkpoint, restore_training_state, save_checkpoint, unwrap
from pretrain.clips import CLASSES, IGNORE, ClipConfig, CorpusClips, clip_loader, collate
from pretrain.engine import CsvLog, train_one_epoch as train_epoch, warmup_cosine


@dataclass
class DataConfig:
    source: str = "zarr"  # "zarr": windows read from the run stores (CorpusClips) | "shards": webdataset shards
    shards: str | None = None  # export root of `pretrain.clips export` (holds index.json, train/)
    window: int = 10  # T frames per clip (causal: frames t-9..t)
    stride: int = 1
    # training windows at these frame spacings (every k-th stored frame: a k times coarser cadence; relative
    # representation only); validation, calibration and replay read the stored cadence (spacing 1)
    spacings: list = field(default_factory=lambda: [1])
    horizon_epochs: float = 2.0  # lead horizon H of the positive zone (docs/architecture.md §9)
    # training windows only: an injected anomaly's class from its onset, not trigger - H (pretrain.clips.ClipConfig);
    # validation and calibration keep the evaluation's targets
    class_from_onset: bool = False
    num_workers: int = 0
    shuffle_buffer: int = 1000  # shards only
    label_fraction: float = 1.0  # fraction of the labelled training runs used (per label, seeded by `seed`); zarr only
    train_splits: list = field(default_factory=lambda: ["train"])  # training runs come from these splits (zarr only)
    # cross-fitting (diagnose.crossfit): train on the train_splits' runs outside this fold and validate and
    # calibrate on the fold's runs (the manifest's `fold`) instead of the val split; None: off
    holdout_fold: int | None = None
    # at most this many training windows per run (evenly spaced over its kept windows, all spacings together), so
    # that a few long runs do not outweigh the many short ones; None: every window (zarr only)
    max_windows_per_run: int | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate, paper Table 14
    min_lr: float = 0.0  # the cosine ends here
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.05  # not on biases, norms, position embeddings
    warmup_epochs: float = 5.0
    clip_grad: float | None = 1.0  # max gradient norm; None: no clipping


@dataclass
class FinetuneConfig:
    name: str = "tiny"
    seed: int = 0
    model: TEViDConfig = field(default_factory=TEViDConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 32  # clips per process and micro-step; global batch = batch_size * grad_accum * processes
    grad_accum: int = 1
    epochs: int = 50
    kl_anneal_epochs: float = 10.0  # lambda of the KL term ramps 0 -> 1 over these epochs (0: 1 from the start)
    class_weights: str = "balanced"  # "balanced" | "none"
    anomaly_weight: float = 1.0  # weight of the anomaly head's binary cross-entropy (model.anomaly_head)
    # domain-adversarial training: heads predict these manifest fields of the window's run (e.g. [family, dataset])
    # through a gradient reversal, weighted by adversary_weight (0: off); model.adversary gets their sizes
    adversary: list = field(default_factory=list)
    adversary_weight: float = 0.0
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval_batch_size: int = 64
    log_every: int = 10  # optimizer steps between train.csv rows
    precision: str = "auto"  # "auto": bf16 autocast on a CUDA device with bf16, else fp32; "bf16"; "no"
    resume: bool = True  # continue from --out/last when it exists
    threads: int | None = None  # torch threads per process; None: CPU cores / processes

    def __post_init__(self):
        if self.data.source not in ("zarr", "shards"):
            raise ValueError(f"data.source must be 'zarr' or 'shards', got {self.data.source!r}")
        if self.class_weights not in ("balanced", "none"):
            raise ValueError(f"class_weights must be 'balanced' or 'none', got {self.class_weights!r}")
        if self.precision not in ("auto", "bf16", "no"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'no', got {self.precision!r}")
        if not 0.0 < self.data.label_fraction <= 1.0:
            raise ValueError(f"data.label_fraction must be in (0, 1], got {self.data.label_fraction}")
        if self.model.representation == "relative" and self.data.source != "zarr":
            raise ValueError("model.representation=relative needs data.source=zarr (shards hold stored frames and raw readouts)")
        if list(self.data.spacings) != [1] and self.model.representation != "relative":
            raise ValueError(f"data.spacings={list(self.data.spacings)} needs model.representation=relative")
        if self.data.class_from_onset and self.data.source != "zarr":
            raise ValueError("data.class_from_onset needs data.source=zarr (shards hold the targets of their export)")
        if (self.data.holdout_fold is not None or list(self.data.train_splits) != ["train"]) and self.data.source != "zarr":
            raise ValueError("data.holdout_fold and data.train_splits need data.source=zarr")
        if self.data.holdout_fold is not None and self.data.label_fraction < 1.0:
            raise ValueError("data.holdout_fold and data.label_fraction < 1 do not combine")
        cap = self.data.max_windows_per_run
        if cap is not None and (self.data.source != "zarr" or not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise ValueError(f"data.max_windows_per_run must be None or an integer >= 1 with data.source=zarr, got "
                             f"{cap!r} with source {self.data.source!r}")
        if not self.data.train_splits:
            raise ValueError("data.train_splits must name at least one split")
        if bool(self.adversary) != (self.adversary_weight > 0):
            raise ValueError(f"adversary (manifest fields, got {list(self.adversary)}) and adversary_weight > 0 (got "
                             f"{self.adversary_weight}) go together")
        if self.data.label_fraction < 1.0 and self.data.source != "zarr":
            raise ValueError("data.label_fraction < 1 needs data.source=zarr (shards hold every training run)")


# ---------------------------------------------------------------- pieces

def corpus_cadences(corpus: Path, spacings) -> dict:
    """{"trained_cadences": [...]}: the frame cadences the windows come at, the corpus's capture cadence (its
    config.json, as the factory saved it) times each spacing; {} when the corpus does not say (shards)."""
    try:
        cadence = json.loads((Path(corpus) / "config.json").read_text())["capture"]["cadence"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {"trained_cadences": sorted({int(cadence) * int(k) for k in spacings})} if isinstance(cadence, int) else {}


def balanced_weights(counts: list[int]) -> torch.Tensor:
    """n / (K_present * n_c) for classes present, 0 for absent ones (sklearn's 'balanced')."""
    c = torch.tensor(counts, dtype=torch.float64)
    present = c > 0
    w = torch.zeros_like(c)
    w[present] = c.sum() / (present.sum() * c[present])
    return w.float()


def run_contexts(records: list[dict], fields) -> dict[str, dict[str, int]]:
    """{field: {run_id: index of the run's value among the sorted values of `records`}}: the targets of the
    adversary heads. A record without the field is an error naming it."""
    out = {}
    for name in fields:
        missing = [r["run_id"] for r in records if r.get(name) is None]
        if missing:
            raise ValueError(f"adversary: manifest field {name!r} missing on {len(missing)} runs (e.g. {missing[0]})")
        index = {v: i for i, v in enumerate(sorted({str(r[name]) for r in records}))}
        out[name] = {r["run_id"]: index[str(r[name])] for r in records}
    return out


def fold_runs(corpus: Path, splits, fold: int | None, inside: bool) -> list[dict]:
    """Usable runs of `splits` whose manifest `fold` is `fold` (inside) or is not (outside; every run of the
    splits when `fold` is None). A fold no run has is an error naming the folds there are."""
    from pretrain.clips import corpus_runs

    runs = [r for split in splits for r in corpus_runs(corpus, split)]
    if fold is None:
        return [] if inside else runs
    present = sorted({r.get("fold") for r in runs if r.get("fold") is not None})
    if fold not in present:
        raise ValueError(f"{corpus}: no run of splits {list(splits)} is in fold {fold}; folds present: {present}")
    return [r for r in runs if (r.get("fold") == fold) == inside]


def labelled_subset(corpus: Path, split: str, fraction: float, seed: int) -> list[str] | None:
    """Run ids of a seeded per-label subset of `split`: round(fraction x n) runs of each label (at least 1),
    in manifest order; None when fraction = 1 (every run). Runs are labelled as wholes, so a fraction of
    the labels is a fraction of the runs (paper App. C.2, "25% of labels")."""
    if fraction >= 1.0:
        return None
    from pretrain.clips import corpus_runs

    runs = corpus_runs(corpus, split)
    rng = np.random.default_rng(seed)
    keep: set[str] = set()
    for label in sorted({str(r.get("label")) for r in runs}):
        ids = sorted(r["run_id"] for r in runs if str(r.get("label")) == label)
        keep.update(rng.choice(ids, size=max(1, round(fraction * len(ids))), replace=False).tolist())
    return [r["run_id"] for r in runs if r["run_id"] in keep]


@dataclass
class TrainData:
    loader: object
    steps_per_epoch: int
    counts: list  # training windows per class
    clips: int  # training windows per epoch (all processes)
    runs: list | None = None  # the training runs read when data.label_fraction < 1


def cap_windows(runs: np.ndarray, keep: np.ndarray, cap: int) -> np.ndarray:
    """`keep` (window indices, with `runs` the run of each) with at most `cap` windows of any run: a run with
    more keeps `cap` of them evenly spaced in `keep`'s order (its first and last when cap >= 2), the others all of theirs."""
    _, group = np.unique(runs.astype(str), return_inverse=True)
    order = np.argsort(group, kind="stable")  # each run's windows together, in keep's order: O(n log n), not runs x n
    out = []
    for mine in np.split(keep[order], np.flatnonzero(np.diff(group[order])) + 1):
        out.append(mine if len(mine) <= cap else mine[np.unique(np.linspace(0, len(mine) - 1, cap).round().astype(int))])
    return np.sort(np.concatenate(out))


def train_data(cfg: FinetuneConfig, corpus: Path, clip_cfg: ClipConfig, accelerator) -> TrainData:
    k = cfg.model.num_classes
    if cfg.data.source == "zarr":
        if cfg.data.holdout_fold is not None or list(cfg.data.train_splits) != ["train"]:
            subset = [r["run_id"] for r in fold_runs(corpus, cfg.data.train_splits, cfg.data.holdout_fold, inside=False)]
            ds = CorpusClips(corpus, None, clip_cfg, runs=subset)
        else:
            subset = labelled_subset(corpus, "train", cfg.data.label_fraction, cfg.seed)
            ds = CorpusClips(corpus, "train", clip_cfg, runs=subset)
        targets = ds.targets()
        keep = np.flatnonzero(targets != IGNORE)
        if len(keep) == 0:
            raise ValueError(f"{corpus}: the train split has no window with a known target (all IGNORE)")
        if cfg.data.max_windows_per_run is not None:
            keep = cap_windows(ds.window_runs()[keep], keep, cfg.data.max_windows_per_run)
        counts = np.bincount(targets[keep], minlength=k).tolist()
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, keep.tolist()), batch_size=cfg.batch_size, shuffle=True,
                                             collate_fn=collate, num_workers=cfg.data.num_workers, drop_last=False)
        loader = accelerator.prepare(loader)  # shards batches over processes
        return TrainData(loader, math.ceil(len(loader) / cfg.grad_accum), counts, len(keep), subset)
    if not cfg.data.shards:
        raise ValueError("data.source=shards needs data.shards=DIR (the output of `python -m pretrain.clips export`)")
    root = Path(cfg.data.shards)
    index_file = root / "index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{index_file} not found: data.shards must be an export root of `python -m pretrain.clips export`")
    index = json.loads(index_file.read_text())
    saved = index.get("clip_config", {})
    want = json.loads(json.dumps(dataclasses.asdict(clip_cfg)))  # tuples as JSON lists, like the index
    if saved and any(saved.get(k, v) != v for k, v in want.items()):  # a field the export predates has its default
        raise ValueError(f"{index_file}: shards were exported with {saved}, the config asks for {want}")
    c = index["counts"]["train"]
    counts = [int(c.get(name, 0)) for name in CLASSES[:k]]
    total = sum(counts)
    # a resampled stream of exactly steps x grad_accum full batches per process and epoch
    per_step = cfg.grad_accum * cfg.batch_size
    spe = max(1, math.ceil(total / (accelerator.num_processes * per_step)))
    loader = clip_loader(root / "train", cfg.batch_size, shuffle=cfg.data.shuffle_buffer, num_workers=cfg.data.num_workers,
                         seed=cfg.seed, epoch_size=spe * per_step)
    return TrainData(loader, spe, counts, spe * per_step * accelerator.num_processes)


def evaluate(model: TEViD, val: CorpusClips, accelerator, batch_size: int) -> list[dict]:
    """Window predictions of the whole val split: each process takes every world-th window, then all gather."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = predict_records(unwrap(model), val, range(rank, len(val), world), batch_size, accelerator.device)
    return gather_object(mine) if world > 1 else mine


def anomaly_loss(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of the anomaly logits over the windows whose target is not IGNORE (a zero
    with a graph when there is none: every process of a distributed step backpropagates)."""
    valid = target != IGNORE
    if not valid.any():
        return logit.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logit[valid], target[valid].float())


def val_loss(records: list[dict]) -> float:
    """Evidential loss of the val windows at lambda = 1 (comparable across epochs), no class weights."""
    target = torch.tensor([r["target"] for r in records])
    if not (target != IGNORE).any():
        return float("nan")
    return float(evidential_loss(torch.tensor([r["logits"] for r in records]), target, 1.0))


# ---------------------------------------------------------------- training

def train_one_epoch(model, data: TrainData, optimizer, scheduler, accelerator, cfg: FinetuneConfig, state: dict,
                    class_w: torch.Tensor | None, log: CsvLog, contexts: dict | None = None) -> dict:
    """One pass over the training clips through the project's training engine (`pretrain.engine`);
    returns mean loss (over processes), clips and seconds."""
    clips, start = 0, time.time()
    bar = tqdm(total=data.steps_per_epoch, desc=f"epoch {state['epoch'] + 1}/{cfg.epochs}", unit="step",
               disable=not accelerator.is_main_process, leave=False, file=sys.stderr)

    def kl_weight() -> float:  # lambda of the KL term at the current optimizer step
        return kl_anneal(state["step"] / data.steps_per_epoch, cfg.kl_anneal_epochs)

    anomaly = unwrap(model).cfg.anomaly_head
    adversary = bool(contexts)

    def forward(model, batch):
        return model(batch["frames"].to(accelerator.device), batch["readouts"].to(accelerator.device), with_anomaly=anomaly,
                     with_adversary=adversary)

    def criterion(out, batch):
        parts = out if isinstance(out, tuple) else (out,)  # (logits[, anomaly logit][, context logits])
        logits, a = parts[0], parts[1] if anomaly else None
        loss = evidential_loss(logits.float(), batch["target"].to(accelerator.device), kl_weight(), class_w)
        if a is not None:
            loss = loss + cfg.anomaly_weight * anomaly_loss(a.float(), batch["anomalous"].to(accelerator.device))
        if adversary:  # the heads learn the run's context; the reversed gradient unlearns it from the features
            for name, ctx_logits in parts[-1].items():
                target = torch.tensor([contexts[name][r] for r in batch["run_id"]], device=accelerator.device)
                loss = loss + cfg.adversary_weight * F.cross_entropy(ctx_logits.float(), target)
        return loss

    def step_done(step: int, losses: list[torch.Tensor], batches: list) -> None:
        nonlocal clips
        lam = kl_weight()  # of the step just taken (its micro-batches all used it)
        state["step"] = step
        clips += sum(len(b["run_id"]) for b in batches)
        bar.update()
        if step % cfg.log_every == 0:
            mean = torch.cat(losses).mean().item()
            log.write({"step": step, "epoch": state["epoch"], "lr": scheduler.get_last_lr()[0], "kl_weight": lam, "loss": mean})
            bar.set_postfix(loss=f"{mean:.4f}")

    result = train_epoch(model, data.loader, optimizer, forward, criterion, accelerator=accelerator, scheduler=scheduler,
                         clip_grad=cfg.optim.clip_grad, step=state["step"], on_step=step_done, what="fine-tuning",
                         hint=lambda batch: f"epoch {state['epoch']}, runs {sorted(set(batch['run_id']))}")
    bar.close()
    seconds = time.time() - start
    total_clips = int(accelerator.reduce(torch.tensor(clips, device=accelerator.device), "sum").item())
    return {"train_loss": result.mean_loss, "clips": total_clips, "seconds": seconds}


def finetune(cfg: FinetuneConfig, corpus: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Fine-tune (resuming from out/last when there), calibrate on validation, save out/final; returns
    out/final. `checkpoint`: a Dynamics-MAE checkpoint directory for the encoder (None: from scratch).
    Runs under `accelerate launch` as under plain Python (one process)."""
    corpus, out = Path(corpus), Path(out)

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16" and not bf16_ok:
        raise ValueError("precision=bf16: this device has no bf16 support (CPU runs fp32; use precision=auto or no)")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision="bf16" if cfg.precision != "no" and bf16_ok else "no")
    world = accelerator.num_processes
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    set_seed(cfg.seed)

    # the adversary heads' targets: each training run's context (their sizes go into the model config)
    contexts = run_contexts(fold_runs(corpus, cfg.data.train_splits, cfg.data.holdout_fold, inside=False),
                            cfg.adversary) if cfg.adversary else None

    # model: resume from out/last, else from the MAE checkpoint (or scratch)
    last = out / "last"
    resumed = load_checkpoint(last) if cfg.resume and checkpoint_exists(last) else None
    if resumed is not None:
        model_cfg = tevid_config_from(resumed.config, str(last))
        model = TEViD(model_cfg)
        model.load_state_dict(resumed.weights, strict=True)
    else:
        if contexts:  # one head per field, as wide as the training runs' values
            sizes = {name: len(set(ix.values())) for name, ix in contexts.items()}
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, adversary=sizes))
        model, model_cfg = build_tevid(cfg.model, checkpoint)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    if checkpoint and not model_cfg.uses_video and accelerator.is_main_process:
        print(f"note: inputs={model_cfg.inputs!r} has no encoder; --checkpoint {checkpoint} is not used", flush=True)

    clip_cfg = ClipConfig(cfg.data.window, cfg.data.stride, cfg.data.horizon_epochs, cfg.model.representation,
                          **model_fields(cfg.model))  # the model's run-relative transform
    data = train_data(cfg, corpus, dataclasses.replace(clip_cfg, spacings=tuple(cfg.data.spacings), class_from_onset=cfg.data.class_from_onset),
                      accelerator)
    try:  # every window: the rule streams them all
        if cfg.data.holdout_fold is None:
            val = CorpusClips(corpus, "val", dataclasses.replace(clip_cfg, stride=1))
        else:
            held = [r["run_id"] for r in fold_runs(corpus, cfg.data.train_splits, cfg.data.holdout_fold, inside=True)]
            val = CorpusClips(corpus, None, dataclasses.replace(clip_cfg, stride=1), runs=held)
    except ValueError as err:
        where = "the val split" if cfg.data.holdout_fold is None else f"fold {cfg.data.holdout_fold}"
        raise ValueError(f"{corpus}: fine-tuning validates and calibrates on {where}: {err}") from err
    trained = corpus_cadences(corpus, cfg.data.spacings)  # read by the live monitor for its default cadence
    class_w = balanced_weights(data.counts).to(accelerator.device) if cfg.class_weights == "balanced" else None

    o = cfg.optim
    decay, no_decay = [], []
    skip = model.no_weight_decay()
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=tuple(o.betas))
    total = cfg.epochs * data.steps_per_epoch
    warmup = min(round(o.warmup_epochs * data.steps_per_epoch), max(0, total - 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup, o.min_lr / o.lr))
    state = {"step": 0, "epoch": 0}
    if resumed is not None:
        state["step"] = restore_training_state(last, optimizer, scheduler)
        state["epoch"] = int(resumed.extra.get("epoch", 0))
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler steps once per optimizer step, unprepared

    main_proc = accelerator.is_main_process
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
        n_params = sum(p.numel() for p in model.parameters())
        init = "resumed" if resumed is not None else f"MAE {checkpoint}" if checkpoint and model_cfg.uses_video else "scratch"
        subset_note = "" if data.runs is None else f" from {len(data.runs)} runs (label_fraction {cfg.data.label_fraction})"
        if data.runs is not None:
            (out / "train_runs.json").write_text(json.dumps({"label_fraction": cfg.data.label_fraction, "seed": cfg.seed,
                                                             "runs": data.runs}, indent=1) + "\n")
        print(f"finetune {cfg.name}: world size {world}, inputs {model_cfg.inputs}, encoder "
              f"{model_cfg.encoder if model_cfg.uses_video else '-'} ({init}), {n_params / 1e6:.2f}M params, "
              f"{data.clips} training windows/epoch {dict(zip(CLASSES, data.counts))}{subset_note}, {len(val)} val windows, "
              f"{data.steps_per_epoch} steps/epoch, global batch {cfg.batch_size * world * cfg.grad_accum}", flush=True)
        if resumed is not None:
            print(f"resumed from {last} at step {state['step']} (epoch {state['epoch']})", flush=True)
    resume_step = state["step"] if resumed is not None else None
    train_log = CsvLog(out / "train.csv", ["step", "epoch", "lr", "kl_weight", "loss"], resume_step, main_proc)
    epoch_log = CsvLog(out / "epochs.csv", ["epoch", "step", "train_loss", "val_loss", "val_run_macro_f1", "val_far",
                                            "val_window_macro_f1", "val_accuracy", "val_mean_vacuity", "clips_per_s", "seconds"], resume_step, main_proc)
    accelerator.wait_for_everyone()

    records: list[dict] | None = None
    cal = None  # the last epoch's calibration (main process), saved with the final weights
    while state["epoch"] < cfg.epochs:
        if hasattr(data.loader, "set_epoch"):  # a prepared DataLoader: reshuffle per epoch
            data.loader.set_epoch(state["epoch"])
        elif hasattr(data.loader, "epoch"):  # a ClipLoader: its epoch seeds the stream
            data.loader.epoch = state["epoch"]
        stats = train_one_epoch(model, data, optimizer, scheduler, accelerator, cfg, state, class_w, train_log, contexts)
        state["epoch"] += 1
        records = evaluate(model, val, accelerator, cfg.eval_batch_size)
        if main_proc:
            m = window_metrics(records)
            # run level, as on test (eval.metrics): the rule calibrated on this epoch's val predictions, replayed on them
            cal = calibrate(streams_from_records(records), cfg.calibration, CLASSES[:model_cfg.num_classes])
            rep = cal.report
            row = {"epoch": state["epoch"], "step": state["step"], "train_loss": stats["train_loss"], "val_loss": val_loss(records),
                   "val_run_macro_f1": float("nan") if rep["val_run_macro_f1"] is None else rep["val_run_macro_f1"],
                   "val_far": rep.get("val_far", float("nan")),
                   "val_window_macro_f1": m["macro_f1"], "val_accuracy": m["accuracy"], "val_mean_vacuity": m["mean_vacuity"],
                   "clips_per_s": stats["clips"] / max(stats["seconds"], 1e-9), "seconds": stats["seconds"]}
            epoch_log.write(row)
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
            save_checkpoint(last, model=model, config=to_dict(cfg), step=state["step"], optimizer=optimizer.optimizer,
                            scheduler=scheduler, extra={"epoch": state["epoch"], **trained})
        accelerator.wait_for_everyone()

    if records is None:  # resumed after the last epoch: predict once for the calibration
        records = evaluate(model, val, accelerator, cfg.eval_batch_size)
    if main_proc:
        if cal is None:  # resumed after the last epoch
            cal = calibrate(streams_from_records(records), cfg.calibration, CLASSES[:model_cfg.num_classes])
        final = save_checkpoint(out / "final", model=model, config=to_dict(cfg), step=state["step"],
                                extra={"epoch": state["epoch"], **trained})
        save_calibration(cal, final)
        write_predictions(records, out / PREDICTIONS_FILE)  # the validation windows' predictions (diagnose.crossfit reads them)
        print(f"calibration: temperature {cal.temperature:.3g}, tau {cal.tau:.3g}, thresholds "
              f"{dict(zip(cal.classes[1:], (round(t, 3) for t in cal.thresholds)))}, {cal.report}", flush=True)
        print(f"final weights and calibration: {final}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "final"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    args = cli_parser(__doc__.splitlines()[0], corpus=True, checkpoint=True).parse_args(argv)
    finetune(load_config(FinetuneConfig, args.config, args.overrides), args.corpus, args.out, args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
