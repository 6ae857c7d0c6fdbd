"""Fault injection on the data path (issue 21, parts 6-8): damaged run stores, factory resume over damaged
runs, a damaged shipped model, calibration and config files that break their schema, and crafted CIFAR
pickles. Each test reproduces one case of the issue and asserts the named error or the graceful
behaviour. Stores are built with `RunWriter` directly (a few frames of 8 x 8), so most of this runs in
seconds; the factory resume runs the smoke config at its smallest size."""
import dataclasses
import json
import logging
import math
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from capture.config import ConfigError, load_config
from capture.readouts import READOUT_NAMES
from capture.recorder import Frame
from capture.store import SHARD_FRAMES, RunStore, RunStoreError, RunWriter, read_labeling, read_privileged, verify_store

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "diagnose" / "default_checkpoint"
S = 8
N = SHARD_FRAMES + 16  # 80 frames: one full shard and a partial one, as in the issue


def _frame(i: int, g: torch.Generator) -> Frame:
    return Frame(step=i, frame=torch.randn(6, S, S, generator=g).to(torch.bfloat16),
                 readouts={k: float(i + j) for j, k in enumerate(READOUT_NAMES)})


def _store(path: Path, n: int = N) -> torch.Tensor:
    """A finished store of `n` frames; returns the frames as written."""
    g = torch.Generator().manual_seed(0)
    frames = [_frame(i, g) for i in range(n)]
    w = RunWriter(path, S, spec={"arch": "tiny", "seed": 0})
    for f in frames:
        w.append_frame(f)
    w.append_steps([0.5] * n, [0.1] * n)
    w.write_privileged("val_acc", np.linspace(0, 1, n))
    w.write_privileged("labeling", np.zeros(1), attrs={"rules": {"spikes": {"fired": False}}})
    w.finalize(label="healthy")
    return torch.stack([f.frame for f in frames])


def _chunk(path: Path, array: str) -> Path:
    return sorted(p for p in (path / array / "c").rglob("*") if p.is_file())[0]


def _flip(file: Path, every: int = 50, mask: int = 0x80) -> None:
    b = bytearray(file.read_bytes())
    for i in range(0, len(b), every):
        b[i] ^= mask
    file.write_bytes(bytes(b))


def _drop_digests(path: Path) -> None:
    """The store as written before digests existed (layout 1 without attrs digests)."""
    meta = json.loads((path / "zarr.json").read_text())
    del meta["attributes"]["digests"]
    (path / "zarr.json").write_text(json.dumps(meta))


# ================================================================ 6. run stores

def test_intact_store_is_verified_and_survives_the_relabelers_attribute_updates(tmp_path):
    path = tmp_path / "run.zarr"
    frames = _store(path)
    store = RunStore(path)
    assert store.verified and torch.equal(store.frames().view(torch.int16), frames.view(torch.int16))
    root = zarr.open_group(str(path), mode="r+")  # what factory.relabel does to a finished store
    root.attrs.update({"label": "overfitting", "onset_step": 3})
    root["privileged/labeling"].attrs["rules"] = {"spikes": {"fired": True}}
    assert verify_store(path).attrs["label"] == "overfitting" and read_labeling(path) == {"spikes": {"fired": True}}


def test_frames_shard_truncated_to_zero_bytes_is_refused(tmp_path):
    """Issue: the store opened and 64 of 80 frames came back all zero."""
    path = tmp_path / "run.zarr"
    _store(path)
    _chunk(path, "frames").write_bytes(b"")
    with pytest.raises(RunStoreError, match=rf"{path}: array 'frames': frames/c/0/0/0/0 has 0 bytes, \d+ were written"):
        RunStore(path)


def test_eight_xored_bytes_in_a_shard_are_refused(tmp_path):
    """Issue: 14 frames changed without an error."""
    path = tmp_path / "run.zarr"
    _store(path)
    shard = _chunk(path, "frames")
    b = bytearray(shard.read_bytes())
    for i in range(8):
        b[len(b) // 3 + i] ^= 0xFF
    shard.write_bytes(bytes(b))
    with pytest.raises(RunStoreError, match=rf"{path}: array 'frames': .* does not match its sha256 digest"):
        RunStore(path)


def test_truncated_readouts_chunk_is_refused_naming_store_and_array(tmp_path):
    """Issue: the store opened, then .readouts() raised a bare 'Zstd decompression error'."""
    path = tmp_path / "run.zarr"
    _store(path)
    chunk = _chunk(path, "readouts")
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    with pytest.raises(RunStoreError, match=rf"{path}: array 'readouts': readouts/c/0/0 has \d+ bytes"):
        RunStore(path)


def test_bit_flips_in_frames_metadata_are_a_store_error(tmp_path):
    """Issue: UnicodeDecodeError naming no store."""
    path = tmp_path / "run.zarr"
    _store(path)
    _flip(path / "frames" / "zarr.json")
    with pytest.raises(RunStoreError, match=rf"{path}: array 'frames': metadata frames/zarr.json cannot be read"):
        RunStore(path)
    _drop_digests(path)  # the same without digests: still named, never a bare UnicodeDecodeError
    with pytest.raises(RunStoreError, match=rf"{path}: array 'frames'"):
        RunStore(path)


def test_metadata_flip_that_stays_valid_json_is_caught_by_the_digest(tmp_path):
    path = tmp_path / "run.zarr"
    _store(path)
    meta_file = path / "frame_step" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["fill_value"] = 7  # still a valid array: reads back silently different without the digest
    meta_file.write_text(json.dumps(meta, indent=2))
    with pytest.raises(RunStoreError, match=r"array 'frame_step': frame_step/zarr\.json has \d+ bytes|"
                                            r"array 'frame_step': frame_step/zarr\.json does not match"):
        RunStore(path)


def test_store_without_digests_wraps_every_decode_error(tmp_path):
    """A store written before digests existed: opened with the structural checks; a read of a damaged
    chunk is a RunStoreError naming the store and the array, and the factory's check refuses it."""
    path = tmp_path / "run.zarr"
    _store(path)
    _drop_digests(path)
    chunk = _chunk(path, "readouts")
    chunk.write_bytes(chunk.read_bytes()[:20])
    store = RunStore(path)
    assert not store.verified
    with pytest.raises(RunStoreError, match=rf"{path}: array 'readouts' could not be read \(RuntimeError: Zstd"):
        store.readouts()
    with pytest.raises(RunStoreError, match="array 'readouts' could not be read"):
        verify_store(path)
    path2 = tmp_path / "run2.zarr"
    _store(path2)
    _drop_digests(path2)
    _chunk(path2, "frames").write_bytes(b"")  # the silent all-zero case, without digests to catch it
    with pytest.raises(RunStoreError, match="is empty: truncated"):
        verify_store(path2)


def test_privileged_frame_array_is_refused(tmp_path):
    """Issue: a crafted store whose frame_arrays lists privileged/val_acc was served to the evaluation path."""
    path = tmp_path / "run.zarr"
    _store(path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["frame_arrays"] = ["privileged/val_acc"]
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(RunStoreError, match=r"frame_arrays lists 'privileged/val_acc', which cannot name a public"):
        RunStore(path)
    for bad in (["frames"], "hessian_top", [3]):
        meta["attributes"]["frame_arrays"] = bad
        (path / "zarr.json").write_text(json.dumps(meta))
        with pytest.raises(RunStoreError, match="frame_arrays"):
            RunStore(path)


def test_damaged_privileged_data_is_refused_by_its_reader_not_by_the_clip_path(tmp_path):
    path = tmp_path / "run.zarr"
    _store(path)
    _flip(_chunk(path, "privileged/val_acc"), every=7)
    assert len(RunStore(path)) == N  # the clip path reads no privileged file, damaged or not
    with pytest.raises(RunStoreError, match=r"array 'privileged/val_acc': .* does not match its sha256"):
        read_privileged(path)
    with pytest.raises(RunStoreError, match="privileged/val_acc"):
        verify_store(path)


def test_digests_cover_added_and_removed_files(tmp_path):
    path = tmp_path / "run.zarr"
    _store(path)
    (path / "lr" / "notes").write_bytes(b"x")
    with pytest.raises(RunStoreError, match=r"array 'lr': file\(s\) \['notes'\] were not written at finalize"):
        RunStore(path)
    (path / "lr" / "notes").unlink()
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["digests"]["arrays"]["lr"]["c/1"] = [1, "0" * 64]
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(RunStoreError, match=r"array 'lr': file\(s\) \['c/1'\] written at finalize are missing"):
        RunStore(path)
    meta["attributes"]["digests"] = {"algorithm": "md5", "arrays": {}}
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(RunStoreError, match="attrs digests are malformed"):
        RunStore(path)


# ================================================================ 6. factory resume

SMALLEST = ["train.perturbations=[healthy]", "val.archs=[]", "test.archs=[]", "training.steps=8",
            "training.eval_every=4", "training.batch_size=4", "training.image_size=16", "training.max_train=64",
            "training.max_val=16", "training.lyapunov_windows=0", "capture.cadence=4", "capture.frame_size=8"]


def _generate(out: Path, *extra: str) -> int:
    from factory.generate import main

    return main(["--config", str(ROOT / "configs" / "factory" / "smoke.yaml"), "--out", str(out), *SMALLEST, *extra])


@pytest.mark.slow
def test_factory_resume_redoes_damaged_runs(tmp_path, capsys):
    """Issue: a finished run whose chunk was truncated stayed "complete", and a flipped zarr.json crashed
    the resume with no store named. Both are now redone, with a line naming the store."""
    torch.set_num_threads(1)
    out = tmp_path / "corpus"
    assert _generate(out) == 0
    (store,) = (out / "runs").glob("*.zarr")
    verify_store(store)
    before = RunStore(store).train_loss()

    chunk = _chunk(store, "readouts")
    chunk.write_bytes(chunk.read_bytes()[:10])
    capsys.readouterr()
    assert _generate(out) == 0
    printed = capsys.readouterr().out
    assert f"redoing {store.name[:-5]}: run store {store}: array 'readouts'" in printed, printed
    assert "1 runs (0 already complete" in printed
    assert torch.equal(verify_store(store).train_loss(), before)  # redone, bit-identical

    _flip(store / "frames" / "zarr.json")
    assert _generate(out) == 0  # no crash
    printed = capsys.readouterr().out
    assert f"run store {store}: array 'frames': metadata frames/zarr.json cannot be read" in printed, printed
    verify_store(store)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["complete"]

    assert _generate(out) == 0  # intact now: skipped
    assert "0 runs (1 already complete" in capsys.readouterr().out


# ================================================================ 7. configs

def test_cli_override_of_the_wrong_type_names_the_field(tmp_path):
    """Issue: training.steps=abc gave a TypeError."""
    with pytest.raises(ConfigError, match=r"override 'training.steps=abc': training.steps: expected an integer, got 'abc'"):
        _generate(tmp_path / "c", "training.steps=abc")
    with pytest.raises(ConfigError, match=r"capture.cadence: expected an integer, got 2.5"):
        _generate(tmp_path / "c", "capture.cadence=2.5")
    with pytest.raises(ConfigError, match=r"training.base_lr.sgd: expected a number, got 'fast'"):
        _generate(tmp_path / "c", "training.base_lr.sgd=fast")
    assert not (tmp_path / "c").exists()


def test_cli_out_of_range_is_refused_before_any_run(tmp_path):
    """Issue: training.steps=-5 exited 0 with 7 "complete" runs of 0 frames."""
    for override, message in [("training.steps=-5", r"training.steps: must be >= 1, got -5"),
                              ("training.eval_every=0", r"training.eval_every: must be >= 1"),
                              ("training.warmup_frac=1.5", r"training.warmup_frac: must be in \[0.0, 1.0\]"),
                              ("training.base_lr.sgd=0", r"training.base_lr.sgd: must be > 0"),
                              ("labels.spike_count=0", r"labels.spike_count: must be >= 1")]:
        with pytest.raises(ConfigError, match=message):
            _generate(tmp_path / "c", override)
    assert not (tmp_path / "c").exists()


def test_malformed_yaml_names_the_file(tmp_path):
    """Issue: the error named <unicode string>."""
    from factory.config import FactoryConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  steps: [5\n")
    with pytest.raises(ConfigError, match=rf'(?s){bad}: not valid YAML: .*in "{bad}", line 2') as info:
        load_config(FactoryConfig, bad)
    assert "<unicode string>" not in str(info.value)
    bad.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"{bad}: "):
        load_config(FactoryConfig, bad)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    """Issue: a duplicate key silently took the last value."""
    from factory.config import FactoryConfig

    dup = tmp_path / "dup.yaml"
    dup.write_text("training:\n  steps: 50\n  batch_size: 4\n  steps: 5000\n")
    with pytest.raises(ConfigError, match=r"found duplicate key 'steps' \(first at line 2\)"):
        load_config(FactoryConfig, dup)
    dup.write_text("base: &b {steps: 5}\ntraining:\n  <<: *b\n  steps: 6\n")  # a merge key is meant to be overridden
    with pytest.raises(ConfigError, match="unknown key"):  # (base is not a field) but no duplicate-key error
        load_config(FactoryConfig, dup)


def test_yaml_file_values_are_type_checked_with_file_and_field(tmp_path):
    from factory.config import FactoryConfig

    f = tmp_path / "c.yaml"
    f.write_text("training:\n  steps: 3e-4\n")  # YAML 1.2 float now: refused for an int field
    with pytest.raises(ConfigError, match=rf"{f}: training.steps: expected an integer, got 0.0003"):
        load_config(FactoryConfig, f)
    f.write_text("train:\n  archs: resnet\n")
    with pytest.raises(ConfigError, match=rf"{f}: train.archs: expected list\[str\]|{f}: train.archs: expected list"):
        load_config(FactoryConfig, f)
    f.write_text("labels:\n  lyapunov_margin: [0.1, high]\n")
    with pytest.raises(ConfigError, match=rf"{f}: labels.lyapunov_margin: expected"):
        load_config(FactoryConfig, f)
    f.write_text("training:\n  lr_scale: {alexnet/sgd: 0.2}\n  warmup_frac: 0.1\n")
    cfg = load_config(FactoryConfig, f)
    assert cfg.training.lr_scale == {"alexnet/sgd": 0.2} and cfg.training.warmup_frac == 0.1


# ================================================================ 7. calibration

def _calibration(directory: Path, **changes) -> Path:
    from diagnose.calibrate import Calibration, save_calibration
    from pretrain.clips import CLASSES

    save_calibration(Calibration(list(CLASSES), [0.6, 0.7, 0.8, 0.5], 1.2, 0.4, 3, {"calibrated": True}), directory)
    path = directory / "calibration.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _MISSING:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


_MISSING = object()


@pytest.mark.parametrize("field", ["tau", "temperature", "consecutive", "thresholds", "classes"])
def test_calibration_missing_a_field_is_refused(tmp_path, field):
    """Issue: a calibration.json missing tau silently got 0.35 (shipped: 0.835); temperature and
    consecutive defaulted silently."""
    from diagnose.calibrate import load_calibration

    path = _calibration(tmp_path, **{field: _MISSING})
    with pytest.raises(ConfigError, match=rf"{path}: missing required field\(s\) \['{field}'\]"):
        load_calibration(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"thresholds": ["0.6", "0.7", "0.8", "0.5"]}, r"thresholds\[0\]: expected a number, got '0.6'"),
    ({"tau": None}, r"tau: expected a number, got None"),
    ({"consecutive": 0}, r"consecutive: must be an integer >= 1, got 0"),
    ({"consecutive": 2.5}, r"consecutive: expected an integer, got 2.5"),
    ({"temperature": -1.0}, r"temperature: must be a finite number > 0"),
    ({"tau": 1.5}, r"tau: must be a number in \[0, 1\]"),
    ({"thresholds": [0.6, 0.7, 0.8]}, r"thresholds: must be 4 numbers"),
    ({"thresholds": [0.6, 0.7, 0.8, 7.0]}, r"thresholds\[3\]: must be a number in \[0, 1\]"),
    ({"tau": True}, r"tau: expected a number, got True"),
    ({"extra": 1}, r"unknown key\(s\) \['extra'\]"),
])
def test_calibration_values_are_checked_at_load(tmp_path, change, message):
    """Issue: thresholds as strings, tau null or consecutive 0 loaded; at the first TEViD prediction the
    monitor then disabled itself, rule symptoms included."""
    from diagnose.calibrate import load_calibration

    path = _calibration(tmp_path, **change)
    with pytest.raises(ConfigError, match=rf"{path}: {message}"):
        load_calibration(tmp_path)


def test_calibration_nan_and_broken_json_are_refused(tmp_path):
    from diagnose.calibrate import load_calibration

    path = _calibration(tmp_path)
    path.write_text(path.read_text().replace('"tau": 0.4', '"tau": NaN'))
    with pytest.raises(ConfigError, match="tau: must be a number in"):
        load_calibration(tmp_path)
    _flip(path, every=9)
    with pytest.raises(ConfigError, match=rf"{path}: not a calibration file"):
        load_calibration(tmp_path)


def _tiny_tevid(directory: Path, window=4, calibration: dict | None = None) -> Path:
    from diagnose.tevid import TEViD, TEViDConfig
    from pretrain.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = TEViDConfig(encoder="tiny", encoder_overrides={"depth": 1}, readout_dim=8, hidden_dim=16)
    path = save_checkpoint(directory / "final", model=TEViD(cfg),
                           config={"model": dataclasses.asdict(cfg), "data": {"window": window}}, step=0)
    _calibration(path, **(calibration or {}))
    return path


def test_monitor_with_a_broken_calibration_refuses_at_watch(tmp_path):
    """The error comes when the checkpoint is loaded, naming file and field: not a monitor that switches
    itself off, rules included, at its first TEViD prediction."""
    from diagnose.api import watch

    path = _tiny_tevid(tmp_path, calibration={"tau": None})
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 3))
    with pytest.raises(ConfigError, match=rf"{path / 'calibration.json'}: tau: expected a number, got None"):
        watch(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint=path)


def test_checkpoint_window_is_checked_against_the_encoder(tmp_path):
    from diagnose.tevid import TEViDLoadError, load_tevid

    load_tevid(_tiny_tevid(tmp_path / "w4", window=4))  # a shorter window (the window5 ablation) is valid
    for window in (11, 0, "5", 2.5, None):
        path = _tiny_tevid(tmp_path / f"w{window}", window=window)
        with pytest.raises(TEViDLoadError, match=rf"{path / 'config.json'}: data.window must be an integer in \[1, 10\]"):
            load_tevid(path)
    path = _tiny_tevid(tmp_path / "cls", calibration={"classes": ["healthy", "a", "b"], "thresholds": [0.5, 0.5]})
    with pytest.raises(TEViDLoadError, match=r"3 classes .* for a model of 5"):
        load_tevid(path)


# ================================================================ 6. the shipped model's MANIFEST

@pytest.fixture()
def shipped_copy(tmp_path):
    if not (SHIPPED / "MANIFEST.json").is_file():
        pytest.skip("no shipped model in this checkout")
    return Path(shutil.copytree(SHIPPED, tmp_path / "default_checkpoint"))


def _flip_tensor_bytes(weights: Path) -> None:
    """64 bytes flipped inside the tensor data (past the header): safetensors itself loads the file."""
    b = bytearray(weights.read_bytes())
    for i in range(64):
        b[len(b) // 2 + 97 * i] ^= 0xFF
    weights.write_bytes(bytes(b))
    from safetensors.torch import load_file

    load_file(str(weights))  # still a readable safetensors file: only the digest can tell


def test_flipped_bytes_in_the_shipped_model_are_refused(shipped_copy):
    """Issue: 64 flipped bytes in model.safetensors loaded, and P(healthy) moved."""
    from diagnose.tevid import TEViDLoadError, load_tevid

    weights = shipped_copy / "model.safetensors"
    _flip_tensor_bytes(weights)
    with pytest.raises(TEViDLoadError, match=rf"{weights}: sha256 [0-9a-f]{{64}} does not match .*MANIFEST.json"):
        load_tevid(shipped_copy)


def test_edited_shipped_config_and_manifest_are_refused(shipped_copy):
    """Issue: config.json data.window: 5 for the shipped 10-frame encoder was accepted."""
    from diagnose.tevid import TEViDLoadError, load_tevid

    config = shipped_copy / "config.json"
    data = json.loads(config.read_text())
    data["data"]["window"] = 5
    config.write_text(json.dumps(data, indent=1) + "\n")
    with pytest.raises(TEViDLoadError, match=rf"{config}: \d+ bytes where .*MANIFEST.json records \d+: damaged or changed after shipping"):
        load_tevid(shipped_copy)
    _flip(shipped_copy / "MANIFEST.json")
    with pytest.raises(TEViDLoadError, match=r"MANIFEST.json: unreadable"):
        load_tevid(shipped_copy)


def test_monitor_with_a_damaged_default_model_warns_and_runs_rules_only(shipped_copy, monkeypatch, caplog):
    import diagnose.monitor
    from diagnose.api import watch

    _flip_tensor_bytes(shipped_copy / "model.safetensors")
    monkeypatch.setattr(diagnose.monitor, "DEFAULT_CHECKPOINT", shipped_copy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="tevid"):
        mon = watch(model, opt, cadence=2)
    warned = [r.getMessage() for r in caplog.records if "did not load" in r.getMessage()]
    assert len(warned) == 1 and "model.safetensors" in warned[0] and "rule symptoms only" in warned[0], warned
    assert mon.tevid is None
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    for step in range(8):
        loss = torch.nn.functional.cross_entropy(model(x * (float("nan") if step == 5 else 1.0)), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    mon.remove()
    assert "nan_inf" in [a.name for a in mon.alerts]  # the rules run on


# ================================================================ 8. no code execution from data

def _cifar_folder(tmp_path: Path, batch: bytes, name: str = "data_batch_1") -> Path:
    """cifar-10-batches-py with valid batches except `name`, whose bytes are `batch`."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        (folder / f).write_bytes(_py2_batch(data, [1, 2, 3, 4]))
    (folder / name).write_bytes(batch)
    return folder


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch as Python 2's cPickle wrote the real files: protocol 2, str as (SHORT_)BINSTRING,
    numpy.core.multiarray._reconstruct + BUILD with the raw bytes."""
    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(n: int) -> bytes:
        return b"K" + bytes([n]) if 0 <= n < 256 else b"M" + struct.pack("<H", n) if 0 <= n < 65536 else b"J" + struct.pack("<i", n)

    dtype = b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R" + b"(" + i(3) + s(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + i(0) + b"tb"
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
             + b"(" + i(1) + i(data.shape[0]) + i(data.shape[1]) + b"\x86" + dtype + b"\x89" + s(data.tobytes()) + b"tb")
    items = s(b"batch_label") + s(b"training batch 1 of 5") + s(b"data") + array + s(b"labels") + b"](" + b"".join(i(v) for v in labels) + b"e"
    return b"\x80\x02}(" + items + b"u."


class _Touch:
    """Unpickling this calls open(marker, "w"): the file appears if the pickle is executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class _System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_real_cifar_batch_format_loads(tmp_path):
    from factory.datasets import load_dataset

    folder = _cifar_folder(tmp_path, _py2_batch(np.arange(4 * 3072).astype(np.uint8).reshape(4, 3072), [0, 9, 5, 5]))
    d = load_dataset("cifar10", root=str(folder.parent), image_size=32)
    assert d.x_train.shape == (20, 3, 32, 32) and d.y_train[:4].tolist() == [0, 9, 5, 5]


@pytest.mark.parametrize("make", [
    lambda m: pickle.dumps({b"data": _Touch(m), b"labels": [0]}, protocol=2),
    lambda m: pickle.dumps({b"data": _System(m), b"labels": [0]}),
    lambda m: pickle.dumps(_Touch(m), protocol=0),
])
def test_crafted_cifar_pickle_is_refused_and_never_executed(tmp_path, make):
    """Issue: factory/datasets.py unpickled CIFAR batches from a user path, so a crafted file ran code."""
    from factory.datasets import load_dataset

    marker = tmp_path / "executed"
    folder = _cifar_folder(tmp_path, make(marker))
    with pytest.raises(ValueError, match=rf"{folder / 'data_batch_1'}: not a CIFAR python batch .*is not allowed"):
        load_dataset("cifar10", root=str(folder))
    assert not marker.exists(), "the crafted pickle was executed"


def test_cifar_pickle_with_object_dtypes_is_refused(tmp_path):
    """numpy's own reconstructors are allowed, but not to make object arrays (which unpickle arbitrary
    objects) or dtypes whose state marks raw bytes as object pointers."""
    from factory.datasets import load_dataset

    objects = pickle.dumps({b"data": np.array([1, "x"], dtype=object), b"labels": [0]}, protocol=2)
    folder = _cifar_folder(tmp_path, objects)
    with pytest.raises(ValueError, match=r"not a CIFAR python batch .*(object|not allowed)"):
        load_dataset("cifar10", root=str(folder))
    flagged = _py2_batch(np.zeros((1, 3072), np.uint8), [0]).replace(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
                                                                       b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb")
    folder = _cifar_folder(tmp_path / "flags", flagged)
    with pytest.raises(ValueError, match=r"dtype state .* is not allowed"):
        load_dataset("cifar10", root=str(folder))
    wrong = pickle.dumps({b"data": np.zeros((2, 5), np.float32), b"labels": [0, 1]}, protocol=2)
    folder = _cifar_folder(tmp_path / "shape", wrong)
    with pytest.raises(ValueError, match=r"b'data' must be an \(N, 3072\) uint8 array"):
        load_dataset("cifar10", root=str(folder))
    labels = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=2)
    folder = _cifar_folder(tmp_path / "labels", labels)
    with pytest.raises(ValueError, match=r"b'labels' must be 2 labels in \[0, 10\)"):
        load_dataset("cifar10", root=str(folder))
