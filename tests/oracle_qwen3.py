"""A float64, single-process reference for one training step of a tiny Qwen3-MoE.

The model is transformers' ``Qwen3MoeForCausalLM`` run in float64 *throughout*: transformers computes
RMSNorm, the router softmax and the RoPE angles in float32 whatever the model dtype, so those three
modules get float64 forwards here (same formulas, per instance: nothing global is patched), and
:class:`NoLowPrecision` checks that no op of the forward produces a narrower floating tensor (the
backward then runs in the forward's dtypes).
On top of its logits: full-vocabulary ``log_softmax``, the paper's objectives written out per token,
the global token mean over every response token of the batch, and autograd for the gradient of
every parameter. Nothing here imports megatron_psft's log-prob kernel or objectives.
"""

import copy
import types
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

SEED = 0


def hf_config(**changes):
    """The repository's `debug` flavour (4 layers, 8 experts top-2, vocab 1000) with wider weights:
    logits far from uniform and routing with clear margins."""
    import transformers

    from megatron_psft.models.qwen3_moe import load_hf_config

    config = {k: v for k, v in load_hf_config("debug").items() if k not in ("architectures", "model_type", "torch_dtype")}
    config.update(initializer_range=0.1, **changes)
    return transformers.Qwen3MoeConfig(**config)


def save_random_model(path: str, seed: int = SEED) -> None:
    """A random fp32 Qwen3-MoE saved by transformers; norms are made distinct (a swapped norm shows)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(hf_config()).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)


# --- float64 everywhere ----------------------------------------------------------------------------

def _rms_norm_forward(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _router_forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    probs = torch.softmax(router_logits, dim=-1)
    top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    # Record how close the top-k choice came to flipping: a float32 model may only be compared with
    # this one where the k-th and (k+1)-th probabilities are well apart.
    sorted_probs = probs.detach().sort(dim=-1, descending=True).values
    gap = (sorted_probs[:, self.top_k - 1] - sorted_probs[:, self.top_k]).min()
    self.oracle_min_gap = min(getattr(self, "oracle_min_gap", float("inf")), float(gap))
    return router_logits, top_value, top_index


def _rotary_forward(self, x, position_ids):
    dim = self.inv_freq.numel() * 2
    theta = self.config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _to_float64(model):
    model.double()
    for module in model.modules():
        kind = type(module).__name__
        if kind == "Qwen3MoeRMSNorm":
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif kind == "Qwen3MoeTopKRouter":
            module.forward = types.MethodType(_router_forward, module)
        elif kind == "Qwen3MoeRotaryEmbedding":
            assert module.rope_type == "default" and module.attention_scaling == 1.0
            module.forward = types.MethodType(_rotary_forward, module)
    return model


class NoLowPrecision(torch.overrides.TorchFunctionMode):
    """Raises if any torch function returns a floating tensor narrower than float64."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                raise AssertionError(f"{func} produced {t.dtype} in the float64 reference")
        return out


def load_float64(path: str):
    """transformers' model from `path` in float64, with eager experts and SDPA attention (both
    float64 on CPU) and the float64 forwards above."""
    import transformers

    model = transformers.Qwen3MoeForCausalLM.from_pretrained(
        path, dtype=torch.float64, attn_implementation="sdpa", experts_implementation="eager")
    return _to_float64(model.eval())


def perturbed(model, seed: int, scale: float):
    """A copy of `model` with every weight multiplied by (1 + scale * N(0, 1)): another policy."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(1 + scale * torch.randn(param.shape, generator=g, dtype=torch.float64))
    return _to_float64(other)


def min_routing_gap(model) -> float:
    return min(m.oracle_min_gap for m in model.modules() if hasattr(m, "oracle_min_gap"))


def reset_routing_gaps(model) -> None:
    for m in model.modules():
        if hasattr(m, "oracle_min_gap"):
            del m.oracle_min_gap


def policy(model, tokens, labels, position_ids):
    """float64 ``(logp, entropy)`` of `labels`, each ``[b, s]``, from a full-vocabulary log_softmax."""
    with NoLowPrecision():
        logits = model(input_ids=tokens, position_ids=position_ids, use_cache=False).logits
        assert logits.dtype == torch.float64
        log_probs = torch.log_softmax(logits, dim=-1)
        logp = log_probs.gather(-1, labels[..., None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


@torch.no_grad()
def logprobs(model, batch) -> torch.Tensor:
    return policy(model, batch["tokens"], batch["labels"], batch["position_ids"])[0]


# --- the objectives, from the paper (arXiv 2508.17784) ----------------------------------------------

def top_entropy_selection(entropy, mask, micro_batches: Sequence[range], top_fraction: float):
    """PSFT-Ent: in each micro-batch, the round(top_fraction x its response tokens) (at least one)
    response tokens of highest entropy. Returns the selection and the smallest gap between the last
    selected entropy and the next one (a float32 run may only be compared where it is clear)."""
    selected = torch.zeros_like(mask, dtype=torch.bool)
    gap = float("inf")
    for rows in micro_batches:
        values = entropy[rows.start:rows.stop][mask[rows.start:rows.stop].bool()]
        if values.numel() == 0:
            continue
        keep = max(1, round(top_fraction * values.numel()))
        ordered = values.sort(descending=True).values
        if keep < values.numel():
            gap = min(gap, float(ordered[keep - 1] - ordered[keep]))
        selected[rows.start:rows.stop] = mask[rows.start:rows.stop].bool() & (entropy[rows.start:rows.stop] >= ordered[keep - 1])
    return selected, gap


IW_WEIGHT_MIN, IW_WEIGHT_MAX = 0.2, 1.8  # iw-SFT's weight clipping (PSFT paper, appendix C.4)


def token_loss(name, logp, old=None, reference=None, eps_low=0.2, eps_high=0.28, kl_coef=0.5):
    """Per-token loss of each objective (A = 1 for PSFT)."""
    if name in ("psft", "psft-ent"):
        ratio = torch.exp((logp - old).clamp(-20, 20))
        return -torch.minimum(ratio, ratio.clamp(1 - eps_low, 1 + eps_high))
    if name == "sft":
        return -logp
    if name == "sft-kl":
        delta = reference - logp  # k3 estimator of KL(policy || reference)
        return -logp + kl_coef * (delta.exp() - delta - 1)
    if name == "dft":
        return -logp.detach().exp() * logp
    if name == "iw-sft":  # Qin & Springenberg's per-token weight p / p_ref, a constant of the gradient
        weight = torch.exp((logp.detach() - reference).clamp(-20, 20)).clamp(IW_WEIGHT_MIN, IW_WEIGHT_MAX)
        return -weight * logp
    raise ValueError(name)


def step(model, batch, name: str, old: Optional[torch.Tensor] = None, reference: Optional[torch.Tensor] = None,
         micro_batches: Optional[List[range]] = None, eps_high: float = 0.28, top_fraction: float = 0.2) -> Dict:
    """One step's loss (global token mean) and the gradient of every parameter, in float64."""
    model.zero_grad(set_to_none=True)
    reset_routing_gaps(model)
    mask = batch["loss_mask"].to(torch.float64)
    logp, entropy = policy(model, batch["tokens"], batch["labels"], batch["position_ids"])
    margins = {"routing": min_routing_gap(model)}
    trained = mask
    if name == "psft-ent":
        selected, margins["entropy_selection"] = top_entropy_selection(entropy.detach(), mask, micro_batches, top_fraction)
        trained = selected.to(torch.float64)
    old = None if old is None else old.to(torch.float64)
    reference = None if reference is None else reference.to(torch.float64)
    per_token = token_loss(name, logp, old, reference, eps_high=eps_high)
    loss = (per_token * trained).sum() / trained.sum()
    loss.backward()
    response = mask.bool()
    mean_of_means = None
    if micro_batches is not None:  # what the known peer bug, a mean of micro-batch means, gives instead
        sums = [((per_token * trained)[r.start:r.stop].sum(), trained[r.start:r.stop].sum()) for r in micro_batches]
        means = [float(s / n) for s, n in sums if n > 0]
        mean_of_means = sum(means) / len(means)
    result = dict(
        mean_of_micro_batch_means=mean_of_means,
        loss=float(loss.detach()),
        num_tokens=int(trained.sum()),
        logprob=float(logp.detach()[response].mean()),
        logprob_trained=float(logp.detach()[trained.bool()].mean()),
        entropy=float(entropy.detach()[response].mean()),
        grads={n: p.grad.detach().clone() for n, p in model.named_parameters()},
        margins=margins,
    )
    if name == "psft":
        ratio = torch.exp(logp.detach() - old)[response]
        result.update(clip_fraction=float((ratio > 1 + eps_high).double().mean()),
                      below_lower_clip=float((ratio < 0.8).double().mean()),
                      ratio_min=float(ratio.min()), ratio_max=float(ratio.max()))
        margins["upper_clip"] = float((ratio - (1 + eps_high)).abs().min())
    if name == "iw-sft":
        ratio = torch.exp(logp.detach() - reference)[response]
        result.update(clip_fraction=float(((ratio < IW_WEIGHT_MIN) | (ratio > IW_WEIGHT_MAX)).double().mean()),
                      above_upper_clip=float((ratio > IW_WEIGHT_MAX).double().mean()),
                      ratio_min=float(ratio.min()), ratio_max=float(ratio.max()))
        margins["weight_clip"] = float(torch.minimum((ratio - IW_WEIGHT_MIN).abs(), (ratio - IW_WEIGHT_MAX).abs()).min())
    result["grad_norm"] = float(torch.sqrt(sum((g * g).sum() for g in result["grads"].values())))
    return result
