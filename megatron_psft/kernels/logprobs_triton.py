"""Triton kernels for :mod:`megatron_psft.kernels.logprobs`: one read of the logits in forward, one read and one
write in backward, per token row.

Forward: an online softmax over vocab tiles gives this rank's partial statistics of each row, relative
to the rank's own row max ``m``: ``sum_exp = sum exp(x - m)`` and, for entropy,
``sum_px = sum exp(x - m) (x - m)``. Combining them across TP ranks (the max-rescaling) stays in torch,
in the caller. Backward: from the saved global log-normaliser and entropy, each gradient element is
``-p_k (g_logp + g_H (log p_k + H))`` plus ``g_logp`` at the label's column; padded columns get 0.

Rows are spread one per program; tiles are contiguous columns, so every load is coalesced. With
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly), which is how the tests check them.
"""

import torch
import triton
import triton.language as tl

MAX_BLOCK_COLUMNS = 4096  # per tile: 8 KiB of bf16 per warp group, enough to keep loads in flight


def default_block_columns(columns: int) -> int:
    return min(MAX_BLOCK_COLUMNS, triton.next_power_of_2(max(columns, 16)))


@triton.jit
def online_softmax_update(running_max, sum_exp, sum_px, x, AXIS: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """Fold fp32 logits `x` (-inf where masked) along `AXIS` into the running ``(max, sum e^(x-max),
    sum e^(x-max)(x-max))``; returns the three updated. Shared with the fused output-layer kernel."""
    new_max = tl.maximum(running_max, tl.max(x, axis=AXIS))
    # A row whose columns so far are all -inf keeps max -inf: shift by 0 then, not by -inf (NaN).
    shift = tl.where(new_max == -float("inf"), 0.0, new_max)
    rescale = tl.exp(running_max - shift)
    shifted = x - tl.expand_dims(shift, AXIS)
    exp = tl.exp(shifted)
    if WITH_ENTROPY:
        # sum e^(x-m)(x-m) moved from the old max m to the new one m': e^(m-m') (S + (m-m') Z)
        sum_px = tl.where(sum_exp > 0, rescale * (sum_px + (running_max - shift) * sum_exp), 0.0)
        sum_px += tl.sum(exp * tl.where(exp > 0, shifted, 0.0), axis=AXIS)  # 0, not 0 * -inf, at -inf
    sum_exp = sum_exp * rescale + tl.sum(exp, axis=AXIS)
    return new_max, sum_exp, sum_px


@triton.jit
def _row_statistics_kernel(logits_ptr, row_stride, valid_columns, row_max_ptr, sum_exp_ptr, sum_px_ptr,
                           WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * row_stride passes 2**31 at long sequences
    row_ptr = logits_ptr + row * row_stride
    offsets = tl.arange(0, BLOCK)
    running_max = tl.full((), -float("inf"), tl.float32)
    sum_exp = tl.zeros((), tl.float32)
    sum_px = tl.zeros((), tl.float32)
    for start in range(0, valid_columns, BLOCK):
        columns = start + offsets
        x = tl.load(row_ptr + columns, mask=columns < valid_columns, other=-float("inf")).to(tl.float32)
        running_max, sum_exp, sum_px = online_softmax_update(running_max, sum_exp, sum_px, x, 0, WITH_ENTROPY)
    tl.store(row_max_ptr + row, running_max)
    tl.store(sum_exp_ptr + row, sum_exp)
    if WITH_ENTROPY:
        tl.store(sum_px_ptr + row, sum_px)


@triton.jit
def logits_grad_formula(x, is_label, log_normalizer, grad_logprob, entropy, grad_entropy, ENTROPY_GRAD: tl.constexpr):
    """``d(g_logp logp + g_H H) / dx`` elementwise from fp32 logits `x` (-inf where padded): ``-p (g_logp +
    g_H (log p + H))``, plus ``g_logp`` where `is_label`. Shared with the fused output-layer kernel."""
    log_p = x - log_normalizer
    p = tl.exp(log_p)
    if ENTROPY_GRAD:
        # p = 0 (padding, -inf logits) contributes 0, not 0 * -inf
        grad = -p * (grad_logprob + grad_entropy * (tl.where(p > 0, log_p, 0.0) + entropy))
    else:
        grad = -p * grad_logprob
    return tl.where(is_label, grad + grad_logprob, grad)


@triton.jit
def _logits_grad_kernel(logits_ptr, grad_ptr, row_stride, grad_row_stride, columns, valid_columns, label_ptr,
                        log_normalizer_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
                        ENTROPY_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    offsets = tl.arange(0, BLOCK)
    log_normalizer = tl.load(log_normalizer_ptr + row)
    grad_logprob = tl.load(grad_logprobs_ptr + row)
    label = tl.load(label_ptr + row)  # this rank's column of the label, or -1 outside its slice
    entropy = tl.load(entropy_ptr + row) if ENTROPY_GRAD else 0.0
    grad_entropy = tl.load(grad_entropy_ptr + row) if ENTROPY_GRAD else 0.0
    for start in range(0, columns, BLOCK):
        column = start + offsets
        valid = column < valid_columns
        x = tl.load(row_ptr + column, mask=valid, other=-float("inf")).to(tl.float32)
        grad = logits_grad_formula(x, column == label, log_normalizer, grad_logprob, entropy, grad_entropy,
                                   ENTROPY_GRAD)
        tl.store(grad_row_ptr + column, grad.to(grad_ptr.dtype.element_ty), mask=column < columns)


def row_statistics(logits: torch.Tensor, valid_columns: int, with_entropy: bool, block_columns=None):
    """Per row of `logits [tokens, columns]` (columns past `valid_columns` ignored): fp32 ``row_max``,
    ``sum_exp`` and, with entropy, ``sum_px``, relative to ``row_max``; ``sum_px`` is None without."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = logits.shape[0]
    row_max, sum_exp = (torch.empty(tokens, dtype=torch.float32, device=logits.device) for _ in range(2))
    sum_px = torch.empty_like(sum_exp) if with_entropy else None
    if tokens:
        _row_statistics_kernel[(tokens,)](
            logits, logits.stride(0), valid_columns, row_max, sum_exp, sum_px if with_entropy else sum_exp,
            WITH_ENTROPY=with_entropy, BLOCK=block_columns or default_block_columns(valid_columns),
            num_warps=8,
        )
    return row_max, sum_exp, sum_px


def logits_grad(logits, valid_columns, local_labels, log_normalizer, entropy, grad_logprobs, grad_entropy,
                block_columns=None):
    """Gradient of ``sum(g_logp * logp + g_H * H)`` wrt `logits [tokens, columns]`, in their dtype.

    `local_labels`: int64 column of each row's label on this rank, -1 where it lies on another rank.
    `entropy` and `grad_entropy` are None when the entropy is not trained."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens, columns = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    entropy_grad = grad_entropy is not None
    if tokens:
        _logits_grad_kernel[(tokens,)](
            logits, grad, logits.stride(0), grad.stride(0), columns, valid_columns, local_labels.contiguous(),
            log_normalizer.contiguous(), entropy.contiguous() if entropy_grad else log_normalizer,
            grad_logprobs.float().contiguous(),
            grad_entropy.float().contiguous() if entropy_grad else log_normalizer,
            ENTROPY_GRAD=entropy_grad, BLOCK=block_columns or default_block_columns(columns), num_warps=8,
        )
    return grad
