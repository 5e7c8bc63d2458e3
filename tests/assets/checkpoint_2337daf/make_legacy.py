"""Made with megatron-psft main at 2337daf (the flag-named trainer_state format): a 1-rank PSFT run of
the tiny model, 2 of 4 steps, old policy every 3 steps, saved mid-round."""
import json, os, sys
sys.path.insert(0, "/work/main/tests")
from bundled import preprocess_bundled_data
from distributed import run_distributed

TINY = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 1000, "hidden_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
        "intermediate_size": 32, "moe_intermediate_size": 8, "num_experts": 4, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "router_aux_loss_coef": 0.001, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "max_position_embeddings": 256, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "initializer_range": 0.02}

def run(argv):
    from megatron_psft.train import Trainer, parse_args
    Trainer(parse_args(argv)).run()

if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    os.chdir(out)
    with open("tiny_config.json", "w") as f:
        json.dump(TINY, f, indent=2)
    preprocess_bundled_data("data/chat", 64)
    argv = ["--hf-config", "tiny_config.json", "--data-prefix", "data/chat", "--seq-length", "64",
            "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--lr-warmup-iters", "1",
            "--train-iters", "4", "--old-policy-interval", "3", "--seed", "7", "--save", "checkpoint",
            "--exit-interval", "2", "--metrics-file", "legacy_metrics.jsonl"]
    run_distributed(1, run, argv)
