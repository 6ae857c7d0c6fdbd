"""The field benchmark's training jobs, written as a user writes them, with the monitor attached as a
user attaches it: `diagnose.watch(model, optimizer)` in their own loops, the project's Lightning and
Hugging Face adapters (`diagnose.adapters`) in those frameworks, no options in either.

| job | model | data | loop | optimizer |
|---|---|---|---|---|
| `cnn_digits` | own CNN | digits 16x16 | bf16 autocast | Adam |
| `resmlp_tabular` | own residual MLP | make_classification | gradient accumulation (4 x 16) | SGD + momentum |
| `torchvision_digits` | torchvision `shufflenet_v2_x0_5` | digits 32x32 RGB | plain | AdamW |
| `gru_text` | own GRU | generated topic text | plain, `monitor.observe(loss=...)` | RMSprop |
| `lightning_mlp` | plain MLP in a LightningModule | make_classification | Lightning `Trainer` | Adam |
| `bert_text` | `BertForSequenceClassification` (tiny config) | generated topic text | Hugging Face `Trainer` | AdamW |

Each job function takes the fault, the seed and the run length, and returns a `JobResult`: the
per-step training loss, the validation probes at the onset and at the end (`evaluate`), and the
monitor (removed). The fault's hooks sit where the bug would: the schedule, the data stream, the top
of the step.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import diagnose
from eval.field import data as fd
from eval.field.faults import Fault, stamp
from eval.field.models import GRUClassifier, ResMLP, SmallCNN, plain_mlp, tiny_bert, torchvision_model

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, x) -> logits (B, K)


@dataclass
class JobResult:
    train_loss: list[float]  # per optimizer step (the mean over its micro-batches)
    probes: dict[str, dict] = field(default_factory=dict)  # "onset" / "end" -> `evaluate`
    monitor: object = None  # the diagnose.Monitor, removed


@dataclass(frozen=True)
class Job:
    name: str
    model: str
    data: str
    loop: str
    optimizer: str
    run: Callable[..., JobResult]  # (fault, seed, steps, watch=None) -> JobResult


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


@torch.no_grad()
def evaluate(model: nn.Module, task: fd.Task, forward: Forward = _logits, chunk: int = 500) -> dict:
    """Validation figures of the model as it is (eval mode for the call, then back):
    val_acc / val_loss on the clean validation set; first_task_acc, accuracy on its classes [0, K/2)
    (what a task switch forgets); shortcut, the fraction of validation samples stamped with another
    class's watermark that are predicted as that class (what a watermark teaches; 1/K by chance)."""
    was_training = model.training
    model.eval()
    try:
        xs, ys = task.x_val, task.y_val
        logits = torch.cat([forward(model, xs[i:i + chunk]).float() for i in range(0, len(ys), chunk)])
        wrong = (ys + torch.randint(1, task.num_classes, ys.shape, generator=torch.Generator().manual_seed(0))) % task.num_classes
        marked = stamp(xs, wrong, task)
        pred_marked = torch.cat([forward(model, marked[i:i + chunk]).float().argmax(-1) for i in range(0, len(ys), chunk)])
    finally:
        model.train(was_training)
    pred = logits.argmax(-1)
    first = ys < task.num_classes // 2
    return {"val_acc": (pred == ys).float().mean().item(),
            "val_loss": F.cross_entropy(logits, ys).item(),
            "first_task_acc": (pred[first] == ys[first]).float().mean().item(),
            "shortcut": (pred_marked == wrong).float().mean().item()}


def plain_loop(model: nn.Module, optimizer: torch.optim.Optimizer, task: fd.Task, fault: Fault, *, steps: int,
               seed: int, batch_size: int = 32, accumulate: int = 1, autocast: bool = False, observe: bool = False,
               forward: Forward = _logits, watch: dict | None = None) -> JobResult:
    """The loop of a user's own script: a LambdaLR schedule stepped per optimizer step, `accumulate`
    micro-batches per step, optional bf16 autocast around the forward (the loss in float32), and the
    monitor attached with `diagnose.watch(model, optimizer)`; `observe` also hands it the loss. `watch`:
    options for `diagnose.watch` (the benchmark passes none; a variant run may set e.g. the cadence)."""
    stream = fd.BatchStream(task, fault, batch_size, seed, accumulate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, fault.lr_factor)
    monitor = diagnose.watch(model, optimizer, **(watch or {}))
    result = JobResult([], monitor=monitor)
    model.train()
    try:
        for step in range(steps):
            if step == fault.onset:
                result.probes["onset"] = evaluate(model, task, forward)
            fault.on_step_start(step, optimizer)
            total = 0.0
            for _ in range(accumulate):
                x, y = stream.next()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    logits = forward(model, x)
                loss = F.cross_entropy(logits.float(), y)
                (loss / accumulate).backward()
                if observe:
                    monitor.observe(loss=loss)
                total += loss.item() / accumulate
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            result.train_loss.append(total)
        result.probes["end"] = evaluate(model, task, forward)
    finally:
        monitor.remove()
    return result


# ---------------------------------------------------------------- plain-loop jobs


def cnn_digits(fault: Fault, seed: int, steps: int, watch: dict | None = None) -> JobResult:
    task = fd.digits_images(size=16, shift=1)
    torch.manual_seed(seed)
    model = SmallCNN(1, task.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return plain_loop(model, optimizer, task, fault, steps=steps, seed=seed, autocast=True, watch=watch)


def resmlp_tabular(fault: Fault, seed: int, steps: int, watch: dict | None = None) -> JobResult:
    task = fd.tabular(n_features=20, n_classes=6)
    torch.manual_seed(seed)
    model = ResMLP(task.x_train.shape[1], task.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    return plain_loop(model, optimizer, task, fault, steps=steps, seed=seed, batch_size=16, accumulate=4, watch=watch)


def torchvision_digits(fault: Fault, seed: int, steps: int, watch: dict | None = None) -> JobResult:
    task = fd.digits_images(size=32, channels=3, shift=2)
    torch.manual_seed(seed)
    model = torchvision_model("shufflenet_v2_x0_5", task.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return plain_loop(model, optimizer, task, fault, steps=steps, seed=seed, batch_size=16, watch=watch)


def gru_text(fault: Fault, seed: int, steps: int, watch: dict | None = None) -> JobResult:
    task = fd.topic_text()
    torch.manual_seed(seed)
    model = GRUClassifier(task.vocab_size, task.num_classes)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    return plain_loop(model, optimizer, task, fault, steps=steps, seed=seed, observe=True, watch=watch)


# ---------------------------------------------------------------- Lightning


def lightning_mlp(fault: Fault, seed: int, steps: int, watch: dict | None = None) -> JobResult:
    """A LightningModule around a plain MLP, trained by `lightning.pytorch.Trainer` with the project's
    `TEViDLightningCallback()` (no options). The fault: the scheduler from `configure_optimizers`
    (interval "step"), the data stream behind the DataLoader, and the top of each training batch."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, IterableDataset

    from diagnose.adapters import TEViDLightningCallback

    task = fd.tabular(n_features=32, n_classes=8, class_sep=1.2, seed=1)
    result = JobResult([])

    class Stream(IterableDataset):
        def __init__(self, stream: fd.BatchStream):
            self.stream = stream

        def __iter__(self):
            return iter(self.stream)

    class Classifier(pl.LightningModule):
        def __init__(self, net: nn.Module, lr: float):
            super().__init__()
            self.net, self.lr = net, lr

        def forward(self, x):
            return self.net(x)

        def on_train_batch_start(self, batch, batch_idx):
            if self.global_step == fault.onset and "onset" not in result.probes:
                result.probes["onset"] = evaluate(self.net, task)
            fault.on_step_start(self.global_step, self.optimizers())

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            result.train_loss.append(loss.item())
            return loss

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, fault.lr_factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    pl.seed_everything(seed, verbose=False)
    module = Classifier(plain_mlp(task.x_train.shape[1], task.num_classes), lr=1e-3)
    callback = TEViDLightningCallback(**(watch or {}))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[callback])
    trainer.fit(module, DataLoader(Stream(fd.BatchStream(task, fault, 32, seed)), batch_size=None))
    result.probes["end"] = evaluate(module.net, task)
    result.monitor = callback.monitor
    return result


# ---------------------------------------------------------------- Hugging Face Trainer


def bert_text(fault: Fault, seed: int, steps: int, watch: dict | None = None) -> JobResult:
    """A tiny `BertForSequenceClassification` trained by the Hugging Face `Trainer` with the project's
    `TEViDTrainerCallback()` (no options), AdamW and a LambdaLR passed as `optimizers=`, the Trainer's
    defaults otherwise (gradient clipping at norm 1). The fault: the schedule, the data stream behind the
    Trainer's DataLoader, and a `TrainerCallback` at the top of each step."""
    from torch.utils.data import IterableDataset
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from diagnose.adapters import TEViDTrainerCallback

    task = fd.topic_text()
    result = JobResult([])

    def bert_logits(model, x):
        return model(input_ids=x).logits

    class Stream(IterableDataset):
        def __init__(self, stream: fd.BatchStream):
            self.stream = stream

        def __iter__(self):
            for x, y in self.stream:
                for i in range(len(y)):
                    yield {"input_ids": x[i], "labels": y[i]}

    class FaultAndProbes(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == fault.onset and "onset" not in result.probes:
                result.probes["onset"] = evaluate(model, task, bert_logits)
            fault.on_step_start(state.global_step, optimizer)

    torch.manual_seed(seed)
    model = tiny_bert(task.vocab_size, task.num_classes, task.x_train.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, fault.lr_factor)
    monitor_cb = TEViDTrainerCallback(**(watch or {}))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=32, seed=seed,
                                 report_to=[], save_strategy="no", logging_strategy="steps", logging_steps=1,
                                 use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=Stream(fd.BatchStream(task, fault, 32, seed)),
                          optimizers=(optimizer, scheduler), callbacks=[monitor_cb, FaultAndProbes()])
        trainer.remove_callback(PrinterCallback)  # the per-step loss is kept in log_history, not printed
        trainer.train()
    result.train_loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result.probes["end"] = evaluate(model, task, bert_logits)
    result.monitor = monitor_cb.monitor
    return result


JOBS: dict[str, Job] = {j.name: j for j in (
    Job("cnn_digits", "own CNN (3 conv-BN-ReLU stages, 24k parameters)", "digits 16x16", "bf16 autocast", "Adam 1e-3",
        cnn_digits),
    Job("resmlp_tabular", "own residual MLP (4 pre-norm blocks, 69k)", "make_classification 20 features, 6 classes",
        "gradient accumulation 4 x 16", "SGD 0.02, momentum 0.9", resmlp_tabular),
    Job("torchvision_digits", "torchvision shufflenet_v2_x0_5 (0.35M)", "digits 32x32 RGB", "plain",
        "AdamW 1e-3", torchvision_digits),
    Job("gru_text", "own 2-layer GRU (50k)", "generated topic text, 4 classes", "plain + observe(loss)",
        "RMSprop 1e-3", gru_text),
    Job("lightning_mlp", "plain MLP (38k) in a LightningModule", "make_classification 32 features, 8 classes",
        "Lightning Trainer", "Adam 1e-3", lightning_mlp),
    Job("bert_text", "BertForSequenceClassification, tiny config (4 layers, width 32)", "generated topic text, 4 classes",
        "Hugging Face Trainer", "AdamW 1e-3", bert_text),
)}
