"""Per-map levels and spatial patterns (issue 19): what they hold, checked against plain-torch references
on tiny models with known hook points; their round trip through a run store, its digests, and stores
written before they existed."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zarr

import capture
from capture.relative import interval_losses
from capture.frames import LEVEL_FLOOR, map_summary, resize_pattern, summarise_maps
from capture.readouts import READOUT_NAMES
from capture.recorder import Frame
from capture.store import RunStore, RunStoreError, RunWriter, verify_store

P = 8
G = 8  # channel groups


class Convs(nn.Module):
    """Three conv stages at 16x16, 8x8 and 4x4 (native maps larger than, equal to and smaller than P), a head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.c = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = self.c(F.relu(self.b(F.relu(self.a(x)))))
        return self.head(F.relu(h).mean(dim=(2, 3)))


def _native_reference(t: torch.Tensor) -> torch.Tensor:
    """Plain torch: (B, C, H, W) -> channel-group RMS -> mean over groups (the default projection) -> batch mean."""
    b, c, h, w = t.shape
    return t.reshape(b, G, c // G, h, w).pow(2).mean(2).sqrt().mean(1).mean(0).double()


def _standardised(m: torch.Tensor) -> torch.Tensor:
    return (m - m.mean()) / m.std(correction=0)


def _capture_one_step(model, x, loss_fn, **options):
    """One training step with capture at step 0; returns the frame, the capture, and the hooked tensors
    (activations, then gradients) recorded by hooks of our own on the same modules."""
    seen: dict[str, torch.Tensor] = {}
    cap = capture.attach(model, cadence=1, frame_size=16, pattern_size=P, **options)
    handles = []
    for i, p in enumerate(cap.points):
        def hook(module, args, out, i=i):
            seen[f"act{i}"] = out.detach().clone()
            out.register_hook(lambda g: seen.__setitem__(f"grad{i}", g.detach().clone()))
        handles.append(p.module.register_forward_hook(hook))
    loss = loss_fn(model(x))
    loss.backward()
    frame = cap.step(loss)
    cap.remove()
    for h in handles:
        h.remove()
    return frame, cap, [seen[f"act{i}"] for i in range(3)] + [seen[f"grad{i}"] for i in range(3)]


def test_levels_and_patterns_match_plain_torch_on_a_conv_net():
    torch.manual_seed(0)
    model = Convs()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    frame, cap, tensors = _capture_one_step(model, x, lambda out: F.cross_entropy(out, y), modules=["a", "b", "c"])
    assert not cap.faults
    assert frame.levels.shape == (6,) and frame.levels.dtype == torch.float32
    assert frame.patterns.shape == (6, P, P) and frame.patterns.dtype == torch.bfloat16
    natives = [_native_reference(t) for t in tensors]
    want = torch.stack([m.pow(2).mean().sqrt().log10() for m in natives])
    torch.testing.assert_close(frame.levels.double(), want, atol=1e-5, rtol=0)
    assert cap.metadata()["summaries"]["native_hw"] == [[16, 16], [8, 8], [4, 4]] * 2
    for c, m in enumerate(natives):
        z = _standardised(m)
        assert abs(z.mean()) < 1e-9 and abs(z.std(correction=0) - 1) < 1e-9
        pattern = frame.patterns[c].double()
        if m.shape == (P, P):  # native at P: the pattern is the standardised map itself (to bf16 precision)
            torch.testing.assert_close(pattern, z, atol=0.02, rtol=2 ** -7)
            assert abs(pattern.mean()) < 0.01 and abs(pattern.std(correction=0) - 1) < 0.01
        torch.testing.assert_close(pattern, resize_pattern(z, P), atol=0.02, rtol=2 ** -7)


@pytest.mark.filterwarnings("ignore:the loss on the head's output is not a softmax loss")
def test_scaling_the_input_moves_levels_by_one_decade_and_leaves_patterns():
    """A bias-free ReLU MLP is homogeneous: x -> 10x scales every activation by 10, and with a squared loss
    every gradient too. The maps scale by 10 (RMS, mean projection and batch mean are all homogeneous), so
    each level moves by log10(10) = 1 and the standardised patterns do not move."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 30, bias=False), nn.ReLU(), nn.Linear(30, 30, bias=False), nn.ReLU(),
                          nn.Linear(30, 30, bias=False), nn.ReLU(), nn.Linear(30, 3, bias=False))
    x = torch.randn(16, 12)
    options = dict(modules=["0", "2", "4"], head=model[6])
    a, cap, _ = _capture_one_step(model, x, lambda out: out.pow(2).mean(), **options)
    b, _, _ = _capture_one_step(model, 10 * x, lambda out: out.pow(2).mean(), **options)
    # 30 features on a 6x6 grid: 30 data cells, 6 cells of to_grid's padding
    assert cap.metadata()["summaries"]["native_hw"] == [[6, 6]] * 6
    assert cap.metadata()["summaries"]["native_cells"] == [30] * 6
    torch.testing.assert_close(b.levels - a.levels, torch.ones(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.patterns.float(), a.patterns.float(), atol=0.02, rtol=2 ** -7)
    assert not torch.equal(a.levels[:3], a.levels[3:])  # activations and gradients sit at other levels


def test_padding_cells_neither_count_in_the_level_nor_mark_the_pattern():
    torch.manual_seed(2)
    m = torch.zeros(4, 4)
    m.view(-1)[:10] = torch.rand(10) + 1.0  # 10 data cells; the last 6 are to_grid's zero padding
    level, pattern = map_summary(m, P, cells=10)
    data = m.reshape(-1)[:10].double()
    assert level == pytest.approx(data.pow(2).mean().sqrt().log10().item(), abs=1e-6)
    z = torch.zeros(16, dtype=torch.float64)
    z[:10] = _standardised(data)
    torch.testing.assert_close(pattern.double(), resize_pattern(z.reshape(4, 4), P), atol=1e-6, rtol=1e-6)
    padded_level, _ = map_summary(m, P)  # counting the padding as data would lower the level
    assert padded_level < level - 0.05


def test_zero_constant_and_missing_maps():
    levels, patterns = summarise_maps([torch.zeros(4, 4), torch.full((3, 5), 7.0), None, torch.ones(1, 1),
                                       torch.randn(4, 4), torch.randn(2, 2) * 1e-30], P, [None, None, None, None, 0, None])
    assert levels[0] == LEVEL_FLOOR and not torch.isinf(levels).any()  # a zero map: the floor, not -inf
    assert levels[1].item() == pytest.approx(math.log10(7.0), abs=1e-6)
    assert math.isnan(levels[2]) and math.isnan(levels[4])  # None, and a map without data cells
    assert levels[3] == 0.0
    assert levels[5] == LEVEL_FLOOR  # RMS below 1e-30: floored
    assert torch.all(patterns[:5] == 0)  # zero, constant, missing, 1x1, no data cells
    assert patterns[5].abs().max() > 0.5  # a tiny map still has a pattern: its scale is in the level only


def test_overflowed_map_gives_a_finite_level_and_pattern():
    m = torch.tensor([[float("inf"), 1.0], [0.0, float("nan")]])
    level, pattern = map_summary(m, P)
    assert math.isfinite(level) and 38 < level < 38.6 and torch.isfinite(pattern).all()


def test_small_maps_upsample_without_blocks_or_flat_borders():
    """2x2 -> 8x8: every step along a row or column changes the value (nearest neighbour would repeat
    each value 4 times, align_corners=False would copy the edge cells into flat borders), the corners
    are the native cells and nothing overshoots them."""
    m = torch.tensor([[0.0, 1.0], [3.0, -2.0]])
    z = _standardised(m.double())
    _, pattern = map_summary(m, P)
    pattern = pattern.double()
    assert (pattern.diff(dim=0).abs() > 1e-3).all() and (pattern.diff(dim=1).abs() > 1e-3).all()
    torch.testing.assert_close(pattern[[0, 0, -1, -1], [0, -1, 0, -1]], z.reshape(-1), atol=1e-6, rtol=0)
    assert pattern.min() >= z.min() - 1e-9 and pattern.max() <= z.max() + 1e-9
    nearest = F.interpolate(z[None, None], size=(P, P), mode="nearest")[0, 0]
    assert (nearest.diff(dim=1) == 0).any()  # what the chosen resize avoids


def test_large_maps_downsample_by_averaging():
    """32 -> 8: antialiased, so a checkerboard (the highest frequency) averages out instead of aliasing."""
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2.0 - 1.0
    ramp = torch.linspace(-1, 1, 32)[:, None].expand(32, 32)
    _, pattern = map_summary(checker + 1e-3 * ramp, P)
    assert pattern.abs().max() < 0.2  # subsampling would return the checkerboard's +-1 at full amplitude


def test_released_frames_summarise_the_released_maps():
    """DP telemetry: the frame's levels come from whatever `release` returns (here the batch means x 2)."""
    torch.manual_seed(3)
    model = Convs()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))

    def release(ps):
        return [None if m is None else 2 * m.mean(0) for m in ps.maps], {}

    opts = dict(modules=["a", "b", "c"], gwa_window="step")
    plain, _, _ = _capture_one_step(model, x, lambda out: F.cross_entropy(out, y), **opts)
    released, _, _ = _capture_one_step(model, x, lambda out: F.cross_entropy(out, y), release=release, **opts)
    torch.testing.assert_close(released.levels - plain.levels, torch.full((6,), math.log10(2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(released.patterns.float(), plain.patterns.float(), atol=0.02, rtol=2 ** -7)


def test_a_step_without_backward_has_missing_gradient_levels():
    model = Convs()
    cap = capture.attach(model, cadence=1, frame_size=16, pattern_size=P, modules=["a", "b", "c"])
    with pytest.warns(RuntimeWarning, match="no capture"):
        frame = cap.step(model(torch.randn(2, 3, 16, 16)).sum())
    cap.remove()
    assert torch.isfinite(frame.levels[:3]).all() and torch.isnan(frame.levels[3:]).all()
    assert torch.all(frame.patterns[3:] == 0) and frame.patterns[:3].float().abs().max() > 0.5


# ---------------------------------------------------------------- run stores

def _frames(n: int, p: int = P) -> list[Frame]:
    g = torch.Generator().manual_seed(0)
    return [Frame(step=i, frame=torch.randn(6, 4, 4, generator=g).to(torch.bfloat16),
                  readouts={k: float(i) for k in READOUT_NAMES},
                  levels=torch.randn(6, generator=g) * 3, patterns=torch.randn(6, p, p, generator=g).to(torch.bfloat16))
            for i in range(n)]


def _write(path, frames, **kw):
    w = RunWriter(path, 4, **kw)
    for f in frames:
        w.append_frame(f)
    w.append_steps([0.5] * len(frames), [0.1] * len(frames))
    return w.finalize(label="healthy")


def test_store_round_trip_of_levels_and_patterns(tmp_path):
    frames = _frames(70)  # a full shard of 64 and a partial one
    frames[5].levels[2] = float("nan")
    store = RunStore(_write(tmp_path / "run.zarr", frames))
    assert store.verified and store.has_summaries and store.pattern_size == P
    assert store.attrs["tevid_layout"] == 2 and store.attrs["patterns_dtype"] == "bfloat16"
    levels = store.levels()
    assert levels.dtype == torch.float32 and levels.shape == (70, 6)
    torch.testing.assert_close(levels, torch.stack([f.levels for f in frames]), equal_nan=True, atol=0, rtol=0)
    patterns = store.patterns()
    assert patterns.dtype == torch.bfloat16 and patterns.shape == (70, 6, P, P)
    want = torch.stack([f.patterns for f in frames])
    assert torch.equal(patterns.view(torch.int16), want.view(torch.int16))  # bit-exact
    assert torch.equal(store.patterns(60, 66).view(torch.int16), want[60:66].view(torch.int16))
    root = zarr.open_group(str(store.path), mode="r")  # plain zarr reads them, as the docstring says
    np.testing.assert_array_equal((root["patterns"][:].astype(np.uint32) << 16).view(np.float32), want.float().numpy())


def test_capture_streams_levels_and_patterns_into_a_store(tmp_path):
    model = Convs()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = RunWriter(tmp_path / "run.zarr", 16)  # P from the frames
    emitted = []
    with capture.attach(model, cadence=2, frame_size=16, pattern_size=6, optimizer=opt, sink=writer) as cap:
        for _ in range(5):
            loss = F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 5, (4,)))
            loss.backward()
            frame = cap.step(loss)
            emitted += [frame] if frame is not None else []
            opt.step()
            opt.zero_grad()
    store = RunStore(writer.finalize(capture=cap.metadata()))
    assert store.pattern_size == 6 and len(emitted) == 3
    assert torch.equal(store.levels(), torch.stack([f.levels for f in emitted])) and torch.isfinite(store.levels()).all()
    assert torch.equal(store.patterns().view(torch.int16), torch.stack([f.patterns for f in emitted]).view(torch.int16))
    assert store.attrs["capture"]["summaries"]["native_hw"][2] == [4, 4]
    # each frame carries its steps' losses (the monitor's step-loss features): the store's, cut at the frames
    between = interval_losses(store.train_loss(), store.frame_step())
    assert [len(f.step_losses) for f in emitted] == [1, 2, 2]
    assert all(torch.allclose(torch.tensor(f.step_losses), b) for f, b in zip(emitted, between))


def test_frames_without_levels_are_stored_as_missing_maps(tmp_path):
    frames = [Frame(step=i, frame=torch.zeros(6, 4, 4, dtype=torch.bfloat16), readouts={}) for i in range(3)]
    store = RunStore(_write(tmp_path / "run.zarr", frames))
    assert torch.isnan(store.levels()).all() and store.pattern_size == P
    assert torch.all(store.patterns().float() == 0)


def test_wrong_pattern_shape_is_refused(tmp_path):
    w = RunWriter(tmp_path / "run.zarr", 4, pattern_size=6)
    with pytest.raises(RunStoreError, match=r"patterns of shape \(6, 8, 8\), store holds \(6, 6, 6\)"):
        w.append_frame(_frames(1)[0])
    w.abort()


@pytest.mark.parametrize("array", ["levels", "patterns"])
def test_tampered_levels_or_patterns_chunk_is_refused(tmp_path, array):
    path = _write(tmp_path / "run.zarr", _frames(10))
    chunk = sorted(p for p in (path / array / "c").rglob("*") if p.is_file())[0]
    b = bytearray(chunk.read_bytes())
    b[len(b) // 2] ^= 0x01
    chunk.write_bytes(bytes(b))
    with pytest.raises(RunStoreError, match=rf"{path}: array '{array}': .* does not match its sha256 digest"):
        RunStore(path)
    with pytest.raises(RunStoreError, match=f"'{array}'"):
        verify_store(path)


def test_layout_2_store_without_patterns_is_refused(tmp_path):
    path = _write(tmp_path / "run.zarr", _frames(3))
    shutil.rmtree(path / "patterns")
    with pytest.raises(RunStoreError, match=r"array 'patterns' is missing"):
        RunStore(path)


def _as_layout_1(path):
    """The store as RunWriter wrote it before levels and patterns existed (layout 1)."""
    shutil.rmtree(path / "levels")
    shutil.rmtree(path / "patterns")
    meta = json.loads((path / "zarr.json").read_text())
    attrs = meta["attributes"]
    attrs["tevid_layout"] = 1
    del attrs["patterns_dtype"]
    for key in ("levels", "patterns"):
        del attrs["digests"]["arrays"][key]
    (path / "zarr.json").write_text(json.dumps(meta))


def test_old_store_opens_and_names_what_it_lacks(tmp_path):
    frames = _frames(5)
    path = _write(tmp_path / "run.zarr", frames)
    _as_layout_1(path)
    store = verify_store(path)
    assert store.verified and not store.has_summaries and store.pattern_size is None
    assert torch.equal(store.frames().view(torch.int16), torch.stack([f.frame for f in frames]).view(torch.int16))
    with pytest.raises(RunStoreError, match=rf"run store {path}: has no array 'levels': layout 1"):
        store.levels()
    with pytest.raises(RunStoreError, match=rf"run store {path}: has no array 'patterns': layout 1"):
        store.patterns()
