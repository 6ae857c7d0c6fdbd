"""What a normal install gives a user (docs/architecture.md, "Packaging"): a wheel that carries the shipped
model and the configs, packages that say their public API in `__all__`, and no module that changes the
process's environment when it is imported."""
from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("capture", "configs", "diagnose", "eval", "factory", "pretrain")


def _is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`"""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def _import_time_nodes(tree: ast.Module):
    """Every node that runs when the module is imported: module and class bodies, not function bodies and
    not the `if __name__ == "__main__":` block."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _is_main_guard(node):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _sets_environment(node: ast.AST) -> bool:
    def is_environ(n) -> bool:
        return isinstance(n, ast.Attribute) and n.attr == "environ" and isinstance(n.value, ast.Name) and n.value.id == "os"

    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        f = node.func
        if is_environ(f.value) and f.attr in ("setdefault", "update", "pop", "__setitem__", "clear"):
            return True
        if f.attr in ("putenv", "unsetenv") and isinstance(f.value, ast.Name) and f.value.id == "os":
            return True
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
    return any(isinstance(t, ast.Subscript) and is_environ(t.value) for t in targets)


# modules known to break the rule, each with why (remove the entry with the fix)
PENDING = {}


def test_environment_variables_are_set_only_in_entry_points():
    """ONEDNN_MAX_CPU_ISA and the like are set by `main()` / `if __name__ == "__main__":`, the Makefile and
    .ci/run, never as a side effect of importing a module."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.relative_to(ROOT).as_posix() in PENDING:
                continue
            tree = ast.parse(path.read_text(), str(path))
            found += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in _import_time_nodes(tree) if _sets_environment(n)]
    assert not found, "modules that set environment variables when imported: " + ", ".join(found)


def test_each_package_lists_its_public_api():
    for pkg in PACKAGES:
        module = importlib.import_module(pkg)
        assert module.__all__, pkg
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{pkg}.{name}"
    import capture

    assert "read_privileged" not in capture.__all__ and not hasattr(capture, "read_privileged")


def test_importing_a_package_or_the_schema_loads_no_torch():
    script = ("import sys, capture, capture.schema, capture.corpus, configs, diagnose, eval, factory, pretrain; "
              "print(sorted(m for m in ('torch', 'zarr', 'optuna', 'webdataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_configs_path_finds_every_stage_and_names_the_choices():
    import configs

    assert configs.path("factory/smoke") == configs.path("factory/smoke.yaml") == ROOT / "configs" / "factory" / "smoke.yaml"
    assert {"capture/demo", "factory/cpu", "finetune/cpu", "pretrain/cpu"} <= set(configs.names())
    with pytest.raises(FileNotFoundError, match="factory/cpu"):
        configs.path("factory/cpuu")


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_loads_the_shipped_model_and_finds_the_configs(tmp_path):
    """`pip install` of a built wheel (not editable) into a fresh venv, run from a directory outside the
    checkout: `diagnose.watch()` loads the shipped model and `configs.path` finds the configs. The venv
    reads the dependencies (torch, ...) from this environment's site-packages through a .pth file."""
    src = tmp_path / "src"  # build from a copy, so the build leaves nothing in the checkout
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("tevid-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-compile", str(wheel)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)  # pip of this env, installing into the venv
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, timm, ... of this environment

    work = tmp_path / "elsewhere"
    work.mkdir()
    script = """
import json, sys, torch
import capture, configs, diagnose
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                            torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
monitor = diagnose.watch(model, opt, cadence=5)
print(json.dumps({"tevid": monitor.tevid is not None, "checkpoint": monitor.checkpoint, "capture": capture.__file__,
                  "config": str(configs.path("factory/cpu")), "exists": configs.path("factory/cpu").is_file()}))
monitor.remove()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TEVID_DEFAULT_CHECKPOINT")}
    proc = subprocess.run([str(python), "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tevid"] and out["exists"]
    for key in ("checkpoint", "capture", "config"):  # everything comes from the installed wheel, not the checkout
        assert Path(out[key]).resolve().is_relative_to(env_dir.resolve()), (key, out[key])
    assert Path(out["checkpoint"]).name == "default_checkpoint"
    # the console scripts are installed and run
    demo = subprocess.run([str(env_dir / "bin" / "tevid-demo"), "--help"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert demo.returncode == 0 and "usage: tevid-demo" in demo.stdout, demo.stderr[-2000:]
