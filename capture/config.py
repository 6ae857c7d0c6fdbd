"""Config loading shared by every stage's script (DESIGN.md §11).

One dataclass per stage; a yaml file sets its values (`yaml.safe_load`, then the dataclass
defaults fill the rest); `key=value` overrides address nested fields with dots
(`model.depth=2`); unknown keys are an error that lists the valid ones; the resolved config is
written next to the outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys raise `ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    defaults = cls()  # every config dataclass has defaults; nested sections are dataclass instances
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = set(data) - set(valid)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(valid)}")
    kwargs = {}
    for key, value in data.items():
        sub = getattr(defaults, key)
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            value = from_dict(type(sub), value, f"{where}.{key}")
        elif isinstance(sub, float) and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}.{key}: expected a number, got {value!r}") from None
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_path(data: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)  # "3" -> 3, "true" -> True, "[1,2]" -> [1, 2]


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- yaml file <- `key=value` overrides, validated into `cls`."""
    data: dict = to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        _merge(data, loaded, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), raw)
    return from_dict(cls, data, str(path) if path else cls.__name__)


def _merge(base: dict, new: dict, where: str) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v, f"{where}:{k}")
        else:
            base[k] = v


def save_config(cfg, out_dir: str | Path, name: str = "config.json") -> Path:
    out = Path(out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_dict(cfg), indent=2, default=str) + "\n")
    return out


def cli_parser(description: str, default_config: str | None = None, corpus: bool = False, checkpoint: bool = False) -> argparse.ArgumentParser:
    """The flags every script shares: --config, --out, optional --corpus/--checkpoint, key=value overrides."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=default_config, help="yaml config file")
    p.add_argument("--out", required=default_config is None, default=None, help="output directory")
    if corpus:
        p.add_argument("--corpus", required=True, help="corpus directory")
    if checkpoint:
        p.add_argument("--checkpoint", default=None, help="checkpoint directory")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. model.depth=2)")
    return p
