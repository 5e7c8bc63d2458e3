"""One optimizer step, and the forward-only log-prob pass, through Megatron's pipeline schedules.

The path from a batch to a gradient: micro-batch -> ``GPTModel`` forward (vocab-parallel logits on
the last stage) -> :func:`vocab_parallel_logprobs` -> objective -> Megatron's schedule, which sums
the micro-batches' losses and gradients and normalises by the global token count.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from megatron_psft import parallel
from megatron_psft.logprobs import vocab_parallel_logprobs
from megatron_psft.metrics import reduce_metrics
from megatron_psft.objectives import ObjectiveConfig, make_loss_func


@dataclass
class StepResult:
    metrics: Dict[str, Optional[float]]  # reduced over the global batch; identical on every rank
    grad_norm: float
    learning_rate: float
    num_tokens: int


def _model_forward(model, micro_batch):
    # Right padding and a causal mask: padded positions never reach earlier tokens, and the loss mask
    # drops them, so no explicit attention mask is needed.
    return model(micro_batch["tokens"], micro_batch["position_ids"], attention_mask=None,
                 packed_seq_params=micro_batch.get("packed_seq_params"))


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
               vocab_size: int, token_histograms: bool = False) -> StepResult:
    """Forward and backward over this rank's micro-batches of one global batch, then one optimizer step.

    Each micro-batch dict holds ``tokens``, ``position_ids``, ``labels``, ``loss_mask`` and, as the
    objective needs, ``old_logprobs`` (or ``old_is_current``) and ``reference_logprobs``.
    """
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        logits = _model_forward(model, micro_batch)
        return logits, make_loss_func(
            objective, micro_batch["labels"], micro_batch["loss_mask"], vocab_size,
            old_logprobs=micro_batch.get("old_logprobs"),
            reference_logprobs=micro_batch.get("reference_logprobs"),
            old_is_current=micro_batch.get("old_is_current", False),
            token_histograms=token_histograms,
        )

    per_microbatch = _run_schedule(model_chunks, micro_batches, forward_step, forward_only=False)
    metrics = _reduce_over_stages(per_microbatch)
    num_tokens = int(metrics["trained_tokens_total"])
    if num_tokens == 0:
        raise ValueError("the global batch has no response tokens (every loss_mask is 0): nothing to train on")
    scheduler.step(1)  # the learning rate of step n is that of n + 1 scheduler steps: warm-up starts above 0
    update_successful, grad_norm, _ = optimizer.step()
    if not update_successful:
        raise FloatingPointError(f"optimizer step failed (grad norm {grad_norm})")
    return StepResult(metrics, float(grad_norm), optimizer.param_groups[0]["lr"], num_tokens)


def policy_logprobs(model_chunks, micro_batches: List[dict], vocab_size: int) -> Optional[List[torch.Tensor]]:
    """Forward-only pass: the log-probs ``[b, s]`` of each micro-batch's labels (last stage; None elsewhere)."""

    def loss_func(labels, logits):
        logprobs = vocab_parallel_logprobs(logits, labels, vocab_size=vocab_size)
        return logprobs.sum(), torch.tensor(0, dtype=torch.int), {"logprobs": logprobs}

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        return _model_forward(model, micro_batch), lambda logits: loss_func(micro_batch["labels"], logits)

    with torch.no_grad():
        outputs = _run_schedule(model_chunks, micro_batches, forward_step, forward_only=True)
    if not parallel.is_last_stage():
        return None
    return [out["logprobs"].float() for out in outputs]


def _reduce_over_stages(per_microbatch: List[dict]) -> Dict[str, float]:
    """Metrics live on the last stage: reduce them over data-parallel ranks there, then share them
    with the other stages so every rank returns the same numbers."""
    import torch.distributed as dist

    result = reduce_metrics(per_microbatch, parallel.data_group()) if parallel.is_last_stage() else None
    holder = [result]
    group = parallel.pipeline_group()
    last = dist.get_global_rank(group, dist.get_world_size(group) - 1)
    dist.broadcast_object_list(holder, src=last, group=group)
    return holder[0]
