"""Step metrics that reduce exactly across micro-batches and data-parallel ranks.

A metric is a tensor in one of three forms: a mean is ``[sum, count]`` (from :func:`mean_metric`), so
means combine by summing both parts, never by averaging averages; an extreme is a scalar whose name
ends in ``_min`` or ``_max`` (from :func:`extreme_metric`), holding the identity (+inf / -inf) when no
token contributed; a total is a scalar whose name ends in ``_total``, summed.
"""

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_psft.platform import parallel


def mean_metric(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(torch.float32)
    return torch.stack([(values.float() * mask).sum(), mask.sum()])


def extreme_metric(values: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    identity = float("inf") if kind == "min" else float("-inf")
    masked = values.float().masked_fill(~mask.bool(), identity)
    if masked.numel() == 0:
        return masked.new_tensor(identity)
    return masked.min() if kind == "min" else masked.max()


def _kind(name: str) -> str:
    for kind in ("min", "max", "total"):
        if name.endswith("_" + kind):
            return kind
    return "mean"


def reduce_metrics(
    per_microbatch: List[Dict[str, torch.Tensor]], group: Optional[dist.ProcessGroup] = None
) -> Dict[str, Optional[float]]:
    """Combine the micro-batches' metrics, then across `group` (the data-parallel ranks).

    Every rank of `group` must call this with the same metric names. A metric no token contributed
    to is None, never NaN or a made-up zero.
    """
    names = sorted({name for metrics in per_microbatch for name in metrics})
    totals = {}
    for name in names:
        values = torch.stack([m[name].detach().float().cpu() for m in per_microbatch if name in m])
        kind = _kind(name)
        totals[name] = values.min() if kind == "min" else values.max() if kind == "max" else values.sum(0)
    if group is not None and dist.get_world_size(group) > 1:
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        for kind, op in (("mean", dist.ReduceOp.SUM), ("total", dist.ReduceOp.SUM), ("min", dist.ReduceOp.MIN),
                         ("max", dist.ReduceOp.MAX)):
            chosen = [n for n in names if _kind(n) == kind]
            if chosen:
                flat = torch.cat([totals[n].reshape(-1) for n in chosen]).to(device)
                dist.all_reduce(flat, op=op, group=group)
                parts = flat.cpu().split([totals[n].numel() for n in chosen])
                totals.update({n: p.reshape(totals[n].shape) for n, p in zip(chosen, parts)})
    result = {}
    for name, total in totals.items():
        if _kind(name) == "mean":
            result[name] = float(total[0] / total[1]) if total[1] > 0 else None
        elif _kind(name) == "total":
            result[name] = float(total) if total.numel() == 1 else total.tolist()
        else:
            result[name] = float(total) if torch.isfinite(total) else None
    return result


def moe_load_balance(num_microbatches: int) -> dict:
    """Megatron's load-balancing loss per MoE layer over the last step (1.0 is perfectly balanced):
    its mean and worst layer, reduced as Megatron reduces its MoE metrics tracker. Clears the tracker.

    Megatron's own reductions average with ReduceOp.AVG, which gloo lacks: they are spelled here as
    SUM / size, in the order and with the groups of the installed version."""
    name = "load_balancing_loss"
    try:  # newer megatron-core (0.19.2 here): the MoE metrics tracker object, moe_logging.MoEMetricsTracker
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # 0.16: the module-level dict of moe_utils
        get_moe_metrics_tracker = None

    if get_moe_metrics_tracker is not None:
        tracker = get_moe_metrics_tracker()
        entry = tracker.metrics.get(name)
        if entry is None:
            return {}
        # MoEMetricsTracker._sync_metrics: PP sum, reduce_group sum, avg_group average, then the DP
        # average whenever the entry asks for it.
        reduce_group, avg_group = entry.reduce_group, entry.avg_group
        dp_average = entry.needs_dp_avg
        values, clear = entry.values, tracker.clear
    else:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

        entry = get_moe_layer_wise_logging_tracker().get(name)
        if entry is None:
            return {}
        # reduce_aux_losses_tracker_across_ranks: PP sum, reduce_group sum, the DP average only after a
        # reduce_group that lacks the DP ranks, then avg_group average.
        reduce_group, avg_group = entry.get("reduce_group"), entry.get("avg_group")
        dp_average = reduce_group is not None and not entry.get("reduce_group_has_dp", False)
        values, clear = entry["values"], clear_aux_losses_tracker

    values = values.detach().float().clone()  # reduce a copy: Megatron's own report may still run
    dist.all_reduce(values, group=parallel.pipeline_group())  # each stage fills its own layers
    if reduce_group is not None:
        dist.all_reduce(values, group=reduce_group)  # partial sums over TP x CP (or TP x DP x CP)
    # The averages are linear, so their order does not change the result.
    for group in (avg_group, parallel.data_group(with_context_parallel=False) if dp_average else None):
        if group is not None:
            dist.all_reduce(values, group=group)
            values /= dist.get_world_size(group)
    values *= 1 / num_microbatches  # Megatron's report scales by loss_scale = 1 / num_microbatches
    clear()
    return {"moe_load_balance_mean": float(values.mean()), "moe_load_balance_max": float(values.max())}


def model_flops_per_token(args, seq_length: int) -> float:
    """Forward FLOPs per token: 2 x the matmul parameters a token touches, plus causal attention."""
    q_width, kv_width = args.num_attention_heads * args.head_dim, args.num_kv_heads * args.head_dim
    attention_params = args.hidden_size * (q_width + 2 * kv_width) + q_width * args.hidden_size
    if args.is_moe:
        mlp_params = args.moe_top_k * 3 * args.hidden_size * args.moe_ffn_hidden_size + args.hidden_size * args.num_experts
    else:
        mlp_params = 3 * args.hidden_size * args.ffn_hidden_size
    causal_attention = 2 * q_width * seq_length  # QK^T and AV, halved by the causal mask, x2 FLOPs/MAC
    per_layer = 2 * (attention_params + mlp_params) + causal_attention
    return args.num_layers * per_layer + 2 * args.hidden_size * args.vocab_size


def global_real_tokens(micro_batches) -> int:
    """Input positions of this step's global batch that belong to a sample (padding has no segment);
    collective over the data-parallel group."""
    local = sum(int((micro_batch["segment_ids"] >= 0).sum()) for micro_batch in micro_batches)
    total = torch.tensor(float(local), device=parallel.device())
    dist.all_reduce(total, group=parallel.data_group())
    return int(total)


def throughput(real_tokens: int, rows: int, seq_length: int, forward_passes: int, flops_per_token: float,
               seconds: float) -> dict:
    """``tokens_per_s`` (real tokens) and ``tflops_per_gpu`` over the `rows` of `seq_length` computed in
    `forward_passes` forward-equivalents per row (training forward + backward count 3)."""
    return {"tokens_per_s": real_tokens / seconds,
            "tflops_per_gpu": rows * forward_passes * seq_length * flops_per_token / seconds
            / dist.get_world_size() / 1e12}


def step_record(result, micro_batches, objective, phase: str, seconds: float, old_policy, launch,
                flops_per_token: float) -> dict:
    """One training step's metrics: the objective's (reduced over the global batch), the optimizer's,
    throughput, MoE load balance and memory."""
    from megatron_psft.observability.memory import memory_record

    data = launch.config.data
    # Every rank computes as many rows; the old-policy and reference passes are one forward each.
    rows = len(micro_batches) * data.micro_batch_size * parallel.data_size()
    forward_passes = 3 + old_policy.last_pass_steps + objective.needs_reference_logprobs
    record = dict(result.metrics)
    record.update(
        phase=phase,
        grad_norm=result.grad_norm,
        learning_rate=result.learning_rate,
        step_time_s=seconds,
        old_policy_s=old_policy.last_pass_seconds if objective.needs_old_logprobs else 0.0,
        routing_flip_fraction=result.routing_flip_fraction,
        **throughput(global_real_tokens(micro_batches), rows, data.seq_length, forward_passes, flops_per_token, seconds),
        **(moe_load_balance(len(micro_batches))
           if launch.model_args.is_moe and launch.transformer_config.moe_aux_loss_coeff else {}),
        **memory_record(),
    )
    return record
