"""The fused output layer + log-probs on its Triton kernel against float64, on CPU through Triton's interpreter.

``fused_vocab_parallel_logprobs(hidden, weight, ..., kernel="triton")`` against a float64
``log_softmax(hidden @ W.T)`` (values, and the gradients of hidden and weight) at TP1, TP2 and TP2 with
sequence parallelism, fp32 and bf16, every backward branch (the entropy trained or not, logp trained or
not). The tiles are shrunk to tl.dot's minimum of 16, so tokens (20), hidden size (24), each rank's vocab
rows (40 at TP1, 20 at TP2, of which 37 and 17 real) all end in a ragged tile, and the forward runs two
vocab splits. The backward's chunk of 8 tokens leaves a ragged last chunk; bf16 sums 3 chunks of the weight
gradient in bf16, and one case with chunks of 4 tokens (5 chunks) takes the fp32 accumulator.

One 2-rank launch with ``TRITON_INTERPRET=1`` set before the ranks import anything (see
tests/test_logprobs_triton.py for why).
"""

import importlib.util

import pytest
import torch

from distributed import run_interpreted
from test_logprobs import BACKWARD_MODES

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed in this leg (py311 has no triton; py312 runs these "
                                       "through its interpreter)")

BATCH, SEQ, HIDDEN, VOCAB, PADDED = 2, 10, 24, 37, 40
CHUNK = 8
LAYOUTS = {"tp1": dict(tensor=1), "tp2": dict(tensor=2), "tp2_sp": dict(tensor=2, sequence_parallel=True)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NAMES = ("logp", "entropy", "grad_hidden", "grad_weight")


def _inputs(dtype):
    """Inputs rounded to `dtype`, in float64, so the reference sees what the kernel sees."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=g).to(dtype).double()
    weight = (torch.randn(PADDED, HIDDEN, generator=g) / 2).to(dtype).double()
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    upstream = torch.randn(2, BATCH, SEQ, generator=g, dtype=torch.float64)
    return hidden, weight, labels, upstream


def _objective(out, mode, upstream):
    with_entropy, train_logp, train_entropy = BACKWARD_MODES[mode]
    logp, entropy = out if with_entropy else (out, None)
    terms = ([(logp * upstream[0].to(logp.dtype)).sum()] if train_logp else []) + (
        [(entropy * upstream[1].to(entropy.dtype)).sum()] if train_entropy else [])
    sum(terms).backward()
    return logp.detach(), None if entropy is None else entropy.detach()


def _reference(hidden, weight, labels, upstream, mode):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    log_p = torch.log_softmax((hidden @ weight.t())[..., :VOCAB], dim=-1)
    logp = log_p.gather(-1, labels[..., None]).squeeze(-1)
    out = (logp, -(log_p.exp() * log_p).sum(-1)) if BACKWARD_MODES[mode][0] else logp
    return _objective(out, mode, upstream) + (hidden.grad, weight.grad)


def _errors(layout, dtype_name, mode, chunk_tokens=CHUNK):
    """Max errors of this rank's values and gradient shards vs float64, relative to the largest reference."""
    from megatron.core import parallel_state

    from megatron_psft.kernels.fused_logprobs import fused_vocab_parallel_logprobs

    sequence_parallel = LAYOUTS[layout].get("sequence_parallel", False)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    hidden, weight, labels, upstream = _inputs(DTYPES[dtype_name])
    ref = _reference(hidden, weight, labels, upstream, mode)
    rows = slice(rank * PADDED // tp, (rank + 1) * PADDED // tp)
    seq = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp) if sequence_parallel else slice(None)
    h = hidden[:, seq].to(DTYPES[dtype_name]).requires_grad_()
    w = weight[rows].to(DTYPES[dtype_name]).requires_grad_()
    out = fused_vocab_parallel_logprobs(h, w, labels, VOCAB, BACKWARD_MODES[mode][0], sequence_parallel,
                                        chunk_tokens=chunk_tokens, kernel="triton")
    values = _objective(out, mode, upstream) + (h.grad, w.grad)
    wanted = (ref[0], ref[1], ref[2][:, seq], ref[3][rows])

    def err(got, want):
        return 0.0 if got is None else float((got.double() - want).abs().max() / want.abs().max())

    return {
        "errors": {name: err(got, want) for name, got, want in zip(NAMES, values, wanted)},
        "grad_dtypes": {str(h.grad.dtype), str(w.grad.dtype)},
        "pad_rows_grad_zero": bool((w.grad[max(0, VOCAB - rows.start):] == 0).all()),
    }


def _all_cases():
    import torch.distributed as dist

    from megatron_psft.kernels import fused_logprobs_triton
    from megatron_psft.platform import parallel

    fused_logprobs_triton.BLOCK_TOKENS = fused_logprobs_triton.BLOCK_COLUMNS = fused_logprobs_triton.BLOCK_HIDDEN = 16
    fused_logprobs_triton.TARGET_PROGRAMS = 4  # 2 token blocks x 2 vocab splits at TP1
    rank = dist.get_rank()
    cases = [(dtype, mode) for dtype in DTYPES for mode in BACKWARD_MODES]
    results = {}
    for layout, kwargs in LAYOUTS.items():
        parallel.initialize(parallel.ParallelLayout(**kwargs))
        # At TP1 the two ranks are two data-parallel replicas: they split the cases.
        for dtype, mode in cases[rank::2] if layout == "tp1" else cases:
            results[(layout, dtype, mode)] = _errors(layout, dtype, mode)
        parallel.destroy()
    parallel.initialize(parallel.ParallelLayout(tensor=2, sequence_parallel=True))
    results["bf16_fp32_accumulator"] = _errors("tp2_sp", "bf16", "logp_and_entropy", chunk_tokens=4)
    parallel.destroy()
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def per_rank():
    return run_interpreted(2, _all_cases)


def _worst(per_rank, dtype):
    cases = [r for results in per_rank for key, r in results.items() if isinstance(key, tuple) and key[1] == dtype]
    return {name: max(r["errors"][name] for r in cases) for name in NAMES}


def test_every_layout_dtype_and_backward_branch_ran(per_rank):
    keys = {key for results in per_rank for key in results}
    assert {(layout, dtype, mode) for layout in LAYOUTS for dtype in DTYPES for mode in BACKWARD_MODES} <= keys


def test_fp32_matches_float64(per_rank):
    worst = _worst(per_rank, "fp32")
    print("fp32 max relative errors vs float64", worst)
    assert max(worst.values()) < 1e-5, worst


def test_bf16_matches_float64(per_rank):
    # The logits stay fp32 on chip, so logp and entropy keep fp32 accuracy. The gradients are bf16: the
    # logits' gradient rounded once (truncated by the interpreter; rounded to nearest on a GPU), each
    # matmul's output rounded, and the weight's chunks summed in bf16: a few bf16 ulps (2**-8 each).
    worst = _worst(per_rank, "bf16")
    print("bf16 max relative errors vs float64", worst)
    assert worst["logp"] < 1e-5 and worst["entropy"] < 1e-5, worst
    assert worst["grad_hidden"] < 2e-2 and worst["grad_weight"] < 2e-2, worst
    assert all(r["grad_dtypes"] == {"torch.bfloat16"} for results in per_rank for key, r in results.items()
               if "bf16" in key)  # the (layout, "bf16", mode) cases and "bf16_fp32_accumulator"


def test_the_fp32_accumulator_of_many_bf16_chunks(per_rank):
    for results in per_rank:
        errors = results["bf16_fp32_accumulator"]["errors"]
        assert max(errors.values()) < 2e-2, errors


def test_padded_vocab_rows_get_no_gradient(per_rank):
    for rank, results in enumerate(per_rank):
        for key, r in results.items():
            assert r["pad_rows_grad_zero"], (rank, key)
