"""Megatron-Core's DDP, (distributed) Adam and learning-rate / weight-decay scheduler, wired up; and the
fix-ups torch's Adam needs when Megatron loads its state."""

import contextlib
from typing import List

import torch

from megatron_psft.config import OptimConfig


def wrap_with_ddp(model_chunks, transformer_config, optim: OptimConfig) -> List[torch.nn.Module]:
    """Wrap each chunk in Megatron's DDP and hand the schedule its grad hooks.

    Gradients are summed, not averaged, in the collective: with ``calculate_per_token_loss`` the
    schedule divides by the global token count instead.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=optim.overlap_grad_reduce,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        average_in_collective=False,
        check_for_nan_in_grad=True,
    )
    wrapped = [
        DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(model_chunks)
    ]
    transformer_config.finalize_model_grads_func = finalize_model_grads

    def one_or_list(funcs):
        return funcs if len(funcs) > 1 else funcs[0]

    transformer_config.no_sync_func = one_or_list([chunk.no_sync for chunk in wrapped])
    if optim.overlap_grad_reduce:  # let the pipeline schedule start each chunk's reduction when it is done
        transformer_config.grad_sync_func = one_or_list([chunk.start_grad_sync for chunk in wrapped])
    return wrapped


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (the model itself when unwrapped)."""
    return chunk.module if hasattr(chunk, "module") else chunk


def build_optimizer(model_chunks, optim: OptimConfig, params_dtype: torch.dtype, train_steps: int):
    """Adam over the DDP-wrapped chunks and its scheduler (linear warm-up, then `lr_decay_style`)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            bf16=params_dtype == torch.bfloat16,
            params_dtype=params_dtype,
            use_distributed_optimizer=optim.use_distributed_optimizer,
        ),
        model_chunks,
    )
    warmup = min(optim.lr_warmup_steps, max(train_steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup,
        # Step n trains at schedule position n + 1 (see train_step), so the run's last step is
        # at position train_steps: decaying over one more keeps its learning rate above min_lr.
        lr_decay_steps=max(optim.lr_decay_steps or train_steps + 1, warmup + 1),
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(train_steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def init_state_for_loading(optimizer) -> None:
    """Create Adam's empty state, which the sharded optimizer state dict is built from before loading.
    Megatron's init_state_fn leaves out torch Adam's per-parameter ``step`` (kept per group by the
    Apex/TE Adams), which the distributed optimizer reads without them."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        sub.init_state_fn(sub.optimizer, sub.config)
    for sub in _torch_adams(optimizer):
        for state in sub.optimizer.state.values():
            state.setdefault("step", torch.tensor(0.0))


@contextlib.contextmanager
def reshardable_load_keeps_adam_step(optimizer):
    """Within it, the distributed optimizer loads a fully_reshardable (or model-space) state with torch's
    Adam. megatron-core (0.16.1 to 0.19.2) restores Adam's step from the param groups, then copies every
    state tensor a parameter holds from the checkpoint's per-parameter tensors, which leave ``step``
    out: a KeyError wherever Apex / TE's Adam (no per-parameter step) is absent. Each parameter's own,
    just restored step is handed back as its source."""
    patched = [sub for sub in _torch_adams(optimizer) if hasattr(sub, "_set_main_param_and_optimizer_states")]
    for sub in patched:
        def set_states(model_param, tensors, sub=sub, original=sub._set_main_param_and_optimizer_states):
            group_index, group_order = sub.model_param_group_index_map[model_param]
            main_param = sub.optimizer.param_groups[group_index]["params"][group_order]
            state = sub.optimizer.state[main_param]
            original(model_param, {**tensors, **({"step": state["step"]} if "step" in state else {})})

        sub._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for sub in patched:
            del sub._set_main_param_and_optimizer_states


def _torch_adams(optimizer) -> list:
    """The chained sub-optimizers (or the optimizer itself) that wrap torch's Adam."""
    return [sub for sub in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(sub.optimizer, torch.optim.Adam)]


def restore_adam_steps(optimizer) -> None:
    """Megatron restores Adam's step count into the param groups (where the Apex/TE Adams keep it);
    torch's Adam reads it per parameter, so its bias correction would restart at step 1."""
    for sub in _torch_adams(optimizer):
        for group in sub.optimizer.param_groups:
            if "step" in group:
                for param in group["params"]:
                    sub.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))
