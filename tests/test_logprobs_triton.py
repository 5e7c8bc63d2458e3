"""The Triton log-prob kernel against the float64 full-vocabulary reference, on CPU through Triton's
interpreter, at TP1 and TP2, fp32 and bf16 logits, every backward branch.

The vocab (and each rank's slice) is not a multiple of the kernel's tile and has padded columns, and
the tile is shrunk to 64 columns, so rows span several tiles with a ragged last one. The kernel runs
in spawned ranks with ``TRITON_INTERPRET=1`` in their environment from the start: triton reads it when
a kernel is defined, so it must be set before :mod:`megatron_psft.kernels.logprobs_triton` is imported, which
a test process that already imported the package cannot guarantee.
"""

import importlib.util

import pytest
import torch

from distributed import run_interpreted
from test_logprobs import BACKWARD_MODES, _reference, _upstream

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed in this leg (py311 has no "
                                                          "triton; py312 runs these through its interpreter)")
SEQ, BATCH, VOCAB = 9, 2, 229  # 229 real columns: three full 64-column tiles and a ragged one
TILE = 64
PADDED = 234  # TP2: 117 columns per rank, the second rank holds 112 real ones and 5 of padding


def _inputs(padded):
    g = torch.Generator().manual_seed(0)
    return 4 * torch.randn(SEQ, BATCH, padded, generator=g), torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)


def _errors(dtype, padded, mode, kernel):
    """Max relative errors of this rank's logp, entropy and logits gradient vs the float64 reference."""
    from megatron.core import parallel_state

    from megatron_psft import vocab_parallel_logprobs

    with_entropy, train_logp, train_entropy = BACKWARD_MODES[mode]
    logits, labels = _inputs(padded)
    ref_logp, ref_ent, ref_grad = _reference(logits.to(dtype).float(), labels, VOCAB, mode)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    cols = padded // tp
    shard = logits[..., rank * cols:(rank + 1) * cols].to(dtype).clone().requires_grad_()
    out = vocab_parallel_logprobs(shard, labels, vocab_size=VOCAB, with_entropy=with_entropy, kernel=kernel)
    logp, ent = out if with_entropy else (out, None)
    g_logp, g_ent = _upstream(labels.shape)
    sum(([(logp * g_logp.float()).sum()] if train_logp else [])
        + ([(ent * g_ent.float()).sum()] if train_entropy else [])).backward()
    ref_grad_shard = ref_grad[..., rank * cols:(rank + 1) * cols]
    return {
        "logp": float(((logp.double() - ref_logp).abs() / ref_logp.abs().clamp(min=1)).max()),
        "entropy": 0.0 if ent is None else float(((ent.double() - ref_ent).abs() / ref_ent.abs().clamp(min=1)).max()),
        "grad": float((shard.grad.double() - ref_grad_shard).abs().max() / ref_grad.abs().max()),
        "pad_grad_zero": bool((shard.grad[..., max(0, VOCAB - rank * cols):] == 0).all()),
        "grad_dtype": str(shard.grad.dtype),
    }


def _bad_logits(kernel):
    from megatron_psft import vocab_parallel_logprobs

    logits, labels = _inputs(VOCAB)
    outcomes = {}
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        bad = logits.clone()
        bad[1, 1, 100] = value
        try:
            vocab_parallel_logprobs(bad, labels, with_entropy=True, kernel=kernel)
            outcomes[name] = "no error"
        except FloatingPointError:
            outcomes[name] = "FloatingPointError"
    return outcomes


def _fused_errors():
    """The fused output layer on the Triton kernel at TP2 with sequence parallelism vs float64."""
    from megatron.core import parallel_state

    from megatron_psft.kernels.fused_logprobs import fused_vocab_parallel_logprobs

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(BATCH, SEQ + 1, 16, generator=g)  # an even sequence, split over the 2 ranks
    weight = torch.randn(PADDED, 16, generator=g) / 2
    labels = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    ref_h, ref_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    log_p = torch.log_softmax((ref_h @ ref_w.t())[..., :VOCAB], dim=-1)
    ref_logp = log_p.gather(-1, labels[..., None]).squeeze(-1)
    ref_ent = -(log_p.exp() * log_p).sum(-1)
    (ref_logp.sum() + (0.5 * ref_ent).sum()).backward()
    cols, seq = PADDED // tp, (SEQ + 1) // tp
    h_shard = hidden[:, rank * seq:(rank + 1) * seq].clone().requires_grad_()
    w_shard = weight[rank * cols:(rank + 1) * cols].clone().requires_grad_()
    logp, ent = fused_vocab_parallel_logprobs(h_shard, w_shard, labels, VOCAB, with_entropy=True,
                                              sequence_parallel=True, chunk_tokens=7, kernel="triton")
    (logp.sum() + (0.5 * ent).sum()).backward()
    return {
        "logp": float((logp.double() - ref_logp).abs().max()),
        "entropy": float((ent.double() - ref_ent).abs().max()),
        "grad_hidden": float((h_shard.grad - ref_h.grad[:, rank * seq:(rank + 1) * seq]).abs().max()),
        "grad_weight": float((w_shard.grad - ref_w.grad[rank * cols:(rank + 1) * cols]).abs().max()),
    }


def _all_cases():
    import os

    import torch.distributed as dist

    from megatron_psft.kernels import logprobs_triton
    from megatron_psft.platform import parallel

    logprobs_triton.MAX_BLOCK_COLUMNS = TILE
    results = {}
    rank = dist.get_rank()
    parallel.initialize(parallel.ParallelLayout(tensor=1))
    tp1_cases = [(dtype, mode) for dtype in (torch.float32, torch.bfloat16) for mode in BACKWARD_MODES]
    for dtype, mode in tp1_cases[rank::2]:  # the two TP1 ranks split the cases
        results[(1, str(dtype), mode)] = _errors(dtype, VOCAB, mode, "triton")
    # The same kernel chosen through the environment switch rather than the argument.
    os.environ["PSFT_LOGPROBS_KERNEL"] = "triton"
    results[(1, "env_switch", rank)] = _errors(torch.float32, VOCAB, "logp_and_entropy", None)
    del os.environ["PSFT_LOGPROBS_KERNEL"]
    results[("bad_logits", rank)] = _bad_logits("triton")
    parallel.destroy()

    parallel.initialize(parallel.ParallelLayout(tensor=2))
    for dtype, mode in tp1_cases:
        results[(2, str(dtype), mode)] = _errors(dtype, PADDED, mode, "triton")
    parallel.destroy()
    parallel.initialize(parallel.ParallelLayout(tensor=2, sequence_parallel=True))
    results["fused_tp2_sp"] = _fused_errors()
    parallel.destroy()
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def per_rank():
    return run_interpreted(2, _all_cases)


def _cases(per_rank, dtype):
    for rank, results in enumerate(per_rank):
        for key, err in results.items():
            if isinstance(key, tuple) and key[1] == dtype:
                yield rank, key, err


@needs_triton
def test_every_case_ran(per_rank):
    keys = {key for results in per_rank for key in results}
    for tp in (1, 2):
        for dtype in ("torch.float32", "torch.bfloat16"):
            for mode in BACKWARD_MODES:
                assert (tp, dtype, mode) in keys


@needs_triton
def test_fp32_matches_float64_reference(per_rank):
    cases = list(_cases(per_rank, "torch.float32")) + list(_cases(per_rank, "env_switch"))
    print("fp32 max relative errors", {k: max(e[k] for _, _, e in cases) for k in ("logp", "entropy", "grad")})
    for rank, key, err in cases:
        assert err["logp"] < 1e-5 and err["entropy"] < 1e-5 and err["grad"] < 1e-5, (rank, key, err)


@needs_triton
def test_bf16_matches_float64_reference(per_rank):
    # The reference sees the same bf16-rounded logits: left are fp32 accumulation and the gradient's one
    # conversion to bf16, which Triton's interpreter truncates (the GPU rounds to nearest): under one bf16
    # ulp, 2**-7 of an element. The torch path converts twice; its bound is 1e-2.
    worst = {k: max(e[k] for _, _, e in _cases(per_rank, "torch.bfloat16")) for k in ("logp", "entropy", "grad")}
    print("bf16 max relative errors", worst)
    assert worst["logp"] < 1e-5 and worst["entropy"] < 1e-5 and worst["grad"] < 2**-7, worst
    assert all(e["grad_dtype"] == "torch.bfloat16" for _, _, e in _cases(per_rank, "torch.bfloat16"))


@needs_triton
def test_padded_columns_get_no_gradient(per_rank):
    for rank, key, err in list(_cases(per_rank, "torch.float32")) + list(_cases(per_rank, "torch.bfloat16")):
        assert err["pad_grad_zero"], (rank, key)


@needs_triton
def test_non_finite_logits_raise(per_rank):
    for rank, results in enumerate(per_rank):
        assert results[("bad_logits", rank)] == {"nan": "FloatingPointError", "inf": "FloatingPointError"}


@needs_triton
def test_fused_output_layer_on_the_triton_kernel_with_sequence_parallel(per_rank):
    for results in per_rank:
        err = results["fused_tp2_sp"]
        assert max(err.values()) < 1e-5, err


def test_kernel_choice_and_its_refusals():
    """'auto' keeps CPU logits on torch; forcing Triton where it cannot run says how to fix it."""
    from megatron_psft.kernels.logprobs import resolve_kernel

    cpu_logits = torch.zeros(2, 3)
    assert resolve_kernel(None, cpu_logits) == "torch"
    assert resolve_kernel("auto", cpu_logits) == "torch"
    assert resolve_kernel("torch", cpu_logits) == "torch"
    with pytest.raises(ValueError, match="PSFT_LOGPROBS_KERNEL"):
        resolve_kernel("cuda", cpu_logits)
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)
    try:
        if HAS_TRITON:
            with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
                resolve_kernel("triton", cpu_logits)
        else:
            with pytest.raises(ImportError, match="PSFT_LOGPROBS_KERNEL=torch"):
                resolve_kernel("triton", cpu_logits)
        mp.setenv("PSFT_LOGPROBS_KERNEL", "torch")
        assert resolve_kernel(None, cpu_logits) == "torch"
    finally:
        mp.undo()
