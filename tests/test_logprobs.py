"""vocab_parallel_logprobs against a float64 full-vocabulary log_softmax, at TP 1, 2 and 4.

The backward is checked in each of the ways callers use it, since the kernel has two branches:
log-prob and entropy both trained; the log-prob alone with the entropy computed but not trained
(how training uses it: the entropy is only logged); the log-prob alone without entropy (the
old-policy pass's function); and the entropy alone.
"""

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from megatron_psft import vocab_parallel_logprobs

SEQ, BATCH, VOCAB, PADDED = 12, 3, 250, 256
# What is back-propagated: (with_entropy, log-prob trained, entropy trained).
BACKWARD_MODES = {
    "logp_and_entropy": (True, True, True),
    "logp_entropy_untrained": (True, True, False),
    "logp_without_entropy": (False, True, False),
    "entropy_only": (True, False, True),
}


def _reference(full_logits, labels, vocab, mode="logp_and_entropy"):
    """float64 log-probs, entropy and the gradient, for fixed upstream weights, of what `mode` trains."""
    _, train_logp, train_entropy = BACKWARD_MODES[mode]
    x = full_logits[..., :vocab].double().requires_grad_()
    logp_all = torch.log_softmax(x, dim=-1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    g_logp, g_ent = _upstream(labels.shape)
    ((logp * g_logp).sum() * train_logp + (entropy * g_ent).sum() * train_entropy).backward()
    grad = torch.zeros(full_logits.shape, dtype=torch.float64)
    grad[..., :vocab] = x.grad
    return logp.detach(), entropy.detach(), grad


def _upstream(shape):
    g = torch.Generator().manual_seed(3)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def _inputs(padded):
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(SEQ, BATCH, padded, generator=g)
    labels = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    return logits, labels


def _errors(tp, dtype, padded, vocab, chunk_tokens, mode):
    """Max relative errors of logp, entropy and grad on this rank's slice vs the float64 reference."""
    from megatron.core import parallel_state

    with_entropy, train_logp, train_entropy = BACKWARD_MODES[mode]
    logits, labels = _inputs(padded)
    ref_logp, ref_ent, ref_grad = _reference(logits.to(dtype).float(), labels, vocab, mode)
    rank, cols = parallel_state.get_tensor_model_parallel_rank(), padded // tp
    shard = logits[..., rank * cols:(rank + 1) * cols].to(dtype).clone().requires_grad_()
    before = shard.detach().clone()
    out = vocab_parallel_logprobs(shard, labels, vocab_size=vocab, with_entropy=with_entropy, chunk_tokens=chunk_tokens)
    logp, ent = out if with_entropy else (out, None)
    g_logp, g_ent = _upstream(labels.shape)
    trained = []
    if train_logp:
        trained.append((logp * g_logp.float()).sum())
    if train_entropy:
        trained.append((ent * g_ent.float()).sum())
    sum(trained).backward()  # an untrained output gets no gradient at all (None), as in training
    ref_grad_shard = ref_grad[..., rank * cols:(rank + 1) * cols]
    result = {
        "untouched": bool(torch.equal(shard.detach(), before)),
        "dtype": tuple(str(t.dtype) for t in (logp, ent) if t is not None),
        "logp": float(((logp.double() - ref_logp).abs() / ref_logp.abs().clamp(min=1)).max()),
        "entropy": 0.0 if ent is None else float(((ent.double() - ref_ent).abs() / ref_ent.abs().clamp(min=1)).max()),
        "grad": float((shard.grad.double() - ref_grad_shard).abs().max() / ref_grad.abs().max()),
        "pad_grad_zero": bool((shard.grad[..., max(0, vocab - rank * cols):] == 0).all()),
    }
    return result


def _error_cases():
    """Bad input: each must raise a clear error on every TP rank (no hang, no NaN)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    cols = PADDED // tp
    logits, labels = _inputs(PADDED)
    shard = logits[..., :cols].clone()
    outcomes = {}

    def attempt(name, fn):
        try:
            fn()
            outcomes[name] = "no error"
        except (ValueError, FloatingPointError) as e:
            outcomes[name] = type(e).__name__
    bad_labels = labels.clone(); bad_labels[0, 0] = VOCAB
    attempt("label_past_vocab", lambda: vocab_parallel_logprobs(shard, bad_labels, vocab_size=VOCAB))
    attempt("negative_label", lambda: vocab_parallel_logprobs(shard, labels - 1000, vocab_size=VOCAB))
    attempt("full_vocab_logits", lambda: vocab_parallel_logprobs(logits, labels, vocab_size=VOCAB))
    attempt("label_shape", lambda: vocab_parallel_logprobs(shard, labels[:-1], vocab_size=VOCAB))
    nan = shard.clone(); nan[1, 1, 0] = float("nan")
    attempt("nan_logit", lambda: vocab_parallel_logprobs(nan, labels, vocab_size=VOCAB))
    inf = shard.clone(); inf[2, 0, 3] = float("inf")
    attempt("inf_logit", lambda: vocab_parallel_logprobs(inf, labels, vocab_size=VOCAB))

    # A bad value in one rank's slice only: every rank must raise, none may wait in a collective.
    rank = parallel_state.get_tensor_model_parallel_rank()

    def bad_on(bad_rank, index, value):
        bad = shard.clone()
        if rank == bad_rank:
            bad[index] = value
        return bad
    for name, bad_rank, index, value in [("nan_logit_last_rank_only", tp - 1, (1, 1, 3), float("nan")),
                                         ("inf_logit_first_rank_only", 0, (2, 0, 5), float("inf")),
                                         ("neg_inf_logit_last_rank_only", tp - 1, (0, 2, 1), float("-inf"))]:
        attempt(name, lambda: vocab_parallel_logprobs(bad_on(bad_rank, index, value), labels, vocab_size=VOCAB,
                                                      with_entropy=True))
        attempt(name + "_without_entropy",
                lambda: vocab_parallel_logprobs(bad_on(bad_rank, index, value), labels, vocab_size=VOCAB))
    return outcomes


def _all_layouts():
    from megatron_psft.platform import parallel

    results = {}
    for tp in (1, 2, 4):
        parallel.initialize(parallel.ParallelLayout(tensor=tp))
        for dtype in (torch.float32, torch.bfloat16):
            for padded, vocab in ((PADDED, PADDED), (PADDED, VOCAB)):
                for chunk in (1000, 7):
                    for mode in BACKWARD_MODES:
                        results[(tp, str(dtype), vocab, chunk, mode)] = _errors(tp, dtype, padded, vocab, chunk, mode)
        results[("errors", tp)] = _error_cases()
        parallel.destroy()
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def per_rank():
    return run_distributed(4, _all_layouts)


def _cases(per_rank, dtype):
    for rank, results in enumerate(per_rank):
        for key, err in results.items():
            if key[0] != "errors" and key[1] == dtype:
                yield rank, key, err


def test_fp32_matches_float64_reference(per_rank):
    for mode in BACKWARD_MODES:
        errors = [e for _, key, e in _cases(per_rank, "torch.float32") if key[-1] == mode]
        print(f"fp32 {mode}: max relative errors", {k: max(e[k] for e in errors) for k in ("logp", "entropy", "grad")})
    for rank, key, err in _cases(per_rank, "torch.float32"):
        assert err["logp"] < 1e-5 and err["entropy"] < 1e-5 and err["grad"] < 1e-5, (rank, key, err)


def test_bf16_error_is_bounded(per_rank):
    # The reference sees the same bf16-rounded logits; what is left is fp32 accumulation.
    worst = {k: max(e[k] for _, _, e in _cases(per_rank, "torch.bfloat16")) for k in ("logp", "entropy", "grad")}
    print("bf16 max relative errors vs float64:", worst)
    assert worst["logp"] < 1e-5 and worst["entropy"] < 1e-5 and worst["grad"] < 1e-2, worst


def test_every_backward_branch_is_checked_at_every_tp_with_padding_and_chunking(per_rank):
    keys = {key for results in per_rank for key in results if key[0] != "errors"}
    for tp in (1, 2, 4):
        for mode in BACKWARD_MODES:
            assert {(tp, "torch.float32", VOCAB, 7, mode), (tp, "torch.float32", PADDED, 1000, mode)} <= keys
    # The modes ask for different gradients: each reference differs from the others.
    logits, labels = _inputs(PADDED)
    grads = {mode: _reference(logits, labels, VOCAB, mode)[2] for mode in BACKWARD_MODES}
    assert torch.equal(grads["logp_entropy_untrained"], grads["logp_without_entropy"])
    for a, b in [("logp_and_entropy", "logp_entropy_untrained"), ("logp_and_entropy", "entropy_only"),
                 ("logp_entropy_untrained", "entropy_only")]:
        assert (grads[a] - grads[b]).abs().max() > 0.1 * grads[a].abs().max(), (a, b)


def test_outputs_are_fp32_and_logits_untouched(per_rank):
    for rank, key, err in _cases(per_rank, "torch.bfloat16"):
        assert err["dtype"] == (("torch.float32", "torch.float32") if BACKWARD_MODES[key[-1]][0] else ("torch.float32",))
    for results in per_rank:
        for key, err in results.items():
            if key[0] != "errors":
                assert err["untouched"], key


def test_padded_columns_get_no_gradient(per_rank):
    for rank, key, err in list(_cases(per_rank, "torch.float32")) + list(_cases(per_rank, "torch.bfloat16")):
        assert err["pad_grad_zero"], (rank, key)


def test_bad_input_raises_clearly(per_rank):
    expected = {"label_past_vocab": "ValueError", "negative_label": "ValueError", "label_shape": "ValueError",
                "nan_logit": "FloatingPointError", "inf_logit": "FloatingPointError"}
    for name in ("nan_logit_last_rank_only", "inf_logit_first_rank_only"):
        expected[name] = expected[name + "_without_entropy"] = "FloatingPointError"
    for results in per_rank:
        for tp in (1, 2, 4):
            outcomes = results[("errors", tp)]
            for name, error in expected.items():
                assert outcomes[name] == error, (tp, name, outcomes)
            # Full-vocab logits are only detectable as wrong when TP > 1.
            assert outcomes["full_vocab_logits"] == ("no error" if tp == 1 else "ValueError"), (tp, outcomes)


def test_a_bad_logit_on_one_tp_rank_raises_on_every_rank(per_rank):
    """NaN / inf in one rank's slice only (the others are finite): the whole TP group raises (the
    launch would hang in a collective otherwise). A -inf logit is a zero probability: whatever the
    kernel makes of it, every rank of the group must make the same of it."""
    for tp in (2, 4):
        for name in ("nan_logit_last_rank_only", "inf_logit_first_rank_only"):
            for case in (name, name + "_without_entropy"):
                assert [r[("errors", tp)][case] for r in per_rank] == ["FloatingPointError"] * 4, (tp, case)
        for case in ("neg_inf_logit_last_rank_only", "neg_inf_logit_last_rank_only_without_entropy"):
            outcomes = [r[("errors", tp)][case] for r in per_rank]
            assert len(set(outcomes)) == 1, (tp, case, outcomes)


def test_single_process_without_megatron_groups():
    logits = torch.randn(5, 40, dtype=torch.float64).float().requires_grad_()
    labels = torch.randint(0, 40, (5,))
    logp = vocab_parallel_logprobs(logits, labels)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), ref, rtol=0, atol=1e-6)
