"""Checkpoints (bit-exact, atomic, never unpickled) and Dynamics-MAE pretraining end to end: two real
accelerate processes on the smoke corpus, resume from the saved step, bit-exact after a crash."""
import csv
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain.train as pretrain_train
from capture.config import ConfigError
from pretrain.checkpoint import (CheckpointError, checkpoint_exists, load_checkpoint, restore_training_state,
                                 save_checkpoint)
from pretrain.encoder import encoder_config, encoder_from_checkpoint
from pretrain.mae import DynamicsMAE
from pretrain.train import NonFiniteLossError, lr_factor, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "pretrain" / "tiny.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the CPU may be shared with other jobs


def _trained(steps=3, seed=0):
    """A tiny Dynamics-MAE with AdamW + LambdaLR after a few steps."""
    torch.manual_seed(seed)
    model = DynamicsMAE(encoder_config("tiny"), decoder_dim=32, decoder_depth=1, decoder_heads=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, 2, 0.1))
    clip = torch.randn(2, 3, 6, 16, 16)
    for i in range(steps):
        model(clip, generator=torch.Generator().manual_seed(i)).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched, clip


def _step(model, opt, sched, clip):
    model(clip, generator=torch.Generator().manual_seed(99)).loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def _same_tree(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


# ------------------------------------------------------------------ checkpoints

def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model, opt, sched, clip = _trained()
    extra = {"epoch": 3, "rng": torch.Generator().manual_seed(5).get_state(), "note": ("a", 1)}
    path = save_checkpoint(tmp_path / "last", model=model, config={"encoder": {"depth": 2}, "betas": (0.9, 0.95)}, step=3,
                           optimizer=opt, scheduler=sched, extra=extra)
    ckpt = load_checkpoint(path)
    assert ckpt.step == 3 and ckpt.path == path and ckpt.config == {"encoder": {"depth": 2}, "betas": [0.9, 0.95]}
    assert _same_tree(ckpt.extra, extra)
    assert _same_tree(ckpt.weights, dict(model.state_dict()))

    fresh, opt2, sched2, _ = _trained(steps=0, seed=1)
    fresh.load_state_dict(ckpt.weights)
    assert restore_training_state(path, opt2, sched2) == 3
    assert _same_tree(opt2.state_dict(), opt.state_dict())  # AdamW moments, step counts, param groups (betas a tuple)
    assert sched2.state_dict() == sched.state_dict()
    _step(model, opt, sched, clip)
    _step(fresh, opt2, sched2, clip)
    assert _same_tree(dict(fresh.state_dict()), dict(model.state_dict()))  # training continues identically


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, opt, sched, _ = _trained(steps=1)
    save_checkpoint(tmp_path / "c", model=model, config={}, step=1, optimizer=opt, scheduler=sched)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, refuse)
    ckpt = load_checkpoint(tmp_path / "c")
    _, opt2, sched2, _ = _trained(steps=0)
    assert restore_training_state(tmp_path / "c", opt2, sched2) == 1 and ckpt.step == 1
    assert not list((tmp_path / "c").glob("*.pt")) and not list((tmp_path / "c").glob("*.pkl"))


def test_missing_or_corrupt_checkpoints_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"no checkpoint at {tmp_path / 'nope'}"):
        load_checkpoint(tmp_path / "nope")
    model, opt, _, _ = _trained(steps=1)
    path = save_checkpoint(tmp_path / "c", model=model, config={}, step=1, optimizer=opt)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint file {path / 'model.safetensors'}"):
        load_checkpoint(path)
    save_checkpoint(path, model=model, config={}, step=1, optimizer=opt)
    (path / "state.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint file {path / 'state.json'}"):
        load_checkpoint(path)
    save_checkpoint(path, model=model, config={}, step=1)  # no optimizer state
    with pytest.raises(CheckpointError, match=f"{path / 'optimizer.json'} is missing"):
        restore_training_state(path, opt)
    with pytest.raises(CheckpointError, match="plain JSON"):
        save_checkpoint(path, model=model, config={"x": torch.zeros(1)}, step=1)


def test_a_crashed_save_never_leaves_a_half_checkpoint(tmp_path, monkeypatch):
    model, opt, sched, clip = _trained(steps=1)
    path = save_checkpoint(tmp_path / "last", model=model, config={}, step=1, optimizer=opt, scheduler=sched)
    before = load_checkpoint(path).weights
    _step(model, opt, sched, clip)

    import pretrain.checkpoint as ck

    real_json = ck._write_json

    def crash_on_state(p, obj):
        if p.name == "state.json":
            raise KeyboardInterrupt("killed while saving")
        real_json(p, obj)

    monkeypatch.setattr(ck, "_write_json", crash_on_state)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=model, config={}, step=2, optimizer=opt, scheduler=sched)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # the old one, no temporary left
    after = load_checkpoint(path)
    assert after.step == 1 and _same_tree(after.weights, before)

    # killed between the two renames: `last` is missing, both complete copies are beside it
    new = save_checkpoint(tmp_path / "staging", model=model, config={}, step=2)
    os.rename(path, tmp_path / ".last.old-1-x")
    os.rename(new, tmp_path / ".last.tmp-1-y")
    assert checkpoint_exists(path) and load_checkpoint(path).step == 2  # the newest is put back
    save_checkpoint(path, model=model, config={}, step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # the stale copy is cleaned up


def test_lr_schedule_warms_up_then_follows_a_cosine():
    f = [lr_factor(s, 10, 4, 0.1) for s in range(11)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and all(a > b for a, b in zip(f[4:], f[5:])) and f[10] == pytest.approx(0.1)
    assert f[7] == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine


def test_non_finite_loss_raises():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, opt, sched, clip = _trained(steps=0)
    clip[0, 1, 2, 3, 4] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite Dynamics-MAE loss .* at optimizer step 8"):
        train_one_epoch(model, [{"frames": clip}], opt, sched, accelerator, step=7, max_steps=10, clip_grad=None)


@pytest.mark.parametrize("scale", ["tiny", "cpu", "base"])
def test_every_pretrain_config_builds_its_model(scale):
    from capture.config import load_config
    from pretrain.encoder import ENCODER_VARIANTS
    from pretrain.train import PretrainConfig, build_model

    cfg = load_config(PretrainConfig, ROOT / "configs" / "pretrain" / f"{scale}.yaml", ["optim.blr=3e-4"])
    assert cfg.optim.blr == 3e-4  # YAML 1.1 reads 3e-4 as a string; float fields accept it
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.encoder.cfg == ENCODER_VARIANTS[scale] and len(model.decoder_blocks) == 4 and model.mask_ratio == 0.9
    assert tuple(cfg.optim.betas) == (0.9, 0.95) and cfg.optim.weight_decay == 0.05


def test_unknown_config_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*'dept'.*valid keys.*'depth'"):
        pretrain_train.main(["--config", TINY, "--corpus", str(tmp_path), "--out", str(tmp_path), "model.dept=2"])


# ------------------------------------------------------------------ pretraining end to end

def _log(out: Path) -> list[dict]:
    with (out / "log.csv").open() as f:
        return list(csv.DictReader(f))


def test_pretraining_two_processes_then_resume(tmp_path, smoke_corpus):
    out = tmp_path / "pretrain"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ACCELERATE_USE_CPU": "true"}
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "0", str(ROOT / "pretrain" / "train.py"),
           "--config", TINY, "--corpus", str(smoke_corpus), "--out", str(out), "max_steps=24", "ckpt_every=8", "threads=1"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2" in res.stdout and "global batch 4" in res.stdout
    rows = _log(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 25))
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:3]) / 3, losses  # from ~1.0 (norm-pix targets) down
    assert load_checkpoint(out / "last").step == 24 and load_checkpoint(out / "final").step == 24
    assert (out / "config.json").is_file() and load_checkpoint(out / "last").extra["world_size"] == 2

    # the encoder of the checkpoint, as fine-tuning loads it
    encoder = encoder_from_checkpoint(out / "final")
    weights = load_checkpoint(out / "final").weights
    assert all(torch.equal(v, weights[f"encoder.{k}"]) for k, v in encoder.state_dict().items())

    # resume (here in one process): continues from step 24, the log is not repeated
    buf = io.StringIO()
    sys_stdout, sys.stdout = sys.stdout, buf
    try:
        assert pretrain_train.main(["--config", TINY, "--corpus", str(smoke_corpus), "--out", str(out), "max_steps=30",
                                    "ckpt_every=8", "threads=1"]) == 0
    finally:
        sys.stdout = sys_stdout
    assert f"resumed from step 24 ({out / 'last'})" in buf.getvalue()
    rows = _log(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert float(rows[24]["loss"]) < 0.9 * float(rows[0]["loss"])  # it starts from the trained weights
    assert load_checkpoint(out / "last").step == 30


def test_resume_after_a_crash_is_bit_exact(tmp_path, smoke_corpus, monkeypatch):
    """Killed right after the checkpoint of step 6 (mid-epoch), resumed: the same weights at step 12 as a
    run that was never interrupted (same data order, masks, optimizer and schedule state)."""
    def run(out: str, ckpt_every: int) -> int:
        return pretrain_train.main(["--config", TINY, "--corpus", str(smoke_corpus), "--out", str(tmp_path / out),
                                    "max_steps=12", "threads=1", "optim.warmup_epochs=1", f"ckpt_every={ckpt_every}"])

    assert run("a", 4) == 0

    class Killed(Exception):
        pass

    def save_then_die(path, **kwargs):
        save_checkpoint(path, **kwargs)
        if kwargs["step"] == 6:
            raise Killed

    monkeypatch.setattr(pretrain_train, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run("b", 3)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "b" / "last").step == 6 and not (tmp_path / "b" / "final").exists()
    assert run("b", 4) == 0
    a, b = load_checkpoint(tmp_path / "a" / "final"), load_checkpoint(tmp_path / "b" / "final")
    assert a.step == b.step == 12
    assert _same_tree(a.weights, b.weights)
    assert [r["loss"] for r in _log(tmp_path / "a")] == [r["loss"] for r in _log(tmp_path / "b")]


def test_pretraining_from_exported_shards(tmp_path, smoke_corpus):
    from pretrain.clips import ClipConfig, export_shards

    export_shards(smoke_corpus, tmp_path / "clips", ClipConfig(window=10), shard_size=4)
    out = tmp_path / "pretrain"
    assert pretrain_train.main(["--config", TINY, "--corpus", str(tmp_path / "clips"), "--out", str(out),
                                "data.source=shards", "max_steps=6", "threads=1"]) == 0
    assert [int(r["step"]) for r in _log(out)] == list(range(1, 7)) and load_checkpoint(out / "final").step == 6
    with pytest.raises(ConfigError, match="clips of 10 frames; the config asks for 8"):
        pretrain_train.main(["--config", TINY, "--corpus", str(tmp_path / "clips"), "--out", str(out), "data.source=shards",
                             "data.window=8", "resume=false"])
