"""pretrain: the Dynamics-MAE stage (docs/architecture.md, docs/models.md). Its model parts (the
space-time encoder, the MAE, safetensors checkpoints) belong to the library the live monitor loads;
`pretrain.clips` (the corpus's windows as datasets and webdataset shards) and `pretrain.train` (the
pretraining command) are the data path and a pipeline stage. Names below are imported on first use.
"""
from __future__ import annotations

from capture.lazy import lazy_exports

__all__ = ["ENCODER_VARIANTS", "DynamicsMAE", "EncoderConfig", "SpaceTimeEncoder", "encoder_config",
           "load_checkpoint", "save_checkpoint"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "ENCODER_VARIANTS": "encoder", "EncoderConfig": "encoder", "SpaceTimeEncoder": "encoder", "encoder_config": "encoder",
    "DynamicsMAE": "mae", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
})
