"""The parallel layout: Megatron's model-parallel sizes. Data parallelism is what the world size leaves."""

from dataclasses import dataclass
from typing import Optional

from megatron_psft.config.base import Section, setting


@dataclass(frozen=True)
class ParallelLayout(Section):
    tensor: int = setting(1, key="tensor_model_parallel_size")
    pipeline: int = setting(1, key="pipeline_model_parallel_size")
    expert: int = setting(1, key="expert_model_parallel_size")
    expert_tensor: Optional[int] = setting(None, key="expert_tensor_parallel_size")  # None: same as `tensor`
    virtual_pipeline: Optional[int] = setting(None, key="virtual_pipeline_model_parallel_size")
    sequence_parallel: bool = False

    def __post_init__(self):
        for name in ("tensor", "pipeline", "expert"):
            self.at_least(name, 1)
        for name in ("expert_tensor", "virtual_pipeline"):
            self.at_least(name, 1, optional=True)
        self.require(not self.sequence_parallel or self.tensor > 1,
                     "--sequence-parallel needs --tensor-model-parallel-size > 1")

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tensor * self.pipeline
        self.require(world_size % model_parallel == 0,
                     f"world size {world_size} is not divisible by TP x PP = {model_parallel} "
                     "(--tensor-model-parallel-size x --pipeline-model-parallel-size)")
        return world_size // model_parallel
