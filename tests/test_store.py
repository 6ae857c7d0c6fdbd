"""Run stores: bit-exact round trip, refusal of incomplete/damaged stores, plain-zarr readability."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import zarr

import capture
from capture.readouts import READOUT_NAMES
from capture.recorder import Frame
from capture.store import SHARD_FRAMES, RunStore, RunStoreError, RunWriter, read_privileged

S = 16


def _frames(n):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        f = (torch.randn(6, S, S, generator=g) * 3).to(torch.bfloat16)
        f[0, 0, 0] = float("inf") if i == 1 else f[0, 0, 0]  # odd bit patterns must survive too
        r = {k: float(i + j / 10) for j, k in enumerate(READOUT_NAMES)}
        r["gwa"] = math.nan
        out.append(Frame(step=10 * i, frame=f, readouts=r))
    return out


def _write(path, n=SHARD_FRAMES + 5, **attrs):
    frames = _frames(n)
    w = RunWriter(path, S, spec={"arch": "resnet", "seed": 3})
    for f in frames:
        w.append_frame(f)
    w.append_steps([0.5] * (10 * n), [0.1] * (10 * n))
    w.write_privileged("val_acc", np.linspace(0, 1, n))
    w.finalize(label="healthy", onset_step=0, trigger_step=None, **attrs)
    return frames


def test_round_trip_is_bit_exact(tmp_path):
    path = tmp_path / "run.zarr"
    frames = _write(path)
    store = RunStore(path)
    assert len(store) == len(frames) and store.frame_size == S
    got = store.frames()
    assert got.dtype == torch.bfloat16
    expected = torch.stack([f.frame for f in frames])
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))  # bit-exact, inf included
    assert store.frame_step().tolist() == [f.step for f in frames]
    r = store.readouts()
    assert r.shape == (len(frames), len(READOUT_NAMES)) and store.readout_names == list(READOUT_NAMES)
    assert torch.isnan(r[:, READOUT_NAMES.index("gwa")]).all()
    assert r[3, 0].item() == pytest.approx(3.0)
    assert len(store.train_loss()) == len(store.lr()) == 10 * len(frames)
    assert store.spec == {"arch": "resnet", "seed": 3} and store.attrs["label"] == "healthy"
    assert torch.equal(store.frames(2, 4).view(torch.int16), expected[2:4].view(torch.int16))
    assert "privileged" not in dir(store)
    np.testing.assert_allclose(read_privileged(path)["val_acc"], np.linspace(0, 1, len(frames)))


def test_store_opens_with_plain_zarr(tmp_path):
    path = tmp_path / "run.zarr"
    frames = _write(path)
    root = zarr.open_group(str(path), mode="r")  # no project code from here on
    assert root.attrs["frames_dtype"] == "bfloat16" and root.attrs["complete"] is True
    bits = root["frames"][:]
    as_f32 = (bits.astype(np.uint32) << 16).view(np.float32)  # the documented decoding
    np.testing.assert_array_equal(as_f32, torch.stack([f.frame for f in frames]).float().numpy())
    names = root.attrs["readout_names"]
    assert root["readouts"][:].shape == (len(frames), len(names))
    assert root["privileged/val_acc"].shape == (len(frames),)


def test_unfinished_store_is_refused(tmp_path):
    path = tmp_path / "run.zarr"
    w = RunWriter(path, S)
    for f in _frames(3):
        w.append_frame(f)
    w._flush_frames()  # data on disk, but never finalized: as after a kill
    assert not path.exists(), "an unfinished run must not appear under its final name"
    with pytest.raises(RunStoreError, match=r"unfinished run"):
        RunStore(w.tmp)
    with pytest.raises(RunStoreError, match="does not exist"):
        RunStore(path)
    shutil.copytree(w.tmp, path)  # even copied under the final name, it says it is incomplete
    with pytest.raises(RunStoreError, match=f"{path}.*incomplete"):
        RunStore(path)


def test_writer_context_removes_temporary_store_on_error(tmp_path):
    path = tmp_path / "run.zarr"
    with pytest.raises(RuntimeError):
        with RunWriter(path, S) as w:
            w.append_frame(_frames(1)[0])
            raise RuntimeError("training crashed")
    assert not path.exists() and not w.tmp.exists()


def test_truncated_store_is_refused(tmp_path):
    path = tmp_path / "run.zarr"
    _write(path)
    shard = next(p for p in (path / "frames" / "c").rglob("*") if p.is_file())
    shard.unlink()
    with pytest.raises(RunStoreError, match=r"'frames' has 1 of its 2 chunk files"):
        RunStore(path)


@pytest.mark.parametrize("edit,message", [
    (lambda a: a.update(tevid_layout=99), "layout version 99"),
    (lambda a: a.update(frames_dtype="float16"), "frames_dtype"),
    (lambda a: a.update(n_frames=3), "truncated"),
    (lambda a: a.update(complete=False), "incomplete"),
])
def test_wrong_layout_is_refused(tmp_path, edit, message):
    path = tmp_path / "run.zarr"
    _write(path, n=4)
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    edit(meta["attributes"])
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(RunStoreError, match=message):
        RunStore(path)


def test_wrong_shape_or_dtype_is_refused(tmp_path):
    path = tmp_path / "run.zarr"
    _write(path, n=4)
    root = zarr.open_group(str(path), mode="r+")
    del root["frames"]
    root.create_array("frames", shape=(4, 3, S, S), dtype="uint16")
    with pytest.raises(RunStoreError, match=r"frames have shape \(4, 3, 16, 16\)"):
        RunStore(path)
    del root["frames"]
    root.create_array("frames", shape=(4, 6, S, S), dtype="float32")
    with pytest.raises(RunStoreError, match="dtype float32"):
        RunStore(path)


def test_existing_store_is_not_overwritten_by_accident(tmp_path):
    path = tmp_path / "run.zarr"
    _write(path, n=2)
    with pytest.raises(FileExistsError):
        RunWriter(path, S)


def test_capture_streams_into_a_store(tmp_path):
    from zoo import IMAGE_FAMILIES
    import torch.nn.functional as F

    model = IMAGE_FAMILIES["resnet"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "run.zarr"
    writer = RunWriter(path, S)
    with capture.attach(model, cadence=3, frame_size=S, optimizer=opt, sink=writer) as cap:
        for _ in range(10):
            loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
            loss.backward()
            cap.step(loss)
            opt.step()
            opt.zero_grad()
    writer.finalize(capture=cap.metadata())
    store = RunStore(path)
    assert store.frame_step().tolist() == [0, 3, 6, 9]
    assert len(store.train_loss()) == 10 and torch.allclose(store.lr(), torch.full((10,), 0.01))
    assert store.attrs["capture"]["projection"]["kind"] == "mean"
    assert store.readouts()[:, READOUT_NAMES.index("loss")].tolist() == pytest.approx(store.train_loss()[[0, 3, 6, 9]].tolist())
