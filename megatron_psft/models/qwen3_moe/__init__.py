"""Qwen3-MoE (and dense Qwen3) on Megatron-Core: hyper-parameters from an HF config, and the model."""

from megatron_psft.models.qwen3_moe.args import Qwen3MoeArgs, load_hf_config
from megatron_psft.models.qwen3_moe.model import (
    build_model,
    build_model_chunks,
    padded_vocab_size,
    transformer_config,
    vocab_columns,
)

__all__ = ["Qwen3MoeArgs", "build_model", "build_model_chunks", "load_hf_config", "padded_vocab_size",
           "transformer_config", "vocab_columns"]
