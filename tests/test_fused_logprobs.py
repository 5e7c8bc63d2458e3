"""The fused output layer + log-probs against float64 and against the unfused path, on CPU.

1. ``fused_vocab_parallel_logprobs(hidden, weight, ...)`` equals a float64 ``log_softmax(hidden @ W.T)``
   (values, and the gradients of hidden and weight, every backward branch) at TP1, TP2 and TP2 with
   sequence parallelism, with padded vocab rows and a chunk size that leaves a ragged last chunk; and it
   equals the unfused fp32 logits + ``vocab_parallel_logprobs``.
2. A Megatron GPTModel (the debug Qwen3-MoE, one layer) run inside ``output_hidden_states`` and fed to
   the fused op gives the same log-probs, entropy and gradient of every parameter as the same model's
   logits fed to ``vocab_parallel_logprobs``: untied at TP1, tied embeddings at TP2 with SP.
All in one 2-rank launch.
"""

import pytest
import torch

from distributed import run_distributed
from test_logprobs import BACKWARD_MODES

BATCH, SEQ, HIDDEN, VOCAB, PADDED = 2, 6, 8, 37, 40  # TP2: 20 rows per rank, the second has 17 real ones
CHUNK = 5  # 12 tokens: chunks of 5, 5, 2
LAYOUTS = {"tp1": dict(tensor=1), "tp2": dict(tensor=2), "tp2_sp": dict(tensor=2, sequence_parallel=True)}


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(PADDED, HIDDEN, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    upstream = torch.randn(2, BATCH, SEQ, generator=g, dtype=torch.float64)
    return hidden, weight, labels, upstream


def _objective(out, with_entropy, train_logp, train_entropy, upstream):
    logp, entropy = out if with_entropy else (out, None)
    terms = ([(logp * upstream[0].to(logp.dtype)).sum()] if train_logp else []) + (
        [(entropy * upstream[1].to(entropy.dtype)).sum()] if train_entropy else [])
    sum(terms).backward()
    return logp.detach(), None if entropy is None else entropy.detach()


def _reference(mode):
    with_entropy, train_logp, train_entropy = BACKWARD_MODES[mode]
    hidden, weight, labels, upstream = _inputs()
    hidden.requires_grad_(), weight.requires_grad_()
    log_p = torch.log_softmax((hidden @ weight.t())[..., :VOCAB], dim=-1)
    logp = log_p.gather(-1, labels[..., None]).squeeze(-1)
    out = (logp, -(log_p.exp() * log_p).sum(-1)) if with_entropy else logp
    logp, entropy = _objective(out, with_entropy, train_logp, train_entropy, upstream)
    return logp, entropy, hidden.grad, weight.grad


def _compare(layout, mode):
    """Max errors of fused and of unfused vs float64, and fused vs unfused, on this rank's shards."""
    from megatron.core import parallel_state

    from megatron_psft import vocab_parallel_logprobs
    from megatron_psft.kernels.fused_logprobs import fused_vocab_parallel_logprobs

    with_entropy, train_logp, train_entropy = BACKWARD_MODES[mode]
    sequence_parallel = LAYOUTS[layout].get("sequence_parallel", False)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    hidden, weight, labels, upstream = _inputs()
    ref = _reference(mode)
    rows = slice(rank * PADDED // tp, (rank + 1) * PADDED // tp)
    seq = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp) if sequence_parallel else slice(None)

    h_fused = hidden[:, seq].float().requires_grad_()
    w_fused = weight[rows].float().requires_grad_()
    fused = _objective(fused_vocab_parallel_logprobs(h_fused, w_fused, labels, VOCAB, with_entropy, sequence_parallel,
                                                     chunk_tokens=CHUNK), with_entropy, train_logp, train_entropy,
                       upstream)
    # Unfused: every rank holds the whole sequence's hidden states (what the output layer gathers under SP).
    h_unfused = hidden.float().requires_grad_()
    w_unfused = weight[rows].float().requires_grad_()
    unfused = _objective(vocab_parallel_logprobs(h_unfused @ w_unfused.t(), labels, vocab_size=VOCAB,
                                                 with_entropy=with_entropy, chunk_tokens=CHUNK),
                         with_entropy, train_logp, train_entropy, upstream)
    grad_h_unfused = h_unfused.grad.clone()
    if tp > 1:  # each rank's share of the hidden gradient comes from its vocab rows: sum them
        torch.distributed.all_reduce(grad_h_unfused, group=parallel_state.get_tensor_model_parallel_group())

    def err(a, b):
        return 0.0 if a is None else float((a.double() - b.double()).abs().max() / b.double().abs().max())

    fused_values = fused + (h_fused.grad, w_fused.grad)
    unfused_values = unfused + (grad_h_unfused[:, seq], w_unfused.grad)
    ref_values = (ref[0], ref[1], ref[2][:, seq], ref[3][rows])
    names = ("logp", "entropy", "grad_hidden", "grad_weight")
    return {
        "fused_vs_float64": {n: err(f, r) for n, f, r in zip(names, fused_values, ref_values)},
        "unfused_vs_float64": {n: err(u, r) for n, u, r in zip(names, unfused_values, ref_values)},
        "fused_vs_unfused": {n: err(f, u) for n, f, u in zip(names, fused_values, unfused_values)},
        "pad_rows_grad_zero": bool((w_fused.grad[max(0, VOCAB - rows.start):] == 0).all()),
    }


def _model_case(layout_kwargs, tied):
    """The same GPTModel through logits + vocab_parallel_logprobs and through the fused op."""
    from megatron.core import parallel_state

    from megatron_psft import vocab_parallel_logprobs
    from megatron_psft.platform import parallel
    from megatron_psft.kernels.fused_logprobs import fused_vocab_parallel_logprobs, output_hidden_states, output_weight
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, load_hf_config, transformer_config

    layout = parallel.ParallelLayout(**layout_kwargs)
    parallel.initialize(layout, seed=3)
    hf_config = dict(load_hf_config("debug"), num_hidden_layers=1, tie_word_embeddings=tied)
    args = Qwen3MoeArgs.from_hf_config(hf_config)
    config = transformer_config(args, layout, moe_aux_loss_coeff=0.0)
    (model,) = build_model_chunks(args, config)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, args.vocab_size, (2, 8), generator=g)
    labels = torch.randint(0, args.vocab_size, (2, 8), generator=g)
    position_ids = torch.arange(8).expand(2, 8).contiguous()
    upstream = torch.randn(2, 2, 8, generator=g)

    def run(fused):
        model.zero_grad(set_to_none=True)
        if fused:
            with output_hidden_states(model):
                hidden = model(tokens, position_ids, attention_mask=None)
            out = fused_vocab_parallel_logprobs(hidden, output_weight(model), labels, args.vocab_size, True,
                                                layout.sequence_parallel, chunk_tokens=5)
        else:
            out = vocab_parallel_logprobs(model(tokens, position_ids, attention_mask=None), labels,
                                          vocab_size=args.vocab_size, with_entropy=True)
        ((out[0] * upstream[0]).sum() + (out[1] * upstream[1]).sum()).backward()
        return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (logp, entropy), grads = run(fused=False)
    (fused_logp, fused_entropy), fused_grads = run(fused=True)
    unfused_logits = model(tokens, position_ids, attention_mask=None)  # the helper restored the output layer
    result = {
        "padded_columns": int(unfused_logits.shape[-1]) * parallel_state.get_tensor_model_parallel_world_size(),
        "logp": float((fused_logp - logp).abs().max()),
        "entropy": float((fused_entropy - entropy).abs().max()),
        "same_params": sorted(grads) == sorted(fused_grads),
        "grad": max(float((fused_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-30)) for n, g in grads.items()),
        "output_grad_nonzero": bool(grads["embedding.word_embeddings.weight" if tied else "output_layer.weight"]
                                    .abs().sum() > 0),
    }
    parallel.destroy()
    return result


def _all_cases():
    import torch.distributed as dist

    from megatron_psft.platform import parallel

    results = {}
    for layout, kwargs in LAYOUTS.items():
        parallel.initialize(parallel.ParallelLayout(**kwargs))
        for mode in BACKWARD_MODES:
            results[(layout, mode)] = _compare(layout, mode)
        parallel.destroy()
    results["model_tp1_untied"] = _model_case(dict(tensor=1), tied=False)
    results["model_tp2_sp_tied"] = _model_case(dict(tensor=2, sequence_parallel=True), tied=True)
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def per_rank():
    return run_distributed(2, _all_cases)


def test_fused_matches_float64_at_every_layout_and_backward_branch(per_rank):
    for rank, results in enumerate(per_rank):
        for layout in LAYOUTS:
            for mode in BACKWARD_MODES:
                errors = results[(layout, mode)]
                assert max(errors["fused_vs_float64"].values()) < 1e-5, (rank, layout, mode, errors)
                # The unfused path is the oracle's sanity check: it is held to the same bound.
                assert max(errors["unfused_vs_float64"].values()) < 1e-5, (rank, layout, mode, errors)
                assert max(errors["fused_vs_unfused"].values()) < 1e-5, (rank, layout, mode, errors)
                assert errors["pad_rows_grad_zero"], (rank, layout, mode)


def test_a_gpt_model_gives_the_same_logprobs_and_gradients_fused(per_rank):
    for rank, results in enumerate(per_rank):
        for case in ("model_tp1_untied", "model_tp2_sp_tied"):
            r = results[case]
            print(rank, case, r)
            assert r["padded_columns"] > 1000  # the debug vocab (1000) is padded: padding is in play
            assert r["same_params"] and r["output_grad_nonzero"], (rank, case, r)
            assert r["logp"] < 1e-5 and r["entropy"] < 1e-5 and r["grad"] < 1e-4, (rank, case, r)


def test_sequence_parallel_without_tensor_parallel_is_refused():
    from megatron_psft.kernels.fused_logprobs import fused_vocab_parallel_logprobs

    hidden, weight, labels, _ = _inputs()
    with pytest.raises(ValueError, match="--sequence-parallel"):
        fused_vocab_parallel_logprobs(hidden, weight, labels, VOCAB, sequence_parallel=True)
    with pytest.raises(ValueError, match="labels"):
        fused_vocab_parallel_logprobs(hidden, weight, labels[:, :-1], VOCAB)


def test_auto_keeps_the_fused_torch_kernel_until_the_triton_one_has_run_on_a_gpu(monkeypatch):
    from megatron_psft.kernels import fused_logprobs

    # As if on a CUDA tensor with triton installed, where the logits kernel's 'auto' picks Triton.
    monkeypatch.setattr(fused_logprobs, "resolve_kernel", lambda kernel, tensor: "triton")
    hidden = torch.zeros(2, 3)
    monkeypatch.delenv("PSFT_LOGPROBS_KERNEL", raising=False)
    assert fused_logprobs._fused_kernel(None, hidden) == fused_logprobs._fused_kernel("auto", hidden) == "torch"
    assert fused_logprobs._fused_kernel("triton", hidden) == "triton"
    monkeypatch.setenv("PSFT_LOGPROBS_KERNEL", "triton")
    assert fused_logprobs._fused_kernel(None, hidden) == "triton"
