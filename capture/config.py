"""Config loading shared by every stage's script (docs/architecture.md §11).

One dataclass per stage; a yaml file sets its values, the dataclass defaults fill the rest;
`key=value` overrides address nested fields with dots (`model.depth=2`); the resolved config is
written next to the outputs.

Validation is a small schema on those dataclasses (no second model of each config to keep in step):
the field annotations give the types, checked for every value (`steps: int` refuses "abc", 2.5 and
true; an int is a valid float), and the dataclasses' own `__post_init__` checks ranges, through
`at_least` / `positive` / `within` below. Unknown keys are refused with the valid ones listed; every
error is a `ConfigError` naming the file (or the override) and the field's dotted path. The yaml
loader refuses duplicate keys, reads YAML 1.2 floats (`3e-4` is a number, not the string PyYAML's
YAML 1.1 makes of it) and names the file in syntax errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


class FieldError(ValueError):
    """One field's value is wrong; `from_dict` adds the file and the field's dotted path."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


# ---------------------------------------------------------------- range checks for __post_init__

def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(cfg: Any, low: float, *names: str) -> None:
    """Each named field of `cfg` is a number >= `low` (NaN fails)."""
    for name in names:
        v = getattr(cfg, name)
        if _number(v) and not v >= low:
            raise FieldError(name, f"must be >= {low}, got {v!r}")


def positive(cfg: Any, *names: str) -> None:
    """Each named field of `cfg` is a finite number > 0."""
    for name in names:
        v = getattr(cfg, name)
        if _number(v) and not (v > 0 and math.isfinite(v)):
            raise FieldError(name, f"must be a finite number > 0, got {v!r}")


def within(cfg: Any, low: float, high: float, *names: str) -> None:
    """Each named field of `cfg` is a number in [low, high]."""
    for name in names:
        v = getattr(cfg, name)
        if _number(v) and not low <= v <= high:
            raise FieldError(name, f"must be in [{low}, {high}], got {v!r}")


# ---------------------------------------------------------------- dict -> dataclass, type-checked

def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(hint, getattr(hint, "__name__", None) or str(hint).replace("typing.", ""))


_BUILTIN_NAMES = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field annotations of `cls`. Where they cannot be resolved (a class defined in a
    module run by runpy, whose globals are gone): plain builtin names, the type of a dataclass
    default (nested sections keep being built), else unchecked."""
    try:
        return get_type_hints(cls)
    except Exception:  # noqa: BLE001 - NameError and friends
        pass
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not isinstance(f.type, str):
            out[f.name] = f.type
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = type(default) if dataclasses.is_dataclass(default) else _BUILTIN_NAMES.get(f.type, Any)
    return out


class _Builder:
    """Builds (nested) dataclasses from dicts, naming `where` (or the override that set a value) and the
    dotted field path in every error."""

    def __init__(self, where: str, sources: dict[str, str] | None = None, require_all: bool = False):
        self.where, self.sources, self.require_all = where, sources or {}, require_all

    def origin(self, path: str) -> str:
        parts = path.split(".")
        for n in range(len(parts), 0, -1):  # the longest overridden prefix of the path
            if ".".join(parts[:n]) in self.sources:
                return self.sources[".".join(parts[:n])]
        return self.where

    def error(self, path: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.origin(path)}: {path}: {problem}" if path else f"{self.where}: {problem}")

    def build(self, cls: type[T], data: Any, path: str = "") -> T:
        if not isinstance(data, dict):
            raise self.error(path, f"expected a mapping, got {type(data).__name__}")
        fields = [f for f in dataclasses.fields(cls) if f.init]
        valid = [f.name for f in fields]
        unknown = set(data) - set(valid)
        if unknown:
            raise self.error(path, f"unknown key(s) {sorted(map(str, unknown))}; valid keys: {sorted(valid)}")
        if self.require_all:  # every field but those marked field(metadata={"optional": True})
            missing = [f.name for f in fields if f.name not in data and not f.metadata.get("optional")]
            if missing:
                raise self.error(path, f"missing required field(s) {missing}")
        hints = _hints(cls)
        kwargs = {}
        for key, value in data.items():
            sub = f"{path}.{key}" if path else key
            kwargs[key] = self.value(value, hints.get(key, Any), sub)
        try:
            return cls(**kwargs)
        except FieldError as err:
            sub = f"{path}.{err.field}" if path else err.field
            raise self.error(sub, err.problem) from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{self.origin(path)}: {path + ': ' if path else ''}{err}") from None

    def value(self, value: Any, hint: Any, path: str) -> Any:
        """`value` checked against annotation `hint` (an int widens to float), else a ConfigError."""
        origin, args = get_origin(hint), get_args(hint)
        if hint is Any or hint is object or isinstance(hint, (str, TypeVar)):
            return value
        if origin in (Union, types.UnionType):
            for arm in args:
                try:
                    return self.value(value, arm, path)
                except ConfigError:
                    continue
            names = " or ".join(_type_name(a) for a in args)
            raise self.error(path, f"expected {names}, got {value!r} ({type(value).__name__})")
        if origin is Literal:
            if value in args:
                return value
            raise self.error(path, f"expected one of {list(args)}, got {value!r}")
        if hint is type(None):
            if value is None:
                return None
        elif dataclasses.is_dataclass(hint) and isinstance(hint, type):
            if isinstance(value, hint):
                return value
            return self.build(hint, value, path)
        elif hint is bool:
            if isinstance(value, bool):
                return value
        elif hint is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif hint is float:
            if _number(value):
                return value  # an int is a valid float (kept as given, as before the schema)
        elif hint is str:
            if isinstance(value, str):
                return value
        elif hint in (list, tuple) or origin in (list, tuple):
            if isinstance(value, (list, tuple)):
                if not args:
                    return value
                if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                    if len(value) != len(args):
                        raise self.error(path, f"expected {len(args)} items, got {len(value)}")
                    items = [self.value(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
                else:
                    items = [self.value(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
                return type(value)(items)
        elif hint is dict or origin is dict:
            if isinstance(value, dict):
                if not args:
                    return value
                return {self.value(k, args[0], f"{path} key {k!r}"): self.value(v, args[1], f"{path}.{k}")
                        for k, v in value.items()}
        else:
            return value  # a type this schema does not know (Path, a custom class): taken as given
        raise self.error(path, f"expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type[T], data: dict, where: str = "config", require_all: bool = False) -> T:
    """Build dataclass `cls` from a (nested) dict, checking every value against the field's annotation
    and the class's own `__post_init__`; unknown keys, wrong types and (with `require_all`: files that
    must be complete, not filled with defaults) missing fields raise `ConfigError` naming `where` and
    the field."""
    return _Builder(where, require_all=require_all).build(cls, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- yaml

_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate keys (PyYAML keeps the last one silently) and reads YAML
    1.2 floats: `3e-4` is a number, not the string YAML 1.1 makes of it."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *base" merges are meant to be overridden
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first at line {first.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def read_yaml(path: str | Path) -> Any:
    """The yaml file at `path` (ConfigLoader); a ConfigError naming the file when it is not valid yaml."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:  # a stream: yaml's error marks then name the file
            return yaml.load(f, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err})") from None


def _set_path(data: dict, item: str) -> str:
    """Apply override `key.path=value` to `data`; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    dotted, raw = item.split("=", 1)
    dotted = dotted.strip()
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"override {item!r}: {dotted!r} is not a dotted field name")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {k!r} is not a section")
    stream = io.StringIO(raw)
    stream.name = f"override {dotted}"  # what yaml's error marks then name
    try:
        node[keys[-1]] = yaml.load(stream, Loader=ConfigLoader)  # "3" -> 3, "true" -> True, "[1,2]" -> [1, 2]
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None
    return dotted


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- yaml file <- `key=value` overrides, validated into `cls`."""
    data: dict = to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = read_yaml(path)
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        _merge(data, loaded)
    sources = {}
    for item in overrides or []:
        sources[_set_path(data, item)] = f"override {item!r}"
    return _Builder(str(path) if path else cls.__name__, sources).build(cls, data)


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
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
