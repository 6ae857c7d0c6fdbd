"""Run stores: one zarr v3 store per training run (DESIGN.md §5; layout in docs/run-store.md).

    <run_id>.zarr/                  attrs: tevid_layout, complete, spec, label, onset_step, ...
        frames      (T, 6, S, S)  uint16 = bfloat16 bit patterns (attrs frames_dtype), zstd,
                                  chunks of 16 frames in shards of 64
        frame_step  (T,)          int64   optimizer step of each frame
        readouts    (T, R)        float32 names in attrs readout_names; NaN = missing
        train_loss  (N,)          float32 every optimizer step
        lr          (N,)          float32 every optimizer step
        <extra>     (T,)          float32 optional per-frame arrays, names in attrs frame_arrays
                                  (e.g. hessian_top: capture.hessian); NaN = not computed at that frame
        privileged/               validation metrics etc.: labeling and evaluation only

A writer builds the store under `<run_id>.zarr.tmp-<pid>` and renames it only after `finalize()`,
so a killed run never leaves a store that looks complete. `RunStore` refuses, naming the path
and the problem, anything incomplete, of another layout version, or of the wrong shape/dtype.
zarr 3.1 has no bfloat16 data type, so frames are stored as their uint16 bit patterns; this is
lossless and readable with plain numpy: `(u16.astype(np.uint32) << 16).view(np.float32)`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from capture.frames import CHANNELS
from capture.readouts import READOUT_NAMES
from capture.recorder import Frame

LAYOUT_VERSION = 1
FRAMES_DTYPE = "bfloat16"
SHARD_FRAMES = 64  # frames per shard file
CHUNK_FRAMES = 16  # frames per compressed chunk inside a shard (1-frame chunks write ~5x slower)
STEP_CHUNK = 4096
PUBLIC_ARRAYS = ("frames", "frame_step", "readouts", "train_loss", "lr")
RESERVED = (*PUBLIC_ARRAYS, "privileged")


class RunStoreError(ValueError):
    pass


def bf16_to_bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def bits_to_bf16(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


class RunWriter:
    """Streams frames of one run into a temporary store; `finalize()` publishes it.

    Usable as the `sink` of `capture.attach`. Frames are buffered and written a whole shard at a
    time (a partial shard write would rewrite the shard). The small per-frame and per-step arrays
    (steps, readouts, loss, lr: a few bytes each) stay in memory until `finalize()`.
    """

    def __init__(self, path: str | os.PathLike, frame_size: int, spec: dict | None = None, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"run store {self.path} already exists (pass overwrite=True to replace it)")
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.overwrite = overwrite
        self.size = frame_size
        self.root = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        s, r = frame_size, len(READOUT_NAMES)
        # Every chunk is written, even all-fill ones, so a missing chunk file always means truncation.
        # write_empty_chunks is a setting of the array object, not stored: write through these objects
        # (an array reopened by name would skip all-fill chunks, e.g. a lone frame at step 0).
        full = {"write_empty_chunks": True}
        self._z = {
            "frames": self.root.create_array("frames", shape=(0, 6, s, s), chunks=(CHUNK_FRAMES, 6, s, s), shards=(SHARD_FRAMES, 6, s, s), dtype="uint16", config=full),
            "frame_step": self.root.create_array("frame_step", shape=(0,), chunks=(STEP_CHUNK,), dtype="int64", config=full),
            "readouts": self.root.create_array("readouts", shape=(0, r), chunks=(STEP_CHUNK, r), dtype="float32", fill_value=np.nan, config=full),
            "train_loss": self.root.create_array("train_loss", shape=(0,), chunks=(STEP_CHUNK,), dtype="float32", fill_value=np.nan, config=full),
            "lr": self.root.create_array("lr", shape=(0,), chunks=(STEP_CHUNK,), dtype="float32", fill_value=np.nan, config=full),
        }
        self.root.attrs.update({
            "tevid_layout": LAYOUT_VERSION,
            "complete": False,
            "frames_dtype": FRAMES_DTYPE,
            "frame_channels": list(CHANNELS),
            "readout_names": list(READOUT_NAMES),
            "spec": _jsonable(spec or {}),
        })
        self._frames: list[Frame] = []  # not yet written
        self._steps: list[int] = []
        self._readouts: list[list[float]] = []
        self._loss: list[float] = []
        self._lr: list[float] = []
        self._frame_arrays: dict[str, np.ndarray] = {}
        self.n_frames = 0
        self.closed = False

    # -------------------------------------------------------------- Sink protocol
    def append_frame(self, frame: Frame) -> None:
        if tuple(frame.frame.shape) != (6, self.size, self.size):
            raise RunStoreError(f"{self.tmp}: frame of shape {tuple(frame.frame.shape)}, store holds (6, {self.size}, {self.size})")
        self._frames.append(frame)
        self._steps.append(int(frame.step))
        self._readouts.append([frame.readouts.get(k, np.nan) for k in READOUT_NAMES])
        if len(self._frames) >= SHARD_FRAMES:
            self._flush_frames()

    def append_steps(self, loss: list[float], lr: list[float]) -> None:
        self._loss += loss
        self._lr += lr

    @property
    def train_loss(self) -> np.ndarray:
        """Per-step losses received so far."""
        return np.asarray(self._loss, dtype=np.float64)

    @property
    def frame_steps(self) -> np.ndarray:
        return np.asarray(self._steps, dtype=np.int64)

    @property
    def frame_readouts(self) -> np.ndarray:
        """`(frames so far, R)` in the order of `READOUT_NAMES`."""
        return np.asarray(self._readouts, dtype=np.float64).reshape(-1, len(READOUT_NAMES))

    # -------------------------------------------------------------- writing
    def _flush_frames(self) -> None:
        if not self._frames:
            return
        frames = bf16_to_bits(torch.stack([f.frame for f in self._frames]))  # (n, 6, S, S) uint16
        self._z["frames"].append(frames)
        self.n_frames += len(self._frames)
        self._frames = []

    def _write_small_arrays(self) -> None:
        self._z["frame_step"].append(np.asarray(self._steps, dtype=np.int64))
        self._z["readouts"].append(np.asarray(self._readouts, dtype=np.float32).reshape(-1, len(READOUT_NAMES)))
        self._z["train_loss"].append(np.asarray(self._loss, dtype=np.float32))
        self._z["lr"].append(np.asarray(self._lr, dtype=np.float32))

    def set_frame_array(self, name: str, values: Any) -> None:
        """A public float32 value per frame (NaN = none at that frame), written at `finalize()`, which
        checks that it has one value per frame. Only model/training-batch quantities belong here:
        validation metrics and optimizer internals go to `write_privileged`."""
        if name in RESERVED or not name.isidentifier():
            raise RunStoreError(f"{self.tmp}: {name!r} cannot name a per-frame array (reserved: {RESERVED})")
        arr = np.asarray(values, dtype=np.float32)
        if arr.ndim != 1:
            raise RunStoreError(f"{self.tmp}: per-frame array {name!r} has shape {arr.shape}, expected (n_frames,)")
        self._frame_arrays[name] = arr

    def _write_frame_arrays(self) -> None:
        for name, arr in self._frame_arrays.items():
            if len(arr) != self.n_frames:
                raise RunStoreError(f"{self.tmp}: per-frame array {name!r} has {len(arr)} values for {self.n_frames} frames")
            z = self.root.create_array(name, shape=(0,), chunks=(STEP_CHUNK,), dtype="float32", fill_value=np.nan,
                                       config={"write_empty_chunks": True})
            z.append(arr)  # through this object: an all-NaN chunk is written too
        self.root.attrs["frame_arrays"] = sorted(self._frame_arrays)

    def write_privileged(self, name: str, values: Any, attrs: dict | None = None) -> None:
        """Validation metrics, optimizer internals, ...: only for labeling and evaluation."""
        group = self.root.require_group("privileged")
        arr = np.asarray(values)
        group.create_array(name, data=arr, overwrite=True)
        if attrs:
            group[name].attrs.update(_jsonable(attrs))

    def finalize(self, **attrs: Any) -> Path:
        """Flush, record `attrs` (label, onset_step, capture metadata, ...), mark complete, publish."""
        self._flush_frames()
        self._write_small_arrays()
        self._write_frame_arrays()
        self.root.attrs.update(_jsonable(attrs))
        self.root.attrs["n_frames"] = self.n_frames
        self.root.attrs["complete"] = True  # written last; the rename below is the commit point
        if self.path.exists() and self.overwrite:
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        self.closed = True
        return self.path

    def abort(self) -> None:
        self.closed = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if not self.closed and exc_type is not None:
            self.abort()


class RunStore:
    """Read a complete run store; arrays come back as torch tensors. Privileged data is not reachable
    from here (see `read_privileged`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._root = self._open_checked()

    def _fail(self, problem: str) -> RunStoreError:
        return RunStoreError(f"run store {self.path}: {problem}")

    def _open_checked(self) -> zarr.Group:
        if ".tmp-" in self.path.name:
            raise self._fail("is a temporary store of an unfinished run (never finalized)")
        if not self.path.is_dir():
            raise self._fail("does not exist or is not a directory")
        if not (self.path / "zarr.json").is_file():
            raise self._fail("has no zarr.json: not a zarr v3 store, or truncated")
        try:
            root = zarr.open_group(str(self.path), mode="r")
        except Exception as err:  # noqa: BLE001
            raise self._fail(f"cannot be opened by zarr ({type(err).__name__}: {err})") from err
        attrs = dict(root.attrs)
        if attrs.get("tevid_layout") != LAYOUT_VERSION:
            raise self._fail(f"layout version {attrs.get('tevid_layout')!r}, this reader expects {LAYOUT_VERSION}")
        if attrs.get("complete") is not True:
            raise self._fail("is incomplete (attribute complete is not true): the run did not finish writing")
        if attrs.get("frames_dtype") != FRAMES_DTYPE:
            raise self._fail(f"frames_dtype {attrs.get('frames_dtype')!r}, expected {FRAMES_DTYPE!r}")
        for key in PUBLIC_ARRAYS:  # by path: listing the group's members would open privileged/zarr.json
            if not (self.path / key / "zarr.json").is_file():
                raise self._fail(f"array {key!r} is missing")
        frames, steps, readouts = root["frames"], root["frame_step"], root["readouts"]
        if frames.ndim != 4 or frames.shape[1] != 6 or frames.shape[2] != frames.shape[3]:
            raise self._fail(f"frames have shape {frames.shape}, expected (T, 6, S, S)")
        if frames.dtype != np.uint16:
            raise self._fail(f"frames have dtype {frames.dtype}, expected uint16 bfloat16 bit patterns")
        t = frames.shape[0]
        n_readouts = len(attrs.get("readout_names", []))
        if steps.shape != (t,):
            raise self._fail(f"frame_step has shape {steps.shape}, expected ({t},) to match frames")
        if readouts.shape != (t, n_readouts):
            raise self._fail(f"readouts have shape {readouts.shape}, expected ({t}, {n_readouts})")
        if attrs.get("n_frames") != t:
            raise self._fail(f"holds {t} frames but recorded n_frames={attrs.get('n_frames')}: truncated")
        if root["train_loss"].shape != root["lr"].shape:
            raise self._fail(f"train_loss {root['train_loss'].shape} and lr {root['lr'].shape} differ in length")
        extra = attrs.get("frame_arrays", [])
        for key in extra:
            if key in RESERVED or not (self.path / key / "zarr.json").is_file():
                raise self._fail(f"per-frame array {key!r} (listed in attrs frame_arrays) is missing")
            if root[key].shape != (t,):
                raise self._fail(f"per-frame array {key!r} has shape {root[key].shape}, expected ({t},) to match frames")
        for key in (*PUBLIC_ARRAYS, *extra):
            arr = root[key]
            block = arr.shards or arr.chunks
            expected = -(-arr.shape[0] // block[0]) if arr.shape[0] else 0
            found = sum(1 for f in (self.path / key / "c").rglob("*") if f.is_file()) if expected else 0
            if found != expected:
                raise self._fail(f"array {key!r} has {found} of its {expected} chunk files: truncated or damaged")
        return root

    @property
    def attrs(self) -> dict:
        return dict(self._root.attrs)

    def __len__(self) -> int:
        return self._root["frames"].shape[0]

    @property
    def frame_size(self) -> int:
        return self._root["frames"].shape[-1]

    @property
    def readout_names(self) -> list[str]:
        return list(self._root.attrs["readout_names"])

    def frames(self, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """`(T, 6, S, S)` bfloat16."""
        try:
            return bits_to_bf16(self._root["frames"][start:stop])
        except Exception as err:  # noqa: BLE001 - a missing/corrupt chunk file
            raise self._fail(f"frames could not be read ({type(err).__name__}: {err})") from err

    def frame_step(self) -> torch.Tensor:
        return torch.from_numpy(self._root["frame_step"][:])

    def readouts(self) -> torch.Tensor:
        """`(T, R)` float32 in the order of `readout_names`."""
        return torch.from_numpy(self._root["readouts"][:])

    def train_loss(self) -> torch.Tensor:
        return torch.from_numpy(self._root["train_loss"][:])

    def lr(self) -> torch.Tensor:
        return torch.from_numpy(self._root["lr"][:])

    @property
    def frame_array_names(self) -> list[str]:
        """Names of the optional public per-frame arrays this run has (e.g. `hessian_top`)."""
        return list(self._root.attrs.get("frame_arrays", []))

    def frame_array(self, name: str) -> torch.Tensor:
        """`(T,)` float32 optional per-frame array (NaN where not computed)."""
        if name not in self.frame_array_names:
            raise self._fail(f"has no per-frame array {name!r} (it has {self.frame_array_names or 'none'})")
        return torch.from_numpy(self._root[name][:])

    @property
    def spec(self) -> dict:
        return dict(self._root.attrs.get("spec", {}))


def _privileged_group(path: str | os.PathLike) -> zarr.Group | None:
    """The privileged group of a complete store (read-only), or None when it has none."""
    root = zarr.open_group(str(RunStore(path).path), mode="r")
    return root["privileged"] if "privileged" in list(root.group_keys()) else None


def read_privileged(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Labeling and evaluation only: the privileged group of a complete store, as numpy arrays."""
    group = _privileged_group(path)
    return {} if group is None else {k: group[k][...] for k in group.array_keys()}


def read_labeling(path: str | os.PathLike) -> dict:
    """Labeling and evaluation only: the rules' results the labeler stored with a complete run
    (`privileged/labeling` attrs: per rule fired, trigger step and statistics); {} when absent."""
    group = _privileged_group(path)
    if group is None or "labeling" not in list(group.array_keys()):
        return {}
    return dict(group["labeling"].attrs.get("rules", {}))
