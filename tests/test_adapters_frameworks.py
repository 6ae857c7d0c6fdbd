"""The Lightning and Hugging Face adapters (diagnose/adapters.py) against the real libraries: a tiny Lightning
Trainer fit and a tiny transformers Trainer train on CPU with the callbacks attached. Frames are captured,
alerts flow, `should_stop` becomes the framework's stop request, the loss the monitor sees is the one the
module computed, and every hook comes off at the end. Skipped where the framework is not installed."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_monitor import MODULES, TinyNet, data, hooks_of

from diagnose.adapters import find_head

LIT_MODULES = [f"net.{m}" for m in MODULES]


pytestmark = pytest.mark.usefixtures("no_default_model")  # these tests are of the monitor without a shipped model

@pytest.fixture(autouse=True)
def _threads(one_thread):
    pass


def _loader(n=192, batch=16):
    x, y = data(n, 8)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


# ---------------------------------------------------------------- Lightning

@pytest.fixture(scope="module")
def pl():
    return pytest.importorskip("lightning.pytorch")


def _lit_module(pl, nan_at=None):
    class Lit(pl.LightningModule):
        """A TinyNet under `self.net` (so the LightningModule itself has no get_classifier); NaN inputs
        from optimizer step `nan_at` on; records the loss of every training micro-batch."""

        def __init__(self):
            super().__init__()
            self.net, self.losses = TinyNet(), []

        def training_step(self, batch, batch_idx):
            x, y = batch
            if nan_at is not None and self.global_step >= nan_at:
                x = x * float("nan")
            loss = F.cross_entropy(self.net(x), y)
            self.losses.append((self.global_step, loss.item()))
            return loss

        def validation_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Lit()


def _trainer(pl, callback, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[callback], **kw)


def test_lightning_fit_captures_alerts_and_stops(pl):
    from diagnose.adapters import TEViDLightningCallback

    cb = TEViDLightningCallback(cadence=2, modules=LIT_MODULES, stop_on="nan_inf")
    module = _lit_module(pl, nan_at=5)
    trainer = _trainer(pl, cb, max_steps=12, accumulate_grad_batches=2, limit_val_batches=2, val_check_interval=4,
                       num_sanity_val_steps=1)
    trainer.fit(module, _loader(), _loader(32))
    monitor = cb.monitor
    # the head was found inside the LightningModule (net.get_classifier), so head readouts exist
    assert monitor.capture.head is module.net.head and all("score_w" in r for r in monitor.readouts)
    # only optimizer steps count (2 micro-batches each); validation forwards make no frames
    assert [r["step"] for r in monitor.readouts] == [0, 2, 4, 6]
    _assert_module_losses(monitor, module, 3)
    assert [(a.name, a.step, a.source) for a in monitor.alerts if a.name == "nan_inf"] == [("nan_inf", 5, "rule")]
    # the alert is confirmed at the frame of step 6; Lightning stops after that batch, before max_steps
    assert monitor.should_stop and trainer.should_stop and trainer.global_step == 7
    assert not monitor.active and hooks_of(module, trainer.optimizers[0]) == (0, 0)


def _assert_module_losses(monitor, module, frames):
    """The loss of a step is the mean of its micro-batches' losses as the module computed them: Lightning's
    1/accumulate_grad_batches (and a 16-mixed GradScaler's scale) are undone before `observe`."""
    for r in monitor.readouts[:frames]:
        true = [v for s, v in module.losses if s == r["step"]]
        assert len(true) == 2 and r["loss"] == pytest.approx(sum(true) / 2, rel=1e-3)


def test_lightning_fp16_grad_scaler_loss(pl):
    from diagnose.adapters import TEViDLightningCallback

    # Lightning turns precision="16-mixed" into bf16 (no scaler) on CPU: the plugin forces fp16 + a GradScaler
    plugin = pl.plugins.MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    cb = TEViDLightningCallback(cadence=2, modules=LIT_MODULES)
    module = _lit_module(pl)
    trainer = _trainer(pl, cb, max_steps=6, accumulate_grad_batches=2, plugins=[plugin])
    trainer.fit(module, _loader())
    assert plugin.scaler.get_scale() > 1  # the loss Lightning hands to on_before_backward was multiplied by it
    assert [r["step"] for r in cb.monitor.readouts] == [0, 2, 4]
    _assert_module_losses(cb.monitor, module, 3)


def test_lightning_state_resumes_from_a_checkpoint(pl, tmp_path):
    from diagnose.adapters import TEViDLightningCallback

    first = TEViDLightningCallback(cadence=2, modules=LIT_MODULES)
    module = _lit_module(pl)
    trainer = _trainer(pl, first, max_steps=4)
    trainer.fit(module, _loader())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    state = first.monitor.state_dict()
    assert state["step_count"] == 4

    again = TEViDLightningCallback(cadence=2, modules=LIT_MODULES)
    resumed = _trainer(pl, again, max_steps=6)
    resumed.fit(_lit_module(pl), _loader(), ckpt_path=tmp_path / "run.ckpt", weights_only=False)
    assert again.monitor.step_count == 6 and [r["step"] for r in again.monitor.readouts] == [4]
    # a second fit with the same callback attaches a new monitor
    trainer2 = _trainer(pl, first, max_steps=2)
    old = first.monitor
    trainer2.fit(module, _loader())
    assert first.monitor is not old and first.monitor.step_count == 2 and not first.monitor.active


def test_lightning_exception_removes_hooks(pl):
    from diagnose.adapters import TEViDLightningCallback

    class Boom(RuntimeError):
        pass

    module = _lit_module(pl)
    step = module.training_step

    def failing(batch, batch_idx):
        if module.global_step == 3:
            raise Boom("user error")
        return step(batch, batch_idx)

    module.training_step = failing
    cb = TEViDLightningCallback(cadence=2, modules=LIT_MODULES)
    trainer = _trainer(pl, cb, max_steps=8)
    with pytest.raises(Boom):
        trainer.fit(module, _loader())
    assert cb.monitor.step_count == 3 and not cb.monitor.active
    assert hooks_of(module, trainer.optimizers[0]) == (0, 0)


# ---------------------------------------------------------------- Hugging Face transformers

@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


class HFTiny(nn.Module):
    """A TinyNet in the Trainer's calling convention: forward(pixel_values, labels) -> {"loss", "logits"}.
    NaN inputs from micro-batch `nan_from` on."""

    def __init__(self, nan_from=None):
        super().__init__()
        self.net, self.nan_from, self.calls = TinyNet(), nan_from, 0

    def forward(self, pixel_values, labels=None):
        if self.nan_from is not None and self.training and self.calls >= self.nan_from:
            pixel_values = pixel_values * float("nan")
        self.calls += self.training
        logits = self.net(pixel_values)
        return {"logits": logits, **({"loss": F.cross_entropy(logits, labels)} if labels is not None else {})}


class Images(torch.utils.data.Dataset):
    def __init__(self, n=192):
        self.x, self.y = data(n, 8)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=16, vocab=32):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(hf, tmp_path, **kw):
    return hf.TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=16, report_to=[],
                                save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
                                dataloader_num_workers=0, lr_scheduler_type="constant", seed=0, **kw)


def test_hf_trainer_captures_alerts_and_stops(hf, tmp_path):
    from diagnose.adapters import TEViDTrainerCallback

    cb = TEViDTrainerCallback(cadence=2, modules=LIT_MODULES, stop_on="nan_inf")
    model = HFTiny(nan_from=10)  # micro-batch 10 = the first of optimizer step 5 (2 per step)
    trainer = hf.Trainer(model=model, args=_args(hf, tmp_path, max_steps=12, learning_rate=0.05,
                                                  gradient_accumulation_steps=2), train_dataset=Images(), callbacks=[cb])
    trainer.train()
    monitor = cb.monitor
    assert monitor.capture.head is model.net.head  # found by find_head inside the wrapper
    assert [r["step"] for r in monitor.readouts] == [0, 2, 4, 6]
    assert all(1.0 < r["loss"] < 2.0 for r in monitor.readouts[:3])  # recovered from the head: ~log 4
    assert [(a.name, a.step) for a in monitor.alerts if a.name == "nan_inf"] == [("nan_inf", 5)]
    # should_stop -> control.should_training_stop: the Trainer ends after the step that confirmed it
    assert monitor.should_stop and trainer.state.global_step == 7 and model.calls == 14
    opt = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps the torch optimizer
    assert not monitor.active and hooks_of(model, opt) == (0, 0)


def test_hf_trainer_with_a_transformers_model_built_from_config(hf, tmp_path):
    """A 3-layer GPT-2 from a config (no download): hook points by pattern, the LM head found through
    get_output_embeddings, the loss recovered from its gradient equals the model's own loss."""
    from diagnose.adapters import TEViDTrainerCallback

    config = hf.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=3, n_head=2,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = hf.GPT2LMHeadModel(config)
    assert find_head(model) is model.lm_head
    cb = TEViDTrainerCallback(cadence=2, modules=["transformer.h.*.attn"])
    trainer = hf.Trainer(model=model, args=_args(hf, tmp_path, max_steps=6, learning_rate=1e-3),
                         train_dataset=Tokens(), callbacks=[cb])
    trainer.train()
    monitor = cb.monitor
    assert [p.name for p in monitor.capture.points] == [f"transformer.h.{i}.attn" for i in range(3)]
    assert [r["step"] for r in monitor.readouts] == [0, 2, 4] and not monitor.disabled_reason
    assert all(f.frame.shape[0] == 6 and torch.isfinite(f.frame.float()).all() for f in monitor.frames)
    # step 0's loss against the model's own loss with the initial weights (one batch = the whole data set,
    # and the mean over tokens does not depend on their order)
    torch.manual_seed(0)
    fresh = hf.GPT2LMHeadModel(config)
    ids = Tokens().ids
    with torch.no_grad():
        expected = fresh(input_ids=ids, labels=ids).loss.item()
    assert monitor.readouts[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert not monitor.active and hooks_of(model, trainer.optimizer.optimizer) == (0, 0)


def test_mistakes_in_watch_options_reach_the_user(pl, hf, tmp_path):
    """An unknown watch option raises at attach through each framework (it is the user's mistake, not a
    monitor fault to swallow)."""
    from diagnose.adapters import TEViDLightningCallback, TEViDTrainerCallback

    with pytest.raises(TypeError, match="unknown option"):
        _trainer(pl, TEViDLightningCallback(modules=LIT_MODULES, cadense=3), max_steps=2).fit(_lit_module(pl), _loader())
    trainer = hf.Trainer(model=HFTiny(), args=_args(hf, tmp_path, max_steps=2), train_dataset=Images(),
                         callbacks=[TEViDTrainerCallback(modules=LIT_MODULES, cadense=3)])
    with pytest.raises(TypeError, match="unknown option"):
        trainer.train()
