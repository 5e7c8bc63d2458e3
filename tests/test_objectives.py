"""Token-level objectives against hand-computed values and autograd."""

import math

import pytest
import torch

from megatron_psft import (ObjectiveConfig, dft_loss, psft_loss, psft_top_entropy_loss, reduce_metrics,
                           sft_kl_loss, sft_loss)
from megatron_psft.psft.objectives import iw_sft_loss, make_loss_func, objective_loss

RATIOS = torch.tensor([[1.0, 1.5, 0.5, 1.2, 2.0, 1.28]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 1, 0, 1]], dtype=torch.float64)


def _leaf_logprobs():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -0.25]], dtype=torch.float64)
    return (old + RATIOS.log()).requires_grad_(), old


def test_psft_gradient_is_ratio_inside_trust_region_and_zero_above():
    logprobs, old = _leaf_logprobs()
    loss_sum, num_tokens, _ = psft_loss(logprobs, old, MASK)
    loss_sum.backward()
    expected = -(RATIOS * (RATIOS <= 1 + 0.28) * MASK)
    torch.testing.assert_close(logprobs.grad, expected, rtol=1e-12, atol=1e-12)
    assert logprobs.grad[0, 2] == pytest.approx(-0.5)  # the lower clip never acts with advantage 1
    assert int(num_tokens) == 5


def test_psft_value_and_statistics_match_hand_computation():
    logprobs, old = _leaf_logprobs()
    loss_sum, num_tokens, metrics = psft_loss(logprobs, old, MASK)
    # masked tokens: r = 1, 1.5 (clipped to 1.28), 0.5, 1.2, 1.28
    assert float(loss_sum) == pytest.approx(-(1 + 1.28 + 0.5 + 1.2 + 1.28))
    reduced = reduce_metrics([metrics])
    kept = [1.0, 1.5, 0.5, 1.2, 1.28]
    assert reduced["clip_fraction"] == pytest.approx(1 / 5)  # 1.28 sits on the boundary: not clipped
    assert reduced["ratio_mean"] == pytest.approx(sum(kept) / 5)
    assert reduced["ratio_min"] == pytest.approx(0.5) and reduced["ratio_max"] == pytest.approx(1.5)
    assert reduced["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in kept) / 5)
    assert reduced["loss"] == pytest.approx(float(loss_sum) / 5)
    assert reduced["trained_tokens_total"] == 5


def test_log_ratio_is_clamped_so_extreme_ratios_stay_finite():
    logprobs = torch.tensor([0.0, -100.0], requires_grad=True)
    old = torch.tensor([-100.0, 0.0])
    loss_sum, _, metrics = psft_loss(logprobs, old, torch.ones(2))
    loss_sum.backward()
    assert torch.isfinite(loss_sum) and torch.isfinite(logprobs.grad).all()
    assert float(metrics["ratio_max"]) == pytest.approx(math.exp(20), rel=1e-5)


def test_empty_micro_batch_gives_zero_loss_and_no_metric():
    logprobs, old = _leaf_logprobs()
    loss_sum, num_tokens, metrics = psft_loss(logprobs, old, torch.zeros_like(MASK))
    loss_sum.backward()
    assert float(loss_sum) == 0 and int(num_tokens) == 0 and torch.equal(logprobs.grad, torch.zeros_like(MASK))
    reduced = reduce_metrics([metrics])
    assert reduced["clip_fraction"] is None and reduced["ratio_min"] is None and reduced["loss"] is None


def test_missing_old_logprobs_is_an_error():
    logprobs, _ = _leaf_logprobs()
    with pytest.raises(ValueError, match="old_logprobs"):
        psft_loss(logprobs, None, MASK)
    with pytest.raises(ValueError, match="old_logprobs"):
        objective_loss(ObjectiveConfig("psft"), logprobs, MASK)
    with pytest.raises(ValueError, match="shapes"):
        psft_loss(logprobs, logprobs[:, :3], MASK)


def test_metrics_are_token_means_across_micro_batches_not_means_of_means():
    logprobs, old = _leaf_logprobs()
    first = psft_loss(logprobs, old, MASK)[2]          # 5 tokens, one clipped
    second_mask = torch.tensor([[0, 1, 0, 0, 0, 0]], dtype=torch.float64)
    second = psft_loss(logprobs, old, second_mask)[2]  # 1 token, clipped
    reduced = reduce_metrics([first, second])
    assert reduced["clip_fraction"] == pytest.approx(2 / 6)
    assert reduced["clip_fraction"] != pytest.approx((1 / 5 + 1) / 2)


def test_sft_and_dft_and_sft_kl_values_and_gradients():
    logprobs, old = _leaf_logprobs()
    loss_sum, _, _ = sft_loss(logprobs, MASK)
    assert float(loss_sum) == pytest.approx(-float((logprobs * MASK).sum()))

    logprobs.grad = None
    loss_sum, _, _ = dft_loss(logprobs, MASK)
    loss_sum.backward()
    torch.testing.assert_close(logprobs.grad, -(logprobs.detach().exp() * MASK))  # -sg(p) * grad log p

    reference = old  # KL(policy || reference) with log(ref/policy) = -log r
    loss_sum, _, metrics = sft_kl_loss(logprobs, reference, MASK, kl_coef=0.5)
    k3 = (1 / RATIOS) - 1 + RATIOS.log()
    expected = float(((-logprobs.detach() + 0.5 * k3) * MASK).sum())
    assert float(loss_sum) == pytest.approx(expected)
    assert reduce_metrics([metrics])["reference_kl"] == pytest.approx(float((k3 * MASK).sum() / MASK.sum()))
    with pytest.raises(ValueError, match="reference_logprobs"):
        sft_kl_loss(logprobs, None, MASK)


def test_psft_on_top_entropy_tokens_trains_only_those():
    logprobs, old = _leaf_logprobs()
    entropy = torch.tensor([[0.1, 3.0, 0.2, 2.0, 9.0, 0.3]], dtype=torch.float64)
    loss_sum, num_tokens, metrics = psft_top_entropy_loss(logprobs, old, MASK, entropy, top_fraction=0.4)
    loss_sum.backward()
    # 5 response tokens -> keep 2: entropies 3.0 and 2.0 (9.0 is masked out)
    assert int(num_tokens) == 2
    assert torch.nonzero(logprobs.grad[0]).flatten().tolist() == [3]  # token 1 is clipped (r = 1.5)
    reduced = reduce_metrics([metrics])
    assert reduced["selected_fraction"] == pytest.approx(2 / 5)
    assert reduced["entropy"] == pytest.approx((0.1 + 3.0 + 0.2 + 2.0 + 0.3) / 5)


def test_objective_config_rejects_bad_values():
    with pytest.raises(ValueError):
        ObjectiveConfig("ppo")
    with pytest.raises(ValueError):
        ObjectiveConfig(eps_low=1.0)
    with pytest.raises(ValueError):
        ObjectiveConfig(entropy_top_fraction=0)
    with pytest.raises(ValueError, match="iw_weight_min"):
        ObjectiveConfig("iw-sft", iw_weight_min=1.1)
    with pytest.raises(ValueError, match="iw_weight_max"):
        ObjectiveConfig("iw-sft", iw_weight_max=0.9)


# --- iw-SFT: per-token weights p / p_ref against the frozen reference, clipped to [0.2, 1.8] ----------

# Ratios p / p_ref below the lower bound, just inside both bounds and above the upper one; the masked
# token (index 4) has an extreme ratio that must not count anywhere.
IW_RATIOS = torch.tensor([[0.1, 0.21, 0.7, 1.0, 50.0, 1.79, 2.5, 1.3]], dtype=torch.float64)
IW_MASK = torch.tensor([[1, 1, 1, 1, 0, 1, 1, 1]], dtype=torch.float64)


def _iw_leaf_logprobs(ratios=IW_RATIOS):
    reference = -torch.linspace(0.5, 4.0, ratios.numel(), dtype=torch.float64).reshape(ratios.shape)
    return (reference + ratios.log()).requires_grad_(), reference


def _iw_oracle(logprobs, reference, mask, low=0.2, high=1.8):
    """float64, written out: loss sum and d(loss sum)/d(logp) of -sg(clip(p / p_ref)) * log p."""
    weight = torch.exp(logprobs.detach() - reference).clamp(low, high)
    return float((-weight * logprobs.detach() * mask).sum()), -weight * mask


def test_iw_sft_gradient_is_the_clipped_weight_at_both_bounds():
    logprobs, reference = _iw_leaf_logprobs()
    loss_sum, num_tokens, metrics = iw_sft_loss(logprobs, reference, IW_MASK)
    loss_sum.backward()
    want_loss, want_grad = _iw_oracle(logprobs, reference, IW_MASK)
    assert float(loss_sum) == pytest.approx(want_loss, rel=1e-12)
    torch.testing.assert_close(logprobs.grad, want_grad, rtol=1e-12, atol=1e-12)
    # Both clips act, and a clipped token keeps its gradient (unlike PSFT above its trust region).
    assert logprobs.grad[0, 0] == pytest.approx(-0.2) and logprobs.grad[0, 6] == pytest.approx(-1.8)
    assert logprobs.grad[0, 1] == pytest.approx(-0.21) and logprobs.grad[0, 5] == pytest.approx(-1.79)
    assert logprobs.grad[0, 4] == 0
    assert int(num_tokens) == 7
    reduced = reduce_metrics([metrics])
    kept = [0.1, 0.21, 0.7, 1.0, 1.79, 2.5, 1.3]
    assert reduced["clip_fraction"] == pytest.approx(2 / 7)
    assert reduced["ratio_min"] == pytest.approx(0.1) and reduced["ratio_max"] == pytest.approx(2.5)
    assert reduced["ratio_mean"] == pytest.approx(sum(kept) / 7)
    assert reduced["importance_weight"] == pytest.approx(sum(min(max(r, 0.2), 1.8) for r in kept) / 7)
    assert reduced["loss"] == pytest.approx(want_loss / 7)


def test_iw_sft_is_sft_at_the_reference_and_takes_the_configured_bounds():
    logprobs, reference = _iw_leaf_logprobs(torch.ones_like(IW_RATIOS))
    got = objective_loss(ObjectiveConfig("iw-sft"), logprobs, IW_MASK, reference_logprobs=reference)[0]
    assert float(got) == pytest.approx(float(sft_loss(logprobs, IW_MASK)[0]), rel=1e-12)

    logprobs, reference = _iw_leaf_logprobs()
    config = ObjectiveConfig("iw-sft", iw_weight_min=0.5, iw_weight_max=1.2)
    loss_sum = objective_loss(config, logprobs, IW_MASK, reference_logprobs=reference)[0]
    loss_sum.backward()
    want_loss, want_grad = _iw_oracle(logprobs, reference, IW_MASK, 0.5, 1.2)
    assert float(loss_sum) == pytest.approx(want_loss, rel=1e-12)
    torch.testing.assert_close(logprobs.grad, want_grad, rtol=1e-12, atol=1e-12)


def test_iw_sft_weights_each_token_not_the_sequence():
    """Two samples whose token ratios (3, 1/3) and (1/3, 3) have a geometric mean of 1: a sequence-level
    weight (the length-normalised ratio of the whole response) would be 1 on every token, plain SFT.
    Per token, the likelier token counts 1.8 times and the other 1/3 times."""
    ratios = torch.tensor([[3.0, 1 / 3], [1 / 3, 3.0]], dtype=torch.float64)
    mask = torch.ones_like(ratios)
    logprobs, reference = _iw_leaf_logprobs(ratios)
    iw_sft_loss(logprobs, reference, mask)[0].backward()
    torch.testing.assert_close(logprobs.grad, _iw_oracle(logprobs, reference, mask)[1], rtol=1e-12, atol=1e-12)
    sequence_weight = torch.exp((logprobs.detach() - reference).mean(-1, keepdim=True)).clamp(0.2, 1.8)
    assert torch.allclose(sequence_weight, torch.ones_like(sequence_weight))
    assert (logprobs.grad - (-sequence_weight * mask)).abs().max() > 0.5


def test_iw_sft_metrics_reduce_exactly_over_micro_batches():
    logprobs, reference = _iw_leaf_logprobs()
    whole = reduce_metrics([iw_sft_loss(logprobs, reference, IW_MASK)[2]])
    first, second = IW_MASK.clone(), IW_MASK.clone()
    first[0, 3:], second[0, :3] = 0, 0
    parts = reduce_metrics([iw_sft_loss(logprobs, reference, m)[2] for m in (first, second)])
    assert parts.keys() == whole.keys()
    for key in whole:
        assert parts[key] == pytest.approx(whole[key], rel=1e-6), key


def test_iw_sft_needs_the_reference():
    logprobs, reference = _iw_leaf_logprobs()
    assert ObjectiveConfig("iw-sft").needs_reference_logprobs and not ObjectiveConfig("iw-sft").needs_old_logprobs
    with pytest.raises(ValueError, match="reference_logprobs"):
        iw_sft_loss(logprobs, None, IW_MASK)
    with pytest.raises(ValueError, match="reference_logprobs"):
        objective_loss(ObjectiveConfig("iw-sft"), logprobs, IW_MASK)
    with pytest.raises(ValueError, match="shapes"):
        iw_sft_loss(logprobs, reference[:, :3], IW_MASK)


def test_iw_sft_loss_func_on_logits_matches_a_full_vocabulary_float64_oracle():
    """make_loss_func's path (log-probs from the logits, then the objective) against log_softmax in float64:
    the loss, the token count and the gradient with respect to the logits."""
    g = torch.Generator().manual_seed(3)
    logits = (2 * torch.randn(2, 5, 11, generator=g, dtype=torch.float64)).float().requires_grad_()
    labels = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.float32)
    exact = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(exact, -1).gather(-1, labels[..., None]).squeeze(-1)
    reference = (logp.detach() + 1.5 * torch.randn(2, 5, generator=g, dtype=torch.float64)).float()
    weight = torch.exp(logp.detach() - reference.double()).clamp(0.2, 1.8)
    assert ((weight == 0.2) | (weight == 1.8))[mask.bool()].any() and ((weight > 0.2) & (weight < 1.8)).any()
    want = (-weight * logp * mask).sum()
    want.backward()
    loss_func = make_loss_func(ObjectiveConfig("iw-sft"), labels, mask, 11, reference_logprobs=reference)
    loss_sum, num_tokens, _ = loss_func(logits)
    loss_sum.backward()
    assert int(num_tokens) == 6
    assert float(loss_sum) == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(logits.grad.double(), exact.grad, rtol=1e-5, atol=1e-6)
