"""One optimizer step, and the forward-only log-prob pass, through Megatron's pipeline schedules.

The path from a batch to a gradient: micro-batch -> ``GPTModel`` forward (vocab-parallel logits on
the last stage) -> :func:`vocab_parallel_logprobs` -> objective -> Megatron's schedule, which sums
the micro-batches' losses and gradients and normalises by the global token count.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_psft import parallel, routing
from megatron_psft.logprobs import vocab_parallel_logprobs
from megatron_psft.metrics import reduce_metrics
from megatron_psft.objectives import ObjectiveConfig, make_loss_func
from megatron_psft.timers import Timers


@dataclass
class StepResult:
    metrics: Dict[str, Optional[float]]  # reduced over the global batch; identical on every rank
    grad_norm: Optional[float]
    learning_rate: float
    num_tokens: int
    routing_flip_fraction: Optional[float] = None  # old-policy top-k choices the training pass did not route to


def _model_forward(model, micro_batch):
    # Right padding and a causal mask: padded positions never reach earlier tokens, and the loss mask
    # drops them, so no explicit attention mask is needed.
    return model(micro_batch["tokens"], micro_batch["position_ids"], attention_mask=None)


def _run_schedule(model_chunks, micro_batches, forward_step, forward_only):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    first = micro_batches[0]
    batch_size, seq_length = first["tokens"].shape
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
               vocab_size: int, token_histograms: bool = False, replays=None, replay_routing: bool = False,
               timers: Optional[Timers] = None) -> StepResult:
    """Forward and backward over this rank's micro-batches of one global batch, then one optimizer step.

    Each micro-batch dict holds ``tokens``, ``position_ids``, ``labels``, ``loss_mask`` and, as the
    objective needs, ``old_logprobs`` (or ``old_is_current``) and ``reference_logprobs``. With
    `replays` (the policy's routers, :func:`routing.routers`) and a micro-batch ``routing`` from the
    old-policy pass, the forward replays that routing if `replay_routing`, and either way counts the
    choices of it that the forward did not route to (``routing_flip_fraction``: 0 under replay).
    """
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    flips = torch.zeros(2, device=parallel.device())

    def forward_step(data_iterator, model):
        nonlocal flips
        micro_batch = next(data_iterator)
        old_routing = micro_batch.get("routing") if replays else None
        if old_routing is not None and replay_routing:
            routing.replay(replays, old_routing)
        logits = _model_forward(model, micro_batch)
        if old_routing is not None:
            flips += routing.flipped_choices(replays, old_routing)
        return logits, make_loss_func(
            objective, micro_batch["labels"], micro_batch["loss_mask"], vocab_size,
            old_logprobs=micro_batch.get("old_logprobs"),
            reference_logprobs=micro_batch.get("reference_logprobs"),
            old_is_current=micro_batch.get("old_is_current", False),
            token_histograms=token_histograms,
        )

    timers = timers or Timers(0)
    with timers("forward-backward"):
        per_microbatch = _run_schedule(model_chunks, micro_batches, forward_step, forward_only=False)
    if replays:
        routing.stop(replays)
    metrics = _reduce_over_stages(per_microbatch)
    num_tokens = int(metrics["trained_tokens_total"])
    if num_tokens == 0:
        raise ValueError("the global batch has no response tokens (every loss_mask is 0): nothing to train on")
    with timers("optimizer"):
        scheduler.step(1)  # the learning rate of step n is that of n + 1 scheduler steps: warm-up starts above 0
        update_successful, grad_norm, _ = optimizer.step()
    if not update_successful:
        raise FloatingPointError(f"optimizer step failed (grad norm {grad_norm})")
    grad_norm = None if grad_norm is None else float(grad_norm)  # None: --clip-grad 0 without a norm
    flip_fraction = None
    if replays and any("routing" in mb for mb in micro_batches):
        dist.all_reduce(flips)  # every stage routes its own layers
        flip_fraction = float(flips[0] / flips[1]) if flips[1] else None
    return StepResult(metrics, grad_norm, optimizer.param_groups[0]["lr"], num_tokens, flip_fraction)


def forward_only_pass(model_chunks, micro_batches: List[dict], vocab_size: int, replays=None) -> List[dict]:
    """Per micro-batch: ``logprobs [b, s]`` of its labels (last stage only) and, with `replays`, the
    ``routing`` each of this rank's routers chose."""
    results = [{} for _ in micro_batches]
    position = iter(results)

    def loss_func(labels, logits):
        logprobs = vocab_parallel_logprobs(logits, labels, vocab_size=vocab_size)
        return logprobs.sum(), torch.tensor(0, dtype=torch.int), {"logprobs": logprobs}

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        if replays:
            routing.start_recording(replays)
        logits = _model_forward(model, micro_batch)
        if replays:
            next(position)["routing"] = routing.recorded(replays)
        return logits, lambda output: loss_func(micro_batch["labels"], output)

    with torch.no_grad():
        outputs = _run_schedule(model_chunks, micro_batches, forward_step, forward_only=True)
    if replays:
        routing.stop(replays)
    if parallel.is_last_stage():
        for result, output in zip(results, outputs):
            result["logprobs"] = output["logprobs"].float()
    return results


def policy_logprobs(model_chunks, micro_batches: List[dict], vocab_size: int) -> Optional[List[torch.Tensor]]:
    """Forward-only pass: the log-probs ``[b, s]`` of each micro-batch's labels (last stage; None elsewhere)."""
    results = forward_only_pass(model_chunks, micro_batches, vocab_size)
    return [result["logprobs"] for result in results] if parallel.is_last_stage() else None


def _reduce_over_stages(per_microbatch: List[dict]) -> Dict[str, float]:
    """Metrics live on the last stage: reduce them over data-parallel ranks there, then share them
    with the other stages so every rank returns the same numbers."""
    result = reduce_metrics(per_microbatch, parallel.data_group()) if parallel.is_last_stage() else None
    holder = [result]
    group = parallel.pipeline_group()
    last = dist.get_global_rank(group, dist.get_world_size(group) - 1)
    dist.broadcast_object_list(holder, src=last, group=group)
    return holder[0]
