"""Atomic checkpoints of plain data, shared by pretraining and fine-tuning (STYLE.md 10).

    <dir>/model.safetensors       state dict of the unwrapped module (no DDP / compile prefixes)
    <dir>/config.json             the run's resolved config (a dict; Dynamics-MAE adds "encoder")
    <dir>/optimizer.safetensors   optimizer state tensors, keyed by their path in the state dict
    <dir>/optimizer.json          the rest of the optimizer state (param groups, ...), tensors by key
    <dir>/state.json              step, extra, scheduler state; written last
    <dir>/state.safetensors       tensors inside `extra` / the scheduler state, only if there are any

A checkpoint is built in a sibling `.<name>.tmp-*` directory and renamed into place; an existing one
is first renamed aside (`.<name>.old-*`) and removed after. A crash therefore never leaves a half
checkpoint at `<dir>`; a crash between the two renames leaves `<dir>` missing but both complete copies
beside it, and the next save or load puts the newest back. Nothing is ever unpickled: tensors are
read with safetensors, everything else is JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
STATE_TENSORS = "state.safetensors"
OPTIM_FILE = "optimizer.safetensors"
OPTIM_JSON = "optimizer.json"


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]
    config: dict
    step: int
    extra: dict
    path: Path


# ---------------------------------------------------------------- nested state <-> JSON + tensors

def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of `obj` with every tensor moved into `tensors` under its path."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone().contiguous()  # safetensors refuses shared or strided storage
        return {"__tensor__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _flatten(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        # non-string keys (an optimizer's state is keyed by parameter index): keep their types
        return {"__items__": [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    raise CheckpointError(f"cannot store a {type(obj).__name__} at {key or 'top level'!r} in a checkpoint "
                          "(tensors, numbers, strings, None, lists, tuples and dicts only)")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise CheckpointError(f"{where}: tensor {obj['__tensor__']!r} is missing from the safetensors file")
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_unflatten(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _unflatten(v, tensors, where) for k, v in obj["__items__"]}
    return {k: _unflatten(v, tensors, where) for k, v in obj.items()}


# ---------------------------------------------------------------- files

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")
    _fsync(path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync(path)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"incomplete checkpoint: {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"corrupt checkpoint file {path}: not valid JSON ({err})") from err


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"incomplete checkpoint: {path} is missing")
    try:
        return load_file(str(path))  # safetensors: never unpickles
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean "unreadable"
        raise CheckpointError(f"corrupt checkpoint file {path}: not a readable safetensors file ({err})") from err


def _siblings(path: Path) -> list[Path]:
    return [p for p in path.parent.glob(f".{path.name}.*-*") if p.is_dir()]


def _saved_step(path: Path) -> int:
    try:
        return int(json.loads((path / STATE_FILE).read_text())["step"])
    except Exception:  # noqa: BLE001 - anything unreadable is not a complete checkpoint
        return -1


def _recover(path: Path) -> None:
    """Put back the newest complete copy if a crash between the two renames left `path` missing."""
    if path.exists():
        return
    complete = [p for p in _siblings(path) if _saved_step(p) >= 0]
    if complete:
        os.rename(max(complete, key=_saved_step), path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / FSDP / torch.compile wrappers."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=False, keep_torch_compile=False)


# ---------------------------------------------------------------- API

def save_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, config: dict, step: int,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, extra: dict | None = None) -> Path:
    """Write a checkpoint atomically to directory `path` (replacing one there) and return `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    for stale in _siblings(path):  # left by a crash: never the current checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        weights = {k: v.detach().cpu().clone().contiguous() for k, v in unwrap(model).state_dict().items()}
        _write_tensors(tmp / MODEL_FILE, weights)
        _write_json(tmp / CONFIG_FILE, _plain_config(config))
        if optimizer is not None:
            tensors: dict[str, torch.Tensor] = {}
            flat = _flatten(optimizer.state_dict(), "optimizer", tensors)
            _write_tensors(tmp / OPTIM_FILE, tensors)
            _write_json(tmp / OPTIM_JSON, flat)
        tensors = {}
        state = _flatten({"step": int(step), "extra": extra or {},
                          "scheduler": scheduler.state_dict() if scheduler is not None else None}, "state", tensors)
        if tensors:
            _write_tensors(tmp / STATE_TENSORS, tensors)
        _write_json(tmp / STATE_FILE, state)  # last: a directory with state.json is complete
        _fsync(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _plain_config(config: dict) -> dict:
    """The config as plain JSON (tuples become lists): it is read by people and by model builders."""
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint config must be a dict, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(config))
    except TypeError as err:
        raise CheckpointError(f"checkpoint config must be plain JSON data (numbers, strings, lists, dicts): {err}") from err


def _state(path: Path) -> dict:
    state = _read_json(path / STATE_FILE)
    tensors = _read_tensors(path / STATE_TENSORS) if (path / STATE_TENSORS).exists() else {}
    state = _unflatten(state, tensors, path / STATE_TENSORS)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"corrupt checkpoint file {path / STATE_FILE}: no integer 'step'")
    return state


def _checked_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    _recover(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
    return path


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """Whether a checkpoint directory is at `path` (after putting back one a crashed save left aside)."""
    path = Path(path)
    _recover(path)
    return path.is_dir()


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Weights, config, step and extra of the checkpoint in directory `path` (tensors on the CPU)."""
    path = _checked_dir(path)
    state = _state(path)
    config = _read_json(path / CONFIG_FILE)
    if not isinstance(config, dict):
        raise CheckpointError(f"corrupt checkpoint file {path / CONFIG_FILE}: a JSON object expected, got {type(config).__name__}")
    weights = _read_tensors(path / MODEL_FILE)
    return Checkpoint(weights=weights, config=config, step=state["step"], extra=state.get("extra") or {}, path=path)


def restore_training_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> int:
    """Load the optimizer (and scheduler) state saved in `path` into them; returns the saved step."""
    path = _checked_dir(path)
    state = _state(path)
    flat = _read_json(path / OPTIM_JSON)
    tensors = _read_tensors(path / OPTIM_FILE)
    try:
        optimizer.load_state_dict(_unflatten(flat, tensors, path / OPTIM_FILE))
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the saved optimizer state does not fit this optimizer ({err})") from err
    if scheduler is not None:
        if state.get("scheduler") is None:
            raise CheckpointError(f"{path}: no scheduler state was saved")
        scheduler.load_state_dict(state["scheduler"])
    return state["step"]
