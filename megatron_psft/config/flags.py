"""The trainer's flags, in Megatron's style, and the :class:`TrainConfig` they build.

Each flag's destination is the key of the configuration field it sets (:mod:`megatron_psft.config`);
the checks live with the fields, so a bad flag exits with code 2 and one line naming it, before
anything starts. ``--dry-run`` and ``--dry-run-platform`` say what to do with the configuration and
are not part of it.
"""

import argparse
import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple

from megatron_psft.config.base import ConfigError, key_of
from megatron_psft.config.model import FP8_FORMATS, FP8_RECIPES, PARAMS_DTYPES
from megatron_psft.config.optimizer import LR_DECAY_STYLES
from megatron_psft.config.psft import OBJECTIVES
from megatron_psft.config.train import TrainConfig
from megatron_psft.platform import MIN_TRANSFORMER_ENGINE

PLATFORMS = ("auto", "gpu-te", "gpu", "cpu")


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
    group.add_argument("--async-save", action="store_true",
                       help="write checkpoints in the background while training goes on (megatron-core's asynchronous "
                            "dist-checkpointing); 'latest' moves only when a save is complete")
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
    group.add_argument("--fp8-format", choices=FP8_FORMATS, default=None)
    group.add_argument("--fp8-recipe", choices=FP8_RECIPES, default=None,
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
    group.add_argument("--fused-logprobs", choices=("off", "on", "auto"), nargs="?", const="on", default="off",
                       help="on (or the bare flag): log-probs from the final hidden states, the [tokens, vocab] logits "
                            "never held (one more output-layer matmul in the backward); auto: on where one "
                            "micro-batch's logits would pass 4 GiB (docs/kernels.md); default off")
    group.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    group.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    group.add_argument("--recompute-num-layers", type=int, default=None)
    group.add_argument("--recompute-modules", nargs="+", default=None)


def _data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data-prefix", nargs="+", default=[], metavar="[WEIGHT] PREFIX",
                       help="output prefix of tools/preprocess_data.py, or a weighted blend W1 PREFIX1 W2 PREFIX2 ... "
                            "(Megatron's --data-path form; unweighted prefixes blend by their sizes). Required but "
                            "for --dry-run")
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
    group.add_argument("--old-policy-interval", type=_interval, default=8,
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
    group.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="cosine")
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
    group.add_argument("--dry-run-platform", choices=PLATFORMS, default="auto",
                       help="platform to plan for; auto: this machine if it has a GPU, else a GPU with "
                            f"Transformer Engine {MIN_TRANSFORMER_ENGINE}")




def _interval(text: str) -> Optional[int]:
    """--old-policy-interval: a number of steps, or 'never'."""
    return None if text == "never" else int(text)


@dataclass(frozen=True)
class CommandLine:
    """What the command line asks to do with its configuration."""

    dry_run: bool = False
    dry_run_platform: str = "auto"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The configuration of parsed flags: each section from the flags of its fields' keys (fields without a
    flag keep their defaults)."""
    values = vars(args)
    sections = {}
    for section in dataclasses.fields(TrainConfig):
        section_type = section.default_factory
        sections[section.name] = section_type.from_dict(
            {key_of(f): values[key_of(f)] for f in dataclasses.fields(section_type) if key_of(f) in values})
    return TrainConfig(**sections)


def parse_config(argv: Optional[List[str]] = None) -> Tuple[TrainConfig, CommandLine]:
    """Flags -> configuration. A bad flag exits with code 2 and one line naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data_prefix and not args.dry_run:
        parser.error("--data-prefix is required")
    try:
        config = config_from_args(args)
    except ConfigError as error:
        parser.error(str(error))
    return config, CommandLine(args.dry_run, args.dry_run_platform)


def refuse(message: str) -> None:
    """Exit as a bad flag does (code 2, the message as the last line), for refusals found after parsing."""
    build_parser().error(message)
