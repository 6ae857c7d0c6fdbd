"""The project's yaml configs, one folder per stage and scale (docs/architecture.md, "Configs"):

    factory/   smoke, pilot, cpu, cpu_hessian, paper    corpus generation (factory.config.FactoryConfig)
    pretrain/  tiny, cpu, base                          Dynamics-MAE (pretrain.train.PretrainConfig)
    finetune/  tiny, cpu, base                          TEViD fine-tuning (diagnose.finetune.FinetuneConfig)
    capture/   demo                                     the capture demo (capture.demo)

They ship inside the installed package, so a script finds its default config from any working
directory: `configs.path("pretrain/cpu")` is the file's path. Standard library only.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["ROOT", "names", "path"]

ROOT = Path(__file__).resolve().parent


def names() -> list[str]:
    """Every config, as "stage/name" (what `path` takes)."""
    return sorted(p.relative_to(ROOT).with_suffix("").as_posix() for p in ROOT.rglob("*.yaml"))


def path(name: str) -> Path:
    """The file of config `name` ("pretrain/cpu" or "pretrain/cpu.yaml"); FileNotFoundError lists the configs."""
    file = ROOT / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not file.is_file():
        raise FileNotFoundError(f"configs.path({name!r}): no such config in {ROOT}; configs: {', '.join(names())}")
    return file
