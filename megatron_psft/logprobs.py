"""Per-token log-probabilities and entropy from vocab-parallel logits.

Each tensor-parallel rank holds a slice of the vocabulary. The forward pass needs two reductions
over the TP group (the max, then one stacked sum of ``sum(exp)``, the target logit and, for entropy,
``sum(exp * x)``); the backward pass needs none, because with the global log-normaliser and entropy
saved, each rank's gradient depends only on its own slice. Work is chunked along tokens so the extra
memory is a fixed number of fp32 ``[chunk, V/tp]`` buffers plus the gradient itself; the full
vocabulary is never gathered and the caller's logits are never written.
"""

from typing import Optional

import torch
import torch.distributed as dist

CHUNK_BUFFER_BYTES = 256 * 2**20  # per fp32 working buffer; 441 tokens at Qwen3's 151936-column vocab


def default_chunk_tokens(columns: int) -> int:
    return max(1, CHUNK_BUFFER_BYTES // (4 * columns))


def _check(labels: torch.Tensor, vocab_size: int, outputs: torch.Tensor) -> None:
    """One host sync for both checks. Both counts are the same on every TP rank (labels are
    replicated; outputs come from reduced values), so all ranks raise together, never hang."""
    out_of_vocab, non_finite = torch.stack([((labels < 0) | (labels >= vocab_size)).sum(),
                                            (~torch.isfinite(outputs)).sum()]).tolist()
    if out_of_vocab:
        low, high = torch.aminmax(labels)
        raise ValueError(f"labels must lie in [0, {vocab_size}); got [{int(low)}, {int(high)}]. "
                         "Mask positions with the loss mask, not with out-of-vocab ids")
    if non_finite:
        raise FloatingPointError(f"non-finite log-probs at {non_finite} token positions: the logits hold inf or NaN")


class _VocabParallelLogprobs(torch.autograd.Function):
    """Rows of `logits` are tokens; columns [0, valid_columns) of this rank's slice are real vocab."""

    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start, valid_columns, vocab_size, with_entropy, chunk_tokens):
        real = logits[:, :valid_columns]
        logits_max = real.max(dim=-1).values.float()
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)

        local_labels = labels - vocab_start
        in_slice = (local_labels >= 0) & (local_labels < valid_columns)
        # Gather with a clamped index and mask, rather than index with a boolean mask: no host sync.
        slice_index = local_labels.clamp(0, valid_columns - 1)[:, None]
        stats = logits.new_zeros((3 if with_entropy else 2, labels.numel()), dtype=torch.float32)
        sum_exp = stats[0]
        stats[1] = torch.where(in_slice, real.gather(1, slice_index).squeeze(1).float(), 0.0)
        for start in range(0, labels.numel(), chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            # A private fp32 copy: .float() would alias fp32 logits, which belong to the caller.
            shifted = real[chunk].to(torch.float32, copy=True).sub_(logits_max[chunk, None])
            if with_entropy:
                exp = shifted.exp()
                sum_exp[chunk] = exp.sum(dim=-1)
                stats[2, chunk] = shifted.mul_(exp).sum(dim=-1)
            else:
                sum_exp[chunk] = shifted.exp_().sum(dim=-1)
        if group is not None:
            dist.all_reduce(stats, group=group)

        log_normalizer = sum_exp.log() + logits_max
        logprobs = stats[1] - log_normalizer
        entropy = sum_exp.log() - stats[2] / sum_exp if with_entropy else None
        _check(labels, vocab_size, torch.stack([logprobs, entropy]) if with_entropy else logprobs)

        ctx.save_for_backward(logits, slice_index, in_slice, log_normalizer, *([entropy] if with_entropy else []))
        ctx.valid_columns = valid_columns
        ctx.with_entropy = with_entropy
        ctx.chunk_tokens = chunk_tokens
        ctx.set_materialize_grads(False)  # entropy is mostly logged, not trained: skip its backward then
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        logits, slice_index, in_slice, log_normalizer, *entropy = ctx.saved_tensors
        valid_columns = ctx.valid_columns
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(log_normalizer)
        use_entropy_grad = ctx.with_entropy and grad_entropy is not None

        # d logp_t / dx_k = 1[k = t] - p_k ;  d H / dx_k = -p_k (log p_k + H)
        grad_logits = torch.zeros_like(logits)
        for start in range(0, log_normalizer.numel(), ctx.chunk_tokens):
            chunk = slice(start, start + ctx.chunk_tokens)
            log_p = logits[chunk, :valid_columns].to(torch.float32, copy=True).sub_(log_normalizer[chunk, None])
            if use_entropy_grad:
                probs = log_p.exp()
                coeff = log_p.add_(entropy[0][chunk, None]).mul_(grad_entropy[chunk, None])
                probs.mul_(coeff.add_(grad_logprobs[chunk, None]))
            else:
                probs = log_p.exp_().mul_(grad_logprobs[chunk, None])
            grad_logits[chunk, :valid_columns] = probs.neg_()
        rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)
        grad_logits.index_put_((rows, slice_index[:, 0]), torch.where(in_slice, grad_logprobs, 0.0).to(grad_logits.dtype),
                               accumulate=True)
        return grad_logits, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    with_entropy: bool = False,
    chunk_tokens: Optional[int] = None,
):
    """Log-probability of `labels` (and the policy's entropy) from this rank's vocab slice of `logits`.

    Args:
        logits: ``[..., V/tp]`` slice as Megatron's output layer produces it, bf16 or fp32.
        labels: ``[...]`` token ids in ``[0, vocab_size)``.
        tp_group: the tensor-parallel group; defaults to Megatron's when it is initialised.
        vocab_size: the real vocabulary; columns past it (Megatron's padding) take no part.
        with_entropy: also return the full-vocabulary entropy per token.
        chunk_tokens: tokens per fp32 working buffer (default: a 256 MiB buffer).

    Returns:
        fp32 ``logp [...]``, or ``(logp, entropy)`` with `with_entropy`. Both are differentiable.
    """
    if tp_group is None:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    if tp_size == 1:
        tp_group = None

    if logits.dim() < 1 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} without its vocab dim")
    columns = logits.shape[-1]
    padded_vocab = columns * tp_size
    vocab_size = padded_vocab if vocab_size is None else vocab_size
    if not padded_vocab - columns < vocab_size <= padded_vocab:
        raise ValueError(
            f"logits hold {columns} vocab columns per rank x TP {tp_size} = {padded_vocab}, which does not fit "
            f"vocab {vocab_size} with less than one slice of padding: pass this rank's vocab slice"
        )
    vocab_start = tp_rank * columns
    valid_columns = max(0, min(columns, vocab_size - vocab_start))
    out = _VocabParallelLogprobs.apply(
        logits.reshape(-1, columns), labels.reshape(-1), tp_group, vocab_start, valid_columns, vocab_size,
        with_entropy, chunk_tokens or default_chunk_tokens(columns),
    )
    if with_entropy:
        return out[0].view(labels.shape), out[1].view(labels.shape)
    return out.view(labels.shape)
