"""Megatron-Core on CPU with gloo: the fenced compatibility layer.

Megatron-Core assumes CUDA in a handful of private call sites. This module patches exactly those so
that the real model, parallel groups, MoE dispatchers, schedules, DDP, the distributed optimizer and
``dist_checkpointing`` run on CPU across local gloo processes, which is how the test suite and the
embedded default run on machines without a GPU.

``megatron_psft.platform.parallel.init_process_group`` applies it, and only when CUDA is absent; it refuses to
run when CUDA is available, and refuses megatron-core versions it was not tested against
(``TESTED_MEGATRON_CORE``): the patched functions are private and change between releases. Where a
patch point differs between the tested versions, the patch branches on the version and says why.
Nothing else in the package imports it.
"""

import torch
import torch.distributed as dist

TESTED_MEGATRON_CORE = ("0.16.1", "0.19.2")

_applied = False


def apply() -> None:
    """Patch Megatron-Core for CPU execution (idempotent)."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_psft.platform.cpu_compat must not be used when CUDA is available")
    import megatron.core

    release = check_version(megatron.core.__version__)
    _patch_cuda_runtime(release)
    _patch_rng_tracker()
    _patch_causal_mask()
    _patch_moe(release)
    _patch_sequence_parallel_norm()
    _patch_uneven_all_gather()
    _CudaToCpuMode().__enter__()  # stays active for the life of the process
    _applied = True


def check_version(version: str) -> tuple:
    """The (major, minor) release of a tested megatron-core version; RuntimeError for any other.

    A local suffix is ignored: 0.19.2's ``__version__`` appends ``+<git HEAD>`` whenever the installed
    package lies inside a git work tree (a venv in the repository), e.g. ``0.19.2+7bf3670``."""
    public = version.split("+", 1)[0]
    if public not in TESTED_MEGATRON_CORE:
        raise RuntimeError(
            f"megatron_psft.platform.cpu_compat is tested with megatron-core {' and '.join(TESTED_MEGATRON_CORE)} "
            f"only, found {version}: the private call sites it patches move between releases. Install a "
            "tested version for CPU runs (requirements-cpu.txt, requirements-cpu-py312.txt)."
        )
    return tuple(int(part) for part in public.split(".")[:2])


class _NullStream:
    """The CPU has one implicit stream: waits and events on it are no-ops."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass


def _patch_cuda_runtime(release):
    # ~70 call sites place tensors on torch.cuda.current_device(); streams and syncs have no CPU meaning.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    if release >= (0, 19):
        # 0.19.2's DDP grad sync (param_and_grad_buffer's start_grad_sync) always fetches
        # torch.cuda.current_stream() to wait on CUDA-graph events; 0.16.1 reaches no stream on the
        # paths the CPU runs (one distributed-optimizer instance), so it keeps the real function.
        torch.cuda.current_stream = lambda device=None: _NullStream()


def _patch_rng_tracker():
    # The tensor-parallel RNG tracker swaps CUDA generator states; route it to the CPU generator.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda clone=False, device="cuda", graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None


def _patch_causal_mask():
    # get_default_causal_mask builds its mask with device="cuda".
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = lambda sq: torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _patch_moe(release):
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe import token_dispatcher

    if release < (0, 19):
        # 0.16.1 defines te_general_gemm only when Transformer Engine imports, and the router reads it;
        # 0.19.2 binds it to None without TE.
        moe_utils.te_general_gemm = None

    # The alltoall dispatcher copies its split sizes to host as numpy on a side CUDA stream; on CPU
    # the copy is a no-op, so do the numpy conversion that gloo's all_to_all_single needs.
    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    dispatcher.cuda_dtoh_stream = object()

    def _splits_to_host(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name, None)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())
        return tokens_per_expert

    dispatcher._maybe_dtoh_and_synchronize = _splits_to_host


def _patch_sequence_parallel_norm():
    # Without Apex/TE the local spec's torch norm refuses sequence parallelism. Build the same norm and
    # tag its parameters like TENorm does, so finalize_model_grads all-reduces their grads over TP.
    from megatron.core.transformer import torch_norm

    def _new(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
             normalization="LayerNorm"):
        norm_cls = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}[config.normalization]
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm

    torch_norm.WrappedTorchNorm.__new__ = _new


def _patch_uneven_all_gather():
    # MoE dispatch under sequence parallelism all-gathers uneven splits, which gloo rejects:
    # pad to the largest split, gather, strip.
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    def _gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        padded = input_.new_zeros((max(sizes),) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded.contiguous(), group=group)
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)

    mappings._gather_along_first_dim = _gather


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Maps literal ``device="cuda"`` / ``.cuda()`` / ``.to("cuda")`` (optimizer, DDP buffers,
    schedules, clip_grads) to CPU; the ``current_device`` patch cannot reach those."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "record_stream":
            return None
        if name == "to":
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if name == "type" and len(args) == 1 and not kwargs:
            # The optimizer and clip_grads compare param.type() with 'torch.cuda.FloatTensor'.
            result = func(*args)
            return result.replace("torch.", "torch.cuda.", 1) if ".cuda." not in result else result
        return func(*args, **kwargs)
