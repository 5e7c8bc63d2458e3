"""One optimizer step, and the forward-only log-prob pass, through Megatron's pipeline schedules.

The path from a batch to a gradient: micro-batch -> ``GPTModel`` forward (vocab-parallel logits on
the last stage) -> :func:`vocab_parallel_logprobs` -> objective -> Megatron's schedule, which sums
the micro-batches' losses and gradients and normalises by the global token count.
"""

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_psft.platform import parallel
from megatron_psft.psft import routing
from megatron_psft import platform as platforms
from megatron_psft.kernels.fused_logprobs import fused_vocab_parallel_logprobs, output_hidden_states, output_weight
from megatron_psft.kernels.logprobs import vocab_parallel_logprobs
from megatron_psft.observability.metrics import reduce_metrics
from megatron_psft.psft.objectives import ObjectiveConfig, make_loss_func
from megatron_psft.observability.timers import Timers


@dataclass
class StepResult:
    metrics: Dict[str, Optional[float]]  # reduced over the global batch; identical on every rank
    grad_norm: Optional[float]
    learning_rate: float
    routing_flip_fraction: Optional[float] = None  # old-policy top-k choices the training pass did not route to


def _uses_thd(micro_batch) -> bool:
    """Packed rows go to Transformer Engine's attention as one THD sequence of ``b * s`` tokens."""
    return "cu_seqlens" in micro_batch and platforms.current().use_transformer_engine


def _padding_mask(model, micro_batch) -> Optional[torch.Tensor]:
    """Megatron's MoE padding mask (True on padding): padding stays out of the routers' load-balancing
    statistics and the aux loss is normalised by real tokens. Padding still passes through the experts,
    as every token does in Megatron's dispatch; packing is what removes it."""
    from megatron.core import tensor_parallel
    from megatron.core.utils import get_attr_wrapped_model

    config = get_attr_wrapped_model(model, "config")
    if not config.num_moe_experts:
        return None
    padding = micro_batch["segment_ids"] < 0
    if _uses_thd(micro_batch):
        padding = padding.view(1, -1)
    if config.sequence_parallel and not get_attr_wrapped_model(model, "pre_process"):
        # GPTModel splits the mask along the sequence only on the first stage; later stages get the whole
        # mask next to their sequence-parallel shard of the hidden states.
        padding = tensor_parallel.scatter_to_sequence_parallel_region(padding.t().contiguous()).t().contiguous()
    return padding


def model_forward(model, micro_batch):
    """Padded rows need no attention mask: the padding is on the right, after every real token of its row,
    and the loss mask drops it. Packed rows keep attention within each sample: TE's THD attention with the
    samples' boundaries (which also restarts the RoPE positions), or on the local spec a block-diagonal
    causal mask. There RoPE rotates by the position in the row; since a rotary score depends only on the
    query-key offset and attention stays inside the sample, that equals rotating by the position in the
    sample (tests/test_batching.py: packed log-probs equal padded ones)."""
    tokens, position_ids = micro_batch["tokens"], micro_batch["position_ids"]
    padding_mask = _padding_mask(model, micro_batch)
    if "cu_seqlens" not in micro_batch:
        return model(tokens, position_ids, attention_mask=None, padding_mask=padding_mask)
    if _uses_thd(micro_batch):
        from megatron.core.packed_seq_params import PackedSeqParams

        boundaries, longest = micro_batch["cu_seqlens"], micro_batch["max_seqlen"]
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=boundaries, cu_seqlens_kv=boundaries,
                                 max_seqlen_q=longest, max_seqlen_kv=longest)
        return model(tokens.view(1, -1), position_ids.view(1, -1), attention_mask=None, padding_mask=padding_mask,
                     packed_seq_params=packed)
    segments = micro_batch["segment_ids"]
    same_sample = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=tokens.device).tril()
    masked = ~(same_sample & causal)[:, None]  # [b, 1, s, s], True where attention is not allowed
    return model(tokens, position_ids, attention_mask=masked, padding_mask=padding_mask)


def stage_output(model, micro_batch, fused_logprobs: bool):
    """The model's output for a micro-batch: on the last stage the vocab-parallel logits, or with
    `fused_logprobs` the final hidden states (the output layer is applied inside the fused log-probs)."""
    if not fused_logprobs:
        return model_forward(model, micro_batch)
    with output_hidden_states(model):
        return model_forward(model, micro_batch)


def output_logprobs(model, micro_batch, vocab_size: int, fused_logprobs: bool, with_entropy: bool):
    """The function from the last stage's output (:func:`stage_output`) to the log-probs ``[b, s]`` of the
    micro-batch's labels, and with `with_entropy` their entropy."""
    labels = micro_batch["labels"]
    # Under THD the stage's output is one sequence of the micro-batch's b * s tokens.
    targets = labels.view(1, -1) if _uses_thd(micro_batch) else labels

    def logprobs_of(output):
        if fused_logprobs:
            from megatron.core.utils import get_attr_wrapped_model

            result = fused_vocab_parallel_logprobs(
                output, output_weight(model), targets, vocab_size=vocab_size, with_entropy=with_entropy,
                sequence_parallel=get_attr_wrapped_model(model, "config").sequence_parallel)
        else:
            result = vocab_parallel_logprobs(output, targets, vocab_size=vocab_size, with_entropy=with_entropy)
        return tuple(t.view(labels.shape) for t in result) if with_entropy else result.view(labels.shape)

    return logprobs_of


def micro_batch_multiple(model_chunks) -> int:
    """What the number of micro-batches must be a multiple of: the interleaved (VPP) schedule, which several
    chunks per rank mean, runs them in groups of ``microbatch_group_size_per_vp_stage`` (default: PP) and
    refuses a partial group."""
    if len(model_chunks) == 1:
        return 1
    from megatron.core.utils import get_model_config

    return get_model_config(model_chunks[0]).microbatch_group_size_per_vp_stage


def run_schedule(model_chunks, micro_batches, forward_step, forward_only):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    first = micro_batches[0]
    batch_size, seq_length = first["tokens"].shape
    if _uses_thd(first):  # the stages exchange [b * s, 1, hidden]
        batch_size, seq_length = 1, batch_size * seq_length
    data_iterator = [iter(micro_batches) for _ in model_chunks] if len(model_chunks) > 1 else iter(micro_batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=batch_size,
        forward_only=forward_only,
    )


def train_step(model_chunks, optimizer, scheduler, micro_batches: List[dict], objective: ObjectiveConfig,
               vocab_size: int, token_histograms: bool = False, routers=None, replay_routing: bool = False,
               timers: Optional[Timers] = None, fused_logprobs: bool = False) -> StepResult:
    """Forward and backward over this rank's micro-batches of one global batch, then one optimizer step.

    Each micro-batch dict holds ``tokens``, ``position_ids``, ``labels``, ``loss_mask`` and, as the
    objective needs, ``old_logprobs`` (or ``old_is_current``) and ``reference_logprobs``. With
    `routers` (the policy's, :func:`routing.routers`) and a micro-batch's ``old_routing`` from the
    old-policy pass, the forward replays that routing if `replay_routing`, and either way counts the
    choices of it that the forward did not route to (``routing_flip_fraction``: 0 under replay).
    `fused_logprobs` computes the log-probs from the final hidden states without materialising the logits.
    """
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    flipped = torch.zeros(2, device=parallel.device())  # [choices that moved, choices compared]

    def forward_step(data_iterator, model):
        nonlocal flipped
        micro_batch = next(data_iterator)
        old_routing = micro_batch.get("old_routing") if routers else None
        if old_routing is not None and replay_routing:
            routing.replay(routers, old_routing)
        output = stage_output(model, micro_batch, fused_logprobs)
        if old_routing is not None:
            flipped += routing.flipped_choices(routers, old_routing)
        return output, make_loss_func(
            objective, micro_batch["labels"], micro_batch["loss_mask"], vocab_size,
            old_logprobs=micro_batch.get("old_logprobs"),
            reference_logprobs=micro_batch.get("reference_logprobs"),
            old_is_current=micro_batch.get("old_is_current", False),
            token_histograms=token_histograms,
            logprobs_of=output_logprobs(model, micro_batch, vocab_size, fused_logprobs, with_entropy=True),
        )

    timers = timers or Timers(0)
    with timers("forward-backward"):
        per_microbatch = run_schedule(model_chunks, micro_batches, forward_step, forward_only=False)
    if routers:
        routing.stop(routers)
    metrics = reduce_over_stages(per_microbatch)
    if metrics["trained_tokens_total"] == 0:
        raise ValueError("the global batch has no response tokens (every loss_mask is 0): nothing to train on")
    with timers("optimizer"):
        scheduler.step(1)  # the learning rate of step n is that of n + 1 scheduler steps: warm-up starts above 0
        update_successful, grad_norm, _ = optimizer.step()
    if not update_successful:
        raise FloatingPointError(f"optimizer step failed (grad norm {grad_norm})")
    grad_norm = None if grad_norm is None else float(grad_norm)  # None: --clip-grad 0 without a norm
    flip_fraction = None
    if routers and any("old_routing" in micro_batch for micro_batch in micro_batches):
        dist.all_reduce(flipped)  # every stage routes its own layers
        flip_fraction = float(flipped[0] / flipped[1]) if flipped[1] else None
    return StepResult(metrics, grad_norm, optimizer.param_groups[0]["lr"], flip_fraction)


def forward_only_pass(model_chunks, micro_batches: List[dict], vocab_size: int, routers=None,
                      fused_logprobs: bool = False) -> List[dict]:
    """Per micro-batch: ``logprobs [b, s]`` of its labels (last stage only) and, with `routers`, the
    ``routing`` each of this rank's routers chose."""
    results = [{} for _ in micro_batches]
    position = iter(results)

    def loss_func(logprobs_of, output):
        logprobs = logprobs_of(output)
        return logprobs.sum(), torch.tensor(0, dtype=torch.int), {"logprobs": logprobs}

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        if routers:
            routing.start_recording(routers)
        output = stage_output(model, micro_batch, fused_logprobs)
        if routers:
            next(position)["routing"] = routing.recorded(routers)
        return output, functools.partial(
            loss_func, output_logprobs(model, micro_batch, vocab_size, fused_logprobs, with_entropy=False))

    with torch.no_grad():
        outputs = run_schedule(model_chunks, micro_batches, forward_step, forward_only=True)
    if routers:
        routing.stop(routers)
    if parallel.is_last_stage():
        for result, output in zip(results, outputs):
            result["logprobs"] = output["logprobs"].float()
    return results


def policy_logprobs(model_chunks, micro_batches: List[dict], vocab_size: int,
                    fused_logprobs: bool = False) -> Optional[List[torch.Tensor]]:
    """Forward-only pass: the log-probs ``[b, s]`` of each micro-batch's labels (last stage; None elsewhere)."""
    results = forward_only_pass(model_chunks, micro_batches, vocab_size, fused_logprobs=fused_logprobs)
    return [result["logprobs"] for result in results] if parallel.is_last_stage() else None


def reduce_over_stages(per_microbatch: List[dict]) -> Dict[str, float]:
    """Metrics live on the last stage: reduce them over data-parallel ranks there, then share them
    with the other stages so every rank returns the same numbers."""
    result = reduce_metrics(per_microbatch, parallel.data_group()) if parallel.is_last_stage() else None
    shared = [result]
    group = parallel.pipeline_group()
    last = dist.get_global_rank(group, dist.get_world_size(group) - 1)
    dist.broadcast_object_list(shared, src=last, group=group)
    return shared[0]
