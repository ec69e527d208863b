"""Training: ``TrainConfig`` -> ``train`` on accelerate, feature shards, atomic checkpoints;
fine-tuning from released weights.

``train`` and ``TrainResult`` are imported on first use (they bring in accelerate), so that
``unidiffuser --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .checkpoint import (
    Checkpoint,
    PretrainedSource,
    find_checkpoints,
    latest_checkpoint,
    load_network_weights,
    load_training_state,
    load_weights,
    pretrained_source,
    save_checkpoint,
)
from .config import TrainConfig, load_config
from .data import DataStream, FeatureShards, ToyExamples, sample_latent, write_feature_shard

if TYPE_CHECKING:
    from .trainer import TrainResult, train

__all__ = [
    "Checkpoint",
    "DataStream",
    "FeatureShards",
    "PretrainedSource",
    "ToyExamples",
    "TrainConfig",
    "TrainResult",
    "find_checkpoints",
    "latest_checkpoint",
    "load_config",
    "load_network_weights",
    "load_training_state",
    "load_weights",
    "pretrained_source",
    "sample_latent",
    "save_checkpoint",
    "train",
    "write_feature_shard",
]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
