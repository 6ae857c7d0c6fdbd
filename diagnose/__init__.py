"""diagnose: TEViD and the live monitor (docs/architecture.md, docs/monitor.md, docs/tevid.md).

    monitor = diagnose.watch(model, optimizer)    # the shipped TEViD model + rule symptoms

The public API below is imported on first use (`capture.lazy`), so `import diagnose` does not load
torch. Pipeline stages that live here but are not part of the library: `diagnose.finetune` (training
TEViD) and `diagnose.recalibrate` (calibrating a checkpoint on a corpus).
"""
from __future__ import annotations

from capture.lazy import lazy_exports

__all__ = ["Alert", "DPConfig", "Monitor", "MonitorCallback", "SinkConfig", "TEViD", "TensorBoardSink", "WandbSink",
           "default_symptoms", "load_tevid", "select_checkpoint", "watch"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "watch": "api", "Monitor": "monitor", "Alert": "symptoms", "default_symptoms": "symptoms",
    "MonitorCallback": "callbacks", "SinkConfig": "sinks", "TensorBoardSink": "sinks", "WandbSink": "sinks",
    "DPConfig": "privacy", "TEViD": "tevid", "load_tevid": "tevid", "select_checkpoint": "selection",
})
