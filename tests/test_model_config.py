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


# --fused-logprobs off | on | auto


@pytest.mark.parametrize("tokens, tp, dtype_bytes, fused", [
    (4096, 1, 2, False),  # H100: fused 2x slower here, the unfused logits 1.16 GiB
    (16384, 1, 2, True),  # 4.6 GiB of logits
    (32768, 1, 2, True),  # 9.3 GiB
    (16384, 2, 2, False),  # TP halves the slice: 2.3 GiB
    (32768, 2, 2, True),
    (4096, 1, 4, False),  # fp32 logits: 2.3 GiB
    (8192, 1, 4, True),  # 4.6 GiB
])
def test_auto_fuses_where_the_logits_pass_4_gib(tokens, tp, dtype_bytes, fused):
    from megatron_psft.config.model import fused_logprobs_pays

    assert fused_logprobs_pays(tokens, padded_vocab_size(151936, tp) // tp, dtype_bytes) is fused


def test_the_flag_takes_off_on_auto_and_a_bare_flag_means_on():
    from megatron_psft.config.flags import parse_config

    def mode(*flags):
        return parse_config(["--data-prefix", "x", "--train-iters", "1", *flags])[0].model.fused_logprobs_mode

    assert (mode(), mode("--fused-logprobs"), mode("--fused-logprobs", "auto"), mode("--fused-logprobs", "off")) == (
        "off", "on", "auto", "off")
    with pytest.raises(SystemExit):
        mode("--fused-logprobs", "sometimes")


def test_configs_saved_with_a_bool_still_load():
    from megatron_psft.config.model import ModelConfig

    assert ModelConfig.from_dict({"fused_logprobs": True}).fused_logprobs_mode == "on"
    assert ModelConfig.from_dict({"fused_logprobs": False}).fused_logprobs is False
    assert ModelConfig(fused_logprobs_mode="on").to_dict()["fused_logprobs"] == "on"
    with pytest.raises(ValueError, match="--fused-logprobs"):
        ModelConfig(fused_logprobs_mode="yes")


@pytest.mark.parametrize("seq_length, tensor, fused", [(4096, 2, False), (32768, 2, True), (32768, 4, False)])
def test_the_launch_settles_auto_for_its_shapes(seq_length, tensor, fused, monkeypatch):
    from megatron_psft.config.model import ModelConfig
    from megatron_psft.launch import parse_launch

    with pytest.raises(ValueError, match="settled by the launch"):
        ModelConfig(fused_logprobs_mode="auto").fused_logprobs
    monkeypatch.setenv("WORLD_SIZE", "8")
    model = parse_launch(["--dry-run", "--train-iters", "1", "--hf-config", "30b-a3b", "--seq-length", str(seq_length),
                          "--tensor-model-parallel-size", str(tensor), "--sequence-parallel",
                          "--expert-model-parallel-size", "8", "--expert-tensor-parallel-size", "1",
                          "--fused-logprobs", "auto"]).config.model
    assert (model.fused_logprobs_mode, model.fused_logprobs, model.params_dtype) == ("on" if fused else "off", fused,
                                                                                      "bf16")
