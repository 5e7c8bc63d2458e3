"""The PSFT training entry point: ``torchrun ... -m megatron_psft.train [flags]``.

One step reads top-down: this rank's share of the global batch -> (old-policy / reference log-probs
when the objective needs them) -> :func:`megatron_psft.step.train_step` -> metrics -> checkpoint.
Everything else (parallel groups, the model, the optimizer, checkpoints) comes from Megatron-Core.
"""

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_psft import checkpoint, parallel, routing
from megatron_psft import platform as platforms
from megatron_psft.batching import Batching, rank_micro_batches, regroup
from megatron_psft.data import SFTDataset, check_tokenizer, global_batch_indices
from megatron_psft.evaluation import EvalSettings, evaluate, parse_eval_data_prefix
from megatron_psft.logger import MetricsLogger, drop_steps_after
from megatron_psft.memory import memory_record
from megatron_psft.metrics import model_flops_per_token, moe_load_balance
from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, load_hf_config, transformer_config
from megatron_psft.objectives import OBJECTIVES, ObjectiveConfig
from megatron_psft.old_policy import OLD_IS_CURRENT, OldPolicy, RoundSchedule
from megatron_psft.optimizer import OptimConfig, build_optimizer, unwrap, wrap_with_ddp
from megatron_psft.plan import Sizes, format_plan, memory_per_gpu
from megatron_psft.run_config import run_config, write_run_config
from megatron_psft.timers import Timers
from megatron_psft.step import forward_only_pass, policy_logprobs, train_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Settings a resumed run must share with its checkpoint: they place the data and the old-policy round.
RESUME_INVARIANTS = ("seed", "global_batch_size", "micro_batch_size", "seq_length", "pack_sequences", "objective",
                     "old_policy_interval", "sft_warmup_steps", "data_prefix")
# Settings the optimizer state and the per-rank state are laid out by: changing one needs
# --no-load-optim or --finetune (the weights themselves are layout-free).
LAYOUT_INVARIANTS = ("world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "virtual_pipeline_model_parallel_size", "expert_model_parallel_size",
                     "expert_tensor_parallel_size", "params_dtype", "fp8_format", "fp8_recipe",
                     "use_distributed_optimizer")
# The learning-rate / weight-decay schedule's settings, as OptimizerParamScheduler saves them.
SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd",
                 "wd_incr_steps", "wd_incr_style")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Proximal Supervised Fine-Tuning on Megatron-Core",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model and checkpoints")
    model.add_argument("--hf-config", default="debug",
                       help="HF config.json, HF model dir, or a bundled flavour (debug, 30b-a3b). "
                            "Ignored when --pretrained-checkpoint or a resumable --load holds one")
    model.add_argument("--pretrained-checkpoint", help="Megatron checkpoint (e.g. from checkpoint_convert.hf_to_megatron) to start from")
    model.add_argument("--load", help="checkpoint root to resume from when it holds a complete training checkpoint "
                                      "(one holding only weights, e.g. a converter's output, starts from them)")
    model.add_argument("--finetune", action="store_true",
                       help="from --load take the weights only: step 0, fresh optimizer, schedule and old policy "
                            "(continue at another layout, dtype or optimizer setting)")
    model.add_argument("--no-load-optim", action="store_true",
                       help="from --load take the weights and the step; fresh optimizer state, RNG and old-policy "
                            "round (continue at another layout, dtype or optimizer setting)")
    model.add_argument("--override-opt-param-scheduler", action="store_true",
                       help="on resume, follow the learning-rate flags, not the checkpoint's schedule")
    model.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                       help="on resume, keep the checkpoint's learning-rate schedule whatever the flags say")
    model.add_argument("--save", help="checkpoint root to save to")
    model.add_argument("--save-interval", type=int, default=0, help="save every N steps (0: only at the end)")
    model.add_argument("--exit-interval", type=int, default=0,
                       help="stop (and save) once the step count is a multiple of N; the schedule still spans --train-iters")
    model.add_argument("--exit-duration-in-mins", type=float, default=None,
                       help="stop (and save) after the step that passes this many minutes of this run")
    model.add_argument("--exit-signal-handler", action="store_true",
                       help="on SIGTERM (SLURM's preemption and time limit) every rank finishes its step, saves, "
                            "and exits 0")
    model.add_argument("--seed", type=int, default=1234)

    par = parser.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    par.add_argument("--expert-model-parallel-size", type=int, default=1)
    par.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--no-distributed-optimizer", dest="use_distributed_optimizer", action="store_false")
    par.add_argument("--overlap-grad-reduce", action="store_true")

    prec = parser.add_argument_group("precision, MoE and recompute")
    prec.add_argument("--params-dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    prec.add_argument("--fp8-format", choices=("hybrid", "e4m3"), default=None)
    prec.add_argument("--fp8-recipe", choices=("delayed", "tensorwise", "mxfp8", "blockwise"), default=None,
                      help="default with --fp8-format: tensorwise (docs/run_script.md says why)")
    prec.add_argument("--moe-token-dispatcher-type", choices=("alltoall", "allgather"), default="alltoall")
    prec.add_argument("--moe-grouped-gemm", action=argparse.BooleanOptionalAction, default=None,
                      help="default: on with Transformer Engine")
    prec.add_argument("--moe-aux-loss-coeff", type=float, default=None, help="default: the HF config's router_aux_loss_coef")
    prec.add_argument("--moe-router-replay", action="store_true",
                      help="record MoE routing in the old-policy pass and replay it in training passes")
    prec.add_argument("--moe-routing-flip-stats", action="store_true",
                      help="record the old-policy pass's routing and report the fraction of top-k choices "
                           "that differ in the training pass (routing_flip_fraction)")
    prec.add_argument("--fused-logprobs", action="store_true",
                      help="compute log-probs from the final hidden states in chunks of tokens, never materialising "
                           "the [tokens, vocab] logits (one more output-layer matmul in the backward)")
    prec.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    prec.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    prec.add_argument("--recompute-num-layers", type=int, default=None)
    prec.add_argument("--recompute-modules", nargs="+", default=None)

    data = parser.add_argument_group("data")
    data.add_argument("--data-prefix", help="output prefix of tools/preprocess_data.py (required but for --dry-run)")
    data.add_argument("--seq-length", type=int, default=4096)
    data.add_argument("--micro-batch-size", type=int, default=1)
    data.add_argument("--global-batch-size", type=int, default=32, help="sequences per optimizer step (the paper's mini-batch)")
    data.add_argument("--eval-data-prefix", nargs="+", default=[], metavar="NAME=PREFIX",
                      help="held-out sets to evaluate (token-mean NLL and entropy over response tokens), each a name "
                           "and a tools/preprocess_data.py output prefix")
    data.add_argument("--eval-interval", type=int, default=None,
                      help="evaluate every N steps (always at step 0 of a fresh run and at the last step)")
    data.add_argument("--eval-iters", type=int, default=None,
                      help="global batches of each eval set to evaluate (default: the whole set)")
    data.add_argument("--pack-sequences", action="store_true",
                      help="pack whole samples into each --seq-length row (attention and positions stay within a "
                           "sample); a micro-batch is --micro-batch-size rows, the global batch still "
                           "--global-batch-size samples")
    data.add_argument("--tokenizer", default=None,
                      help="the model's HF tokenizer (directory or name): the data's tokenizer (its meta.json) must "
                           "have the same vocabulary. Default: --hf-config when that directory holds a tokenizer")
    data.add_argument("--allow-tokenizer-mismatch", action="store_true",
                      help="train on data tokenized with another vocabulary (a warning instead of an error)")

    train = parser.add_argument_group("objective and schedule (defaults: the paper's PSFT settings)")
    train.add_argument("--train-iters", type=int, required=True)
    train.add_argument("--objective", choices=OBJECTIVES, default="psft")
    train.add_argument("--eps-low", type=float, default=0.2)
    train.add_argument("--eps-high", type=float, default=0.28)
    train.add_argument("--kl-coef", type=float, default=0.5, help="sft-kl: weight of the KL to the frozen reference")
    train.add_argument("--entropy-top-fraction", type=float, default=0.2, help="psft-ent: fraction of tokens trained")
    train.add_argument("--old-policy-micro-batch-size", type=int, default=None,
                       help="rows per micro-batch of the forward-only old-policy pass, which keeps no activations "
                            "and so fits more (default: --micro-batch-size)")
    train.add_argument("--old-policy-interval", default="8",
                       help="optimizer steps per old-policy round (round batch / global batch), or 'never'")
    train.add_argument("--no-first-step-reuse", dest="reuse_first_step", action="store_false",
                       help="recompute the old log-probs of a round's first step instead of reusing the training forward's")
    train.add_argument("--sft-warmup-steps", type=int, default=0, help="plain-SFT steps before the objective starts")
    train.add_argument("--sft-warmup-lr", type=float, default=None, help="learning rate during the SFT warm-up (default --lr)")

    opt = parser.add_argument_group("optimizer")
    opt.add_argument("--lr", type=float, default=1e-6)
    opt.add_argument("--min-lr", type=float, default=0.0)
    opt.add_argument("--lr-warmup-iters", type=int, default=10)
    opt.add_argument("--lr-decay-iters", type=int, default=0, help="0: the whole run")
    opt.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="cosine")
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--clip-grad", type=float, default=1.0)
    opt.add_argument("--adam-beta1", type=float, default=0.9)
    opt.add_argument("--adam-beta2", type=float, default=0.95)
    opt.add_argument("--adam-eps", type=float, default=1e-8)

    log = parser.add_argument_group("logging")
    log.add_argument("--metrics-file", help="JSONL file of per-step metrics (default: SAVE/metrics.jsonl)")
    log.add_argument("--tensorboard-dir", default=None)
    log.add_argument("--log-clipped-tokens", action="store_true",
                     help="write per-step counts of clipped tokens to clipped_tokens.jsonl next to the metrics file")
    log.add_argument("--log-interval", type=int, default=1,
                     help="print a console line every N steps, averaged over them (the metrics file keeps every step)")
    log.add_argument("--metrics-file-every-interval", action="store_true",
                     help="write the metrics file at the log interval too, averaged like the console")
    log.add_argument("--timing-log-level", type=int, choices=(0, 1), default=0,
                     help="1: time each phase of a step (data, old-policy, forward-backward, optimizer, save), the "
                          "maximum over ranks; 0: no timers and no device synchronisation")
    log.add_argument("--straggler-factor", type=float, default=1.5,
                     help="with timing on: report a rank whose forward-backward takes this many times the median")
    log.add_argument("--wandb-project", default=None, help="log to Weights & Biases (pip install wandb)")
    log.add_argument("--wandb-exp-name", default=None, help="the W&B run's name")
    log.add_argument("--wandb-save-dir", default=None,
                     help="where W&B keeps its files (default SAVE/wandb); runs offline when the service is unreachable")
    log.add_argument("--profile", action="store_true",
                     help="trace steps --profile-step-start to --profile-step-end with the PyTorch profiler")
    log.add_argument("--profile-step-start", type=int, default=2, help="first profiled step (1-based)")
    log.add_argument("--profile-step-end", type=int, default=3, help="last profiled step (1-based)")
    log.add_argument("--profile-dir", default=None, help="where each rank's trace goes (default SAVE/profile)")
    plan = parser.add_argument_group("dry run")
    plan.add_argument("--dry-run", action="store_true",
                      help="resolve every flag, build the TransformerConfig and the layout for WORLD_SIZE "
                           "processes, print the plan (sizes, parameters and memory per GPU) and exit; "
                           "needs no GPU, process group, data or weights")
    plan.add_argument("--dry-run-platform", choices=("auto", "gpu-te", "gpu", "cpu"), default="auto",
                      help="platform to plan for; auto: this machine if it has a GPU, else a GPU with "
                           f"Transformer Engine {platforms.MIN_TRANSFORMER_ENGINE}")
    return parser


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
            model_args, layout, params_dtype=DTYPES[args.params_dtype], fp8=args.fp8_format,
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


class Trainer:
    """Holds the policy, its optimizer, the old policy and the data position of one training run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        run = resolve_run(args)
        self.layout, self.hf_config, self.model_args = run.layout, run.hf_config, run.model_args
        self.transformer_config = run.transformer_config
        resume_from = run.resume_from
        parallel.initialize(self.layout, seed=args.seed)
        if run.weights_from and run.weights_from == args.load:
            why = "--finetune" if args.finetune else "it holds weights only (no trainer state)"
            parallel.print_rank_last(f"starting from the weights of {args.load} at step 0: {why}")
        self.dataset = SFTDataset(args.data_prefix, vocab_size=self.model_args.vocab_size)
        check_data(self.dataset.meta, self.model_args, args)
        self.eval_sets = {name: SFTDataset(prefix, vocab_size=self.model_args.vocab_size)
                          for name, prefix in args.eval_sets.items()}
        for name, dataset in self.eval_sets.items():
            check_data(dataset.meta, self.model_args, args, prefix=args.eval_sets[name])
        self.batching = Batching(args.seq_length, args.micro_batch_size, self.dataset.meta["pad_id"],
                                 pack=args.pack_sequences,
                                 micro_batch_multiple=self.layout.pipeline if self.layout.virtual_pipeline else 1)
        self.objective = ObjectiveConfig(args.objective, args.eps_low, args.eps_high, args.kl_coef, args.entropy_top_fraction)
        chunks = build_model_chunks(self.model_args, self.transformer_config)
        if run.weights_from:
            checkpoint.load_model(run.weights_from, chunks)

        # A frozen copy of the starting weights: sft-kl's reference, or the never-refreshed old policy.
        needs_frozen = self.objective.needs_reference_logprobs or (
            self.objective.needs_old_logprobs and args.old_policy_interval is None)
        self.frozen = build_model_chunks(self.model_args, self.transformer_config) if needs_frozen else None
        if self.frozen:
            _copy_weights(chunks, self.frozen)

        params_dtype = DTYPES[args.params_dtype]
        optim = OptimConfig(lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                            lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters,
                            lr_decay_style=args.lr_decay_style, use_distributed_optimizer=args.use_distributed_optimizer,
                            overlap_grad_reduce=args.overlap_grad_reduce)
        track_routing = self.model_args.is_moe and (args.moe_router_replay or args.moe_routing_flip_stats)
        self.replays = routing.routers(chunks) if track_routing else None
        self.frozen_replays = routing.routers(self.frozen) if track_routing and self.frozen else None
        self.model = wrap_with_ddp(chunks, self.transformer_config, optim)
        self.optimizer, self.scheduler = build_optimizer(self.model, optim, params_dtype, args.train_iters)
        self.old_policy = OldPolicy(RoundSchedule(args.old_policy_interval, args.sft_warmup_steps, args.reuse_first_step,
                                                  end_step=args.train_iters))
        self.step = 0
        self.resumed = bool(resume_from)
        if resume_from:
            self._resume(resume_from)
        self.flops_per_token = model_flops_per_token(self.model_args, args.seq_length)
        self.timers = Timers(args.timing_log_level, nvtx=args.profile and torch.cuda.is_available())
        self.run_config = run_config(args, self.transformer_config, platforms.current(), dist.get_world_size())
        self._start_logging(resumed_step=self.step if resume_from else None)

    def _start_logging(self, resumed_step: Optional[int]) -> None:
        args = self.args
        if args.save and dist.get_rank() == 0:
            write_run_config(args.save, self.run_config)
        wandb = None
        if args.wandb_project:
            wandb = dict(project=args.wandb_project, name=args.wandb_exp_name, config=self.run_config,
                         save_dir=args.wandb_save_dir or (os.path.join(args.save, "wandb") if args.save else None))
        self.logger = MetricsLogger(args.metrics_file, args.tensorboard_dir, args.train_iters, resumed_step,
                                    log_interval=args.log_interval,
                                    jsonl_every_interval=args.metrics_file_every_interval, wandb=wandb)
        self.clipped_tokens_file = None
        if args.log_clipped_tokens and self.logger.active and args.metrics_file:
            path = os.path.join(os.path.dirname(os.path.abspath(args.metrics_file)), "clipped_tokens.jsonl")
            if resumed_step is not None:
                drop_steps_after(path, resumed_step)
            self.clipped_tokens_file = open(path, "a")
        self.memory_reported = False

    # --- data ---------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> List[dict]:
        """This data-parallel rank's share of global batch `step`, as micro-batches."""
        indices = global_batch_indices(len(self.dataset), self.args.global_batch_size, step, self.args.seed)
        return rank_micro_batches(self.dataset, indices, self.batching, parallel.device())

    def _old_policy_pass(self, chunks, replays, step):
        """The old policy's log-probs (and routing) for step `step`'s micro-batches, computed in micro-batches
        of --old-policy-micro-batch-size rows."""
        micro_batches = self.micro_batches(step)
        rows = self.args.old_policy_micro_batch_size or self.args.micro_batch_size
        if rows == self.args.micro_batch_size:
            return forward_only_pass(chunks, micro_batches, self.model_args.vocab_size, replays,
                                     fused_logprobs=self.args.fused_logprobs)
        results = forward_only_pass(chunks, regroup(micro_batches, rows, self.batching), self.model_args.vocab_size,
                                    fused_logprobs=self.args.fused_logprobs)
        if not parallel.is_last_stage():
            return [{} for _ in micro_batches]
        logprobs = torch.cat([result["logprobs"] for result in results]).split(self.args.micro_batch_size)
        return [{"logprobs": values} for values in logprobs[:len(micro_batches)]]

    # --- one step -----------------------------------------------------------------------------------
    def train_one_step(self) -> dict:
        args, step = self.args, self.step
        in_warmup = step < args.sft_warmup_steps
        objective = ObjectiveConfig("sft") if in_warmup else self.objective
        start = time.perf_counter()
        with self.timers("data"):
            micro_batches = self.micro_batches(step)
        with self.timers("old-policy"):
            self._attach_old_policy(step, objective, micro_batches)
        if args.sft_warmup_lr is not None:  # one schedule over the run; its peak differs per phase
            for group in self.optimizer.param_groups:
                group["max_lr"] = args.sft_warmup_lr if in_warmup else args.lr
        result = train_step(self.model, self.optimizer, self.scheduler, micro_batches, objective,
                            self.model_args.vocab_size, token_histograms=args.log_clipped_tokens,
                            replays=self.replays, replay_routing=args.moe_router_replay, timers=self.timers,
                            fused_logprobs=args.fused_logprobs)
        seconds = time.perf_counter() - start
        self.step += 1

        record = dict(result.metrics)
        clipped = record.pop("clipped_token_counts_total", None)
        response = record.pop("response_token_counts_total", None)
        if clipped is not None and self.clipped_tokens_file:
            self._write_clipped_tokens(step, clipped, response)
        real_tokens = self._global_real_tokens(micro_batches)
        # Forward-equivalents of the rows computed (all ranks hold as many): training (forward + backward = 3),
        # old-policy and reference passes.
        rows = len(micro_batches) * args.micro_batch_size * parallel.data_size()
        forward_sequences = rows * (3 + self.old_policy.last_pass_steps + objective.needs_reference_logprobs)
        record.update(
            phase="sft-warmup" if in_warmup else objective.name,
            grad_norm=result.grad_norm,
            learning_rate=result.learning_rate,
            step_time_s=seconds,
            old_policy_s=self.old_policy.last_pass_seconds if objective.needs_old_logprobs else 0.0,
            tokens_per_s=real_tokens / seconds,
            routing_flip_fraction=result.routing_flip_fraction,
            tflops_per_gpu=forward_sequences * args.seq_length * self.flops_per_token / seconds
            / dist.get_world_size() / 1e12,
            **(moe_load_balance(len(micro_batches))
               if self.model_args.is_moe and self.transformer_config.moe_aux_loss_coeff else {}),
            **memory_record(),
            **self.timers.collect(),
        )
        self._report_memory_once(record)
        straggler = self.timers.straggler(args.straggler_factor)
        if straggler:
            self.logger.note(straggler)
        self.logger.log(step, record)
        return record

    def _attach_old_policy(self, step: int, objective: ObjectiveConfig, micro_batches: List[dict]) -> None:
        """The old-policy (or reference) log-probs and routing each micro-batch's objective needs."""
        args = self.args
        if objective.needs_old_logprobs:
            if step == args.sft_warmup_steps and self.frozen and args.old_policy_interval is None:
                _copy_weights(self.model, self.frozen)  # the fixed old policy is the model as PSFT begins
            old = self.old_policy.for_step(step, lambda s: self._old_policy_pass(self.model, self.replays, s),
                                           lambda s: self._old_policy_pass(self.frozen, self.frozen_replays, s))
            for index, micro_batch in enumerate(micro_batches):
                if old == OLD_IS_CURRENT:
                    micro_batch["old_is_current"] = True
                else:
                    micro_batch["old_logprobs"] = old[index].get("logprobs")  # None off the last stage
                    micro_batch["routing"] = old[index].get("routing")
        if objective.needs_reference_logprobs:
            reference = policy_logprobs(self.frozen, micro_batches, self.model_args.vocab_size,
                                        fused_logprobs=args.fused_logprobs)
            for micro_batch, logprobs in zip(micro_batches, reference or []):
                micro_batch["reference_logprobs"] = logprobs

    def _report_memory_once(self, record: dict) -> None:
        """After the first step: the memory it took next to the dry run's estimate for this launch."""
        if self.memory_reported:
            return
        self.memory_reported = True
        args = self.args
        estimate = memory_per_gpu(self.model_args, self.transformer_config,
                                  Sizes.of(self.layout, dist.get_world_size()), platforms.current(), args.seq_length,
                                  args.micro_batch_size, args.global_batch_size, args.use_distributed_optimizer)
        self.logger.note(f"memory after the first step (worst rank): {record['memory/peak_gib']:.2f} GiB peak, "
                         f"{record['memory/reserved_gib']:.2f} GiB reserved; the plan estimated "
                         f"{estimate['total']:.2f} GiB (--dry-run)")

    def _global_real_tokens(self, micro_batches) -> int:
        """Input positions of the global batch that belong to a sample (padding has no segment)."""
        local = sum(int((mb["segment_ids"] >= 0).sum()) for mb in micro_batches)
        total = torch.tensor(float(local), device=parallel.device())
        dist.all_reduce(total, group=parallel.data_group())
        return int(total)

    def _write_clipped_tokens(self, step, clipped, response) -> None:
        ids = [i for i, count in enumerate(clipped) if count]
        self.clipped_tokens_file.write(json.dumps({
            "step": step + 1,
            "clipped": {str(i): int(clipped[i]) for i in ids},
            "response": {str(i): int(count) for i, count in enumerate(response) if count},
        }) + "\n")
        self.clipped_tokens_file.flush()

    def run_evaluation(self) -> None:
        """Each --eval-data-prefix set at the current weights; forward-only, so training is unchanged."""
        if not self.eval_sets:
            return
        start = time.perf_counter()
        results = evaluate(self.model, self.eval_sets, EvalSettings.from_args(self.args), self.model_args.vocab_size)
        self.logger.log_eval(self.step, results, time.perf_counter() - start)

    # --- checkpoints --------------------------------------------------------------------------------
    def save(self) -> str:
        from megatron.core import tensor_parallel

        rank_state = {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": None if parallel.use_cpu() else torch.cuda.get_rng_state(),
            "tracker_rng": tensor_parallel.get_cuda_rng_tracker().get_states(),
            "old_policy": self.old_policy.state_dict(),
        }
        with self.timers("save"):
            path = checkpoint.save(
                self.args.save, self.step, self.model, self.hf_config, self.optimizer, self.scheduler,
                trainer_state={"step": self.step, "world_size": dist.get_world_size(),
                               **{key: getattr(self.args, key) for key in RESUME_INVARIANTS + LAYOUT_INVARIANTS
                                  if key != "world_size"}},
                rank_state=rank_state, frozen_chunks=self.frozen, run_config=self.run_config)
        if dist.get_rank() == 0:
            write_run_config(self.args.save, self.run_config)
        parallel.print_rank_last(f"saved checkpoint {path}")
        return path

    def _resume(self, root: str) -> None:
        from megatron.core import tensor_parallel

        saved = checkpoint.read_common_state(root)
        check_resume(self.args, saved["trainer_state"], saved["scheduler"], self.scheduler.state_dict())
        if self.args.no_load_optim:  # weights and step; the flags' schedule, a fresh optimizer and round
            checkpoint.load_model(root, self.model, self.frozen)
            self.step = saved["trainer_state"]["step"]
            self.scheduler.step(self.step)
            parallel.print_rank_last(f"loaded the weights of {checkpoint.resolve(root)} (--no-load-optim): "
                                     f"fresh optimizer state from step {self.step}")
            return
        self.scheduler.override_opt_param_scheduler = self.args.override_opt_param_scheduler
        self.scheduler.use_checkpoint_opt_param_scheduler = self.args.use_checkpoint_opt_param_scheduler
        trainer_state, rank_state = checkpoint.load_training_state(root, self.model, self.optimizer, self.scheduler,
                                                                   frozen_chunks=self.frozen)
        self.step = trainer_state["step"]
        torch.set_rng_state(rank_state["torch_rng"])  # RNG states stay on the host, as saved
        if rank_state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(rank_state["cuda_rng"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rank_state["tracker_rng"])
        self.old_policy.load_state_dict(checkpoint.to_device(rank_state["old_policy"], parallel.device()))
        parallel.print_rank_last(f"resumed from {checkpoint.resolve(root)} at step {self.step}")

    def run(self) -> None:
        args = self.args
        saved_step = self.step if self.resumed else None  # a checkpoint of this step exists already
        exit_conditions = ExitConditions(args.exit_signal_handler, args.exit_duration_in_mins)
        profiler = Profiler(args) if args.profile else None
        if self.step == 0 and not self.resumed:
            self.run_evaluation()
        while self.step < args.train_iters:
            if profiler:
                profiler.before_step(self.step + 1)
            self.train_one_step()
            if profiler:
                profiler.after_step(self.step)
            # Before any save, so a run resumed from this step has its evaluation already, as an uninterrupted run.
            if self.step == args.train_iters or (args.eval_interval and self.step % args.eval_interval == 0):
                self.run_evaluation()
            if args.exit_interval and self.step % args.exit_interval == 0:
                break
            if args.save and args.save_interval and self.step % args.save_interval == 0:
                self.save()
                saved_step = self.step
            reason = exit_conditions.reason()
            if reason:
                parallel.print_rank_last(f"stopping after step {self.step}: {reason}")
                break
        if args.save and saved_step != self.step:
            self.save()
        self.logger.close()
        if self.clipped_tokens_file:
            self.clipped_tokens_file.close()


class Profiler:
    """--profile: the PyTorch profiler over steps --profile-step-start..--profile-step-end (1-based),
    one Chrome trace per rank; CUDA kernels too on a GPU."""

    def __init__(self, args: argparse.Namespace):
        self.start, self.end = args.profile_step_start, args.profile_step_end
        self.directory = args.profile_dir or os.path.join(args.save, "profile")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile = torch.profiler.profile(activities=activities, record_shapes=True)
        self.running = False

    def before_step(self, step: int) -> None:
        if step == self.start:
            self.profile.start()
            self.running = True

    def after_step(self, step: int) -> None:
        if self.running and step == self.end:
            self.profile.stop()
            self.running = False
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"trace_rank{dist.get_rank():05d}.json")
            self.profile.export_chrome_trace(path)
            parallel.print_rank_last(f"profile of steps {self.start}-{self.end} written to {self.directory}")


class ExitConditions:
    """--exit-signal-handler and --exit-duration-in-mins. Every rank stops after the same step: a
    SIGTERM may reach only some ranks, and clocks differ, so the ranks agree by an all-reduce."""

    def __init__(self, on_sigterm: bool, duration_in_mins: Optional[float]):
        self.signal_received = False
        self.deadline = None if duration_in_mins is None else time.monotonic() + 60 * duration_in_mins
        self.active = on_sigterm or self.deadline is not None
        if on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.signal_received = True  # acted on after the step in progress

    def reason(self) -> Optional[str]:
        if not self.active:
            return None
        flags = torch.tensor([float(self.signal_received),
                              float(self.deadline is not None and time.monotonic() > self.deadline)],
                             device=parallel.device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return "SIGTERM received (--exit-signal-handler)"
        return "--exit-duration-in-mins reached" if flags[1] else None


def check_resume(args: argparse.Namespace, trainer_state: dict, saved_schedule: dict, schedule: dict) -> None:
    """Refuse a resume whose settings differ from its checkpoint's, saying what changed and how to go on."""
    def changed(keys):
        now = {**vars(args), "world_size": dist.get_world_size()}
        return {key: (trainer_state[key], now[key]) for key in keys if key in trainer_state and trainer_state[key] != now[key]}

    data_settings = changed(RESUME_INVARIANTS)
    if data_settings:  # the data position and the saved old-policy round depend on them
        raise ValueError(f"resuming needs the checkpoint's settings; changed (saved, now): {data_settings}")
    if args.no_load_optim:
        return
    layout = changed(LAYOUT_INVARIANTS)
    if layout:
        raise ValueError(f"the checkpoint's optimizer and per-rank state were saved at another layout / precision; "
                         f"changed (saved, now): {layout}. To continue from its weights, pass --no-load-optim "
                         f"(keeps the step and the schedule) or --finetune (starts at step 0)")
    schedule_changes = {key: (saved_schedule[key], schedule[key]) for key in SCHEDULE_KEYS
                        if key in saved_schedule and saved_schedule[key] != schedule[key]}
    if schedule_changes and not (args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
        raise ValueError(f"the learning-rate schedule of the flags differs from the checkpoint's; changed (saved, now): "
                         f"{schedule_changes}. Pass --override-opt-param-scheduler to follow the flags (e.g. a longer "
                         f"--train-iters) or --use-checkpoint-opt-param-scheduler to keep the checkpoint's")


def _copy_weights(source_chunks, target_chunks) -> None:
    """Copy weights chunk by chunk (same layout); the target is frozen."""
    with torch.no_grad():
        for source, target in zip(source_chunks, target_chunks):
            target.load_state_dict(unwrap(source).state_dict(), strict=True)
            target.eval()
            for param in target.parameters():
                param.requires_grad_(False)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        platform = run_platform(args)
        run = resolve_run(args, platform)
        print(format_plan(platform=platform, model_args=run.model_args, config=run.transformer_config,
                          sizes=run.sizes, args=args))
        sys.exit(0)
    trainer = Trainer(args)
    trainer.run()
    parallel.destroy()


if __name__ == "__main__":
    main()
