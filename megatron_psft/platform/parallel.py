"""Parallel-group plumbing: process group start-up, Megatron-Core model parallelism, and the groups
the rest of the package reduces over. Nothing else in the package calls ``parallel_state`` directly
for set-up."""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from megatron_psft.config import ParallelLayout


def use_cpu() -> bool:
    return not torch.cuda.is_available()


def select_local_device() -> None:
    """Bind this process to its GPU (torchrun's LOCAL_RANK) before anything touches CUDA, so no rank
    opens a context on GPU 0 by accident."""
    if not use_cpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(timeout_minutes: int = 30) -> None:
    """Start torch.distributed from torchrun's environment (a single process when there is none)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if use_cpu():
        from megatron_psft.platform import cpu_compat

        cpu_compat.apply()
        backend = "gloo"
    else:
        select_local_device()
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def initialize(layout: ParallelLayout, seed: int = 1234) -> None:
    """Create Megatron-Core's parallel groups for `layout` and seed every RNG Megatron uses."""
    from megatron.core import parallel_state, tensor_parallel

    init_process_group()
    layout.data_parallel_size(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor,
    )
    # Offset by pipeline stage, as Megatron-LM does, so stages do not initialise identical layers.
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy() -> None:
    """Tear down the model-parallel groups (the process group stays, so another layout can follow)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def data_group(with_context_parallel: bool = True):
    """Ranks that hold different data: PSFT's token-mean and every metric reduce over these."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=with_context_parallel)


def data_rank() -> int:
    """This rank's index among the data-parallel ranks: which share of the global batch it reads."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def data_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def pipeline_group():
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


def is_last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def device() -> torch.device:
    return torch.device("cpu") if use_cpu() else torch.device("cuda", torch.cuda.current_device())


def is_reporting_rank() -> bool:
    """The rank that prints and writes metrics: the last, which holds the last pipeline stage (the loss)."""
    if not dist.is_initialized():  # before start-up: torchrun's environment says which rank this is
        return int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1
    return dist.get_rank() == dist.get_world_size() - 1


def print_rank_last(*args) -> None:
    """Print on the last rank, which is on the last pipeline stage where losses live."""
    if is_reporting_rank():
        print(*args, flush=True)


@contextlib.contextmanager
def single_process_group():
    """dist_checkpointing is collective; conversion runs as a world of one (no launcher, no port)."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("checkpoint conversion runs in a single process; do not launch it with torchrun")
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
