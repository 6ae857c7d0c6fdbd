"""The import rule of docs/architecture.md §12, checked on the source: every `import` statement of every
project module, function-local ones included, read with `ast`.

- The library (what a user's training job imports: `capture`, pretrain's model parts and the live parts
  of `diagnose`) imports only the library: nothing from `factory` or `eval`, and not the data path
  (`pretrain.clips`, which loads webdataset and tqdm, nor the training stages).
- Nothing outside `eval` imports `eval`.
- No import cycle between project modules.

A last test runs the live path in a fresh interpreter (`diagnose.watch` with the shipped model on a
small job) and checks which project modules it loaded, so an import hidden from `ast` (importlib) is
caught too.
"""
from __future__ import annotations

import ast
import graphlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("capture", "configs", "diagnose", "eval", "factory", "pretrain")
# the library: whole packages, or single modules of a package
LIBRARY_PACKAGES = ("capture", "diagnose")
LIBRARY_MODULES = ("pretrain", "pretrain.checkpoint", "pretrain.encoder", "pretrain.mae", "configs")
# modules under a library package that are pipeline stages or experiments, not library (each with why)
NOT_LIBRARY = {
    "diagnose.finetune": "the fine-tuning stage: reads a corpus through pretrain.clips",
    "diagnose.recalibrate": "calibrates a checkpoint on a corpus's validation windows (pretrain.clips)",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """module name -> file of every project module (the packages and tests/)."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    for path in sorted((ROOT / "tests").glob("*.py")):
        found[path.stem] = path  # tests import each other (conftest, zoo) as top-level modules
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` (or its longest prefix that is one); None for outside modules."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in modules:
            return ".".join(parts[:k])
    return None


def imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported project module) for every import statement anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.append((node.lineno, resolved))
    return found


def in_library(module: str) -> bool:
    if module in NOT_LIBRARY:
        return False
    return module in LIBRARY_MODULES or module.split(".")[0] in LIBRARY_PACKAGES


def test_the_walker_sees_function_local_relative_and_submodule_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import json\n\ndef f():\n    from factory.train import run_one\n    from . import schema\n"
                    "    from eval import metrics\n")
    assert imports("capture.m", path, project_modules()) == [(4, "factory.train"), (5, "capture.schema"), (6, "eval.metrics")]


def test_the_library_imports_only_the_library():
    modules = project_modules()
    library = [m for m in modules if in_library(m)]
    assert {"capture.recorder", "capture.schema", "diagnose.monitor", "diagnose.tevid", "pretrain.encoder"} <= set(library)
    violations = []
    for module in library:
        for line, target in imports(module, modules[module], modules):
            if not in_library(target):
                why = NOT_LIBRARY.get(target) or ("the data path" if target == "pretrain.clips" else target.split(".")[0])
                violations.append(f"{modules[module].relative_to(ROOT)}:{line} imports {target} ({why})")
    violations = list(dict.fromkeys(violations))  # one line per (statement, module)
    assert not violations, "library modules importing outside the library (docs/architecture.md §12):\n" + "\n".join(violations)


def test_only_the_evaluation_side_imports_eval():
    """Experiments and reports live in eval/; the library and the pipeline never reach into them."""
    modules = project_modules()
    violations = [f"{path.relative_to(ROOT)}:{line} imports {target}"
                  for module, path in modules.items() if module.split(".")[0] in PACKAGES and module.split(".")[0] != "eval"
                  for line, target in imports(module, path, modules) if target.split(".")[0] == "eval"]
    assert not violations, "modules outside eval/ importing it:\n" + "\n".join(violations)


def test_no_import_cycle_between_project_modules():
    modules = project_modules()
    graph = {m: {t for _, t in imports(m, p, modules)} for m, p in modules.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        cycle = err.args[1]
        raise AssertionError("import cycle: " + " -> ".join(reversed(cycle))) from None


def test_a_job_watched_with_the_shipped_model_loads_no_factory_eval_or_data_path_module(tmp_path):
    script = """
import json, sys, torch
import diagnose
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                            torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with diagnose.watch(model, opt, cadence=2) as monitor:
    for _ in range(24):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 3, (16,)))
        loss.backward(); opt.step(); opt.zero_grad()
    tevid, predictions = monitor.tevid is not None, len(monitor.predictions)
print(json.dumps({"tevid": tevid, "predictions": predictions, "modules": sorted(sys.modules)}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TEVID_DEFAULT_CHECKPOINT", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tevid"] and out["predictions"] > 0  # the live path really ran the model
    loaded = [m for m in out["modules"] if m.split(".")[0] in ("factory", "eval", "webdataset")
              or m in ("pretrain.clips", "pretrain.train", *NOT_LIBRARY)]
    assert not loaded, f"the live path loaded {loaded}"
