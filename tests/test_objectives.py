"""Token-level objectives against hand-computed values and autograd."""

import math

import pytest
import torch

from megatron_psft import (ObjectiveConfig, dft_loss, psft_loss, psft_top_entropy_loss, reduce_metrics,
                           sft_kl_loss, sft_loss)
from megatron_psft.objectives import objective_loss

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
