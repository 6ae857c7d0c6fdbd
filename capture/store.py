"""Run stores: one zarr v3 store per training run (docs/architecture.md §5; layout in docs/run-store.md).

    <run_id>.zarr/                  attrs: tevid_layout, complete, spec, label, onset_step, ...
        frames      (T, 6, S, S)  uint16 = bfloat16 bit patterns (attrs frames_dtype), zstd,
                                  chunks of 16 frames in shards of 64
        frame_step  (T,)          int64   optimizer step of each frame
        readouts    (T, R)        float32 names in attrs readout_names; NaN = missing
        levels      (T, 6)        float32 per map: log10 RMS of its native batch-mean map, before any
                                  normalisation (capture.frames.map_summary); NaN = map missing
        patterns    (T, 6, P, P)  uint16 = bfloat16 bit patterns (attrs patterns_dtype): per map, the
                                  native map standardised per frame at P x P; zeros = map missing
        train_loss  (N,)          float32 every optimizer step
        lr          (N,)          float32 every optimizer step
        <extra>     (T,)          float32 optional per-frame arrays, names in attrs frame_arrays
                                  (e.g. hessian_top: capture.hessian); NaN = not computed at that frame
        privileged/               validation metrics etc.: labeling and evaluation only

Layout versions: 2 adds `levels` and `patterns` (issue 19: a new input representation is computed
from them when a store is read, without regenerating the corpus). Layout 1 stores still open; their
`levels()` / `patterns()` raise a `RunStoreError` naming the store and the missing array, and
`has_summaries` says which kind a store is.

A writer builds the store under `<run_id>.zarr.tmp-<pid>` and renames it only after `finalize()`,
so a killed run never leaves a store that looks complete. `RunStore` refuses, naming the path
and the problem, anything incomplete, of another layout version, or of the wrong shape/dtype.
zarr 3.1 has no bfloat16 data type, so frames are stored as their uint16 bit patterns; this is
lossless and readable with plain numpy: `(u16.astype(np.uint32) << 16).view(np.float32)`.

Integrity: `finalize()` records the size and sha256 of every file of every array in attrs `digests`
(privileged arrays without their zarr.json, whose attributes the relabeler updates). `RunStore`
checks the public arrays' files against them when it opens a store, `read_privileged` the privileged
ones, and `verify_store` both (the factory's resume check). zarr's own crc32c codec would only check
chunks it decodes: a shard truncated to 0 bytes or a missing chunk reads back as fill values without
an error, so digests of whole files are kept instead. Stores written before digests existed open with
the structural checks only. Every read error (zstd, JSON, unicode, a truncated file) comes back as a
`RunStoreError` naming the store and the array.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from capture.frames import CHANNELS, PATTERN_SIZE
from capture.readouts import READOUT_NAMES
from capture.recorder import Frame

LAYOUT_VERSION = 2  # what RunWriter writes
READABLE_LAYOUTS = (1, 2)  # 1: before levels and patterns
FRAMES_DTYPE = "bfloat16"
SHARD_FRAMES = 64  # frames per shard file
CHUNK_FRAMES = 16  # frames per compressed chunk inside a shard (1-frame chunks write ~5x slower)
STEP_CHUNK = 4096
PUBLIC_ARRAYS = ("frames", "frame_step", "readouts", "train_loss", "lr")  # in every layout
SUMMARY_ARRAYS = ("levels", "patterns")  # per-frame level and pattern of each map, layout >= 2
RESERVED = (*PUBLIC_ARRAYS, *SUMMARY_ARRAYS, "privileged")
PRIVILEGED = "privileged"
DIGEST = "sha256"  # of every stored file, recorded at finalize (module docstring)


class RunStoreError(ValueError):
    pass


def bf16_to_bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def bits_to_bf16(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)


def _file_digest(path: Path) -> str:
    h = hashlib.new(DIGEST)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _array_files(store: Path, key: str) -> dict[str, Path]:
    """{path relative to the array's directory: path} of the files of array `key` that digests cover:
    all of them, except a privileged array's zarr.json (the relabeler rewrites its attributes)."""
    base = store / key
    files = {p.relative_to(base).as_posix(): p for p in base.rglob("*") if p.is_file()} if base.is_dir() else {}
    if key.startswith(f"{PRIVILEGED}/"):
        files.pop("zarr.json", None)
    return files


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


class RunWriter:
    """Streams frames of one run into a temporary store; `finalize()` publishes it.

    Usable as the `sink` of `capture.attach`. Frames and their patterns are buffered and written a whole
    shard at a time (a partial shard write would rewrite the shard). The small per-frame and per-step
    arrays (steps, readouts, levels, loss, lr: a few bytes each) stay in memory until `finalize()`.

    `pattern_size` P: None takes it from the first frame that carries patterns (`PATTERN_SIZE` if none
    does). A frame without levels / patterns (built by hand, not by capture) is stored as six missing
    maps: NaN levels, zero patterns.
    """

    def __init__(self, path: str | os.PathLike, frame_size: int, spec: dict | None = None, overwrite: bool = False,
                 pattern_size: int | None = None):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"run store {self.path} already exists (pass overwrite=True to replace it)")
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.overwrite = overwrite
        self.size = frame_size
        self.pattern_size = pattern_size
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
            "patterns_dtype": FRAMES_DTYPE,
            "frame_channels": list(CHANNELS),
            "readout_names": list(READOUT_NAMES),
            "spec": _jsonable(spec or {}),
        })
        self._frames: list[Frame] = []  # not yet written
        self._steps: list[int] = []
        self._readouts: list[list[float]] = []
        self._levels: list[torch.Tensor] = []  # (6,) float32 per frame
        self._loss: list[float] = []
        self._lr: list[float] = []
        self._frame_arrays: dict[str, np.ndarray] = {}
        self.n_frames = 0
        self.closed = False

    # -------------------------------------------------------------- Sink protocol
    def append_frame(self, frame: Frame) -> None:
        if tuple(frame.frame.shape) != (6, self.size, self.size):
            raise RunStoreError(f"{self.tmp}: frame of shape {tuple(frame.frame.shape)}, store holds (6, {self.size}, {self.size})")
        levels, patterns = frame.levels, frame.patterns
        if levels is not None and tuple(levels.shape) != (6,):
            raise RunStoreError(f"{self.tmp}: frame levels of shape {tuple(levels.shape)}, expected (6,)")
        if patterns is not None:
            p = self.pattern_size if self.pattern_size is not None else patterns.shape[-1]
            if tuple(patterns.shape) != (6, p, p):
                raise RunStoreError(f"{self.tmp}: frame patterns of shape {tuple(patterns.shape)}, store holds (6, {p}, {p})")
            self.pattern_size = p
        self._frames.append(frame)
        self._levels.append(torch.full((6,), float("nan")) if levels is None else levels.detach().float().cpu())
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
    def _patterns_array(self) -> zarr.Array:
        """The `patterns` array, created at the first flush (when P is known)."""
        if "patterns" not in self._z:
            if self.pattern_size is None:
                self.pattern_size = PATTERN_SIZE
            p = self.pattern_size
            self._z["patterns"] = self.root.create_array(
                "patterns", shape=(0, 6, p, p), chunks=(CHUNK_FRAMES, 6, p, p), shards=(SHARD_FRAMES, 6, p, p),
                dtype="uint16", config={"write_empty_chunks": True})
        return self._z["patterns"]

    def _flush_frames(self) -> None:
        patterns = self._patterns_array()
        if not self._frames:
            return
        frames = bf16_to_bits(torch.stack([f.frame for f in self._frames]))  # (n, 6, S, S) uint16
        p = self.pattern_size
        zeros = torch.zeros(6, p, p, dtype=torch.bfloat16)
        pats = [zeros if f.patterns is None else f.patterns for f in self._frames]
        self._z["frames"].append(frames)
        patterns.append(bf16_to_bits(torch.stack(pats)))  # (n, 6, P, P) uint16
        self.n_frames += len(self._frames)
        self._frames = []

    def _write_small_arrays(self) -> None:
        self._z["frame_step"].append(np.asarray(self._steps, dtype=np.int64))
        self._z["readouts"].append(np.asarray(self._readouts, dtype=np.float32).reshape(-1, len(READOUT_NAMES)))
        levels = self.root.create_array("levels", shape=(0, 6), chunks=(STEP_CHUNK, 6), dtype="float32", fill_value=np.nan,
                                        config={"write_empty_chunks": True})
        levels.append(torch.stack(self._levels).numpy() if self._levels else np.zeros((0, 6), np.float32))
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

    def _digests(self) -> dict:
        """{"algorithm", "arrays": {array: {file: [bytes, hex digest]}}} of every array written."""
        keys = [*PUBLIC_ARRAYS, *SUMMARY_ARRAYS, *sorted(self._frame_arrays)]
        priv = self.tmp / PRIVILEGED
        if priv.is_dir():
            keys += [f"{PRIVILEGED}/{d.name}" for d in sorted(priv.iterdir()) if d.is_dir()]
        return {"algorithm": DIGEST, "arrays": {
            key: {rel: [f.stat().st_size, _file_digest(f)] for rel, f in sorted(_array_files(self.tmp, key).items())}
            for key in keys}}

    def finalize(self, **attrs: Any) -> Path:
        """Flush, record `attrs` (label, onset_step, capture metadata, ...) and the digest of every
        array file, mark complete, publish."""
        self._flush_frames()
        self._write_small_arrays()
        self._write_frame_arrays()
        self.root.attrs.update(_jsonable(attrs))
        self.root.attrs["digests"] = self._digests()  # every array is written: no array file changes after this
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
    from here (see `read_privileged`).

    Opening checks the layout, shapes and chunk files, then every public array file against the
    digests recorded at finalize; any failure, and any later read error, is a `RunStoreError` naming
    the store and the array. `verified` is False for a store written before digests existed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._root = self._open_checked()
        except RunStoreError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever zarr, json or the OS raise on a damaged store
            raise self._fail(f"cannot be read ({type(err).__name__}: {err}): damaged") from err

    def _fail(self, problem: str) -> RunStoreError:
        return RunStoreError(f"run store {self.path}: {problem}")

    def _array(self, root: zarr.Group, key: str) -> zarr.Array:
        """Array `key`'s metadata, with a damaged zarr.json named."""
        try:
            arr = root[key]
        except Exception as err:  # noqa: BLE001 - JSONDecodeError, UnicodeDecodeError, KeyError, ...
            raise self._fail(f"array {key!r}: metadata {key}/zarr.json cannot be read ({type(err).__name__}: {err})") from err
        if not isinstance(arr, zarr.Array):
            raise self._fail(f"{key!r} is a {type(arr).__name__}, not an array")
        return arr

    def _open_checked(self) -> zarr.Group:
        if ".tmp-" in self.path.name:
            raise self._fail("is a temporary store of an unfinished run (never finalized)")
        if not self.path.is_dir():
            raise self._fail("does not exist or is not a directory")
        if not (self.path / "zarr.json").is_file():
            raise self._fail("has no zarr.json: not a zarr v3 store, or truncated")
        try:
            root = zarr.open_group(str(self.path), mode="r")
            attrs = dict(root.attrs)
        except Exception as err:  # noqa: BLE001
            raise self._fail(f"zarr.json cannot be read by zarr ({type(err).__name__}: {err})") from err
        layout = attrs.get("tevid_layout")
        if layout not in READABLE_LAYOUTS:
            raise self._fail(f"layout version {layout!r}, this reader reads {' and '.join(map(str, READABLE_LAYOUTS))}")
        if attrs.get("complete") is not True:
            raise self._fail("is incomplete (attribute complete is not true): the run did not finish writing")
        if attrs.get("frames_dtype") != FRAMES_DTYPE:
            raise self._fail(f"frames_dtype {attrs.get('frames_dtype')!r}, expected {FRAMES_DTYPE!r}")
        self._public = (*PUBLIC_ARRAYS, *(SUMMARY_ARRAYS if layout >= 2 else ()))
        for key in self._public:  # by path: listing the group's members would open privileged/zarr.json
            if not (self.path / key / "zarr.json").is_file():
                raise self._fail(f"array {key!r} is missing")
        frames, steps, readouts = (self._array(root, k) for k in ("frames", "frame_step", "readouts"))
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
        if layout >= 2:
            if attrs.get("patterns_dtype") != FRAMES_DTYPE:
                raise self._fail(f"patterns_dtype {attrs.get('patterns_dtype')!r}, expected {FRAMES_DTYPE!r}")
            levels, patterns = self._array(root, "levels"), self._array(root, "patterns")
            if levels.shape != (t, 6) or levels.dtype != np.float32:
                raise self._fail(f"levels have shape {levels.shape} and dtype {levels.dtype}, expected ({t}, 6) float32")
            if (patterns.ndim != 4 or patterns.shape[:2] != (t, 6) or patterns.shape[2] != patterns.shape[3]
                    or patterns.dtype != np.uint16):
                raise self._fail(f"patterns have shape {patterns.shape} and dtype {patterns.dtype}, "
                                 f"expected ({t}, 6, P, P) uint16 bfloat16 bit patterns")
        loss, lr = self._array(root, "train_loss"), self._array(root, "lr")
        if loss.shape != lr.shape:
            raise self._fail(f"train_loss {loss.shape} and lr {lr.shape} differ in length")
        extra = attrs.get("frame_arrays", [])
        if not isinstance(extra, list) or not all(isinstance(k, str) for k in extra):
            raise self._fail(f"attrs frame_arrays must be a list of array names, got {extra!r}")
        for key in extra:
            if key in RESERVED or not key.isidentifier():  # "privileged/val_acc" is not an identifier
                raise self._fail(f"attrs frame_arrays lists {key!r}, which cannot name a public per-frame array "
                                 f"(privileged data and {PUBLIC_ARRAYS} are never served as one)")
            if not (self.path / key / "zarr.json").is_file():
                raise self._fail(f"per-frame array {key!r} (listed in attrs frame_arrays) is missing")
            if self._array(root, key).shape != (t,):
                raise self._fail(f"per-frame array {key!r} has shape {root[key].shape}, expected ({t},) to match frames")
        for key in (*self._public, *extra):
            arr = root[key]
            block = arr.shards or arr.chunks
            expected = -(-arr.shape[0] // block[0]) if arr.shape[0] else 0
            found = sum(1 for f in (self.path / key / "c").rglob("*") if f.is_file()) if expected else 0
            if found != expected:
                raise self._fail(f"array {key!r} has {found} of its {expected} chunk files: truncated or damaged")
        self._digests = self._recorded_digests(attrs)
        if self._digests is not None:
            self._verify((*self._public, *extra))
        return root

    # -------------------------------------------------------------- digests
    def _recorded_digests(self, attrs: dict) -> dict | None:
        """attrs `digests` as {array: {file: (bytes, digest)}}; None for a store written before them."""
        if "digests" not in attrs:
            return None
        rec = attrs["digests"]
        try:
            if rec["algorithm"] != DIGEST:
                raise ValueError(f"algorithm {rec['algorithm']!r}, this reader checks {DIGEST!r}")
            return {str(key): {str(rel): (int(size), str(digest)) for rel, (size, digest) in files.items()}
                    for key, files in rec["arrays"].items()}
        except Exception as err:  # noqa: BLE001 - any malformed structure
            raise self._fail(f"attrs digests are malformed ({type(err).__name__}: {err}): damaged") from err

    @property
    def verified(self) -> bool:
        """Whether this store's files were checked against digests recorded at finalize."""
        return self._digests is not None

    def _verify(self, keys) -> None:
        """Every file of arrays `keys` has the size and digest recorded at finalize; no file is missing or added."""
        assert self._digests is not None
        for key in keys:
            if key not in self._digests:
                raise self._fail(f"array {key!r} has no digest recorded at finalize: damaged or altered")
            want, have = self._digests[key], _array_files(self.path, key)
            missing, added = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            if missing:
                raise self._fail(f"array {key!r}: file(s) {missing} written at finalize are missing: truncated or damaged")
            if added:
                raise self._fail(f"array {key!r}: file(s) {added} were not written at finalize: altered")
            for rel, (size, digest) in sorted(want.items()):
                found = have[rel].stat().st_size
                if found != size:
                    raise self._fail(f"array {key!r}: {key}/{rel} has {found} bytes, {size} were written: truncated or damaged")
                if _file_digest(have[rel]) != digest:
                    raise self._fail(f"array {key!r}: {key}/{rel} does not match its {DIGEST} digest recorded at finalize: damaged")

    def _privileged_keys(self) -> list[str]:
        """Names (`privileged/<name>`) of the privileged arrays, from the digests or the directory."""
        if self._digests is not None:
            return [k for k in self._digests if k.startswith(f"{PRIVILEGED}/")]
        base = self.path / PRIVILEGED
        return [f"{PRIVILEGED}/{d.name}" for d in sorted(base.iterdir()) if d.is_dir()] if base.is_dir() else []

    # -------------------------------------------------------------- reading
    def _read(self, key: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        try:
            return self._root[key][start:stop]
        except Exception as err:  # noqa: BLE001 - zstd, crc32c, truncated or missing chunk files
            raise self._fail(f"array {key!r} could not be read ({type(err).__name__}: {err}): damaged") from err

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
        return bits_to_bf16(self._read("frames", start, stop))

    def frame_step(self) -> torch.Tensor:
        return torch.from_numpy(self._read("frame_step"))

    def readouts(self) -> torch.Tensor:
        """`(T, R)` float32 in the order of `readout_names`."""
        return torch.from_numpy(self._read("readouts"))

    @property
    def has_summaries(self) -> bool:
        """Whether the store holds `levels` and `patterns` (layout >= 2; a layout 1 store does not)."""
        return "levels" in self._public

    def _need_summary(self, key: str) -> None:
        if not self.has_summaries:
            raise self._fail(f"has no array {key!r}: layout {self._root.attrs.get('tevid_layout')} was written before "
                             f"levels and patterns were stored (regenerate the run to get them; has_summaries tells)")

    def levels(self) -> torch.Tensor:
        """`(T, 6)` float32: per frame and map (CHANNELS order), log10 RMS of the native batch-mean map
        before any normalisation (>= capture.frames.LEVEL_FLOOR; NaN: map missing). A store without
        them (layout 1) raises `RunStoreError`."""
        self._need_summary("levels")
        return torch.from_numpy(self._read("levels"))

    def patterns(self, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """`(T, 6, P, P)` bfloat16: per frame and map, its native map standardised over the frame and
        resized to P x P (zeros: map missing). A store without them (layout 1) raises `RunStoreError`."""
        self._need_summary("patterns")
        return bits_to_bf16(self._read("patterns", start, stop))

    @property
    def pattern_size(self) -> int | None:
        """P of `patterns`, None for a store without them."""
        return self._root["patterns"].shape[-1] if self.has_summaries else None

    def train_loss(self) -> torch.Tensor:
        return torch.from_numpy(self._read("train_loss"))

    def lr(self) -> torch.Tensor:
        return torch.from_numpy(self._read("lr"))

    @property
    def frame_array_names(self) -> list[str]:
        """Names of the optional public per-frame arrays this run has (e.g. `hessian_top`)."""
        return list(self._root.attrs.get("frame_arrays", []))

    def frame_array(self, name: str) -> torch.Tensor:
        """`(T,)` float32 optional per-frame array (NaN where not computed)."""
        if name not in self.frame_array_names:
            raise self._fail(f"has no per-frame array {name!r} (it has {self.frame_array_names or 'none'})")
        return torch.from_numpy(self._read(name))

    @property
    def spec(self) -> dict:
        return dict(self._root.attrs.get("spec", {}))


def _privileged_group(path: str | os.PathLike) -> tuple[RunStore, zarr.Group | None]:
    """A complete store and its privileged group (read-only; None when it has none), whose files are
    checked against the digests recorded at finalize."""
    store = RunStore(path)
    if not (store.path / PRIVILEGED / "zarr.json").is_file():
        if store.verified and store._privileged_keys():
            raise store._fail(f"group {PRIVILEGED!r} is missing but was written at finalize")
        return store, None
    if store.verified:
        store._verify(store._privileged_keys())
    try:
        root = zarr.open_group(str(store.path), mode="r")
        return store, root[PRIVILEGED]
    except Exception as err:  # noqa: BLE001
        raise store._fail(f"group {PRIVILEGED!r} cannot be opened ({type(err).__name__}: {err}): damaged") from err


def _read_privileged_array(store: RunStore, group: zarr.Group, name: str) -> np.ndarray:
    try:
        return group[name][...]
    except Exception as err:  # noqa: BLE001
        raise store._fail(f"array '{PRIVILEGED}/{name}' could not be read ({type(err).__name__}: {err}): damaged") from err


def read_privileged(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Labeling and evaluation only: the privileged group of a complete store, as numpy arrays."""
    store, group = _privileged_group(path)
    if group is None:
        return {}
    try:
        names = list(group.array_keys())
    except Exception as err:  # noqa: BLE001
        raise store._fail(f"group {PRIVILEGED!r} cannot be listed ({type(err).__name__}: {err}): damaged") from err
    return {k: _read_privileged_array(store, group, k) for k in names}


def read_labeling(path: str | os.PathLike) -> dict:
    """Labeling and evaluation only: the rules' results the labeler stored with a complete run
    (`privileged/labeling` attrs: per rule fired, trigger step and statistics); {} when absent."""
    store, group = _privileged_group(path)
    if group is None or not (store.path / PRIVILEGED / "labeling" / "zarr.json").is_file():
        return {}
    try:
        return dict(group["labeling"].attrs.get("rules", {}))
    except Exception as err:  # noqa: BLE001
        raise store._fail(f"array '{PRIVILEGED}/labeling' metadata cannot be read ({type(err).__name__}: {err}): damaged") from err


def verify_store(path: str | os.PathLike) -> RunStore:
    """The full check of a finished run (the factory's resume test): the public arrays as `RunStore`
    opens them, then the privileged ones. A store written before digests existed is decoded in full
    instead and refused if any chunk file is empty. Raises `RunStoreError` naming the store and array."""
    store = RunStore(path)
    read_privileged(path)  # checks the privileged files' digests and decodes them
    if not store.verified:
        for key in (*store._public, *store.frame_array_names):
            store._read(key)
        for f in store.path.rglob("*"):
            if f.is_file() and f.stat().st_size == 0:
                raise store._fail(f"file {f.relative_to(store.path)} is empty: truncated")
    return store
