"""Qwen3 / Qwen3-MoE hyper-parameters, read from a Hugging Face ``config.json``.

Every field that changes the model's math is mapped; a field this model cannot honour is an error
rather than silently ignored, so a converted checkpoint computes what the HF one computes.
"""

import json
import os
from dataclasses import dataclass
from typing import Optional

SUPPORTED_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen3ForCausalLM")
FLAVOURS_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass(frozen=True)
class Qwen3MoeArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int  # dense MLP width (unused when every layer is MoE)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: Optional[int] = None  # None: dense Qwen3
    moe_ffn_hidden_size: Optional[int] = None
    moe_top_k: Optional[int] = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    initializer_range: float = 0.02

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @classmethod
    def from_hf_config(cls, config: dict) -> "Qwen3MoeArgs":
        architectures = config.get("architectures") or []
        if not set(architectures) & set(SUPPORTED_ARCHITECTURES):
            raise ValueError(f"unsupported architecture {architectures}; supported: {SUPPORTED_ARCHITECTURES}")
        is_moe = "Qwen3MoeForCausalLM" in architectures
        _refuse_unsupported(config, is_moe)
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        args = dict(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=head_dim,
            ffn_hidden_size=config["intermediate_size"],
            rms_norm_eps=config["rms_norm_eps"],
            rope_theta=_rope_theta(config),
            max_position_embeddings=config["max_position_embeddings"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            initializer_range=config.get("initializer_range", 0.02),
        )
        if is_moe:
            args.update(
                num_experts=config.get("num_experts", config.get("num_local_experts")),  # transformers 5 renamed it
                moe_ffn_hidden_size=config["moe_intermediate_size"],
                moe_top_k=config["num_experts_per_tok"],
                norm_topk_prob=bool(config.get("norm_topk_prob", True)),
                router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.0)),
            )
        return cls(**args)

    @classmethod
    def from_pretrained(cls, path: str) -> "Qwen3MoeArgs":
        """From an HF model directory, a ``config.json`` path, or a flavour name (``debug``, ``30b-a3b``)."""
        return cls.from_hf_config(load_hf_config(path))


def load_hf_config(path: str) -> dict:
    flavour = os.path.join(FLAVOURS_DIR, f"{path}.json")
    if os.path.isfile(flavour):
        path = flavour
    elif os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        flavours = sorted(f[:-5] for f in os.listdir(FLAVOURS_DIR))
        raise FileNotFoundError(f"no HF config at {path!r} (flavours: {flavours})")
    with open(path) as f:
        return json.load(f)


def _rope_theta(config: dict) -> float:
    # transformers 5 moves rope_theta under rope_parameters.
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or rope
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ValueError(f"RoPE scaling {scaling} is not supported (only plain RoPE)")
    theta = config.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
        raise ValueError("config has no rope_theta (neither top-level nor under rope_parameters)")
    return float(theta)


def _refuse_unsupported(config: dict, is_moe: bool) -> None:
    problems = []
    if config.get("use_sliding_window") or (config.get("layer_types") and set(config["layer_types"]) - {"full_attention"}):
        problems.append("sliding-window attention")
    if config.get("attention_bias"):
        problems.append("attention biases")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {config['hidden_act']!r}")
    if is_moe:
        if config.get("mlp_only_layers"):
            problems.append(f"dense layers among MoE layers (mlp_only_layers={config['mlp_only_layers']})")
        if config.get("decoder_sparse_step", 1) != 1:
            problems.append(f"decoder_sparse_step={config['decoder_sparse_step']}")
        if config.get("shared_expert_intermediate_size"):
            problems.append("shared experts")
    if problems:
        raise ValueError("this HF config uses features megatron-psft cannot honour: " + ", ".join(problems))
