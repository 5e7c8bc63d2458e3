"""GPU tier: the fused output layer + log-probs on its Triton kernel, compiled for the GPU, against float64.

The CPU suite checks the same kernel through Triton's interpreter with 16-wide tiles; here it runs at its
real tiles (64 x 128 x 64) on bf16 tensor cores, TP1, with ragged shapes (tokens, hidden and vocab not
multiples of a tile, padded vocab rows), both backward branches and both weight-gradient accumulators.
Skipped without CUDA or triton.
"""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="needs a CUDA GPU and triton")
TOKENS, HIDDEN, VOCAB, PADDED = 1000, 200, 5003, 5120


def _errors(dtype, train_entropy, chunk_tokens):
    from megatron_psft.kernels.fused_logprobs import fused_vocab_parallel_logprobs

    g = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(1, TOKENS, HIDDEN, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(PADDED, HIDDEN, device="cuda", generator=g) / 8).to(dtype)
    labels = torch.randint(0, VOCAB, (1, TOKENS), device="cuda", generator=g)
    ref_h, ref_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    log_p = torch.log_softmax((ref_h @ ref_w.t())[..., :VOCAB], dim=-1)
    ref_logp, ref_ent = log_p.gather(-1, labels[..., None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)
    (ref_logp.sum() + train_entropy * ref_ent.sum()).backward()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = fused_vocab_parallel_logprobs(h, w, labels, VOCAB, with_entropy=True, chunk_tokens=chunk_tokens,
                                              kernel="triton")
    (logp.sum() + (ent.sum() if train_entropy else 0)).backward()

    def err(got, want):
        return float((got.double() - want).abs().max() / want.abs().max())

    return {"logp": err(logp, ref_logp), "entropy": err(ent, ref_ent), "grad_hidden": err(h.grad, ref_h.grad),
            "grad_weight": err(w.grad, ref_w.grad), "pad_rows_grad_zero": bool((w.grad[VOCAB:] == 0).all())}


@pytest.mark.parametrize("train_entropy", [True, False])
@pytest.mark.parametrize("dtype, chunk_tokens, grad_bound", [
    (torch.float32, 300, 1e-5),
    (torch.bfloat16, 300, 2e-2),  # 4 chunks: the weight's gradient summed in bf16
    (torch.bfloat16, 100, 2e-2),  # 10 chunks: in an fp32 accumulator
])
def test_fused_triton_matches_float64_on_the_gpu(dtype, chunk_tokens, grad_bound, train_entropy):
    errors = _errors(dtype, train_entropy, chunk_tokens)
    print(dtype, chunk_tokens, train_entropy, errors)
    assert errors.pop("pad_rows_grad_zero")
    assert errors["logp"] < 1e-5 and errors["entropy"] < 1e-5, errors
    assert errors["grad_hidden"] < grad_bound and errors["grad_weight"] < grad_bound, errors
