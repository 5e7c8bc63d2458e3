"""A configuration resolved into a launch, once, before any process group starts.

:func:`resolve` takes a :class:`~megatron_psft.config.TrainConfig` to everything a run is started
from: the platform, the parallel sizes for the world size, the checkpoint to resume or start from,
the model's hyper-parameters, Megatron-Core's ``TransformerConfig``, and, for a real launch, the data
checked against the model and the plan's memory checked against the machine. Every refusal, ours and
Megatron-Core's, comes from here as a :class:`~megatron_psft.config.ConfigError` naming the flags; the
trainer and the dry run take the same :class:`Launch`.
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from megatron_psft import checkpoint
from megatron_psft.platform import parallel
from megatron_psft import platform as platforms
from megatron_psft.config import ConfigError, TrainConfig
from megatron_psft.config.flags import CommandLine, parse_config, refuse
from megatron_psft.data import SFTDataset, check_tokenizer
from megatron_psft.data.blend import BlendedDataset
from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, load_hf_config, transformer_config, vocab_columns
from megatron_psft.plan import GiB, Sizes, memory_per_gpu
from megatron_psft.platform.precision import parse_dtype


@dataclass(frozen=True)
class Launch:
    """A run's configuration resolved for its world size on its platform."""

    config: TrainConfig
    platform: platforms.Platform
    sizes: Sizes
    hf_config: dict
    model_args: Qwen3MoeArgs
    transformer_config: object
    resume_from: Optional[str]  # a training checkpoint to continue
    weights_from: Optional[str]  # a checkpoint to take the starting weights from
    planned: bool = False  # a dry run's plan: nothing is launched, loaded or checked against this machine
    train_set: Optional[BlendedDataset] = None  # loaded and checked (memory-mapped) unless planned
    eval_sets: Optional[Dict[str, SFTDataset]] = None

    @property
    def layout(self):
        return self.config.parallel

    def memory_estimate(self) -> dict:
        """The plan's peak memory per GPU (per process on CPU), in GiB, by part."""
        data = self.config.data
        return memory_per_gpu(self.model_args, self.transformer_config, self.sizes, self.platform, data.seq_length,
                              data.micro_batch_size, data.global_batch_size,
                              self.config.optimizer.use_distributed_optimizer, self.config.model.fused_logprobs)


def resolve(config: TrainConfig, platform: Optional[platforms.Platform] = None, world_size: Optional[int] = None,
            planned: bool = False) -> Launch:
    """`config` for `world_size` processes (default: ``WORLD_SIZE``) on `platform` (default: this machine).
    A planned launch (the dry run) reads no data and is not held to this machine's memory."""
    platform = platform or platforms.current()
    if config.model.params_dtype is None:  # bf16 on a GPU, fp32 on CPU
        config = config.replace(model=config.model.replace(params_dtype="bf16" if platform.cuda else "fp32"))
    sizes = Sizes.of(config.parallel, world_size or int(os.environ.get("WORLD_SIZE", "1")))
    data = config.data
    if not data.pack_sequences and data.global_batch_size % (sizes.data * data.micro_batch_size):
        raise ConfigError(f"--global-batch-size {data.global_batch_size} is not divisible by data-parallel size "
                          f"{sizes.data} x --micro-batch-size {data.micro_batch_size}")
    resume_from, weights_from = _checkpoints(config)
    source = resume_from or weights_from
    hf_config = checkpoint.read_hf_config(source) if source else load_hf_config(config.model.hf_config)
    model_args = Qwen3MoeArgs.from_hf_config(hf_config)
    config = config.replace(model=config.model.settle_fused_logprobs(  # --fused-logprobs auto, for these shapes
        data.seq_length * data.micro_batch_size, vocab_columns(model_args.vocab_size, sizes.tensor)))
    launch = Launch(config, platform, sizes, hf_config, model_args, _transformer_config(config, model_args, platform),
                    resume_from, weights_from, planned)
    if planned:
        return launch
    if not data.data_prefix:
        raise ConfigError("--data-prefix is required")
    check_memory(launch)
    eval_sets = {name: load_dataset(prefix, model_args, config) for name, prefix in config.evaluation.sets.items()}
    prefixes, weights = data.blend
    sources = [load_dataset(prefix, model_args, config) for prefix in prefixes]
    return dataclasses.replace(launch, train_set=BlendedDataset(prefixes, sources, weights), eval_sets=eval_sets)


def _checkpoints(config: TrainConfig):
    """(training checkpoint to resume, checkpoint to take the starting weights from)."""
    settings = config.checkpoint
    loadable = settings.load if settings.load and checkpoint.latest_iteration(settings.load) is not None else None
    resume_from = loadable if loadable and not settings.finetune and checkpoint.is_training_checkpoint(loadable) else None
    weights_from = None if resume_from else (loadable or settings.pretrained_checkpoint)
    return resume_from, weights_from


# Words of Megatron-Core's TransformerConfig errors -> the settings (keys) they speak of.
_CONFIG_WORDS_TO_KEYS = {
    "fp8": ("fp8_format", "fp8_recipe"), "scaling": ("fp8_recipe",), "delayed": ("fp8_recipe",),
    "recompute": ("recompute_granularity", "recompute_modules", "recompute_method", "recompute_num_layers"),
    "moe_act": ("recompute_modules",), "layernorm": ("recompute_modules",),
    "sequence": ("sequence_parallel",), "tensor": ("tensor_model_parallel_size",),
    "pipeline": ("pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size"),
    "expert": ("expert_model_parallel_size", "expert_tensor_parallel_size"),
    "dispatcher": ("moe_token_dispatcher_type",), "grouped": ("moe_grouped_gemm",),
    "replay": ("moe_router_replay",), "dtype": ("params_dtype",), "bf16": ("params_dtype",),
}


def _flags_named_by(message: str, config: TrainConfig) -> str:
    """The flags, with their values, of the settings a Megatron-Core error message speaks of."""
    words = message.lower().replace("-", "_")
    keys = [key for word, word_keys in _CONFIG_WORDS_TO_KEYS.items() if word in words for key in word_keys]
    values, shown = config.flat(), []
    for key in dict.fromkeys(keys):
        value = values[key]
        if value in (None, False):
            continue
        flag = config.flag(key)
        shown.append(flag if value is True else f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return ", ".join(shown)


def _transformer_config(config: TrainConfig, model_args: Qwen3MoeArgs, platform: platforms.Platform):
    model = config.model
    recompute = ({"recompute_method": model.recompute_method, "recompute_num_layers": model.recompute_num_layers}
                 if model.recompute_method else {})
    try:
        return transformer_config(
            model_args, config.parallel, params_dtype=parse_dtype(model.params_dtype), fp8=model.fp8_format,
            fp8_recipe=model.fp8_recipe, moe_token_dispatcher=model.moe_token_dispatcher_type,
            moe_grouped_gemm=model.moe_grouped_gemm, moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            routing_replay=model.tracks_routing, recompute_granularity=model.recompute_granularity,
            recompute_modules=list(model.recompute_modules) if model.recompute_modules else None,
            pack_sequences=config.data.pack_sequences, platform=platform, **recompute)
    except (ValueError, AssertionError) as error:
        message = str(error) or type(error).__name__
        flags = "" if "--" in message else _flags_named_by(message, config)
        raise ConfigError(message + (f" [flags: {flags}]" if flags else "")) from error


def load_dataset(prefix: str, model_args: Qwen3MoeArgs, config: TrainConfig) -> SFTDataset:
    """The preprocessed dataset at `prefix`, memory-mapped, checked on its own and against the model."""
    dataset = SFTDataset(prefix, vocab_size=model_args.vocab_size)
    check_data(dataset.meta, model_args, config, prefix)
    return dataset


def check_data(meta: dict, model_args: Qwen3MoeArgs, config: TrainConfig, prefix: str) -> None:
    """The preprocessed data at `prefix` (its meta.json) fits the model and the configuration."""
    data = config.data
    if meta["vocab_size"] > model_args.vocab_size:
        raise ConfigError(f"the data's tokenizer ({prefix}) has {meta['vocab_size']} ids, the model only "
                          f"{model_args.vocab_size}")
    if meta["seq_length"] > data.seq_length:
        raise ConfigError(f"{prefix} was preprocessed for --seq-length {meta['seq_length']} > {data.seq_length}")
    tokenizer, hf_config = data.tokenizer, config.model.hf_config
    if tokenizer is None and os.path.isdir(hf_config) and any(
            os.path.exists(os.path.join(hf_config, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = hf_config
    if tokenizer is None:
        parallel.print_rank_last("the data's tokenizer was not compared with the model's: pass --tokenizer")
    else:
        check_tokenizer(meta, tokenizer, allow_mismatch=data.allow_tokenizer_mismatch)


def available_memory_gib(platform: platforms.Platform) -> float:
    """What one process may take: this GPU's free memory, or on CPU the machine's available memory
    shared by the processes started on it."""
    if platform.cuda:
        import torch

        parallel.select_local_device()
        return torch.cuda.mem_get_info()[0] / GiB
    with open("/proc/meminfo") as f:
        available_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return available_kib / 2**20 / processes


def check_memory(launch: Launch) -> None:
    """Refuse a launch whose plan does not fit this machine, before anything is loaded."""
    needed, available = launch.memory_estimate()["total"], available_memory_gib(launch.platform)
    if needed > available:
        data = launch.config.data
        where = "GPU" if launch.platform.cuda else "process"
        raise ConfigError(f"the plan needs {needed:.1f} GiB per {where}, and {available:.1f} GiB is available "
                          f"(--seq-length {data.seq_length}, --micro-batch-size {data.micro_batch_size}; "
                          "--dry-run shows the breakdown): shorten the sequences, shard or recompute more")


def parse_launch(argv: Optional[List[str]] = None) -> Launch:
    """Flags -> configuration -> launch, as ``torchrun -m megatron_psft.train`` starts one: any refusal
    exits with code 2 and one line naming the flags, before any process group exists."""
    config, command_line = parse_config(argv)
    try:
        return resolve(config, planned_platform(command_line), planned=command_line.dry_run)
    except (ValueError, FileNotFoundError) as error:
        refuse(str(error))


def planned_platform(command_line: CommandLine) -> Optional[platforms.Platform]:
    """The platform a dry run plans for (None: this machine): --dry-run-platform, or on a machine without a
    GPU one with Transformer Engine."""
    if not command_line.dry_run:
        return None
    if command_line.dry_run_platform != "auto":
        return platforms.Platform.planned(command_line.dry_run_platform)
    detected = platforms.current()
    return platforms.Platform.planned("gpu-te") if not detected.cuda else detected
