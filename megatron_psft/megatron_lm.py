"""PSFT inside Megatron's own training loops: a forward step for Megatron-LM's ``pretrain()`` and
``train_step`` (``megatron.training``, in megatron-core wheels from 0.17 on) and for Megatron-Bridge's
``finetune()``.

:class:`PsftForwardStep` is the ``forward_step_func`` those loops take. Per micro-batch it runs the
policy's forward, computes log-probs and entropy with this project's vocab-parallel kernels (Triton on
CUDA logits, chunked torch elsewhere, or fused with the output layer) and returns the objective's loss
function in Megatron's per-token contract ``(loss_sum, num_tokens, {name: [sum, count]})``, so the
loop's own reduction makes the loss a token mean over the global batch and its logging prints the
metrics (clip fraction, ratio, entropy, ...).

The old policy, in a loop that owns the iteration and the data: a frozen copy of this rank's weight
shards, refreshed in place at each round's first step (each rank copies its own shards: no
communication) and swapped in for a forward without gradient on each micro-batch of the round's later
steps. A round's first step needs no copy: its weights are the old policy, so its training forward's
own log-probs, detached, are the old ones (or, without reuse, a forward of the live weights is).
docs/megatron_lm.md says why this design rather than a look-ahead over the data iterator, what it
costs, and which layouts it refuses (pipeline parallelism: use megatron-psft's trainer).

MoE router replay is Megatron-Core's own (``moe_enable_routing_replay``), driven per model by
:mod:`megatron_psft.psft.routing`: the old forward records each router's top-k, the training forward
replays it.
"""

import argparse
import contextlib
import itertools
from dataclasses import dataclass, fields
from typing import Callable, List, Optional

import torch

from megatron_psft.platform import parallel
from megatron_psft.psft import routing
from megatron_psft.config import OBJECTIVES, ObjectiveConfig, OldPolicyConfig
from megatron_psft.config.model import fused_logprobs_on
from megatron_psft.psft.objectives import make_loss_func
from megatron_psft.psft.old_policy import RoundSchedule
from megatron_psft.engine.optimizer import unwrap
from megatron_psft.engine.step import output_logprobs, stage_output
from megatron_psft.models.qwen3_moe import vocab_columns

TRAINER_ALTERNATIVE = ("use megatron-psft's own trainer (python -m megatron_psft.train), which runs the old-policy "
                       "pass through the pipeline schedule")


@dataclass(frozen=True)
class HookSettings:
    """What the forward step needs besides the objective and the old-policy schedule."""

    vocab_size: int  # the model's vocabulary before Megatron pads it: padded logits never enter the softmax
    fused_logprobs: bool = False  # log-probs from the final hidden states, never materialising the logits
    replay_routing: bool = False  # MoE: the training forward routes each token as the old policy's did
    routing_flip_stats: bool = False  # MoE: report the old policy's top-k choices the training forward left

    def __post_init__(self):
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")

    @property
    def tracks_routing(self) -> bool:
        return self.replay_routing or self.routing_flip_stats


@dataclass(frozen=True)
class OldPolicyInputs:
    """What one micro-batch's objective gets from the old policy or the frozen reference."""

    old_logprobs: Optional[torch.Tensor] = None
    reference_logprobs: Optional[torch.Tensor] = None
    old_is_current: bool = False
    routing: Optional[List[torch.Tensor]] = None  # the old forward's top-k ids per router


def unsupported_layout(config) -> Optional[str]:
    """Why the forward step cannot train with this ``TransformerConfig``, or None."""
    if config.pipeline_model_parallel_size > 1:
        return ("pipeline parallelism: the old policy's forward runs inside the forward step, outside Megatron's "
                f"pipeline schedule, and cannot reach the other stages; {TRAINER_ALTERNATIVE}")
    if config.context_parallel_size > 1:
        return "context parallelism: megatron-psft's log-probs do not split the sequence over context-parallel ranks"
    if not config.calculate_per_token_loss:
        return "PSFT's token mean over the global batch needs --calculate-per-token-loss"
    if getattr(config, "overlap_moe_expert_parallel_comm", False):
        return "--overlap-moe-expert-parallel-comm asks the forward step for a schedule plan, which it does not build"
    return None


def check_layout(config) -> None:
    """Refuse, in one line naming the reason and the alternative, a layout the forward step cannot serve."""
    reason = unsupported_layout(config)
    if reason:
        raise ValueError(f"megatron-psft's forward step cannot train this layout: {reason}")


def megatron_lm_iteration() -> int:
    """The optimizer step Megatron-LM's loop is running (0-based), as its ``train()`` records it."""
    from megatron.training import get_args

    return get_args().curr_iteration


class FrozenWeights:
    """A copy of one model chunk's weight shards (and floating-point buffers) beside the live ones.

    Refreshed in place from the live tensors, and swapped in for a forward by pointing each parameter's
    ``.data`` at its copy, so every module reads the copy however it reads its weights. Entering and
    leaving the swap marks the next forward as a first micro-batch, so Transformer Engine recasts its
    cached FP8 weights instead of reusing the other weights' casts.
    """

    def __init__(self, model_chunk: torch.nn.Module):
        module = unwrap(model_chunk)
        self.module = module
        self.live = [t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()]
        self.copies = [t.detach().clone() for t in self.live]

    @property
    def num_bytes(self) -> int:
        return sum(copy.numel() * copy.element_size() for copy in self.copies)

    def refresh(self) -> None:
        with torch.no_grad():
            for copy, live in zip(self.copies, self.live):
                copy.copy_(live.detach())

    def _mark_first_micro_batch(self) -> None:
        if hasattr(self.module, "set_is_first_microbatch"):
            self.module.set_is_first_microbatch()

    @contextlib.contextmanager
    def swapped_in(self):
        originals = [t.data for t in self.live]
        for tensor, copy in zip(self.live, self.copies):
            tensor.data = copy
        self._mark_first_micro_batch()
        try:
            yield
        finally:
            for tensor, original in zip(self.live, originals):
                tensor.data = original
            self._mark_first_micro_batch()


def _on_device(batch: dict) -> dict:
    """A micro-batch from the loop's data iterator on this rank's device. Without ``segment_ids`` (the
    sample of each position, -1 on padding: what keeps padding out of the MoE routers' statistics) no
    position is padding, as in Megatron's own GPT batches."""
    device = parallel.device()
    micro_batch = {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
                   for key, value in batch.items()}
    micro_batch.setdefault("segment_ids", torch.zeros_like(micro_batch["tokens"]))
    return micro_batch


def megatron_metrics(metrics: dict) -> dict:
    """Our metrics in the form Megatron's loops reduce exactly: the ``[sum, count]`` means, which they sum
    over micro-batches and data-parallel ranks before dividing (extremes and totals have no such form).
    The mean log-prob is reported as ``nll``, its negative: Megatron-LM's console line leaves out negative
    averages (as PSFT's loss, about -1, is: its TensorBoard and W&B logs keep it)."""
    report = {name: value for name, value in metrics.items() if value.numel() == 2 and name != "logprob"}
    report["nll"] = metrics["logprob"] * metrics["logprob"].new_tensor([-1.0, 1.0])
    return report


class PsftForwardStep:
    """The ``forward_step_func`` of Megatron-LM's ``pretrain()`` / ``train_step`` (call it as is: it reads
    the step from Megatron-LM's arguments) and of Megatron-Bridge's ``finetune()`` (pass :meth:`bridge`,
    which takes Bridge's global state first and reads the step from it).

    Rounds of ``old_policy_interval`` steps start at step 0, so a run resumed from a checkpoint saved at a
    multiple of the interval trains exactly as an uninterrupted one; resumed inside a round, the round's
    remaining steps take the resumed weights as their old policy (said on the console). In evaluation
    (the model in eval mode) the loss is the response tokens' negative log-likelihood.
    """

    def __init__(self, objective: ObjectiveConfig, old_policy: OldPolicyConfig, settings: HookSettings,
                 current_step: Callable[[], int] = megatron_lm_iteration):
        if old_policy.old_policy_micro_batch_size is not None:
            raise ValueError("--old-policy-micro-batch-size: the old policy's forward runs on each training "
                             f"micro-batch here; {TRAINER_ALTERNATIVE} for a separate, larger-batch pass")
        self.objective, self.settings, self.current_step = objective, settings, current_step
        interval = old_policy.old_policy_interval if objective.needs_old_logprobs else None
        self.schedule = RoundSchedule(interval, reuse_first_step=old_policy.reuse_first_step)
        self.needs_frozen = objective.needs_old_logprobs or objective.needs_reference_logprobs
        self.frozen: Optional[FrozenWeights] = None
        self.frozen_round: Optional[int] = None  # the round whose first weights the frozen copy holds
        self.routers = None
        self.started = False

    def __call__(self, data_iterator, model):
        return self.forward_step(data_iterator, model, self.current_step())

    def bridge(self, state, data_iterator, model):
        """Megatron-Bridge's form: Bridge passes its ``GlobalState`` to a forward step whose first parameter is
        ``state``."""
        return self.forward_step(data_iterator, model, state.train_state.step)

    def forward_step(self, data_iterator, model, step: int):
        """One micro-batch of optimizer step `step`: the model's output and its loss function."""
        micro_batch = _on_device(next(data_iterator))
        if not self.started:
            self._start(model)
        if self.routers:
            routing.stop(self.routers)  # the previous micro-batch's replay ends here, after its backward
        if not model.training:
            return stage_output(model, micro_batch, self.settings.fused_logprobs), self._loss_func(
                model, micro_batch, ObjectiveConfig("sft"), OldPolicyInputs())
        old = self._old_policy_inputs(model, micro_batch, step)
        output = stage_output(model, micro_batch, self.settings.fused_logprobs)
        if old.old_is_current:  # the round's first weights, read after a forward has gathered every shard
            self._refresh(self.schedule.round_start(step))
        flips = routing.flipped_choices(self.routers, old.routing) if self.routers and old.routing else None
        return output, self._loss_func(model, micro_batch, self.objective, old, flips)

    def _start(self, model) -> None:
        from megatron.core.utils import get_model_config

        check_layout(get_model_config(model))
        if self.needs_frozen:
            self.frozen = FrozenWeights(model)
            parallel.print_rank_last(f"PSFT forward step: a frozen copy of the weights for the "
                                     f"{'old policy' if self.objective.needs_old_logprobs else 'reference'}, "
                                     f"{self.frozen.num_bytes / 2**30:.3f} GiB on this rank")
        if self.settings.tracks_routing and self.needs_frozen:
            self.routers = routing.routers([model])
        self.started = True

    def _old_policy_inputs(self, model, micro_batch: dict, step: int) -> OldPolicyInputs:
        """The old log-probs (or the reference's) of this micro-batch. At a round's first step the live
        weights are the old policy: its training forward's log-probs are the old ones (reuse) or a forward
        of the live weights gives them, after which the copy is refreshed; later steps swap the copy in."""
        if not self.needs_frozen:
            return OldPolicyInputs()
        if self.objective.needs_old_logprobs and self.schedule.old_is_current(step):
            return OldPolicyInputs(old_is_current=True)
        round_start = self.schedule.round_start(step)
        live = step == round_start
        if not live and self.frozen_round != round_start:
            self._start_inside_round(round_start, step)
        logprobs, recorded = self._old_forward(model, micro_batch, live)
        if live:
            self._refresh(round_start)
        if self.settings.replay_routing:
            routing.replay(self.routers, recorded)
        if self.objective.needs_old_logprobs:
            return OldPolicyInputs(old_logprobs=logprobs, routing=recorded)
        return OldPolicyInputs(reference_logprobs=logprobs, routing=recorded)

    def _start_inside_round(self, round_start: int, step: int) -> None:
        """The run starts (or resumes) at `step`, after the first step of its round."""
        if self.schedule.interval is None:
            frozen = "old policy" if self.objective.needs_old_logprobs else "reference"
            raise ValueError(f"resumed at step {step}: the frozen {frozen} is the model the run started from, "
                             "which Megatron's checkpoints do not hold; start from step 0 (--finetune) or use "
                             "megatron-psft's own trainer (python -m megatron_psft.train), whose checkpoints keep it")
        parallel.print_rank_last(f"PSFT: step {step} lies inside the old-policy round that began at step "
                                 f"{round_start}; its remaining steps take the weights at step {step} as their "
                                 "old policy")
        self.frozen.refresh()
        self.frozen_round = round_start

    def _refresh(self, round_start: int) -> None:
        if self.frozen_round != round_start:
            self.frozen.refresh()
            self.frozen_round = round_start

    def _old_forward(self, model, micro_batch: dict, live: bool):
        """Log-probs of the micro-batch's labels under the old policy (the live weights at a round's first
        step, else the frozen copy), without gradient; with routers, the top-k each of them chose."""
        weights = contextlib.nullcontext() if live else self.frozen.swapped_in()
        with torch.no_grad(), weights:
            if self.routers:
                routing.start_recording(self.routers)
            output = stage_output(model, micro_batch, self.settings.fused_logprobs)
            logprobs = output_logprobs(model, micro_batch, self.settings.vocab_size, self.settings.fused_logprobs,
                                       with_entropy=False)(output)
            recorded = routing.recorded(self.routers) if self.routers else None
        if self.routers:
            routing.stop(self.routers)
        return logprobs.float(), recorded

    def _loss_func(self, model, micro_batch: dict, objective: ObjectiveConfig, old: OldPolicyInputs, flips=None):
        vocab_size, fused = self.settings.vocab_size, self.settings.fused_logprobs
        loss_func = make_loss_func(
            objective, micro_batch["labels"], micro_batch["loss_mask"], vocab_size,
            old_logprobs=old.old_logprobs, reference_logprobs=old.reference_logprobs,
            old_is_current=old.old_is_current,
            logprobs_of=output_logprobs(model, micro_batch, vocab_size, fused, with_entropy=True))

        def megatron_loss_func(output):
            loss_sum, num_tokens, metrics = loss_func(output)
            report = megatron_metrics(metrics)
            if flips is not None:
                report["routing_flip_fraction"] = flips
            return loss_sum, num_tokens, report

        return megatron_loss_func


class _RoutingFlag(argparse.Action):
    """A routing flag also builds the routers with Megatron-Core's replay hooks (``moe_enable_routing_replay``,
    which ``core_transformer_config_from_args`` copies into the TransformerConfig)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        namespace.moe_enable_routing_replay = True


def _interval(text: str) -> Optional[int]:
    return None if text == "never" else int(text)


def add_psft_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """PSFT's flags for a Megatron-LM script (its ``extra_args_provider``); defaults are the paper's."""
    group = parser.add_argument_group("PSFT (megatron-psft)")
    group.add_argument("--objective", choices=OBJECTIVES, default="psft")
    for name, default in (("eps-low", 0.2), ("eps-high", 0.28), ("kl-coef", 0.5), ("entropy-top-fraction", 0.2),
                          ("iw-weight-min", 0.2), ("iw-weight-max", 1.8)):
        group.add_argument(f"--{name}", type=float, default=default)
    group.add_argument("--old-policy-interval", type=_interval, default=8,
                       help="optimizer steps per old-policy round, or 'never' (the starting model throughout)")
    group.add_argument("--no-first-step-reuse", dest="reuse_first_step", action="store_false",
                       help="a round's first step takes its old log-probs from a forward of its own instead")
    group.add_argument("--fused-logprobs", choices=("off", "on", "auto"), nargs="?", const="on", default="off",
                       help="log-probs from the final hidden states and the output weight, chunk by chunk; auto: where "
                            "one micro-batch's logits would pass 4 GiB (docs/kernels.md)")
    group.add_argument("--moe-router-replay", action=_RoutingFlag,
                       help="the training forward routes every token as the old policy's forward did")
    group.add_argument("--moe-routing-flip-stats", action=_RoutingFlag,
                       help="report the fraction of the old policy's top-k choices the training forward left")
    parser.set_defaults(moe_enable_routing_replay=False)
    return parser


def _section_from_args(section_type, args: argparse.Namespace):
    from megatron_psft.config.base import key_of

    values = vars(args)
    return section_type.from_dict({key_of(f): values[key_of(f)] for f in fields(section_type) if key_of(f) in values})


def forward_step_from_args(args: argparse.Namespace) -> PsftForwardStep:
    """The forward step of Megatron-LM arguments parsed with :func:`add_psft_arguments`. The vocabulary
    is ``--vocab-size`` when given, else the tokenizer's."""
    vocab_size = args.vocab_size
    if vocab_size is None:
        from megatron.training import get_tokenizer

        vocab_size = get_tokenizer().vocab_size
    fused_logprobs = fused_logprobs_on(args.fused_logprobs, args.seq_length * args.micro_batch_size,
                                       vocab_columns(vocab_size, args.tensor_model_parallel_size),
                                       args.params_dtype.itemsize)  # auto: the trainer's rule, for these shapes
    settings = HookSettings(vocab_size, fused_logprobs=fused_logprobs, replay_routing=args.moe_router_replay,
                            routing_flip_stats=args.moe_routing_flip_stats)
    return PsftForwardStep(_section_from_args(ObjectiveConfig, args), _section_from_args(OldPolicyConfig, args),
                           settings)


# Megatron-LM arguments (as its checkpoints save them) whose values megatron-psft's Qwen3 model cannot honour.
_UNSUPPORTED_ARGUMENTS = {
    "normalization": lambda value: value != "RMSNorm", "qk_layernorm": lambda value: not value,
    "swiglu": lambda value: not value, "add_bias_linear": bool, "add_qkv_bias": bool,
    "position_embedding_type": lambda value: value != "rope", "multi_latent_attention": bool,
    "moe_shared_expert_intermediate_size": bool, "moe_layer_freq": lambda value: value not in (1, None),
    "use_rope_scaling": bool, "rotary_percent": lambda value: value != 1.0,
    "moe_router_score_function": lambda value: value not in ("softmax", None),
}


def hf_config_from_megatron_lm_args(args: argparse.Namespace) -> dict:
    """The Qwen3 / Qwen3-MoE Hugging Face config of the model a Megatron-LM run built from `args` (the
    reverse of examples/megatron_lm/qwen3_moe_flags.py), or ValueError naming what that model cannot be."""
    refused = [name for name, unsupported in _UNSUPPORTED_ARGUMENTS.items()
               if unsupported(getattr(args, name, None))]
    if refused:
        raise ValueError("the Megatron-LM checkpoint's model is not a Qwen3 model megatron-psft builds: "
                         + ", ".join(f"{name}={getattr(args, name, None)!r}" for name in refused))
    if args.vocab_size is None:
        raise ValueError("the Megatron-LM checkpoint's arguments have no --vocab-size (the vocabulary came from its "
                         "tokenizer, padded): the model's HF vocabulary size cannot be told from it")
    config = {
        "architectures": ["Qwen3MoeForCausalLM" if args.num_experts else "Qwen3ForCausalLM"],
        "vocab_size": args.vocab_size, "hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_query_groups if args.group_query_attention else args.num_attention_heads,
        "head_dim": args.kv_channels, "intermediate_size": args.ffn_hidden_size, "rms_norm_eps": args.layernorm_epsilon,
        "rope_theta": float(args.rotary_base), "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
        "initializer_range": args.init_method_std, "hidden_act": "silu", "attention_bias": False,
    }
    if args.num_experts:
        config.update(num_experts=args.num_experts, moe_intermediate_size=args.moe_ffn_hidden_size,
                      num_experts_per_tok=args.moe_router_topk, norm_topk_prob=not args.moe_router_pre_softmax,
                      router_aux_loss_coef=_first(args.moe_aux_loss_coeff))
    return config


def _first(value):
    """Megatron-LM keeps one aux-loss coefficient per load-balancing type, as a list when there are several."""
    return float(value[0] if isinstance(value, (list, tuple)) else value)


def megatron_lm_hf_config(iteration_dir: str) -> dict:
    """The HF config of a Megatron-LM ``torch_dist`` checkpoint, from the arguments it saved."""
    from megatron.core import dist_checkpointing

    args = dist_checkpointing.load_common_state_dict(iteration_dir).get("args")
    if args is None:
        raise FileNotFoundError(f"{iteration_dir} has neither hf_config.json (megatron-psft's checkpoints) nor "
                                "Megatron-LM's saved arguments: its model cannot be told")
    return hf_config_from_megatron_lm_args(args)
