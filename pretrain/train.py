"""Dynamics-MAE pretraining on unlabeled clips of a corpus (paper Sec. 4.2, App. C.1, F.1 Table 14).

    accelerate launch pretrain/train.py --config configs/pretrain/cpu.yaml --corpus outputs/corpus/cpu --out outputs/pretrain/cpu
    python -m pretrain.train --config configs/pretrain/tiny.yaml --corpus DIR --out DIR model.depth=2 max_steps=50

Two real CPU processes (plain `--cpu` starts one):
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no pretrain/train.py --config ... --corpus ... --out ...

AdamW with the paper's betas (0.9, 0.95) and weight decay 0.05 (no decay on biases, norms, position
embeddings, the mask token), linear warm-up then cosine decay per optimizer step, gradient accumulation,
bf16 autocast only where the device supports it. Writes into --out: config.json (resolved config),
log.csv (and TensorBoard events when `torch.utils.tensorboard` imports), last/ (atomic checkpoint every
`ckpt_every` steps and at the end, with optimizer state) and final/ (weights at the end). A run whose
--out holds last/ resumes from its step. Pretraining is label-free: it reads the frames of the
`data.splits` clips only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from capture.config import ConfigError, cli_parser, load_config, save_config
from pretrain.checkpoint import checkpoint_exists, load_checkpoint, restore_training_state, save_checkpoint
from pretrain.engine import CsvLog, NonFiniteLossError, train_one_epoch as train_epoch, warmup_cosine
from pretrain.encoder import ENCODER_VARIANTS, EncoderConfig, encoder_config
from pretrain.mae import DynamicsMAE


def _floats(section) -> None:
    """YAML 1.1 reads `3e-4` (no dot) as a string: accept it for float fields, refuse anything else."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if "float" in str(f.type) and isinstance(value, str):
            try:
                setattr(section, f.name, float(value))
            except ValueError:
                raise ConfigError(f"{type(section).__name__}.{f.name}: expected a number, got {value!r}") from None


@dataclass
class ModelConfig:
    variant: str = "tiny"  # pretrain.encoder.ENCODER_VARIANTS
    # encoder fields; None = the variant's value
    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    num_frames: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    drop_path: float | None = None
    # Dynamics-MAE
    decoder_dim: int | None = None  # None: embed_dim / 2
    decoder_depth: int = 4
    decoder_heads: int | None = None  # None: decoder_dim / 64 (at least 1)
    mask_ratio: float = 0.9
    norm_pix_loss: bool = True

    def __post_init__(self):
        _floats(self)

    def encoder(self) -> EncoderConfig:
        names = [f.name for f in dataclasses.fields(EncoderConfig)]
        return encoder_config(self.variant, **{k: getattr(self, k) for k in names if getattr(self, k, None) is not None})


@dataclass
class DataConfig:
    source: str = "auto"  # "zarr": windows read from the run stores of the corpus --corpus (CorpusClips);
    #                       "shards": --corpus is a root written by `python -m pretrain.clips export` (faster);
    #                       "auto": shards if --corpus holds index.json, else zarr
    splits: list = field(default_factory=lambda: ["train"])  # label-free: "val" may be added
    window: int | None = None  # T frames per clip; None: the encoder's num_frames
    num_workers: int = 0
    shuffle_buffer: int = 1000  # shards: sample shuffle buffer
    epoch_size: int | None = None  # shards: clips per process per epoch; None: exported clips / processes


@dataclass
class OptimConfig:
    lr: float | None = None  # peak learning rate; None: blr * global batch / 256 (MAE's scaling rule)
    blr: float = 1.5e-4  # paper Table 14
    min_lr: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # MAE / VideoMAE, paper Table 14
    weight_decay: float = 0.05
    warmup_epochs: float = 40.0  # of 400 in the paper
    clip_grad: float | None = None  # max gradient norm; None: no clipping (as MAE)

    def __post_init__(self):
        _floats(self)


@dataclass
class PretrainConfig:
    name: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 8  # clips per process and micro-step; global batch = batch_size * grad_accum * processes
    grad_accum: int = 1
    epochs: int = 400
    max_steps: int | None = None  # optimizer steps; replaces `epochs` when set
    precision: str = "auto"  # "auto": bf16 autocast on a CUDA device with bf16, else fp32; "bf16"; "no"
    seed: int = 0
    log_every: int = 10  # optimizer steps
    ckpt_every: int = 500  # optimizer steps (and always at the end)
    resume: bool = True  # continue from --out/last when it exists
    threads: int | None = None  # torch threads per process; None: CPU cores / local processes


# ------------------------------------------------------------------ pieces

def mixed_precision(precision: str) -> str:
    bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if bf16_ok else "no"
    if precision == "bf16" and not bf16_ok:
        raise ConfigError("precision=bf16: this device has no bf16 support (CPU runs fp32; use precision=auto or no)")
    if precision not in ("bf16", "no"):
        raise ConfigError(f"precision must be auto, bf16 or no; got {precision!r}")
    return precision


lr_factor = warmup_cosine  # the project's one schedule (pretrain.engine); the name pretraining's callers know


def build_model(cfg: PretrainConfig) -> DynamicsMAE:
    m = cfg.model
    return DynamicsMAE(m.encoder(), m.decoder_dim, m.decoder_depth, m.decoder_heads, m.mask_ratio, m.norm_pix_loss)


def model_signature(model: DynamicsMAE) -> dict:
    """What a checkpoint must match to be resumed into `model`."""
    first = model.decoder_blocks[0] if len(model.decoder_blocks) else None
    return {"encoder": dataclasses.asdict(model.encoder.cfg),
            "decoder": {"dim": model.decoder_embed.out_features, "depth": len(model.decoder_blocks),
                        "heads": first.attn_time.num_heads if first is not None else None},
            "mask_ratio": model.mask_ratio, "norm_pix_loss": model.norm_pix_loss}


def make_loader(cfg: PretrainConfig, corpus: Path, window: int, world: int):
    """(loader, clips per epoch in total, whether accelerate should shard it)."""
    from pretrain import clips

    source = cfg.data.source
    if source == "auto":
        source = "shards" if (corpus / "index.json").is_file() else "zarr"
    if source == "zarr":
        from torch.utils.data import ConcatDataset, DataLoader

        sets = [clips.CorpusClips(corpus, split, clips.ClipConfig(window=window)) for split in cfg.data.splits]
        dataset = ConcatDataset(sets)
        if len(dataset) < cfg.batch_size * world:
            raise ValueError(f"{corpus} splits {cfg.data.splits}: {len(dataset)} clips of {window} frames, fewer than one "
                             f"global batch ({cfg.batch_size} x {world} processes)")
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=clips.collate,
                            num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                            generator=torch.Generator().manual_seed(cfg.seed))
        return loader, len(dataset), True
    if source == "shards":
        urls = []
        for split in cfg.data.splits:
            found = sorted((corpus / split).glob("clips-*.tar"))
            if not found:
                raise FileNotFoundError(f"no clip shards in {corpus / split} (export them: python -m pretrain.clips export ...)")
            urls += [str(p) for p in found]
        total = None
        if (corpus / "index.json").is_file():
            index = json.loads((corpus / "index.json").read_text())
            if index["clip_config"]["window"] != window:
                raise ConfigError(f"{corpus} holds clips of {index['clip_config']['window']} frames; the config asks for "
                                  f"{window} (data.window / model.num_frames): export again with --window {window}")
            total = sum(index["counts"][s]["total"] for s in cfg.data.splits)
        epoch_size = cfg.data.epoch_size or (total // world if total else None)
        if epoch_size is None:
            raise ConfigError(f"data.epoch_size is needed: {corpus}/index.json is missing")
        # resampled shards: every process yields the same number of batches, as DDP needs
        loader = clips.clip_loader(urls, cfg.batch_size, shuffle=cfg.data.shuffle_buffer, num_workers=cfg.data.num_workers,
                                   seed=cfg.seed, epoch_size=epoch_size)
        return loader, epoch_size * world, False
    raise ConfigError(f"data.source must be 'auto', 'zarr' or 'shards', got {cfg.data.source!r}")


def make_optimizer(cfg: OptimConfig, model: DynamicsMAE, lr: float, total: int, warmup: int):
    """AdamW without weight decay on biases, norms, position embeddings and the mask token (as MAE),
    and its warm-up + cosine schedule, stepped once per optimizer step."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, cfg.weight_decay, model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    min_ratio = cfg.min_lr / lr if lr > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup, min_ratio))
    return optimizer, scheduler


def resume(last: Path, model: DynamicsMAE, optimizer, scheduler) -> int:
    """Load weights, optimizer and schedule state from checkpoint `last`; returns its step."""
    ckpt = load_checkpoint(last)
    saved = {k: ckpt.config.get(k) for k in model_signature(model)}
    if saved != model_signature(model):
        raise ConfigError(f"{last} holds a different model ({saved}) than the config ({model_signature(model)}): "
                          "use another --out, or resume=false to start over")
    model.load_state_dict(ckpt.weights)
    return restore_training_state(last, optimizer, scheduler)


class RunLog:
    """log.csv (`pretrain.engine.CsvLog`: appended to on resume, rows after the resumed step dropped)
    and TensorBoard events when available, on the main process."""

    FIELDS = ("step", "epoch", "loss", "lr", "clips_per_s", "elapsed_s")

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.enabled, self.path = enabled, out / "log.csv"
        self.tb = None
        self.csv = CsvLog(self.path, self.FIELDS, start_step if start_step > 0 else None, enabled)
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is optional
            pass

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.csv.write(row)
        if self.tb is not None:
            for key in ("loss", "lr", "clips_per_s"):
                self.tb.add_scalar(f"pretrain/{key}", row[key], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------ engine

def train_one_epoch(model, loader, optimizer, scheduler, accelerator, *, step: int, max_steps: int, clip_grad: float | None,
                    mask_generator: torch.Generator | None = None, on_step: Callable[[int, float, int], None] | None = None) -> int:
    """One pass over `loader` (or until optimizer step `max_steps`) through the project's training engine
    (`pretrain.engine.train_one_epoch`); returns the optimizer step reached.

    A non-finite loss raises `NonFiniteLossError` on every process at once. `on_step(step, mean loss over
    the optimizer step, clips in it over all processes)` runs after each optimizer step."""

    def forward(model, batch):
        frames = batch["frames"].to(accelerator.device, non_blocking=True)  # (B, T, C, S, S) bf16
        return model(frames, generator=mask_generator).loss

    def step_done(step: int, losses: list[torch.Tensor], batches: list) -> None:
        if on_step is not None:
            clips = sum(b["frames"].shape[0] for b in batches) * accelerator.num_processes
            on_step(step, float(np.mean([g.mean().item() for g in losses])), clips)

    return train_epoch(model, loader, optimizer, forward, accelerator=accelerator, scheduler=scheduler, clip_grad=clip_grad,
                       step=step, max_steps=max_steps, on_step=step_done, what="Dynamics-MAE",
                       hint="lower optim.lr / set optim.clip_grad, or check the clips").step


# ------------------------------------------------------------------ script

def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    args = cli_parser(__doc__.splitlines()[0], corpus=True).parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    if cfg.model.variant not in ENCODER_VARIANTS:
        raise ConfigError(f"model.variant {cfg.model.variant!r} unknown; valid: {sorted(ENCODER_VARIANTS)}")
    out, corpus = Path(args.out), Path(args.corpus)

    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg.precision),
                              gradient_accumulation_steps=cfg.grad_accum,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    world, rank, main_proc = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local))

    set_seed(cfg.seed)  # the same initial weights on every process
    model = build_model(cfg)
    enc = model.encoder.cfg
    window = cfg.data.window or enc.num_frames
    loader, epoch_clips, shard_with_accelerate = make_loader(cfg, corpus, window, world)
    if shard_with_accelerate:
        loader = accelerator.prepare(loader)  # split over processes

    global_batch = cfg.batch_size * cfg.grad_accum * world
    batches = len(loader) if shard_with_accelerate else -(-(epoch_clips // world) // cfg.batch_size)  # per process
    steps_per_epoch = max(1, -(-batches // cfg.grad_accum))
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    warmup = min(total, round(cfg.optim.warmup_epochs * steps_per_epoch))
    if cfg.max_steps is not None:  # a run cut short by steps keeps the schedule's shape: warm-up <= 10%
        warmup = min(warmup, max(1, total // 10))
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * global_batch / 256
    optimizer, scheduler = make_optimizer(cfg.optim, model, lr, total, warmup)

    last = out / "last"
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
        if cfg.resume:
            checkpoint_exists(last)  # only the main process repairs a save interrupted between its renames
    accelerator.wait_for_everyone()
    start = resume(last, model, optimizer, scheduler) if cfg.resume and last.is_dir() else 0

    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(cfg.seed + start, device_specific=True)  # drop-path randomness differs per process

    def mask_seed(step: int) -> int:  # the masks of optimizer step `step` + 1: the same after a resume
        return int(np.random.SeedSequence([cfg.seed, rank, step]).generate_state(1)[0])

    mask_generator = torch.Generator().manual_seed(mask_seed(start))

    if main_proc:
        print(f"pretrain {cfg.name}: world size {world}, device {accelerator.device}, precision {accelerator.mixed_precision}, "
              f"{epoch_clips} clips/epoch of {window} frames from {'run stores' if shard_with_accelerate else 'clip shards'}, "
              f"{steps_per_epoch} steps/epoch, {total} steps "
              f"(warm-up {warmup}), global batch {global_batch}, lr {lr:.3g}"
              + (f", resumed from step {start} ({last})" if start else ""), flush=True)
    log = RunLog(out, start, main_proc)
    config_record = {"pretrain": dataclasses.asdict(cfg), **model_signature(accelerator.unwrap_model(model)),
                     "model": "DynamicsMAE", "corpus": str(corpus)}
    bar = tqdm(total=total, initial=start, desc="pretrain", unit="step", disable=not main_proc, dynamic_ncols=True)
    t0, window_clips, window_losses, epoch = time.time(), 0, [], start // steps_per_epoch
    tick = time.time()

    def on_step(step: int, loss: float, clips: int) -> None:
        nonlocal tick, window_clips
        mask_generator.manual_seed(mask_seed(step))
        window_clips += clips
        window_losses.append(loss)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            now = time.time()
            row = {"step": step, "epoch": epoch, "loss": float(np.mean(window_losses)), "lr": optimizer.param_groups[0]["lr"],
                   "clips_per_s": window_clips / max(now - tick, 1e-9), "elapsed_s": now - t0}
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", clips_s=f"{row['clips_per_s']:.1f}")
            tick, window_clips = now, 0
            window_losses.clear()
        if main_proc and (step % cfg.ckpt_every == 0 or step == total):
            save_checkpoint(last, model=model, config=config_record, step=step, optimizer=optimizer, scheduler=scheduler,
                            extra={"epoch": epoch, "world_size": world})

    step = start
    while step < total:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)  # a new seeded shuffle per epoch, the same after a resume
        elif hasattr(loader, "epoch"):
            loader.epoch = epoch  # pretrain.clips.ClipLoader: the epoch seeds its shard sampling
        batches_done = (step - epoch * steps_per_epoch) * cfg.grad_accum
        epoch_loader = accelerator.skip_first_batches(loader, batches_done) if shard_with_accelerate and batches_done else loader
        reached = train_one_epoch(model, epoch_loader, optimizer, scheduler, accelerator, step=step,
                                  max_steps=min(total, (epoch + 1) * steps_per_epoch), clip_grad=cfg.optim.clip_grad,
                                  mask_generator=mask_generator, on_step=on_step)
        if reached == step:
            raise RuntimeError(f"epoch {epoch} yielded no batch: {epoch_clips} clips for batch size {cfg.batch_size} x {world}")
        step, epoch = reached, epoch + 1
    bar.close()
    log.close()

    accelerator.wait_for_everyone()
    if main_proc:
        save_checkpoint(out / "final", model=model, config=config_record, step=step, extra={"world_size": world})
        print(f"pretrain {cfg.name}: done at step {step} in {time.time() - t0:.1f} s; checkpoints {last} and {out / 'final'}", flush=True)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
