"""Hooks that live outside the watched model and optimizer.

torch keeps a module's hooks in the module (`_forward_hooks`), so a watched model would carry the
monitor into `torch.save(model)`, `pickle.dumps(model)` and `copy.deepcopy(model)` (timm's `ModelEmaV3`
makes its EMA copy that way): closures do not pickle, and a deep copy would be watched by a copy of the
monitor and feed the original's frames. Here one process-wide hook per kind (torch's
`register_module_forward_hook`, `register_module_forward_pre_hook`, `register_optimizer_step_post_hook`)
dispatches to the hooks registered for a given module or optimizer object. The model's and the
optimizer's own hook dicts stay empty: they save, pickle and copy as if unwatched, and a copy is not
watched. The process-wide hook is installed while at least one hook is registered.

    handle = forward_hook(module, fn)      # fn(module, args, output), like module.register_forward_hook
    handle.remove()
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook


class _Table:
    """Hooks per object (keyed by id, the object held weakly), and the one global hook that calls them."""

    def __init__(self, install: Callable):
        self._install = install
        self._hooks: dict[int, tuple[weakref.ref, dict[int, Callable]]] = {}
        self._global = None
        self._next = 0
        self._depth = 0  # dispatches under way: torch iterates its global hook dict live while calling them
        self._lock = threading.RLock()

    def add(self, obj, fn: Callable) -> "Handle":
        with self._lock:
            entry = self._hooks.get(id(obj))
            if entry is None or entry[0]() is not obj:  # new, or an id reused by a new object
                entry = (weakref.ref(obj), {})
                self._hooks[id(obj)] = entry
            self._next += 1
            entry[1][self._next] = fn
            if self._global is None:
                self._global = self._install(self._dispatch)
            return Handle(self, id(obj), self._next)

    def remove(self, key: int, hook_id: int) -> None:
        with self._lock:
            entry = self._hooks.get(key)
            if entry is not None:
                entry[1].pop(hook_id, None)
                if not entry[1]:
                    del self._hooks[key]
            self._uninstall_if_idle()

    def _uninstall_if_idle(self) -> None:
        # never during a dispatch: torch's optimizer walks its global hook dict live, so removing the global
        # hook there would break the user's optimizer.step(); an idle global hook costs one dict lookup, and
        # the next registration or removal outside a dispatch takes it off
        if not self._hooks and self._global is not None and self._depth == 0:
            self._global.remove()
            self._global = None

    def count(self, obj=None) -> int:
        if obj is None:
            return sum(len(fns) for _, fns in self._hooks.values())
        entry = self._hooks.get(id(obj))
        return len(entry[1]) if entry is not None and entry[0]() is obj else 0

    def _dispatch(self, obj, *args):
        entry = self._hooks.get(id(obj))
        if entry is None or entry[0]() is not obj:
            return None
        self._depth += 1
        try:
            for fn in tuple(entry[1].values()):  # a copy: a hook may remove itself or another
                fn(obj, *args)
        finally:
            self._depth -= 1
        return None


class Handle:
    """`.remove()` takes the hook off (idempotent), like torch's RemovableHandle."""

    def __init__(self, table: _Table, key: int, hook_id: int):
        self._table, self._key, self._id = table, key, hook_id

    def remove(self) -> None:
        if self._table is not None:
            self._table.remove(self._key, self._id)
            self._table = None


_FORWARD = _Table(register_module_forward_hook)
_FORWARD_PRE = _Table(register_module_forward_pre_hook)
_STEP_POST = _Table(register_optimizer_step_post_hook)


def forward_hook(module: torch.nn.Module, fn: Callable) -> Handle:
    """`fn(module, args, output)` after every forward of `module` (its return value is ignored)."""
    return _FORWARD.add(module, fn)


def forward_pre_hook(module: torch.nn.Module, fn: Callable) -> Handle:
    """`fn(module, args)` before every forward of `module` (its return value is ignored)."""
    return _FORWARD_PRE.add(module, fn)


def step_post_hook(optimizer: torch.optim.Optimizer, fn: Callable) -> Handle:
    """`fn(optimizer, args, kwargs)` after every `optimizer.step()`."""
    return _STEP_POST.add(optimizer, fn)


def active(obj=None) -> int:
    """Hooks registered here for `obj` (a module or an optimizer), or over all objects when None (0 once
    every watcher is removed)."""
    return _FORWARD.count(obj) + _FORWARD_PRE.count(obj) + _STEP_POST.count(obj)
