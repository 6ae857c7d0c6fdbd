"""How fast each model family learns at a few learning rates: the evidence behind `Family.lr_scale` and the
optimizers' ranges in `ContextConfig.lr`.

    python -m factory.lr_probe [--only mlp vit]                      # AdamW at 0.25-4 x 2e-3: final training loss
    python -m factory.lr_probe --optimizer sgd [--only mlp vit]      # SGD around the rate a drawn corpus gives each family
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from factory.contexts import ContextConfig
from factory.datasets import dataset_info, load_dataset
from factory.families import FAMILIES, InputShape, loss_of, sample_batch
from factory.job import make_optimizer

PROBE_DATASETS = {"image": "textures", "tabular": "tabular_blobs", "sequence": "sines", "text": "pysrc_chars"}
PROBE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _train(model, opt, data, text_context: int | None, steps: int) -> list[float]:
    """`steps` steps on seeded batches of 32 (windows of `text_context` tokens for text); the training losses,
    fewer than `steps` when the loss went non-finite."""
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x, y = sample_batch(data, 32, gen, text_context)
        loss = loss_of(model(x), y)
        if not torch.isfinite(loss):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def lr_probe(families: list[str] | None = None, steps: int = 150, base_lr: float = 2e-3, optimizer: str | None = None) -> None:
    """Per family and modality: the mean training loss of the last 20 of `steps` AdamW steps at
    `base_lr` times each of PROBE_FACTORS (raw, without the family's lr_scale), on PROBE_DATASETS; "div"
    when the loss went non-finite. The evidence behind `Family.lr_scale`.

    With `optimizer` (a name of `factory.job.make_optimizer`): that optimizer, and factor 1 is the rate a
    drawn corpus gives the family (the geometric centre of `ContextConfig.lr[optimizer]` x `lr_scale` x the
    pair's `ContextConfig.lr_pair_scale`; pairs in `excluded_pairs` are skipped); each
    cell adds the final validation accuracy as a multiple of chance (< 2: the run learned nothing)."""
    torch.set_num_threads(1)
    contexts = ContextConfig()
    for name, fam in FAMILIES.items():
        if families and name not in families:
            continue
        if optimizer and not contexts.optimizers_for(name, [optimizer]):
            print(f"{name:14s} not drawn with {optimizer} (contexts.excluded_pairs)")
            continue
        center = (float(np.sqrt(np.prod(contexts.lr[optimizer]))) * fam.lr_scale * contexts.pair_scale(name, optimizer)
                  if optimizer else base_lr)
        for modality in fam.modalities:
            dataset = PROBE_DATASETS[modality]
            info = dataset_info(dataset)
            kw = {"image_size": info.dims[1], "channels": info.dims[0]} if modality == "image" else {}
            data = load_dataset(dataset, max_train=3000, max_val=256 if optimizer else 10, **kw)
            shape = InputShape(modality, info.dims, info.num_classes)
            cells = []
            for factor in PROBE_FACTORS:
                torch.manual_seed(0)
                model = fam.build(shape, fam.median())
                opt = (make_optimizer(optimizer, model.parameters(), center * factor, 0.0) if optimizer
                       else torch.optim.AdamW(model.parameters(), lr=base_lr * factor, foreach=True))
                losses = _train(model, opt, data, info.dims[0] if modality == "text" else None, steps)
                cell = "div" if len(losses) < steps else f"{np.mean(losses[-20:]):.3f}"
                if optimizer and len(losses) == steps and modality != "text":
                    with torch.no_grad():
                        acc = (model.eval()(data.x_val).argmax(-1) == data.y_val).float().mean().item()
                    cell += f" acc {acc * info.num_classes:.1f}x"
                cells.append(cell)
            rate = f"{optimizer} lr {center:.3g}" if optimizer else f"lr_scale {fam.lr_scale:<4}"
            print(f"{name:14s} {modality:9s} {dataset:14s} {rate}  "
                  + "  ".join(f"x{f}: {c}" for f, c in zip(PROBE_FACTORS, cells)), flush=True)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls on AMX-less VMs; entry points only
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", default=None, help="probe this optimizer (factory.job.make_optimizer) around the rate a drawn "
                   "corpus gives each family, with validation accuracy (default: AdamW around 2e-3)")
    p.add_argument("--only", nargs="*", default=None, help="family names (default: all)")
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or []) - set(FAMILIES))
    if unknown:
        p.error(f"--only: unknown families {unknown}; known: {sorted(FAMILIES)}")
    if args.optimizer is not None and args.optimizer not in ContextConfig().lr:
        p.error(f"--optimizer: no drawn learning-rate range for {args.optimizer!r}; known: {sorted(ContextConfig().lr)}")
    lr_probe(args.only, steps=args.steps, optimizer=args.optimizer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
