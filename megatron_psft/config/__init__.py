"""Typed, frozen configuration: one section per part of a run, checked when built.

flags (:mod:`.flags`) -> :class:`TrainConfig` -> launch (:mod:`megatron_psft.launch`) -> trainer.
"""

from megatron_psft.config.base import ConfigError, Section
from megatron_psft.config.data import DataConfig, EvalConfig, parse_eval_data_prefix
from megatron_psft.config.model import ModelConfig
from megatron_psft.config.optimizer import OptimConfig
from megatron_psft.config.parallel import ParallelLayout
from megatron_psft.config.psft import OBJECTIVES, ObjectiveConfig, OldPolicyConfig
from megatron_psft.config.run import CheckpointConfig, LoggingConfig, TrainingConfig
from megatron_psft.config.train import TrainConfig

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig", "ModelConfig",
           "OBJECTIVES", "ObjectiveConfig", "OldPolicyConfig", "OptimConfig", "ParallelLayout", "Section",
           "TrainConfig", "TrainingConfig", "parse_eval_data_prefix"]
