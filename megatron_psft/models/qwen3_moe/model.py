"""Build Megatron-Core's ``GPTModel`` for Qwen3 / Qwen3-MoE.

With Transformer Engine the TE layer spec (fused norms, grouped-GEMM experts) is used, so FP8 works;
without it (CPU, or a GPU without TE) the local spec. Both compute the same function and share one
checkpoint format. Which fused kernels are switched on follows from :mod:`megatron_psft.platform`.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_psft import platform as platforms
from megatron_psft.models.qwen3_moe.args import Qwen3MoeArgs
from megatron_psft.platform.parallel import ParallelLayout


def padded_vocab_size(vocab_size: int, tensor_parallel: int, divisible_by: int = 128) -> int:
    """Megatron's padding: a multiple of ``divisible_by * TP`` (padding never enters the softmax)."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def vocab_columns(vocab_size: int, tensor_parallel: int) -> int:
    """The columns of one TP rank's slice of the padded vocabulary: the width of its logits."""
    return padded_vocab_size(vocab_size, tensor_parallel) // tensor_parallel


def _check_layout(args: Qwen3MoeArgs, layout: ParallelLayout) -> None:
    """Refuse a layout the model's shapes cannot take, naming the flags."""
    if args.is_moe and layout.tensor > 1 and not layout.sequence_parallel:
        raise ValueError("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel")
    if args.is_moe and args.num_experts % layout.expert:
        raise ValueError(f"{args.num_experts} experts do not divide over --expert-model-parallel-size {layout.expert}")
    if args.num_kv_heads % layout.tensor:
        raise ValueError(f"{args.num_kv_heads} KV heads do not divide over --tensor-model-parallel-size {layout.tensor}")
    if args.num_layers % (layout.pipeline * (layout.virtual_pipeline or 1)):
        raise ValueError(f"{args.num_layers} layers do not divide over --pipeline-model-parallel-size {layout.pipeline}"
                         f" x --virtual-pipeline-model-parallel-size {layout.virtual_pipeline or 1}")


# TransformerConfig fields, declared: the model's shapes from its HF config, the settings every Qwen3 layer
# shares, and (MoE) the router HF's Qwen3-MoE uses.
_FROM_MODEL_ARGS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_kv_heads", "kv_channels": "head_dim", "ffn_hidden_size": "ffn_hidden_size",
    "layernorm_epsilon": "rms_norm_eps", "init_method_std": "initializer_range",
}
_QWEN3_LAYER = dict(
    normalization="RMSNorm", qk_layernorm=True, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
    add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
    persist_layer_norm=False,
    calculate_per_token_loss=True,  # PSFT's token mean over the whole global batch
)
_FROM_MOE_ARGS = {"num_moe_experts": "num_experts", "moe_ffn_hidden_size": "moe_ffn_hidden_size",
                  "moe_router_topk": "moe_top_k"}
_QWEN3_ROUTER = dict(
    moe_router_score_function="softmax", moe_router_dtype="fp32",  # HF routes in fp32
    moe_router_load_balancing_type="aux_loss",
)


def _layout_fields(layout: ParallelLayout) -> dict:
    return dict(
        tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline, expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor or layout.tensor, sequence_parallel=layout.sequence_parallel,
        # The interleaved schedule's batched exchange sends an activation forward and a gradient back in
        # one batch_isend_irecv; at PP=2 both go to the same peer and arrive swapped (same-peer messages
        # pair in posting order, which the two stages post in opposite roles): wrong loss and gradients
        # once a rank has more micro-batches than stages. Megatron-LM's own VPP default avoids it.
        overlap_p2p_comm=bool(layout.virtual_pipeline), batch_p2p_comm=not layout.virtual_pipeline,
    )


def _platform_fields(platform: platforms.Platform, params_dtype: torch.dtype, pack_sequences: bool) -> dict:
    """Each fused kernel only where it exists; the rest run Megatron's reference implementations. Kernels
    that import only on the target machine are switched on when it is actually there (not when planned)."""
    te = platform.use_transformer_engine
    return dict(
        params_dtype=params_dtype, pipeline_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16, use_cpu_initialization=not platform.cuda,
        gradient_accumulation_fusion=te and platform.grad_accumulation_fusion,
        # Packed rows on the local spec attend through a block-diagonal mask, which Megatron's fused causal
        # softmax kernel would ignore (it applies its own upper-triangular mask).
        masked_softmax_fusion=platform.fused_softmax and not (pack_sequences and not te),
        apply_rope_fusion=te and not platform.assumed,
    )


def _moe_fields(args: Qwen3MoeArgs, platform: platforms.Platform, dispatcher: str, grouped_gemm: Optional[bool],
                aux_loss_coeff: Optional[float], routing_replay: bool) -> dict:
    if not args.is_moe:
        return {}
    te = platform.use_transformer_engine
    return dict(
        {name: getattr(args, field) for name, field in _FROM_MOE_ARGS.items()}, **_QWEN3_ROUTER,
        # HF: softmax over all experts, top-k, renormalise if norm_topk_prob. Megatron computes the
        # renormalised form as top-k then softmax (pre_softmax=False), the plain one as pre-softmax.
        moe_router_pre_softmax=not args.norm_topk_prob,
        moe_aux_loss_coeff=args.router_aux_loss_coef if aux_loss_coeff is None else aux_loss_coeff,
        moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=te if grouped_gemm is None else grouped_gemm,
        moe_permute_fusion=te and not platform.assumed, moe_enable_routing_replay=routing_replay,
    )


def transformer_config(
    args: Qwen3MoeArgs,
    layout: ParallelLayout,
    *,
    params_dtype: torch.dtype = torch.float32,
    fp8: Optional[str] = None,
    fp8_recipe: str = "delayed",
    moe_token_dispatcher: str = "alltoall",
    moe_grouped_gemm: Optional[bool] = None,
    moe_aux_loss_coeff: Optional[float] = None,
    routing_replay: bool = False,
    recompute_granularity: Optional[str] = None,
    recompute_modules: Optional[list] = None,
    pack_sequences: bool = False,
    platform: Optional[platforms.Platform] = None,
    **overrides,
):
    """The ``TransformerConfig`` for `args` under `layout` on `platform` (default: this machine), from the
    tables above. `overrides` go to TransformerConfig as is."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    platform = platform or platforms.current()
    platform.check(moe=args.is_moe, fp8=fp8, moe_grouped_gemm=moe_grouped_gemm,
                   recompute_modules=recompute_modules if recompute_granularity == "selective" else None)
    _check_layout(args, layout)
    config = {name: getattr(args, field) for name, field in _FROM_MODEL_ARGS.items()}
    config.update(_QWEN3_LAYER, **_layout_fields(layout), **_platform_fields(platform, params_dtype, pack_sequences),
                  **_moe_fields(args, platform, moe_token_dispatcher, moe_grouped_gemm, moe_aux_loss_coeff,
                                routing_replay))
    if fp8:
        config.update(fp8=fp8, fp8_recipe=fp8_recipe)
    if recompute_granularity:
        config.update(recompute_granularity=recompute_granularity,
                      **({"recompute_modules": recompute_modules} if recompute_modules else {}))
    config.update(overrides)
    with platform.as_megatron_sees_it():
        return TransformerConfig(**config)


def layer_spec(config):
    from megatron.core.models.gpt import gpt_layer_specs

    if platforms.current().use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm, qk_layernorm=True
        )
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )
    if config.num_moe_experts:
        # The TE spec keeps an MoE layer's pre-MLP norm as its own module (experts have no fused
        # norm); save it under that name too, so GPU- and CPU-trained checkpoints load either way.
        spec.submodules.sharded_state_dict_keys_map.pop("pre_mlp_layernorm.", None)
    return spec


def build_model(args: Qwen3MoeArgs, config, pre_process: bool, post_process: bool, vp_stage: Optional[int] = None,
                make_vocab_size_divisible_by: int = 128):
    """One pipeline stage (or virtual-pipeline chunk) of the model, on this rank's device."""
    from megatron.core.models.gpt import GPTModel

    kwargs = {} if vp_stage is None else {"vp_stage": vp_stage}
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config),
        vocab_size=padded_vocab_size(args.vocab_size, config.tensor_model_parallel_size, make_vocab_size_divisible_by),
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=args.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(args.rope_theta),
        **kwargs,
    )
    if platforms.current().cuda:
        model.cuda(torch.cuda.current_device())
    return model


def build_model_chunks(args: Qwen3MoeArgs, config, make_vocab_size_divisible_by: int = 128):
    """This rank's model chunks: one per virtual pipeline stage (one in all without VPP)."""
    from megatron.core import parallel_state

    chunks = config.virtual_pipeline_model_parallel_size or 1
    models = []
    for vp_stage in range(chunks):
        vp = vp_stage if chunks > 1 else None
        models.append(build_model(
            args, config,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            vp_stage=vp, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        ))
    return models
