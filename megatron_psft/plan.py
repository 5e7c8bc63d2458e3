"""The dry run's plan: parameters and an estimate of memory per GPU for a resolved launch.

Everything here is arithmetic on the model's shapes, the layout and the TransformerConfig, so it
runs on a laptop with no GPU, no process group and no weights. The memory estimate counts what a
training step holds at its peak on the most loaded rank:

- weights in the parameter dtype; gradients in fp32 (the DDP buffer reduces in fp32);
- Adam's state (fp32 moments, plus fp32 main weights under bf16), divided over the data-parallel
  ranks of each parameter with the distributed optimizer (expert-data-parallel for experts);
- activations saved for backward, per layer and per micro-batch in flight, following the tensors
  Megatron's layers keep (with flash attention under Transformer Engine, the unfused score matrix
  on the local spec), less what the recompute setting drops;
- the larger of two transients: the log-prob working set (logits, their gradient, the kernel's
  fp32 buffers and the output layer's weight gradient) and, on the local spec, one attention
  layer's softmax backward.

Calibration: Qwen3-30B-A3B widths with 2 layers, seq 4096, micro-batch 1, bf16, TP1, local spec,
distributed optimizer on one H100 peaked at 44.6 GiB allocated; this estimate gives 43.7 GiB.
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from megatron_psft.data.blend import epochs_over_run, normalized_weights
from megatron_psft.data.format import dataset_paths, read_meta
from megatron_psft.kernels.logprobs import CHUNK_BUFFER_BYTES
from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, padded_vocab_size, vocab_columns
from megatron_psft.platform.parallel import ParallelLayout
from megatron_psft.platform import Platform

GiB = 2**30


@dataclass(frozen=True)
class Sizes:
    """The parallel sizes of a launch, data parallelism included."""

    world: int
    tensor: int
    pipeline: int
    virtual_pipeline: int
    expert: int
    expert_tensor: int
    data: int
    expert_data: int
    sequence_parallel: bool

    @classmethod
    def of(cls, layout: ParallelLayout, world_size: int) -> "Sizes":
        data = layout.data_parallel_size(world_size)
        expert_tensor = layout.expert_tensor or layout.tensor
        expert_model = layout.expert * expert_tensor * layout.pipeline
        if world_size % expert_model:
            raise ValueError(f"world size {world_size} is not divisible by EP x ETP x PP = {expert_model} "
                             "(--expert-model-parallel-size, --expert-tensor-parallel-size, "
                             "--pipeline-model-parallel-size)")
        return cls(world=world_size, tensor=layout.tensor, pipeline=layout.pipeline,
                   virtual_pipeline=layout.virtual_pipeline or 1, expert=layout.expert, expert_tensor=expert_tensor,
                   data=data, expert_data=world_size // expert_model, sequence_parallel=layout.sequence_parallel)


def parameters_per_gpu(args: Qwen3MoeArgs, sizes: Sizes) -> Dict[str, int]:
    """Dense and expert parameters on the most loaded rank (the pipeline stage holding the embedding
    or the output layer)."""
    tp, h = sizes.tensor, args.hidden_size
    q_width, kv_width = args.num_attention_heads * args.head_dim, args.num_kv_heads * args.head_dim
    layer_dense = (2 * h + 2 * args.head_dim  # input and pre-MLP norms, q/k norms (replicated)
                   + h * (q_width + 2 * kv_width) // tp + q_width * h // tp)
    layer_expert = 0
    if args.is_moe:
        layer_dense += args.num_experts * h  # the router (replicated)
        layer_expert = args.num_experts // sizes.expert * 3 * h * args.moe_ffn_hidden_size // sizes.expert_tensor
    else:
        layer_dense += 3 * h * args.ffn_hidden_size // tp
    layers = args.num_layers // sizes.pipeline
    vocab_shard = padded_vocab_size(args.vocab_size, tp) * h // tp
    first_stage = vocab_shard
    last_stage = h + (0 if args.tie_word_embeddings and sizes.pipeline == 1 else vocab_shard)
    ends = first_stage + last_stage if sizes.pipeline == 1 else max(first_stage, last_stage)
    return {"dense": layers * layer_dense + ends, "expert": layers * layer_expert}


def _layer_activation_bytes(args: Qwen3MoeArgs, config, sizes: Sizes, tokens: int, seq_length: int,
                            micro_batch: int, flash_attention: bool, element: int) -> int:
    """Bytes one layer saves for backward for one micro-batch of `tokens` tokens."""
    recompute = set(config.recompute_modules or []) if config.recompute_granularity == "selective" else set()
    tp, h = sizes.tensor, args.hidden_size
    sequence_shard = tp if sizes.sequence_parallel else 1
    q_width, kv_width = args.num_attention_heads * args.head_dim, args.num_kv_heads * args.head_dim
    hidden = element * tokens * h // sequence_shard  # one hidden-state-sized tensor on this rank
    norm_outputs = 0 if "layernorm" in recompute else hidden

    attention = hidden + norm_outputs + 3 * element * tokens * (q_width + 2 * kv_width) // tp  # qkv, q/k norm, rope
    attention += element * tokens * q_width // tp  # the projection's input
    if flash_attention:
        attention += element * tokens * q_width // tp + 4 * tokens * args.num_attention_heads // tp
    else:
        attention += 3 * element * tokens * q_width // tp  # q and GQA-expanded k, v
        if "core_attn" not in recompute:  # softmax output in fp32 and the probabilities
            attention += (4 + element) * args.num_attention_heads // tp * seq_length**2 * micro_batch

    if args.is_moe:
        routed = args.moe_top_k * tokens // sequence_shard  # token copies this rank's experts see, on average
        ffn = args.moe_ffn_hidden_size // sizes.expert_tensor
        experts = routed * element * (2 * h + 2 * ffn + (0 if "moe_act" in recompute else ffn))
        router = 3 * 4 * tokens // sequence_shard * args.num_experts
        mlp = hidden + norm_outputs + (0 if {"moe", "mlp"} & recompute else experts + router)
    else:
        ffn = args.ffn_hidden_size // tp
        mlp = hidden + norm_outputs + (0 if "mlp" in recompute else element * tokens * 3 * ffn)
    return attention + mlp


def memory_per_gpu(args: Qwen3MoeArgs, config, sizes: Sizes, platform: Platform, seq_length: int,
                   micro_batch: int, global_batch: int, use_distributed_optimizer: bool,
                   fused_logprobs: bool = False) -> Dict[str, float]:
    """Estimated peak memory of one training step on the most loaded rank, in GiB, by part."""
    params = parameters_per_gpu(args, sizes)
    total_params = params["dense"] + params["expert"]
    element = 2 if config.bf16 or config.fp16 else 4
    main_weights = 4 if element != 4 else 0  # fp32 master copies exist only under bf16/fp16
    optimizer_bytes = main_weights + 8
    dense_shards = sizes.data if use_distributed_optimizer else 1
    expert_shards = sizes.expert_data if use_distributed_optimizer else 1

    tokens = seq_length * micro_batch
    flash = platform.use_transformer_engine
    per_layer = _layer_activation_bytes(args, config, sizes, tokens, seq_length, micro_batch, flash, element)
    layers = args.num_layers // sizes.pipeline
    hidden = element * tokens * args.hidden_size // (sizes.tensor if sizes.sequence_parallel else 1)
    if config.recompute_granularity == "full":
        recomputed = layers if config.recompute_num_layers is None else min(layers, config.recompute_num_layers)
        per_microbatch = recomputed * hidden + (layers - recomputed + 1) * per_layer
    else:
        per_microbatch = layers * per_layer
    micro_batches = global_batch // (sizes.data * micro_batch)
    in_flight = min(sizes.pipeline, micro_batches)  # 1F1B: the first stage holds one per stage ahead

    columns = vocab_columns(args.vocab_size, sizes.tensor)
    logits = element * tokens * columns
    buffers = 2 * min(CHUNK_BUFFER_BYTES, 4 * tokens * columns)
    output_weight_grad = 0 if config.gradient_accumulation_fusion else element * columns * args.hidden_size
    if fused_logprobs:  # one chunk of logits at a time, and at most an fp32 accumulator of the weight's gradient
        logits = min(logits, CHUNK_BUFFER_BYTES)
        output_weight_grad += 4 * columns * args.hidden_size
    logprob_working_set = 2 * logits + buffers + output_weight_grad
    attention_backward = 0 if flash else (element + 8) * args.num_attention_heads // sizes.tensor * seq_length**2 * micro_batch
    parts = {
        "weights": total_params * element,
        "gradients (fp32)": total_params * 4,
        "optimizer": params["dense"] * optimizer_bytes / dense_shards + params["expert"] * optimizer_bytes / expert_shards,
        "activations": in_flight * per_microbatch + hidden,
        "transient (log-probs or attention backward)": max(logprob_working_set, attention_backward),
    }
    result = {name: value / GiB for name, value in parts.items()}
    result["total"] = sum(result.values())
    return result


def _count(number: int) -> str:
    return f"{number / 1e9:.3f} B" if number >= 1e8 else f"{number / 1e6:.3f} M"


def format_plan(launch) -> str:
    """The dry run's report of a :class:`~megatron_psft.launch.Launch`."""
    config, model_args, sizes = launch.config, launch.model_args, launch.sizes
    transformer_config, data, model = launch.transformer_config, launch.config.data, launch.config.model
    params = parameters_per_gpu(model_args, sizes)
    memory = launch.memory_estimate()
    moe = (f", {model_args.num_experts} experts top-{model_args.moe_top_k}" if model_args.is_moe else ", dense")
    fp8 = f"FP8 {transformer_config.fp8} ({transformer_config.fp8_recipe})" if transformer_config.fp8 else "no FP8"
    unit, scale = ("GiB", 1) if memory["total"] >= 1 else ("MiB", 1024)
    interval = config.old_policy.old_policy_interval
    distributed = config.optimizer.use_distributed_optimizer
    lines = [
        "megatron-psft plan (dry run: nothing launched, nothing loaded)",
        f"  platform     {launch.platform.describe()}",
        f"  model        {model_args.num_layers} layers, hidden {model_args.hidden_size}{moe}, "
        f"vocab {model_args.vocab_size}",
        f"  world        {sizes.world} {'GPUs' if launch.platform.cuda else 'processes'}: TP{sizes.tensor} x "
        f"PP{sizes.pipeline} x DP{sizes.data}, SP {'on' if sizes.sequence_parallel else 'off'}, VPP {sizes.virtual_pipeline}",
        f"  experts      EP{sizes.expert} x ETP{sizes.expert_tensor} x expert-DP{sizes.expert_data}",
        _batch_line(data, sizes),
        *_data_lines(data, config.training.train_iters),
        f"  precision    {model.params_dtype}, {fp8}, grouped GEMM {'on' if transformer_config.moe_grouped_gemm else 'off'}, "
        f"recompute {_recompute(transformer_config)}, log-probs {'fused with the output layer' if model.fused_logprobs else 'from the logits'}",
        f"  objective    {config.objective.name}, old policy "
        + (f"every {interval} steps" if interval else "never refreshed"),
        f"  params/GPU   dense {_count(params['dense'])}, expert {_count(params['expert'])}",
        f"  memory/GPU   estimate, {unit} ({'distributed' if distributed else 'replicated'} optimizer):",
    ]
    lines += [f"    {name:<44} {value * scale:7.1f}" for name, value in memory.items()]
    return "\n".join(lines)


def _data_lines(data, train_iters: int) -> List[str]:
    """The training sources, their weights and, where their meta.json is at hand, their epochs over the run."""
    prefixes, weights = data.blend
    if not prefixes:
        return []
    sizes = [_samples_in(prefix) for prefix in prefixes]
    known = None not in sizes
    shares = normalized_weights(weights, sizes) if weights is not None or known else [None] * len(prefixes)
    epochs = (epochs_over_run(weights, sizes, train_iters * data.global_batch_size) if known
              else [None] * len(prefixes))
    lines = []
    for index, (prefix, share, size, epoch) in enumerate(zip(prefixes, shares, sizes, epochs)):
        label = "data" if index == 0 else ""
        weight = f"weight {share:.3f}" if share is not None else "weight by size"
        over_run = (f"{size} samples, {epoch:.2f} epochs over the run" if epoch is not None
                    else f"{size} samples" if size is not None else "not read (no meta.json here)")
        lines.append(f"  {label:<12} {prefix}: {weight}, {over_run}")
    return lines


def _samples_in(prefix: str) -> Optional[int]:
    """The samples of the preprocessed data at `prefix`, from its meta.json; None where it is not on this machine."""
    meta_path = dataset_paths(prefix)["meta.json"]
    return read_meta(meta_path)["num_samples"] if os.path.exists(meta_path) else None


def _batch_line(data, sizes: Sizes) -> str:
    if data.pack_sequences:
        return (f"  batch        global {data.global_batch_size} samples packed into rows of seq {data.seq_length}, "
                f"{data.micro_batch_size} row(s) per micro-batch, DP{sizes.data}")
    micro_batches = data.global_batch_size // (sizes.data * data.micro_batch_size)
    return (f"  batch        global {data.global_batch_size} = DP{sizes.data} x micro {data.micro_batch_size} x "
            f"{micro_batches} micro-batches, seq {data.seq_length}")


def _recompute(transformer_config) -> str:
    if transformer_config.recompute_granularity == "selective":
        return "selective: " + " ".join(transformer_config.recompute_modules or [])
    if transformer_config.recompute_granularity == "full":
        return f"full ({transformer_config.recompute_method}, {transformer_config.recompute_num_layers} layers)"
    return "off"
