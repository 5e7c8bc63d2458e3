"""Triton kernels for :mod:`megatron_psft.kernels.fused_logprobs`: the output layer fused with the log-prob and
entropy statistics, so a tile's logits are made and used on chip.

Forward: each program takes ``BLOCK_TOKENS`` tokens and one split of this rank's vocab rows, and for every
``[BLOCK_TOKENS, BLOCK_COLUMNS]`` tile computes the logits ``hidden @ weight.T`` (``tl.dot`` over the hidden
size, fp32 accumulation), then folds them into an online softmax: per token, relative to the split's max,
``sum_exp`` and (for entropy) ``sum_px``, and the label's logit. The logits never reach memory. The splits'
statistics (a ``[4, splits, tokens]`` fp32 workspace) are merged in torch by the same max-rescaling that
combines the TP ranks afterwards (:func:`~megatron_psft.kernels.logprobs.rescaled_statistics`).

Backward, one chunk of tokens at a time: a kernel recomputes each logits tile the same way and writes its
gradient (:func:`~megatron_psft.kernels.logprobs_triton.logits_grad_formula`) into a ``[chunk, V/tp]``
workspace in the weight's dtype; two cuBLAS matmuls fold it into the gradients of the hidden states and of
the weight. The gradient of the logits needs the global log-normaliser, so it cannot be folded into those
matmuls inside the forward's tile loop; the workspace is its smallest form that cuBLAS can consume.

With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly), which is how the tests check them.
"""

import os

import torch
import triton
import triton.language as tl

from megatron_psft.kernels.logprobs import rescaled_statistics
from megatron_psft.kernels.logprobs_triton import logits_grad_formula, online_softmax_update

# Tile sizes: a [64, 128] fp32 logits tile and [64|128, 64] operand tiles keep the tensor cores fed
# from shared memory. The tests shrink them to tl.dot's minimum, 16, to have several ragged tiles.
BLOCK_TOKENS = 64
BLOCK_COLUMNS = 128
BLOCK_HIDDEN = 64
# Triton's interpreter (3.7) multiplies bf16 tl.dot operands wrongly; there they are upcast first. bf16 x bf16
# products are exact in fp32, so only the order of the fp32 sums differs from the GPU's bf16 tensor-core dot.
UPCAST_DOT_OPERANDS = os.environ.get("TRITON_INTERPRET") == "1"
# Forward programs to aim for (token blocks x vocab splits): a few per SM of an H100 (132 SMs).
TARGET_PROGRAMS = 512


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, rows, columns, row_mask, column_mask, hidden_size, hidden_stride,
                 weight_stride, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``hidden[rows] @ weight[columns].T``; masked rows and columns give 0."""
    hidden_rows = hidden_ptr + rows.to(tl.int64)[:, None] * hidden_stride
    weight_rows = weight_ptr + columns.to(tl.int64)[:, None] * weight_stride
    logits = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    for start in range(0, hidden_size, BLOCK_H):
        inner = start + tl.arange(0, BLOCK_H)
        inner_mask = inner < hidden_size
        h = tl.load(hidden_rows + inner[None, :], mask=row_mask[:, None] & inner_mask[None, :], other=0.0)
        w = tl.load(weight_rows + inner[None, :], mask=column_mask[:, None] & inner_mask[None, :], other=0.0)
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        logits = tl.dot(h, tl.trans(w), logits, input_precision=PRECISION)
    return logits


@triton.jit
def _forward_kernel(hidden_ptr, weight_ptr, label_ptr, stats_ptr, tokens, hidden_size, valid_columns,
                    columns_per_split, hidden_stride, weight_stride, WITH_ENTROPY: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < tokens
    labels = tl.load(label_ptr + rows, mask=row_mask, other=-1)  # this rank's column, -1 off the slice
    running_max = tl.full((BLOCK_T,), -float("inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_T,), tl.float32)
    sum_px = tl.zeros((BLOCK_T,), tl.float32)
    target = tl.zeros((BLOCK_T,), tl.float32)
    split_start = split * columns_per_split
    split_end = tl.minimum(split_start + columns_per_split, valid_columns)
    for start in range(split_start, split_end, BLOCK_V):
        columns = start + tl.arange(0, BLOCK_V)
        column_mask = columns < split_end
        x = _logits_tile(hidden_ptr, weight_ptr, rows, columns, row_mask, column_mask, hidden_size, hidden_stride,
                         weight_stride, BLOCK_T, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        x = tl.where(column_mask[None, :], x, -float("inf"))
        target += tl.sum(tl.where(columns[None, :] == labels[:, None], x, 0.0), axis=1)
        running_max, sum_exp, sum_px = online_softmax_update(running_max, sum_exp, sum_px, x, 1, WITH_ENTROPY)
    out = stats_ptr + split * tokens + rows
    split_stride = tl.num_programs(1) * tokens
    tl.store(out, running_max, mask=row_mask)
    tl.store(out + split_stride, sum_exp, mask=row_mask)
    tl.store(out + 2 * split_stride, sum_px, mask=row_mask)
    tl.store(out + 3 * split_stride, target, mask=row_mask)


@triton.jit
def _logits_grad_kernel(hidden_ptr, weight_ptr, grad_ptr, label_ptr, log_normalizer_ptr, entropy_ptr,
                        grad_logprobs_ptr, grad_entropy_ptr, tokens, hidden_size, columns_total, valid_columns,
                        hidden_stride, weight_stride, grad_stride, ENTROPY_GRAD: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    columns = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < tokens
    valid = columns < valid_columns
    x = _logits_tile(hidden_ptr, weight_ptr, rows, columns, row_mask, valid, hidden_size, hidden_stride,
                     weight_stride, BLOCK_T, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
    x = tl.where(valid[None, :], x, -float("inf"))  # padded columns: p = 0, gradient 0
    label = tl.load(label_ptr + rows, mask=row_mask, other=-1)[:, None]
    log_normalizer = tl.load(log_normalizer_ptr + rows, mask=row_mask, other=0.0)[:, None]
    grad_logprob = tl.load(grad_logprobs_ptr + rows, mask=row_mask, other=0.0)[:, None]
    entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)[:, None] if ENTROPY_GRAD else 0.0
    grad_entropy = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)[:, None] if ENTROPY_GRAD else 0.0
    grad = logits_grad_formula(x, columns[None, :] == label, log_normalizer, grad_logprob, entropy, grad_entropy,
                               ENTROPY_GRAD)
    out = grad_ptr + rows.to(tl.int64)[:, None] * grad_stride + columns[None, :]
    tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None] & (columns < columns_total)[None, :])


def _dot_settings(dtype: torch.dtype) -> dict:
    # fp32 operands in full precision, as torch's matmul computes them (TF32 would cost ~1e-3 relative).
    upcast = UPCAST_DOT_OPERANDS and dtype != torch.float32
    return dict(PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)


def _vocab_splits(tokens: int, valid_columns: int):
    """(splits, columns per split): enough programs to fill the GPU; every split holds a real column."""
    token_blocks = triton.cdiv(tokens, BLOCK_TOKENS)
    tiles = triton.cdiv(valid_columns, BLOCK_COLUMNS)
    columns_per_split = triton.cdiv(tiles, max(1, min(tiles, triton.cdiv(TARGET_PROGRAMS, token_blocks)))) * BLOCK_COLUMNS
    return triton.cdiv(valid_columns, columns_per_split), columns_per_split


def local_statistics(hidden, weight, local_labels, valid_columns: int, with_entropy: bool):
    """This rank's statistics of the logits ``hidden [tokens, h] @ weight[:valid_columns].T``, never held:
    fp32 ``(row_max, sum_exp, sum_px or None, target_logit)`` as
    :func:`~megatron_psft.kernels.logprobs.local_row_statistics` gives them; `target_logit` is the logit of
    `local_labels` (this rank's column, -1 where the label lies on another rank; 0 there)."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    tokens = hidden.shape[0]
    splits, columns_per_split = _vocab_splits(tokens, valid_columns)
    stats = torch.empty((4, splits, tokens), dtype=torch.float32, device=hidden.device)
    if tokens:
        _forward_kernel[(triton.cdiv(tokens, BLOCK_TOKENS), splits)](
            hidden, weight, local_labels.contiguous(), stats, tokens, hidden.shape[1], valid_columns,
            columns_per_split, hidden.stride(0), weight.stride(0), WITH_ENTROPY=with_entropy,
            BLOCK_T=BLOCK_TOKENS, BLOCK_V=BLOCK_COLUMNS, BLOCK_H=BLOCK_HIDDEN, **_dot_settings(weight.dtype),
        )
    split_max, split_sum_exp, split_sum_px, split_target = stats
    row_max = split_max.max(dim=0).values
    sum_exp, sum_px = rescaled_statistics(split_max, row_max, split_sum_exp, split_sum_px if with_entropy else None)
    return row_max, sum_exp.sum(dim=0), None if sum_px is None else sum_px.sum(dim=0), split_target.sum(dim=0)


def logits_grad(hidden, weight, valid_columns: int, local_labels, log_normalizer, entropy, grad_logprobs,
                grad_entropy, out=None):
    """Gradient of ``sum(g_logp logp + g_H H)`` wrt the logits ``hidden [tokens, h] @ weight.T``, recomputed
    tile by tile, in the weight's dtype (into `out` when given: a reused ``[>= tokens, columns]`` workspace).
    `entropy` and `grad_entropy` are None when the entropy is not trained."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    tokens, columns = hidden.shape[0], weight.shape[0]
    grad = torch.empty((tokens, columns), dtype=weight.dtype, device=weight.device) if out is None else out[:tokens]
    entropy_grad = grad_entropy is not None
    if tokens:
        _logits_grad_kernel[(triton.cdiv(tokens, BLOCK_TOKENS), triton.cdiv(columns, BLOCK_COLUMNS))](
            hidden, weight, grad, local_labels.contiguous(), log_normalizer.contiguous(),
            entropy.contiguous() if entropy_grad else log_normalizer, grad_logprobs.float().contiguous(),
            grad_entropy.float().contiguous() if entropy_grad else log_normalizer, tokens, hidden.shape[1], columns,
            valid_columns, hidden.stride(0), weight.stride(0), grad.stride(0), ENTROPY_GRAD=entropy_grad,
            BLOCK_T=BLOCK_TOKENS, BLOCK_V=BLOCK_COLUMNS, BLOCK_H=BLOCK_HIDDEN, **_dot_settings(weight.dtype),
        )
    return grad
