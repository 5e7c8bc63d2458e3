"""The output layer and the log-probs fused: the logits are never materialised in full.

Unfused, the last stage holds the logits ``[tokens, V/tp]`` and their gradient, each as large as the
whole model's activations at long sequences (32k tokens x 151936 vocab in bf16 is 9.3 GiB per tensor
at TP1). Fused, tokens go through in chunks: the forward keeps only per-row statistics (the two TP
all-reduces happen once, over all tokens), and the backward recomputes each chunk's logits, turns
them into their gradient and folds that straight into the gradients of the hidden states and of the
output weight. Extra memory: one chunk of logits and its gradient, plus an fp32 accumulator for the
weight's gradient when a bf16 weight's gradient comes from more than a few chunks. The price is one more
output-layer matmul (the recompute).

Two kernels, chosen by `kernel=` or ``$PSFT_LOGPROBS_KERNEL`` ('auto' is the torch one until the Triton one
has run on a GPU; 'triton' opts in): the Triton one (:mod:`~megatron_psft.kernels.fused_logprobs_triton`)
computes the output layer tile by tile inside the kernels, so in forward no logits reach memory and in
backward only their gradient does, one chunk at a time; the torch one multiplies a chunk of tokens by
the weight with torch and runs the torch log-prob kernel on that chunk of logits. Either way the row
statistics meet in the same TP combine (two all-reduces, in torch) and the same backward formula.

Under tensor parallelism the hidden states reach the output layer replicated (or, with sequence
parallelism, split along the sequence); Megatron's own mappings bring them to every TP rank, so their
backward (all-reduce, or reduce-scatter) is Megatron's.

With a Megatron ``GPTModel``: run the forward inside :func:`output_hidden_states`, so the model
returns its final hidden states ``[b, s(/tp under SP), h]`` instead of logits, and give them with
:func:`output_weight` to :func:`fused_vocab_parallel_logprobs`.
"""

import contextlib
import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron_psft.kernels.logprobs import (
    CHUNK_BUFFER_BYTES,
    KERNEL_ENV,
    _check,
    combine_row_statistics,
    default_chunk_tokens,
    label_columns,
    local_row_statistics,
    logits_grad,
    resolve_kernel,
    vocab_slice,
)


# Chunks of the weight gradient summed in the weight's own (bf16) dtype, one rounding each inside the
# matmul's fp32 accumulation, rather than in a full fp32 copy of the weight (V/tp x h x 4 bytes). Up to 4
# roundings stay within a few bf16 ulps of float64 (docs/kernels.md has the measured error); past that an
# fp32 accumulator keeps the error from growing with the sequence length.
LOW_PRECISION_ACCUMULATION_MAX_CHUNKS = 4


def _fused_kernel(kernel: Optional[str], hidden: torch.Tensor) -> str:
    """The fused path's kernel, chosen as :func:`resolve_kernel` chooses, except that 'auto' keeps the torch
    path: the Triton one has run only under Triton's interpreter so far, and waits for the GPU tier
    (tests/gpu/test_gpu_fused_logprobs.py) before it is anyone's default. 'triton' (or
    ``$PSFT_LOGPROBS_KERNEL=triton``) opts in."""
    kernel = kernel or os.environ.get(KERNEL_ENV) or "auto"
    return "torch" if kernel == "auto" else resolve_kernel(kernel, hidden)


def _fused_triton():
    from megatron_psft.kernels import fused_logprobs_triton

    return fused_logprobs_triton


def _local_statistics(hidden, weight, slice_index, in_slice, valid_columns, with_entropy, chunk_tokens, kernel):
    """This rank's fp32 ``(row_max, sum_exp, sum_px or None, target_logit)`` of ``hidden @ weight.T``: on
    Triton, tile by tile on chip; on torch, a chunk of logits at a time."""
    if kernel == "triton":
        return _fused_triton().local_statistics(hidden, weight, torch.where(in_slice, slice_index, -1), valid_columns,
                                                with_entropy)
    tokens = hidden.shape[0]
    inner_chunk_tokens = default_chunk_tokens(weight.shape[0])  # the torch kernel's fp32 buffers
    statistics = torch.empty((4, tokens), dtype=torch.float32, device=hidden.device)
    row_max, sum_exp, sum_px, target_logit = statistics
    for start in range(0, tokens, chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        logits = hidden[chunk] @ weight.t()
        chunk_max, chunk_sum_exp, chunk_sum_px = local_row_statistics(logits, valid_columns, with_entropy,
                                                                      inner_chunk_tokens, "torch")
        row_max[chunk], sum_exp[chunk] = chunk_max, chunk_sum_exp
        if with_entropy:
            sum_px[chunk] = chunk_sum_px
        target_logit[chunk] = logits.gather(1, slice_index[chunk, None]).squeeze(1).float()
    return row_max, sum_exp, sum_px if with_entropy else None, target_logit


def _chunk_logits_grad(ctx, chunk, hidden, weight, slice_index, in_slice, log_normalizer, entropy, grad_logprobs,
                       grad_entropy, workspace):
    """The gradient of a chunk of tokens' logits (recomputed), in the weight's dtype."""
    entropy_chunk = None if entropy is None else entropy[chunk]
    grad_entropy_chunk = None if grad_entropy is None else grad_entropy[chunk]
    if ctx.kernel == "triton":
        return _fused_triton().logits_grad(
            hidden[chunk], weight, ctx.valid_columns, torch.where(in_slice[chunk], slice_index[chunk], -1),
            log_normalizer[chunk], entropy_chunk, grad_logprobs[chunk], grad_entropy_chunk, out=workspace)
    return logits_grad(hidden[chunk] @ weight.t(), ctx.valid_columns, slice_index[chunk], in_slice[chunk],
                       log_normalizer[chunk], entropy_chunk, grad_logprobs[chunk], grad_entropy_chunk,
                       default_chunk_tokens(weight.shape[0]), "torch")


def _weight_grad_dtype(weight, chunks: int) -> torch.dtype:
    if chunks <= LOW_PRECISION_ACCUMULATION_MAX_CHUNKS:
        return weight.dtype
    return torch.promote_types(weight.dtype, torch.float32)


class _FusedOutputLogprobs(torch.autograd.Function):
    """`hidden [tokens, h]` (every token, on every TP rank) times this rank's `weight [V/tp, h]`."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, group, vocab_start, valid_columns, vocab_size, with_entropy,
                chunk_tokens, kernel):
        slice_index, in_slice = label_columns(labels, vocab_start, valid_columns)
        row_max, sum_exp, sum_px, target_logit = _local_statistics(hidden, weight, slice_index, in_slice,
                                                                   valid_columns, with_entropy, chunk_tokens, kernel)
        target_logit.masked_fill_(~in_slice, 0.0)
        logprobs, log_normalizer, entropy = combine_row_statistics(row_max, sum_exp, sum_px, target_logit, group)
        _check(labels, vocab_size, torch.stack([logprobs, entropy]) if with_entropy else logprobs)

        ctx.save_for_backward(hidden, weight, slice_index, in_slice, log_normalizer,
                              *([entropy] if with_entropy else []))
        ctx.valid_columns, ctx.with_entropy, ctx.chunk_tokens, ctx.kernel = (valid_columns, with_entropy,
                                                                             chunk_tokens, kernel)
        ctx.set_materialize_grads(False)
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        hidden, weight, slice_index, in_slice, log_normalizer, *entropy = ctx.saved_tensors
        entropy = entropy[0] if entropy else None
        grad_entropy = grad_entropy if ctx.with_entropy else None
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(log_normalizer)
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        tokens, chunk_tokens = hidden.shape[0], ctx.chunk_tokens
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        accumulate_dtype = _weight_grad_dtype(weight, -(-tokens // chunk_tokens))
        grad_weight = torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device) if want_weight else None
        # The Triton kernel writes every chunk's logits gradient into this one buffer.
        workspace = (torch.empty((min(tokens, chunk_tokens), weight.shape[0]), dtype=weight.dtype,
                                 device=weight.device) if ctx.kernel == "triton" else None)
        for start in range(0, tokens, chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            grad_logits = _chunk_logits_grad(ctx, chunk, hidden, weight, slice_index, in_slice, log_normalizer,
                                             entropy, grad_logprobs, grad_entropy, workspace)
            if want_hidden:
                grad_hidden[chunk] = grad_logits @ weight
            if want_weight:
                if accumulate_dtype == weight.dtype:
                    grad_weight.addmm_(grad_logits.t(), hidden[chunk])
                else:
                    grad_weight += grad_logits.t() @ hidden[chunk]
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def fused_vocab_parallel_logprobs(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: Optional[int] = None,
    with_entropy: bool = False,
    sequence_parallel: bool = False,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_tokens: Optional[int] = None,
    kernel: Optional[str] = None,
):
    """:func:`~megatron_psft.kernels.logprobs.vocab_parallel_logprobs` of ``hidden @ output_weight.T`` without
    materialising those logits; the same values and gradients (wrt `hidden` and `output_weight`).

    Args:
        hidden: ``[b, s, h]`` final hidden states, batch-first as GPTModel hands them back inside
            :func:`output_hidden_states`; ``[b, s/tp, h]`` (this rank's sequence part) under sequence
            parallelism. Cast to the weight's dtype, as the output layer computes.
        output_weight: this rank's ``[V/tp, h]`` rows of the output layer (:func:`output_weight`).
        labels: ``[b, s]`` token ids in ``[0, vocab_size)``, the full sequence.
        vocab_size: the real vocabulary; the weight's padded rows take no part.
        with_entropy: also return the full-vocabulary entropy per token.
        sequence_parallel: `hidden` is split along the sequence over the TP group (Megatron's
            ``--sequence-parallel``).
        tp_group: the tensor-parallel group; defaults to Megatron's when it is initialised.
        chunk_tokens: tokens per chunk of logits (default: 256 MiB of logits in the weight's dtype).
        kernel: 'auto', 'torch' or 'triton', as in ``vocab_parallel_logprobs``.

    Returns:
        fp32 ``logp [b, s]``, or ``(logp, entropy)`` with `with_entropy`.
    """
    from megatron.core.tensor_parallel import mappings

    columns = output_weight.shape[0]
    group, vocab_start, valid_columns, vocab_size = vocab_slice(columns, tp_group, vocab_size)
    if hidden.dim() != 3 or hidden.shape[-1] != output_weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [b, s, h] with h = the output weight's "
                         f"{tuple(output_weight.shape)} second dim")
    if sequence_parallel and group is None:
        raise ValueError("sequence_parallel needs tensor parallelism (TP > 1): drop --sequence-parallel at TP 1")
    hidden = hidden.to(output_weight.dtype)  # Float16Module hands the last stage's output back in fp32
    # What ColumnParallelLinear does to its input, with the same backward (reduce-scatter, or all-reduce).
    if sequence_parallel:
        gathered = mappings.gather_from_sequence_parallel_region(hidden.transpose(0, 1).contiguous(), group=group)
        hidden = gathered.transpose(0, 1)
    elif group is not None:
        # Batch-first, so the gradient it all-reduces is contiguous: Megatron's all-reduce of a
        # non-contiguous gradient reduces a copy and hands back the unreduced original.
        hidden = mappings.copy_to_tensor_model_parallel_region(hidden, group=group)
    if tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"labels {tuple(labels.shape)} must be [b, s] of the (gathered) hidden states "
                         f"{tuple(hidden.shape)}")
    out = _FusedOutputLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), output_weight, labels.reshape(-1), group, vocab_start, valid_columns,
        vocab_size, with_entropy, chunk_tokens or max(1, CHUNK_BUFFER_BYTES // (output_weight.element_size() * columns)),
        _fused_kernel(kernel, hidden),
    )
    if with_entropy:
        return out[0].view(labels.shape), out[1].view(labels.shape)
    return out.view(labels.shape)


def _unwrapped(model_chunk):
    while hasattr(model_chunk, "module"):  # DDP, Float16Module
        model_chunk = model_chunk.module
    return model_chunk


def _hand_back_hidden_states(hidden_states, weight=None, runtime_gather_output=None):
    return hidden_states, None


@contextlib.contextmanager
def output_hidden_states(model_chunk):
    """Within this block the GPTModel chunk's output layer hands back its input, so the model returns
    its final hidden states ``[b, s, h]`` (``[b, s/tp, h]`` under sequence parallelism, not gathered)
    where it returned logits. Chunks without the output layer (earlier pipeline stages) are untouched."""
    model = _unwrapped(model_chunk)
    if not getattr(model, "post_process", False):
        yield
        return
    if getattr(model.config, "use_mup", False):
        raise ValueError("the fused output layer does not apply MuP's logit scaling: drop --fused-logprobs with MuP")
    if getattr(model.config, "mtp_num_layers", None):
        raise ValueError("multi-token prediction calls the output layer itself: drop --fused-logprobs with MTP")
    layer = model.output_layer
    layer.forward = _hand_back_hidden_states  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        del layer.forward


def output_weight(model_chunk) -> Optional[torch.Tensor]:
    """The ``[V/tp, h]`` weight the chunk's output layer multiplies by (the embedding's when tied); None
    on chunks without the output layer (earlier pipeline stages)."""
    model = _unwrapped(model_chunk)
    if not getattr(model, "post_process", False):
        return None
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight
