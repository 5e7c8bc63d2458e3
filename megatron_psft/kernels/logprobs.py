"""Per-token log-probabilities and entropy from vocab-parallel logits.

Each tensor-parallel rank holds a slice of the vocabulary. Each rank first reduces its slice to
per-row statistics relative to its own row max (``sum(exp)`` and, for entropy, ``sum(exp * x)``);
the forward pass then needs two reductions over the TP group (the max, then one stacked sum of the
rescaled statistics and the target logit). The backward pass needs none, because with the global
log-normaliser and entropy saved, each rank's gradient depends only on its own slice. The full
vocabulary is never gathered and the caller's logits are never written.

Two kernels compute the per-rank parts: a Triton one (:mod:`megatron_psft.kernels.logprobs_triton`, one
read of the logits in forward, one read and one write in backward), chosen for CUDA logits, and the
torch reference, chunked along tokens so its extra memory is a fixed number of fp32 ``[chunk, V/tp]``
buffers plus the gradient itself, which is the CPU path. `kernel=` or ``$PSFT_LOGPROBS_KERNEL``
forces either.
"""

import os
from typing import Optional

import torch
import torch.distributed as dist

CHUNK_BUFFER_BYTES = 256 * 2**20  # per fp32 working buffer; 441 tokens at Qwen3's 151936-column vocab
KERNEL_ENV = "PSFT_LOGPROBS_KERNEL"
KERNELS = ("auto", "torch", "triton")


def default_chunk_tokens(columns: int) -> int:
    return max(1, CHUNK_BUFFER_BYTES // (4 * columns))


def _triton_kernels():
    """The Triton module, or None where triton does not import (CPU-only installs)."""
    try:
        from megatron_psft.kernels import logprobs_triton
    except ImportError:
        return None
    return logprobs_triton


def resolve_kernel(kernel: Optional[str], logits: torch.Tensor) -> str:
    """'torch' or 'triton' for these logits. `kernel` (default: $PSFT_LOGPROBS_KERNEL, else 'auto') picks
    Triton under 'auto' only for CUDA logits with triton installed; 'triton' forces it, which on CPU
    logits needs Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported)."""
    kernel = kernel or os.environ.get(KERNEL_ENV) or "auto"
    if kernel not in KERNELS:
        raise ValueError(f"log-prob kernel {kernel!r} is not one of {KERNELS}: fix the kernel argument or ${KERNEL_ENV}")
    if kernel == "torch":
        return kernel
    if _triton_kernels() is None:
        if kernel == "triton":
            raise ImportError(f"the Triton log-prob kernel needs triton, which does not import here: install it "
                              f"or set {KERNEL_ENV}=torch")
        return "torch"
    if kernel == "auto":
        return "triton" if logits.is_cuda else "torch"
    if not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton log-prob kernel runs on CPU logits only under TRITON_INTERPRET=1; "
                         f"set {KERNEL_ENV}=torch or auto for CPU")
    return kernel


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


def label_columns(labels: torch.Tensor, vocab_start: int, valid_columns: int):
    """This rank's column of each label, clamped into the slice (a gather index), and whether it is there."""
    local_labels = labels - vocab_start
    in_slice = (local_labels >= 0) & (local_labels < valid_columns)
    return local_labels.clamp(0, valid_columns - 1), in_slice


def local_row_statistics(logits, valid_columns: int, with_entropy: bool, chunk_tokens: int, kernel: str):
    """This rank's partial statistics of each row of `logits [tokens, columns]`, relative to the rank's
    own row max: fp32 ``(row_max, sum exp(x - max), sum exp(x - max) (x - max) or None)``."""
    real = logits[:, :valid_columns]
    if kernel == "triton":
        return _triton_kernels().row_statistics(logits, valid_columns, with_entropy)
    row_max = real.max(dim=-1).values.float()
    sum_exp = torch.empty_like(row_max)
    sum_px = torch.empty_like(row_max) if with_entropy else None
    for start in range(0, row_max.numel(), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        # A private fp32 copy: .float() would alias fp32 logits, which belong to the caller.
        shifted = real[chunk].to(torch.float32, copy=True).sub_(row_max[chunk, None])
        if with_entropy:
            exp = shifted.exp()
            sum_exp[chunk] = exp.sum(dim=-1)
            sum_px[chunk] = shifted.mul_(exp).sum(dim=-1)
        else:
            sum_exp[chunk] = shifted.exp_().sum(dim=-1)
    return row_max, sum_exp, sum_px


def rescaled_statistics(row_max, new_max, sum_exp, sum_px):
    """`sum_exp` and `sum_px` (or None) relative to `new_max` (>= `row_max`, finite) instead of `row_max`:
    sum e^(x-M) = e^(m-M) sum e^(x-m);  sum e^(x-M)(x-M) = e^(m-M) (sum e^(x-m)(x-m) + (m-M) sum e^(x-m))."""
    offset = row_max - new_max
    rescale = offset.exp()
    return rescale * sum_exp, None if sum_px is None else rescale * (sum_px + offset * sum_exp)


def combine_row_statistics(row_max, sum_exp, sum_px, target_logit, group):
    """The TP combination of :func:`local_row_statistics`: all-reduce the max, move each rank's sums to
    it, all-reduce their sum (`target_logit` is 0 on ranks without the label). Returns fp32
    ``(logprobs, log_normalizer, entropy or None)``."""
    with_entropy = sum_px is not None
    global_max = row_max
    if group is not None:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        sum_exp, sum_px = rescaled_statistics(row_max, global_max, sum_exp, sum_px)
        stats = torch.stack([sum_exp, target_logit] + ([sum_px] if with_entropy else []))
        dist.all_reduce(stats, group=group)
        sum_exp, target_logit = stats[0], stats[1]
        sum_px = stats[2] if with_entropy else None
    log_sum_exp = sum_exp.log()
    log_normalizer = log_sum_exp + global_max
    entropy = log_sum_exp - sum_px / sum_exp if with_entropy else None
    return target_logit - log_normalizer, log_normalizer, entropy


def logits_grad(logits, valid_columns, slice_index, in_slice, log_normalizer, entropy, grad_logprobs, grad_entropy,
                chunk_tokens: int, kernel: str):
    """Gradient wrt `logits [tokens, columns]` of ``sum(g_logp logp + g_H H)``; `grad_entropy` None:
    the entropy is not trained. Padded columns get 0."""
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(log_normalizer)
    if kernel == "triton":
        local_labels = torch.where(in_slice, slice_index, -1)
        return _triton_kernels().logits_grad(logits, valid_columns, local_labels, log_normalizer, entropy,
                                             grad_logprobs, grad_entropy)
    # d logp_t / dx_k = 1[k = t] - p_k ;  d H / dx_k = -p_k (log p_k + H)
    grad = torch.zeros_like(logits)
    for start in range(0, log_normalizer.numel(), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        log_p = logits[chunk, :valid_columns].to(torch.float32, copy=True).sub_(log_normalizer[chunk, None])
        if grad_entropy is not None:
            probs = log_p.exp()
            coeff = log_p.add_(entropy[chunk, None]).mul_(grad_entropy[chunk, None])
            probs.mul_(coeff.add_(grad_logprobs[chunk, None]))
        else:
            probs = log_p.exp_().mul_(grad_logprobs[chunk, None])
        grad[chunk, :valid_columns] = probs.neg_()
    rows = torch.arange(grad.shape[0], device=grad.device)
    grad.index_put_((rows, slice_index), torch.where(in_slice, grad_logprobs, 0.0).to(grad.dtype), accumulate=True)
    return grad


class _VocabParallelLogprobs(torch.autograd.Function):
    """Rows of `logits` are tokens; columns [0, valid_columns) of this rank's slice are real vocab."""

    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start, valid_columns, vocab_size, with_entropy, chunk_tokens,
                kernel):
        slice_index, in_slice = label_columns(labels, vocab_start, valid_columns)
        # Gather with a clamped index and mask, rather than index with a boolean mask: no host sync.
        target_logit = torch.where(in_slice, logits.gather(1, slice_index[:, None]).squeeze(1).float(), 0.0)
        row_max, sum_exp, sum_px = local_row_statistics(logits, valid_columns, with_entropy, chunk_tokens, kernel)
        logprobs, log_normalizer, entropy = combine_row_statistics(row_max, sum_exp, sum_px, target_logit, group)
        _check(labels, vocab_size, torch.stack([logprobs, entropy]) if with_entropy else logprobs)

        ctx.save_for_backward(logits, slice_index, in_slice, log_normalizer, *([entropy] if with_entropy else []))
        ctx.valid_columns = valid_columns
        ctx.with_entropy = with_entropy
        ctx.chunk_tokens = chunk_tokens
        ctx.kernel = kernel
        ctx.set_materialize_grads(False)  # entropy is mostly logged, not trained: skip its backward then
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        logits, slice_index, in_slice, log_normalizer, *entropy = ctx.saved_tensors
        grad_entropy = grad_entropy if ctx.with_entropy else None
        grad_logits = logits_grad(logits, ctx.valid_columns, slice_index, in_slice, log_normalizer,
                                  entropy[0] if entropy else None, grad_logprobs, grad_entropy,
                                  ctx.chunk_tokens, ctx.kernel)
        return grad_logits, None, None, None, None, None, None, None, None


def vocab_slice(columns: int, tp_group, vocab_size: Optional[int]):
    """``(tp_group or None at TP1, vocab_start, valid_columns, vocab_size)`` of this rank's `columns`-wide
    vocab slice; `tp_group` defaults to Megatron's when it is initialised."""
    if tp_group is None:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    padded_vocab = columns * tp_size
    vocab_size = padded_vocab if vocab_size is None else vocab_size
    if not padded_vocab - columns < vocab_size <= padded_vocab:
        raise ValueError(
            f"logits hold {columns} vocab columns per rank x TP {tp_size} = {padded_vocab}, which does not fit "
            f"vocab {vocab_size} with less than one slice of padding: pass this rank's vocab slice"
        )
    vocab_start = tp_rank * columns
    valid_columns = max(0, min(columns, vocab_size - vocab_start))
    return (tp_group if tp_size > 1 else None), vocab_start, valid_columns, vocab_size


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    with_entropy: bool = False,
    chunk_tokens: Optional[int] = None,
    kernel: Optional[str] = None,
):
    """Log-probability of `labels` (and the policy's entropy) from this rank's vocab slice of `logits`.

    Args:
        logits: ``[..., V/tp]`` slice as Megatron's output layer produces it, bf16 or fp32.
        labels: ``[...]`` token ids in ``[0, vocab_size)``.
        tp_group: the tensor-parallel group; defaults to Megatron's when it is initialised.
        vocab_size: the real vocabulary; columns past it (Megatron's padding) take no part.
        with_entropy: also return the full-vocabulary entropy per token.
        chunk_tokens: tokens per fp32 working buffer of the torch kernel (default: a 256 MiB buffer).
        kernel: 'auto' (Triton for CUDA logits when triton imports, else torch), 'torch' or 'triton';
            default ``$PSFT_LOGPROBS_KERNEL`` or 'auto'. See :func:`resolve_kernel`.

    Returns:
        fp32 ``logp [...]``, or ``(logp, entropy)`` with `with_entropy`. Both are differentiable.
    """
    if logits.dim() < 1 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} without its vocab dim")
    columns = logits.shape[-1]
    tp_group, vocab_start, valid_columns, vocab_size = vocab_slice(columns, tp_group, vocab_size)
    out = _VocabParallelLogprobs.apply(
        logits.reshape(-1, columns), labels.reshape(-1), tp_group, vocab_start, valid_columns, vocab_size,
        with_entropy, chunk_tokens or default_chunk_tokens(columns), resolve_kernel(kernel, logits),
    )
    if with_entropy:
        return out[0].view(labels.shape), out[1].view(labels.shape)
    return out.view(labels.shape)
