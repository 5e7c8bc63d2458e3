"""Training objectives: PSFT and the paper's baselines, per token, plus the Megatron loss function.

Every objective returns ``(loss_sum, num_tokens, metrics)`` for one micro-batch: the loss summed over
its response tokens and their count. Run with ``TransformerConfig.calculate_per_token_loss=True``,
Megatron's schedule and ``finalize_model_grads`` then divide the summed gradients by the token count
of the whole global batch (all micro-batches, all data-parallel ranks), so the result is a true token
mean rather than a mean of micro-batch means. Metrics follow the conventions of
:mod:`megatron_psft.observability.metrics` so they reduce exactly across micro-batches and ranks.
"""

from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_psft.config import OBJECTIVES, ObjectiveConfig  # noqa: F401 (OBJECTIVES: the objectives' names)
from megatron_psft.kernels.logprobs import vocab_parallel_logprobs
from megatron_psft.observability.metrics import extreme_metric, mean_metric

LOG_RATIO_LIMIT = 20.0

LossOutput = Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]


def _loss_output(token_loss, logprobs, loss_mask, entropy, **extra_metrics) -> LossOutput:
    """Sum the per-token loss over the response tokens; attach the metrics every objective reports."""
    mask = loss_mask.to(token_loss.dtype)
    loss_sum, num_tokens = (token_loss * mask).sum(), loss_mask.sum().to(torch.int)
    metrics = {
        "loss": torch.stack([loss_sum.detach(), mask.sum()]),
        "logprob": mean_metric(logprobs.detach(), loss_mask),
        "trained_tokens_total": mask.sum(),
    }
    if entropy is not None:
        metrics["entropy"] = mean_metric(entropy.detach(), loss_mask)
    metrics.update(extra_metrics)
    return loss_sum, num_tokens, metrics


def _check_shapes(logprobs: torch.Tensor, loss_mask: torch.Tensor, **others: torch.Tensor) -> None:
    shapes = {"logprobs": logprobs.shape, "loss_mask": loss_mask.shape, **{k: v.shape for k, v in others.items()}}
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes differ: " + ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()))


def clipped(ratio: torch.Tensor, eps_high: float) -> torch.Tensor:
    """Tokens outside the trust region: with advantage 1 only the upper clip acts, and these get no gradient."""
    return ratio > 1 + eps_high


def psft_loss(
    logprobs: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    loss_mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    entropy: Optional[torch.Tensor] = None,
) -> LossOutput:
    """PPO's clipped surrogate with the advantage fixed to 1: ``-min(r, clip(r, 1-eps_low, 1+eps_high))``.

    With a positive advantage only the upper clip acts: a token's gradient is ``r * grad logp`` while
    ``r <= 1 + eps_high`` and zero above it.
    """
    if old_logprobs is None:
        raise ValueError("PSFT needs old_logprobs (the old policy's log-probs of the same tokens)")
    _check_shapes(logprobs, loss_mask, old_logprobs=old_logprobs)
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = log_ratio.exp()
    token_loss = -torch.minimum(ratio, ratio.clamp(1 - eps_low, 1 + eps_high))
    ratio = ratio.detach()
    return _loss_output(
        token_loss, logprobs, loss_mask, entropy,
        clip_fraction=mean_metric(clipped(ratio, eps_high).float(), loss_mask),
        ratio_mean=mean_metric(ratio, loss_mask),
        ratio_min=extreme_metric(ratio, loss_mask, "min"),
        ratio_max=extreme_metric(ratio, loss_mask, "max"),
        # k3 estimator of KL(old || new): non-negative, unbiased under the old policy.
        approx_kl=mean_metric(ratio - 1 - log_ratio.detach(), loss_mask),
    )


def sft_loss(logprobs, loss_mask, entropy=None) -> LossOutput:
    """Negative log-likelihood of the response tokens."""
    return _loss_output(-logprobs, logprobs, loss_mask, entropy)


def sft_kl_loss(logprobs, reference_logprobs, loss_mask, kl_coef=0.5, entropy=None) -> LossOutput:
    """SFT plus ``kl_coef`` times a per-token KL(policy || frozen reference), k3 estimator on the data tokens."""
    if reference_logprobs is None:
        raise ValueError("sft-kl needs reference_logprobs (a frozen reference model's log-probs)")
    log_ratio = (reference_logprobs.detach() - logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    kl = log_ratio.exp() - 1 - log_ratio
    return _loss_output(-logprobs + kl_coef * kl, logprobs, loss_mask, entropy,
                        reference_kl=mean_metric(kl.detach(), loss_mask))


def dft_loss(logprobs, loss_mask, entropy=None) -> LossOutput:
    """Dynamic Fine-Tuning: ``-sg(p) * log p``, each token's NLL weighted by its own probability."""
    return _loss_output(-logprobs.detach().exp() * logprobs, logprobs, loss_mask, entropy)


def iw_sft_loss(
    logprobs: torch.Tensor,
    reference_logprobs: Optional[torch.Tensor],
    loss_mask: torch.Tensor,
    weight_min: float = 0.2,
    weight_max: float = 1.8,
    entropy: Optional[torch.Tensor] = None,
) -> LossOutput:
    """Importance-weighted SFT (Qin & Springenberg 2025, arXiv 2507.12856) with per-token weights, as
    the PSFT paper's baseline (appendix C.4): ``-sg(clip(p / p_ref, weight_min, weight_max)) * log p``.

    ``p_ref`` is the frozen reference (the starting model); the weight is a constant of the gradient,
    so a token's gradient is ``clip(r) * grad logp``: never zero, unlike PSFT's above the trust region.
    At ``p == p_ref`` this is SFT. Tokens the policy has made likelier than the reference count up to
    ``weight_max`` times, tokens it has made less likely down to ``weight_min`` times.
    """
    if reference_logprobs is None:
        raise ValueError("iw-sft needs reference_logprobs (the frozen starting model's log-probs)")
    _check_shapes(logprobs, loss_mask, reference_logprobs=reference_logprobs)
    log_ratio = (logprobs.detach() - reference_logprobs.detach()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = log_ratio.exp()
    weight = ratio.clamp(weight_min, weight_max)
    return _loss_output(
        -weight * logprobs, logprobs, loss_mask, entropy,
        clip_fraction=mean_metric(((ratio < weight_min) | (ratio > weight_max)).float(), loss_mask),
        ratio_mean=mean_metric(ratio, loss_mask),
        ratio_min=extreme_metric(ratio, loss_mask, "min"),
        ratio_max=extreme_metric(ratio, loss_mask, "max"),
        importance_weight=mean_metric(weight, loss_mask),
    )


def top_entropy_mask(entropy: torch.Tensor, loss_mask: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """The `top_fraction` highest-entropy response tokens of this micro-batch (at least one, if any)."""
    mask = loss_mask.bool()
    count = int(mask.sum())
    if count == 0:
        return mask
    keep = max(1, round(top_fraction * count))
    threshold = entropy.detach()[mask].topk(keep).values[-1]
    return mask & (entropy.detach() >= threshold)


def psft_top_entropy_loss(
    logprobs, old_logprobs, loss_mask, entropy, top_fraction=0.2, eps_low=0.2, eps_high=0.28
) -> LossOutput:
    """PSFT on the highest-entropy fraction of response tokens only (PSFT-Ent, appendix C.2)."""
    if entropy is None:
        raise ValueError("psft-ent needs the per-token entropy")
    selected = top_entropy_mask(entropy, loss_mask, top_fraction)
    loss_sum, num_tokens, metrics = psft_loss(logprobs, old_logprobs, selected, eps_low, eps_high, entropy)
    metrics["entropy"] = mean_metric(entropy.detach(), loss_mask)  # over all response tokens, as elsewhere
    metrics["selected_fraction"] = mean_metric(selected.float(), loss_mask)
    return loss_sum, num_tokens, metrics


def objective_loss(
    config: ObjectiveConfig,
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    entropy: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    reference_logprobs: Optional[torch.Tensor] = None,
) -> LossOutput:
    """Dispatch to the objective named by `config`."""
    if config.name == "psft":
        return psft_loss(logprobs, old_logprobs, loss_mask, config.eps_low, config.eps_high, entropy)
    if config.name == "psft-ent":
        return psft_top_entropy_loss(
            logprobs, old_logprobs, loss_mask, entropy, config.entropy_top_fraction, config.eps_low, config.eps_high
        )
    if config.name == "sft":
        return sft_loss(logprobs, loss_mask, entropy)
    if config.name == "sft-kl":
        return sft_kl_loss(logprobs, reference_logprobs, loss_mask, config.kl_coef, entropy)
    if config.name == "iw-sft":
        return iw_sft_loss(logprobs, reference_logprobs, loss_mask, config.iw_weight_min, config.iw_weight_max, entropy)
    return dft_loss(logprobs, loss_mask, entropy)


def make_loss_func(
    config: ObjectiveConfig,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    vocab_size: int,
    old_logprobs: Optional[torch.Tensor] = None,
    reference_logprobs: Optional[torch.Tensor] = None,
    old_is_current: bool = False,
    token_histograms: bool = False,
    logprobs_of: Optional[Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None,
) -> Callable[[torch.Tensor], LossOutput]:
    """The ``loss_func`` a Megatron ``forward_step`` returns for one micro-batch.

    It receives the last pipeline stage's output: by default the vocab-parallel logits ``[b, s, V/tp]``;
    with `logprobs_of` whatever that function turns into ``(log-probs, entropy)`` of `labels` (e.g. the
    final hidden states, for the fused output layer). `old_is_current` marks the first step of an old-policy round: the weights still equal the old
    policy's, so the training forward's own log-probs (detached) are the old ones, exactly.
    `token_histograms` adds per-vocab-id counts of clipped and of all response tokens (PSFT only),
    for the clipped-token report.
    """

    def loss_func(output: torch.Tensor) -> LossOutput:
        if logprobs_of is None:
            logprobs, entropy = vocab_parallel_logprobs(output, labels, vocab_size=vocab_size, with_entropy=True)
        else:
            logprobs, entropy = logprobs_of(output)
        old = logprobs.detach() if old_is_current else old_logprobs
        loss_sum, num_tokens, metrics = objective_loss(config, logprobs, loss_mask, entropy, old, reference_logprobs)
        if token_histograms and config.needs_old_logprobs:
            response = loss_mask.bool()
            outside = response & clipped((logprobs.detach() - old).exp(), config.eps_high)
            metrics["clipped_token_counts_total"] = torch.bincount(labels[outside], minlength=vocab_size).float()
            metrics["response_token_counts_total"] = torch.bincount(labels[response], minlength=vocab_size).float()
        return loss_sum, num_tokens, metrics

    return loss_func
