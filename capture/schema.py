"""The names every stage agrees on: the diagnosis classes, the label values that are not scored, the
ignore value of a window target and the readouts a TEViD window reads (docs/architecture.md, "Schema").

The factory writes these labels into its run stores, `pretrain.clips` turns them into window targets,
TEViD predicts `CLASSES` in this order, the live monitor names its alerts after them and the evaluation
scores them. Defined here once, with no import heavier than the standard library, so the live monitor
can read them without loading the data path (webdataset, zarr) and the labelling rules without torch.
"""
from __future__ import annotations

__all__ = ["CLASSES", "CLIP_READOUTS", "HEALTHY", "IGNORE", "KNOWN_CLASSES", "LABEL_PRIORITY", "NOVEL",
           "UNDERPERFORMING", "UNSCORED_LABELS"]

HEALTHY = "healthy"
# the class index of a TEViD output and of a window target: K = 5, index 0 is Healthy
CLASSES = (HEALTHY, "overfitting", "instability", "forgetting", "concept_bias")
KNOWN_CLASSES = CLASSES[1:]  # the known anomaly classes (a factory perturbation of kind "known" injects one)
# which label a run gets when several rules fire (paper Appendix A.1): Instability > Forgetting >
# Concept Bias > Overfitting, then Healthy / underperforming
LABEL_PRIORITY = ("instability", "forgetting", "concept_bias", "overfitting")
UNDERPERFORMING = "underperforming"  # no rule fired but the final metric missed the dataset's floor
UNSCORED_LABELS = (None, UNDERPERFORMING)  # run labels whose windows are never scored (target IGNORE)
NOVEL = "novel"  # a perturbation kind (and `injected` value) outside the known classes
IGNORE = -1  # the target of a window that is not scored (also the ignore index of the training loss)
# the raw readouts of a clip, in this order: a TEViD window is (T, 6, S, S) frames + (T, 8) of these
CLIP_READOUTS = ("head_grad_norm", "score_w", "score_z", "gwa", "confidence", "entropy", "margin", "loss")
