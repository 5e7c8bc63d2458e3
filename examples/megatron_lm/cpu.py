"""Megatron-LM's ``pretrain()`` on CPU processes over gloo: what the example needs besides
megatron_psft/platform/cpu_compat.py (which covers Megatron-Core) to run without a GPU, for the tests, the bench
and a laptop. Tested with megatron-core 0.19.2's ``megatron.training``; each patch says why.

- ``pretrain()`` calls ``initialize_megatron()`` without ``allow_no_cuda``, which then asserts CUDA.
- Without a CUDA device Megatron-LM skips creating the model-parallel groups and seeding the
  tensor-parallel RNG tracker: :func:`initialize_model_parallel` does both as it would, once the
  arguments are parsed.
- Building DDP opens a side CUDA stream; the CPU has one implicit stream.
- With tensor parallelism, argument validation reads the GPU's architecture (none here: as a pre-Blackwell
  GPU, which asks for ``CUDA_DEVICE_MAX_CONNECTIONS=1``, set here as a launch script sets it).
"""

import contextlib
import functools
import os

import torch


class _HostStream:
    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass


def apply() -> None:
    """Start gloo with Megatron-Core's CPU layer and patch Megatron-LM's CUDA-only start-up (idempotent)."""
    from megatron_psft.platform import parallel

    parallel.init_process_group()  # applies megatron_psft.platform.cpu_compat
    from megatron.training import arguments, initialize, training

    training.initialize_megatron = functools.partial(initialize.initialize_megatron, allow_no_cuda=True)
    torch.cuda.Stream = lambda *args, **kwargs: _HostStream()
    torch.cuda.current_stream = lambda *args, **kwargs: _HostStream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    arguments.get_device_arch_version = lambda: 0
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def initialize_model_parallel(args) -> None:
    """The groups and seeds Megatron-LM's ``_initialize_distributed`` / ``_set_random_seed`` make on a GPU."""
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.virtual_pipeline_model_parallel_size, context_parallel_size=args.context_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size)
    seed = args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
