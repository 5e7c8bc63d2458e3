"""HF config -> Megatron config: every math-changing field mapped, the rest refused."""

import pytest

from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, load_hf_config, padded_vocab_size, transformer_config
from megatron_psft.platform.parallel import ParallelLayout


def _config(**changes):
    return {**load_hf_config("30b-a3b"), **changes}


def test_qwen3_30b_a3b_fields_map_to_megatron():
    args = Qwen3MoeArgs.from_hf_config(_config())
    config = transformer_config(args, ParallelLayout())
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.num_query_groups,
            config.kv_channels) == (48, 2048, 32, 4, 128)
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (128, 8, 768)
    assert config.qk_layernorm and config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-6
    assert config.moe_router_pre_softmax is False  # norm_topk_prob: top-k, then softmax over the k
    assert config.moe_aux_loss_coeff == 0.001 and config.calculate_per_token_loss
    assert args.rope_theta == 1e6 and not args.tie_word_embeddings
    assert padded_vocab_size(151936, 1) == 151936 and padded_vocab_size(151936, 8) == 152576


def test_transformers_5_spellings_are_read():
    config = _config(rope_parameters={"rope_type": "default", "rope_theta": 1e7}, num_local_experts=128)
    del config["rope_theta"], config["num_experts"]
    args = Qwen3MoeArgs.from_hf_config(config)
    assert args.rope_theta == 1e7 and args.num_experts == 128


def test_norm_topk_prob_false_routes_pre_softmax():
    config = transformer_config(Qwen3MoeArgs.from_hf_config(_config(norm_topk_prob=False)), ParallelLayout())
    assert config.moe_router_pre_softmax is True


@pytest.mark.parametrize("changes, message", [
    (dict(use_sliding_window=True), "sliding-window"),
    (dict(mlp_only_layers=[0, 1]), "mlp_only_layers"),
    (dict(shared_expert_intermediate_size=512), "shared experts"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE scaling"),
    (dict(architectures=["LlamaForCausalLM"]), "unsupported architecture"),
])
def test_fields_it_cannot_honour_are_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        Qwen3MoeArgs.from_hf_config(_config(**changes))


def test_layouts_the_model_cannot_take_are_errors():
    args = Qwen3MoeArgs.from_hf_config(_config())
    with pytest.raises(ValueError, match="--sequence-parallel"):
        transformer_config(args, ParallelLayout(tensor=2))
    with pytest.raises(ValueError, match="KV heads"):
        transformer_config(args, ParallelLayout(tensor=8, sequence_parallel=True))
    with pytest.raises(ValueError, match="experts"):
        transformer_config(args, ParallelLayout(expert=3))
