"""Hugging Face <-> Megatron-Core checkpoint conversion for Qwen3 / Qwen3-MoE (see docs/conversion.md).

    python -m checkpoint_convert.hf_to_megatron   HF model -> Megatron dist checkpoint
    python -m checkpoint_convert.megatron_to_hf   Megatron dist checkpoint -> HF model
    python -m checkpoint_convert.verify           compare the logits of the two
"""
