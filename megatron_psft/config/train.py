"""The whole run's configuration: one frozen section per part, and the checks that span sections.

Built from the command line by :mod:`megatron_psft.config.flags` or directly in Python::

    TrainConfig(data=DataConfig(data_prefix="data/chat", seq_length=2048),
                training=TrainingConfig(train_iters=100), objective=ObjectiveConfig(eps_high=0.28))

Every check runs when it is built, before any process group exists. What needs the world size or
the machine (batch divisibility, the TransformerConfig, memory) is checked by :mod:`megatron_psft.launch`.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict

from megatron_psft.config.base import ConfigError, Section, flag_of, key_of
from megatron_psft.config.data import DataConfig, EvalConfig
from megatron_psft.config.model import ModelConfig
from megatron_psft.config.optimizer import OptimConfig
from megatron_psft.config.parallel import ParallelLayout
from megatron_psft.config.psft import ObjectiveConfig, OldPolicyConfig
from megatron_psft.config.run import CheckpointConfig, LoggingConfig, TrainingConfig


@dataclass(frozen=True)
class TrainConfig(Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    old_policy: OldPolicyConfig = field(default_factory=OldPolicyConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        model, data, old_policy, training = self.model, self.data, self.old_policy, self.training
        self.require(training.sft_warmup_steps < training.train_iters or self.objective.name == "sft",
                     "--sft-warmup-steps must be smaller than --train-iters")
        self.require(not self.parallel.sequence_parallel or data.seq_length % self.parallel.tensor == 0,
                     "--seq-length must be divisible by --tensor-model-parallel-size under --sequence-parallel")
        if model.tracks_routing:
            self.require(old_policy.old_policy_micro_batch_size in (None, data.micro_batch_size),
                         "--moe-router-replay / --moe-routing-flip-stats compare routing micro-batch by micro-batch: "
                         "--old-policy-micro-batch-size must equal --micro-batch-size")
            self.require(not self.parallel.virtual_pipeline,
                         "--moe-router-replay / --moe-routing-flip-stats do not support a virtual pipeline yet")
        self.require(not self.logging.profile or self.logging.profile_dir or self.checkpoint.save,
                     "--profile needs --profile-dir or --save")
        if self.logging.metrics_file is None and self.checkpoint.save:
            metrics_file = self.checkpoint.save.rstrip("/") + "/metrics.jsonl"
            object.__setattr__(self, "logging", self.logging.replace(metrics_file=metrics_file))

    # --- views --------------------------------------------------------------------------------------
    def sections(self) -> Dict[str, Section]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def flat(self) -> Dict[str, Any]:
        """Every setting by its key (unique across sections), as :meth:`to_dict` values."""
        return {key: value for section in self.sections().values() for key, value in section.to_dict().items()}

    def flag(self, key: str) -> str:
        """The command-line flag of the setting `key`."""
        for section in self.sections().values():
            for f in dataclasses.fields(section):
                if key_of(f) == key:
                    return flag_of(type(section), f.name)
        raise KeyError(key)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        types = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        unknown = set(values) - set(types)
        if unknown:
            raise ConfigError(f"TrainConfig has no sections {sorted(unknown)}")
        return cls(**{name: types[name].from_dict(section) for name, section in values.items()})
