"""eval: everything that measures (docs/architecture.md, docs/evaluation.md): the streaming replay of a
corpus's held-out runs, metrics with bootstrap intervals, the baselines, tuning, the report, ablations
and probes, and the experiments (overhead, privacy curve, HPO, speed, shipping a model). `eval` may
import every other package; nothing outside `eval` imports it. Names below are imported on first use.
"""
from __future__ import annotations

from capture.lazy import lazy_exports

__all__ = ["RunResult", "TEViDDiagnoser", "load_runs", "replay_runs", "summarize"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "RunResult": "metrics", "summarize": "metrics",
    "TEViDDiagnoser": "replay", "load_runs": "replay", "replay_runs": "replay",
})
