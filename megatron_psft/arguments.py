"""The trainer's flags, in Megatron's style, and their resolution into a launch.

``parse_args`` checks the flags as a whole before any process group starts: our own refusals, then the
layout and megatron-core's ``TransformerConfig`` built for ``WORLD_SIZE`` processes on this platform
(``resolve_run``), so every bad combination exits with code 2 and a message naming the flags involved.
"""

import argparse
import os
from dataclasses import dataclass
from typing import List, Optional

from megatron_psft import checkpoint, parallel
from megatron_psft import platform as platforms
from megatron_psft.data import SFTDataset, check_tokenizer
from megatron_psft.evaluation import parse_eval_data_prefix
from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, load_hf_config, transformer_config
from megatron_psft.objectives import OBJECTIVES, ObjectiveConfig
from megatron_psft.optimizer import OptimConfig
from megatron_psft.plan import Sizes
from megatron_psft.precision import parse_dtype

PARAMS_DTYPES = ("bf16", "fp32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Proximal Supervised Fine-Tuning on Megatron-Core",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add_flags in (_model_flags, _parallelism_flags, _precision_flags, _data_flags, _objective_flags,
                      _optimizer_flags, _logging_flags, _dry_run_flags):
        add_flags(parser)
    return parser


def _model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and checkpoints")
    group.add_argument("--hf-config", default="debug",
                       help="HF config.json, HF model dir, or a bundled flavour (debug, 30b-a3b). "
                            "Ignored when --pretrained-checkpoint or a resumable --load holds one")
    group.add_argument("--pretrained-checkpoint", help="Megatron checkpoint (e.g. from checkpoint_convert.hf_to_megatron) to start from")
    group.add_argument("--load", help="checkpoint root to resume from when it holds a complete training checkpoint "
                                      "(one holding only weights, e.g. a converter's output, starts from them)")
    group.add_argument("--finetune", action="store_true",
                       help="from --load take the weights only: step 0, fresh optimizer, schedule and old policy "
                            "(continue at another layout, dtype or optimizer setting)")
    group.add_argument("--no-load-optim", action="store_true",
                       help="from --load take the weights and the step; fresh optimizer state, RNG and old-policy "
                            "round (continue at another layout, dtype or optimizer setting)")
    group.add_argument("--override-opt-param-scheduler", action="store_true",
                       help="on resume, follow the learning-rate flags, not the checkpoint's schedule")
    group.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                       help="on resume, keep the checkpoint's learning-rate schedule whatever the flags say")
    group.add_argument("--save", help="checkpoint root to save to")
    group.add_argument("--save-interval", type=int, default=0, help="save every N steps (0: only at the end)")
    group.add_argument("--exit-interval", type=int, default=0,
                       help="stop (and save) once the step count is a multiple of N; the schedule still spans --train-iters")
    group.add_argument("--exit-duration-in-mins", type=float, default=None,
                       help="stop (and save) after the step that passes this many minutes of this run")
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="on SIGTERM (SLURM's preemption and time limit) every rank finishes its step, saves, "
                            "and exits 0")
    group.add_argument("--seed", type=int, default=1234)


def _parallelism_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    group.add_argument("--expert-model-parallel-size", type=int, default=1)
    group.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--no-distributed-optimizer", dest="use_distributed_optimizer", action="store_false")
    group.add_argument("--overlap-grad-reduce", action="store_true")


def _precision_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision, MoE and recompute")
    group.add_argument("--params-dtype", choices=PARAMS_DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    group.add_argument("--fp8-format", choices=("hybrid", "e4m3"), default=None)
    group.add_argument("--fp8-recipe", choices=("delayed", "tensorwise", "mxfp8", "blockwise"), default=None,
                       help="default with --fp8-format: tensorwise (docs/run_script.md says why)")
    group.add_argument("--moe-token-dispatcher-type", choices=("alltoall", "allgather"), default="alltoall")
    group.add_argument("--moe-grouped-gemm", action=argparse.BooleanOptionalAction, default=None,
                       help="default: on with Transformer Engine")
    group.add_argument("--moe-aux-loss-coeff", type=float, default=None, help="default: the HF config's router_aux_loss_coef")
    group.add_argument("--moe-router-replay", action="store_true",
                       help="record MoE routing in the old-policy pass and replay it in training passes")
    group.add_argument("--moe-routing-flip-stats", action="store_true",
                       help="record the old-policy pass's routing and report the fraction of top-k choices "
                            "that differ in the training pass (routing_flip_fraction)")
    group.add_argument("--fused-logprobs", action="store_true",
                       help="compute log-probs from the final hidden states in chunks of tokens, never materialising "
                            "the [tokens, vocab] logits (one more output-layer matmul in the backward)")
    group.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    group.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    group.add_argument("--recompute-num-layers", type=int, default=None)
    group.add_argument("--recompute-modules", nargs="+", default=None)


def _data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data-prefix", help="output prefix of tools/preprocess_data.py (required but for --dry-run)")
    group.add_argument("--seq-length", type=int, default=4096)
    group.add_argument("--micro-batch-size", type=int, default=1)
    group.add_argument("--global-batch-size", type=int, default=32, help="sequences per optimizer step (the paper's mini-batch)")
    group.add_argument("--eval-data-prefix", nargs="+", default=[], metavar="NAME=PREFIX",
                       help="held-out sets to evaluate (token-mean NLL and entropy over response tokens), each a name "
                            "and a tools/preprocess_data.py output prefix")
    group.add_argument("--eval-interval", type=int, default=None,
                       help="evaluate every N steps (always at step 0 of a fresh run and at the last step)")
    group.add_argument("--eval-iters", type=int, default=None,
                       help="global batches of each eval set to evaluate (default: the whole set)")
    group.add_argument("--pack-sequences", action="store_true",
                       help="pack whole samples into each --seq-length row (attention and positions stay within a "
                            "sample); a micro-batch is --micro-batch-size rows, the global batch still "
                            "--global-batch-size samples")
    group.add_argument("--tokenizer", default=None,
                       help="the model's HF tokenizer (directory or name): the data's tokenizer (its meta.json) must "
                            "have the same vocabulary. Default: --hf-config when that directory holds a tokenizer")
    group.add_argument("--allow-tokenizer-mismatch", action="store_true",
                       help="train on data tokenized with another vocabulary (a warning instead of an error)")


def _objective_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("objective and schedule (defaults: the paper's PSFT settings)")
    group.add_argument("--train-iters", type=int, required=True)
    group.add_argument("--objective", choices=OBJECTIVES, default="psft")
    group.add_argument("--eps-low", type=float, default=0.2)
    group.add_argument("--eps-high", type=float, default=0.28)
    group.add_argument("--kl-coef", type=float, default=0.5, help="sft-kl: weight of the KL to the frozen reference")
    group.add_argument("--entropy-top-fraction", type=float, default=0.2, help="psft-ent: fraction of tokens trained")
    group.add_argument("--old-policy-micro-batch-size", type=int, default=None,
                       help="rows per micro-batch of the forward-only old-policy pass, which keeps no activations "
                            "and so fits more (default: --micro-batch-size)")
    group.add_argument("--old-policy-interval", default="8",
                       help="optimizer steps per old-policy round (round batch / global batch), or 'never'")
    group.add_argument("--no-first-step-reuse", dest="reuse_first_step", action="store_false",
                       help="recompute the old log-probs of a round's first step instead of reusing the training forward's")
    group.add_argument("--sft-warmup-steps", type=int, default=0, help="plain-SFT steps before the objective starts")
    group.add_argument("--sft-warmup-lr", type=float, default=None, help="learning rate during the SFT warm-up (default --lr)")


def _optimizer_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimizer")
    group.add_argument("--lr", type=float, default=1e-6)
    group.add_argument("--min-lr", type=float, default=0.0)
    group.add_argument("--lr-warmup-iters", type=int, default=10)
    group.add_argument("--lr-decay-iters", type=int, default=0, help="0: the whole run")
    group.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="cosine")
    group.add_argument("--weight-decay", type=float, default=0.1)
    group.add_argument("--clip-grad", type=float, default=1.0)
    group.add_argument("--adam-beta1", type=float, default=0.9)
    group.add_argument("--adam-beta2", type=float, default=0.95)
    group.add_argument("--adam-eps", type=float, default=1e-8)


def _logging_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--metrics-file", help="JSONL file of per-step metrics (default: SAVE/metrics.jsonl)")
    group.add_argument("--tensorboard-dir", default=None)
    group.add_argument("--log-clipped-tokens", action="store_true",
                       help="write per-step counts of clipped tokens to clipped_tokens.jsonl next to the metrics file")
    group.add_argument("--log-interval", type=int, default=1,
                       help="print a console line every N steps, averaged over them (the metrics file keeps every step)")
    group.add_argument("--metrics-file-every-interval", action="store_true",
                       help="write the metrics file at the log interval too, averaged like the console")
    group.add_argument("--timing-log-level", type=int, choices=(0, 1), default=0,
                       help="1: time each phase of a step (data, old-policy, forward-backward, optimizer, save), the "
                            "maximum over ranks; 0: no timers and no device synchronisation")
    group.add_argument("--straggler-factor", type=float, default=1.5,
                       help="with timing on: report a rank whose forward-backward takes this many times the median")
    group.add_argument("--wandb-project", default=None, help="log to Weights & Biases (pip install wandb)")
    group.add_argument("--wandb-exp-name", default=None, help="the W&B run's name")
    group.add_argument("--wandb-save-dir", default=None,
                       help="where W&B keeps its files (default SAVE/wandb); runs offline when the service is unreachable")
    group.add_argument("--profile", action="store_true",
                       help="trace steps --profile-step-start to --profile-step-end with the PyTorch profiler")
    group.add_argument("--profile-step-start", type=int, default=2, help="first profiled step (1-based)")
    group.add_argument("--profile-step-end", type=int, default=3, help="last profiled step (1-based)")
    group.add_argument("--profile-dir", default=None, help="where each rank's trace goes (default SAVE/profile)")


def _dry_run_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dry run")
    group.add_argument("--dry-run", action="store_true",
                       help="resolve every flag, build the TransformerConfig and the layout for WORLD_SIZE "
                            "processes, print the plan (sizes, parameters and memory per GPU) and exit; "
                            "needs no GPU, process group, data or weights")
    group.add_argument("--dry-run-platform", choices=("auto", "gpu-te", "gpu", "cpu"), default="auto",
                       help="platform to plan for; auto: this machine if it has a GPU, else a GPU with "
                            f"Transformer Engine {platforms.MIN_TRANSFORMER_ENGINE}")


# Flags that must be at least 1, and at least 0.
_POSITIVE = ("train_iters", "seq_length", "micro_batch_size", "global_batch_size", "tensor_model_parallel_size",
             "pipeline_model_parallel_size", "expert_model_parallel_size", "log_interval")
_NON_NEGATIVE = ("save_interval", "exit_interval", "sft_warmup_steps", "lr_warmup_iters", "lr_decay_iters")


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flags that are wrong, or that would be dropped silently, on their own terms."""
    def flag(name):
        return "--" + name.replace("_", "-")

    if not args.data_prefix and not args.dry_run:
        parser.error("--data-prefix is required")
    for name in _POSITIVE:
        if getattr(args, name) < 1:
            parser.error(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
    for name in _NON_NEGATIVE:
        if getattr(args, name) < 0:
            parser.error(f"{flag(name)} must not be negative, got {getattr(args, name)}")
    for name in ("expert_tensor_parallel_size", "virtual_pipeline_model_parallel_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
    if args.old_policy_interval != "never" and not (args.old_policy_interval.isdigit() and int(args.old_policy_interval) > 0):
        parser.error(f"--old-policy-interval must be a number of steps >= 1 or 'never', got {args.old_policy_interval!r}")
    if args.fp8_recipe and not args.fp8_format:
        parser.error(f"--fp8-recipe {args.fp8_recipe} has no effect without --fp8-format")
    if args.recompute_modules and args.recompute_granularity != "selective":
        parser.error("--recompute-modules needs --recompute-granularity selective")
    if (args.recompute_method or args.recompute_num_layers is not None) and args.recompute_granularity != "full":
        parser.error("--recompute-method / --recompute-num-layers need --recompute-granularity full")
    if (args.recompute_method is None) != (args.recompute_num_layers is None):
        parser.error("--recompute-method and --recompute-num-layers go together")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        parser.error("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
    if (args.finetune or args.no_load_optim) and not args.load:
        parser.error("--finetune / --no-load-optim need --load")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        parser.error(f"--exit-duration-in-mins must be positive, got {args.exit_duration_in_mins}")
    if args.profile and not 1 <= args.profile_step_start <= args.profile_step_end:
        parser.error("--profile needs 1 <= --profile-step-start <= --profile-step-end")
    if args.profile and not (args.profile_dir or args.save):
        parser.error("--profile needs --profile-dir or --save")
    if args.sft_warmup_steps >= args.train_iters and args.objective != "sft":
        parser.error("--sft-warmup-steps must be smaller than --train-iters")
    if args.moe_router_replay and (args.recompute_granularity == "full" or "moe" in (args.recompute_modules or [])):
        parser.error("--moe-router-replay cannot recompute the router (full or 'moe' recompute): it would re-route")
    for name in ("eval_interval", "eval_iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
    if (args.eval_interval or args.eval_iters) and not args.eval_data_prefix:
        parser.error("--eval-interval / --eval-iters need --eval-data-prefix")
    if args.old_policy_micro_batch_size is not None and args.old_policy_micro_batch_size < 1:
        parser.error(f"--old-policy-micro-batch-size must be at least 1, got {args.old_policy_micro_batch_size}")
    if (args.moe_router_replay or args.moe_routing_flip_stats) and args.old_policy_micro_batch_size not in (
            None, args.micro_batch_size):
        parser.error("--moe-router-replay / --moe-routing-flip-stats compare routing micro-batch by micro-batch: "
                     "--old-policy-micro-batch-size must equal --micro-batch-size")
    if (args.moe_router_replay or args.moe_routing_flip_stats) and args.virtual_pipeline_model_parallel_size:
        parser.error("--moe-router-replay / --moe-routing-flip-stats do not support a virtual pipeline yet")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_flags(parser, args)
    try:
        args.eval_sets = parse_eval_data_prefix(args.eval_data_prefix)
    except ValueError as error:
        parser.error(str(error))
    args.old_policy_interval = None if args.old_policy_interval == "never" else int(args.old_policy_interval)
    if args.fp8_format and args.fp8_recipe is None:
        args.fp8_recipe = "tensorwise"
    platform = run_platform(args)
    if args.params_dtype is None:
        args.params_dtype = "bf16" if platform.cuda else "fp32"
    if args.metrics_file is None and args.save:
        args.metrics_file = os.path.join(args.save, "metrics.jsonl")
    try:  # every check Megatron-Core would make at start-up, before any process group exists
        resolve_run(args, platform)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return args


def run_platform(args: argparse.Namespace) -> platforms.Platform:
    """This machine's platform; for a dry run on a machine without a GPU, the one it plans for."""
    if args.dry_run and args.dry_run_platform != "auto":
        return platforms.Platform.planned(args.dry_run_platform)
    detected = platforms.current()
    return platforms.Platform.planned("gpu-te") if args.dry_run and not detected.cuda else detected


@dataclass(frozen=True)
class ResolvedRun:
    """A launch's flags resolved into the model, its layout and Megatron-Core's TransformerConfig."""

    hf_config: dict
    model_args: Qwen3MoeArgs
    layout: parallel.ParallelLayout
    sizes: Sizes
    transformer_config: object
    resume_from: Optional[str]  # a training checkpoint to continue
    weights_from: Optional[str]  # a checkpoint to take the starting weights from


# Words of Megatron-Core's TransformerConfig errors -> the flags that set what they speak of.
_CONFIG_WORDS_TO_FLAGS = {
    "fp8": ("fp8_format", "fp8_recipe"), "scaling": ("fp8_recipe",), "delayed": ("fp8_recipe",),
    "recompute": ("recompute_granularity", "recompute_modules", "recompute_method", "recompute_num_layers"),
    "moe_act": ("recompute_modules",), "layernorm": ("recompute_modules",),
    "sequence": ("sequence_parallel",), "tensor": ("tensor_model_parallel_size",),
    "pipeline": ("pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size"),
    "expert": ("expert_model_parallel_size", "expert_tensor_parallel_size"),
    "dispatcher": ("moe_token_dispatcher_type",), "grouped": ("moe_grouped_gemm",),
    "replay": ("moe_router_replay",), "dtype": ("params_dtype",), "bf16": ("params_dtype",),
}


def _flags_named_by(message: str, args: argparse.Namespace) -> str:
    words = message.lower().replace("-", "_")
    names = [name for word, flag_names in _CONFIG_WORDS_TO_FLAGS.items() if word in words for name in flag_names]
    shown = []
    for name in dict.fromkeys(names):
        value = getattr(args, name, None)
        if value in (None, False):
            continue
        flag = "--" + name.replace("_", "-")
        shown.append(flag if value is True else f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return ", ".join(shown)


def resolve_run(args: argparse.Namespace, platform: Optional[platforms.Platform] = None) -> ResolvedRun:
    """Resolve the flags for WORLD_SIZE processes on `platform`: every refusal, ours and Megatron-Core's,
    comes from here, naming the flags involved."""
    layout = parallel.ParallelLayout(
        tensor=args.tensor_model_parallel_size, pipeline=args.pipeline_model_parallel_size,
        expert=args.expert_model_parallel_size, expert_tensor=args.expert_tensor_parallel_size,
        virtual_pipeline=args.virtual_pipeline_model_parallel_size, sequence_parallel=args.sequence_parallel)
    sizes = Sizes.of(layout, int(os.environ.get("WORLD_SIZE", "1")))
    if not args.pack_sequences and args.global_batch_size % (sizes.data * args.micro_batch_size):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by data-parallel size "
                         f"{sizes.data} x --micro-batch-size {args.micro_batch_size}")
    if args.sequence_parallel and args.seq_length % args.tensor_model_parallel_size:
        raise ValueError("--seq-length must be divisible by --tensor-model-parallel-size under --sequence-parallel")
    loadable = args.load if args.load and checkpoint.latest_iteration(args.load) is not None else None
    resume_from = loadable if loadable and not args.finetune and checkpoint.is_training_checkpoint(loadable) else None
    weights_from = None if resume_from else (loadable or args.pretrained_checkpoint)
    config_source = resume_from or weights_from
    hf_config = checkpoint.read_hf_config(config_source) if config_source else load_hf_config(args.hf_config)
    model_args = Qwen3MoeArgs.from_hf_config(hf_config)
    try:
        config = transformer_config(
            model_args, layout, params_dtype=parse_dtype(args.params_dtype), fp8=args.fp8_format,
            fp8_recipe=args.fp8_recipe, moe_token_dispatcher=args.moe_token_dispatcher_type,
            moe_grouped_gemm=args.moe_grouped_gemm, moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            routing_replay=args.moe_router_replay or args.moe_routing_flip_stats,
            recompute_granularity=args.recompute_granularity, recompute_modules=args.recompute_modules,
            pack_sequences=args.pack_sequences, platform=platform,
            **({"recompute_method": args.recompute_method, "recompute_num_layers": args.recompute_num_layers}
               if args.recompute_method else {}))
    except (ValueError, AssertionError) as error:
        message = str(error) or type(error).__name__
        flags = "" if "--" in message else _flags_named_by(message, args)
        raise ValueError(message + (f" [flags: {flags}]" if flags else "")) from error
    return ResolvedRun(hf_config, model_args, layout, sizes, config, resume_from, weights_from)


def check_data(meta: dict, model_args: Qwen3MoeArgs, args: argparse.Namespace, prefix: Optional[str] = None) -> None:
    """The preprocessed data at `prefix` (default: --data-prefix) fits the model and the flags."""
    prefix = prefix or args.data_prefix
    if meta["vocab_size"] > model_args.vocab_size:
        raise ValueError(f"the data's tokenizer ({prefix}) has {meta['vocab_size']} ids, the model only "
                         f"{model_args.vocab_size}")
    if meta["seq_length"] > args.seq_length:
        raise ValueError(f"{prefix} was preprocessed for --seq-length {meta['seq_length']} > {args.seq_length}")
    tokenizer = args.tokenizer
    if tokenizer is None and os.path.isdir(args.hf_config) and any(
            os.path.exists(os.path.join(args.hf_config, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = args.hf_config
    if tokenizer is None:
        parallel.print_rank_last("the data's tokenizer was not compared with the model's: pass --tokenizer")
    else:
        check_tokenizer(meta, tokenizer, allow_mismatch=args.allow_tokenizer_mismatch)


def load_datasets(args: argparse.Namespace, model_args: Qwen3MoeArgs):
    """The training set and the named eval sets of the flags, each checked against the model and the flags."""
    train_set = SFTDataset(args.data_prefix, vocab_size=model_args.vocab_size)
    check_data(train_set.meta, model_args, args)
    eval_sets = {}
    for name, prefix in args.eval_sets.items():
        eval_sets[name] = SFTDataset(prefix, vocab_size=model_args.vocab_size)
        check_data(eval_sets[name].meta, model_args, args, prefix=prefix)
    return train_set, eval_sets


def objective_config(args: argparse.Namespace) -> ObjectiveConfig:
    return ObjectiveConfig(args.objective, args.eps_low, args.eps_high, args.kl_coef, args.entropy_top_fraction)


def optim_config(args: argparse.Namespace) -> OptimConfig:
    return OptimConfig(lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                       adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                       lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters,
                       lr_decay_style=args.lr_decay_style, use_distributed_optimizer=args.use_distributed_optimizer,
                       overlap_grad_reduce=args.overlap_grad_reduce)
