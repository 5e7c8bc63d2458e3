"""Megatron-LM's model flags for a Qwen3 / Qwen3-MoE Hugging Face config: the model megatron-psft builds
from that config (megatron_psft.models.qwen3_moe.transformer_config), spelled as Megatron-LM arguments.

    python examples/megatron_lm/qwen3_moe_flags.py /models/Qwen3-30B-A3B     # or a flavour: debug, 30b-a3b

prints them on one line, for a launch line's ``$(...)``. Only the model's math is here; parallelism,
precision and the fused kernels a machine has are the launch's own flags.
"""

import sys
from typing import List

from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, load_hf_config


def model_flags(hf_config: dict) -> List[str]:
    args = Qwen3MoeArgs.from_hf_config(hf_config)
    flags = {
        "--num-layers": args.num_layers, "--hidden-size": args.hidden_size, "--ffn-hidden-size": args.ffn_hidden_size,
        "--num-attention-heads": args.num_attention_heads, "--num-query-groups": args.num_kv_heads,
        "--kv-channels": args.head_dim, "--normalization": "RMSNorm", "--norm-epsilon": args.rms_norm_eps,
        "--position-embedding-type": "rope", "--rotary-base": int(args.rope_theta), "--rotary-percent": 1.0,
        "--max-position-embeddings": args.max_position_embeddings, "--vocab-size": args.vocab_size,
        "--make-vocab-size-divisible-by": 128, "--init-method-std": args.initializer_range,
        "--attention-dropout": 0.0, "--hidden-dropout": 0.0,
    }
    switches = ["--group-query-attention", "--qk-layernorm", "--swiglu", "--disable-bias-linear",
                "--calculate-per-token-loss"]
    if not args.tie_word_embeddings:
        switches.append("--untie-embeddings-and-output-weights")
    if args.is_moe:
        flags.update({"--num-experts": args.num_experts, "--moe-ffn-hidden-size": args.moe_ffn_hidden_size,
                      "--moe-router-topk": args.moe_top_k, "--moe-router-score-function": "softmax",
                      "--moe-router-dtype": "fp32", "--moe-router-load-balancing-type": "aux_loss",
                      "--moe-aux-loss-coeff": args.router_aux_loss_coef})
        # HF renormalises the top-k probabilities (norm_topk_prob): Megatron's top-k then softmax.
        if not args.norm_topk_prob:
            switches.append("--moe-router-pre-softmax")
    return [str(part) for flag, value in flags.items() for part in (flag, value)] + switches


if __name__ == "__main__":
    print(" ".join(model_flags(load_hf_config(sys.argv[1]))))
