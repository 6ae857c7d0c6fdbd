"""Package APIs imported on first use (PEP 562), so importing one light module of a package (say
`capture.schema`) does not load torch, zarr or optuna through the package's `__init__`.

    __all__ = ["attach", "RunStore"]
    __getattr__, __dir__ = lazy_exports(__name__, {"attach": "recorder", "RunStore": "store"})

`package.name` then imports `package.<home>` and returns its `name`; `package.<submodule>` imports the
submodule. Standard library only.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, home: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`, whose public name `n` lives in submodule `home[n]`."""

    def __getattr__(name: str):
        if name in home:
            return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{package}.{name}":
                raise  # the submodule exists but a module it imports does not
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    def __dir__() -> list[str]:
        module = importlib.import_module(package)
        return sorted({*vars(module), *home})

    return __getattr__, __dir__
