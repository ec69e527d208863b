"""Training: ``TrainConfig`` -> ``train`` on accelerate, feature shards, atomic checkpoints;
fine-tuning from released weights; the caption decoder's stage (``DecoderTrainConfig`` ->
``train_decoder``), which comes first when the text encoder changes.

``train``, ``TrainResult``, ``train_decoder`` and ``DecoderTrainResult`` are imported on first use
(they bring in accelerate and transformers), so that ``unidiffuser --help`` stays fast.
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
from .config import DecoderTrainConfig, TrainConfig, load_config
from .data import DataStream, FeatureShards, ToyExamples, sample_latent, write_feature_shard

if TYPE_CHECKING:
    from .decoder import DecoderTrainResult, train_decoder
    from .trainer import TrainResult, train

__all__ = [
    "Checkpoint",
    "DataStream",
    "DecoderTrainConfig",
    "DecoderTrainResult",
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
    "train_decoder",
    "write_feature_shard",
]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("train_decoder", "DecoderTrainResult"):
        from . import decoder

        return getattr(decoder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
