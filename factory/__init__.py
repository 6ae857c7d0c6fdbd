"""factory: the data factory (docs/architecture.md, docs/factory.md): perturbed training jobs with
capture on, labelled by deterministic rules, written as run stores plus a manifest. A job is built
once (`build_job`) and run by the one step loop (`StepLoop` with `JobCallback` hooks). Commands:
`python -m factory.generate`, `factory.relabel`, `factory.stats`. Names below are imported on first use.
"""
from __future__ import annotations

from capture.lazy import lazy_exports

__all__ = ["FactoryConfig", "Job", "JobCallback", "RunSpec", "StepLoop", "TrainingConfig", "build_arch", "build_job",
           "label_run", "load_dataset", "make_perturbation", "run_job"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "FactoryConfig": "config", "TrainingConfig": "config", "RunSpec": "spec", "Job": "job", "build_job": "job",
    "JobCallback": "loop", "StepLoop": "loop", "run_job": "loop", "build_arch": "archs", "load_dataset": "datasets",
    "make_perturbation": "perturbations", "label_run": "labeler",
})
