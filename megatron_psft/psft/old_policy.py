"""The old policy of PSFT: its refresh schedule and the log-probs it gives the training steps.

Every `interval` optimizer steps a round starts: a forward-only pass with the current weights over
the data of the round's steps keeps their log-probs as ``old_logprobs`` (on the last pipeline stage,
where the loss needs them). The first step of a round needs no pass: its weights are the old
policy, so the training forward's own log-probs are the old ones, exactly. With ``interval=None``
the old policy is never refreshed: it stays the model as PSFT began (the paper's fixed-reference
ablation), kept as a frozen copy.
"""

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from megatron_psft.platform import parallel
from megatron_psft.data.batching import regroup
from megatron_psft.engine.optimizer import unwrap
from megatron_psft.engine.step import forward_only_pass, policy_logprobs


@dataclass(frozen=True)
class OldPolicyOutputs:
    """What a training step gets from the old policy: per micro-batch, the old log-probs (last stage) and
    the recorded routing; or nothing, when the step's weights are the old policy (a round's first step
    with reuse) and its training forward's own log-probs, detached, are the old ones."""

    per_micro_batch: Optional[List[dict]] = None

    @property
    def old_is_current(self) -> bool:
        return self.per_micro_batch is None


@dataclass(frozen=True)
class RoundSchedule:
    interval: Optional[int]  # optimizer steps per round; None: never refresh
    first_step: int = 0  # the first PSFT step (after any SFT warm-up)
    reuse_first_step: bool = True
    end_step: Optional[int] = None  # the run's last step + 1: no pass for data that is never trained

    def __post_init__(self):
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"old-policy interval must be >= 1 or 'never', got {self.interval}")

    @classmethod
    def of(cls, config) -> "RoundSchedule":
        """A run's schedule: its old-policy settings, PSFT starting after the SFT warm-up, ending with the run."""
        return cls(config.old_policy.old_policy_interval, config.training.sft_warmup_steps,
                   config.old_policy.reuse_first_step, end_step=config.training.train_iters)

    def round_start(self, step: int) -> int:
        if self.interval is None:
            return self.first_step
        return self.first_step + (step - self.first_step) // self.interval * self.interval

    def round_steps(self, step: int) -> range:
        start = self.round_start(step)
        end = start + self.interval
        return range(start, end if self.end_step is None else min(end, self.end_step))

    def old_is_current(self, step: int) -> bool:
        return self.reuse_first_step and step == self.round_start(step)


class OldPolicy:
    """Old-policy outputs per step, per micro-batch: computed at round starts, handed out step by step.

    ``compute(step)`` runs the forward-only pass of one step's micro-batches with the policy that is
    current when called and returns, per micro-batch, what the training step needs from it (the
    log-probs on the last stage; the routing, when recorded).
    """

    def __init__(self, schedule: RoundSchedule):
        self.schedule = schedule
        self.outputs: Dict[int, List[dict]] = {}
        self.last_pass_seconds = 0.0
        self.last_pass_steps = 0  # global batches the last for_step call ran forward-only

    def for_step(self, step: int, compute: Callable[[int], List[dict]],
                 compute_frozen: Optional[Callable[[int], List[dict]]] = None) -> OldPolicyOutputs:
        """The old-policy outputs of `step`; runs the round's pass when one is due."""
        self.last_pass_seconds, self.last_pass_steps = 0.0, 0
        if self.schedule.old_is_current(step):
            self.outputs.clear()
            if self.schedule.interval is not None:
                self._run_pass([s for s in self.schedule.round_steps(step) if s != step], compute)
            return OldPolicyOutputs()
        if self.schedule.interval is None:
            if compute_frozen is None:
                raise ValueError("a never-refreshed old policy needs its frozen copy")
            self._run_pass([step], compute_frozen)
        elif step not in self.outputs:
            # A round start without reuse, or a resume whose checkpoint had no pass for this step.
            self.outputs.clear()
            self._run_pass([s for s in self.schedule.round_steps(step) if s >= step], compute)
        return OldPolicyOutputs(self.outputs.pop(step))

    def _run_pass(self, steps: List[int], compute) -> None:
        start = time.perf_counter()
        for step in steps:
            self.outputs[step] = compute(step)
        self.last_pass_seconds = time.perf_counter() - start
        self.last_pass_steps = len(steps)

    def state_dict(self) -> dict:
        return {"outputs": dict(self.outputs)}

    def load_state_dict(self, state: dict) -> None:
        self.outputs = dict(state["outputs"])


def freeze_copy(source_chunks, target_chunks) -> None:
    """Copy the weights of `source_chunks` (wrapped or not) into `target_chunks` (same layout) and freeze
    them: the never-refreshed old policy, or sft-kl's and iw-sft's reference."""
    with torch.no_grad():
        for source, target in zip(source_chunks, target_chunks):
            target.load_state_dict(unwrap(source).state_dict(), strict=True)
            target.eval()
            for param in target.parameters():
                param.requires_grad_(False)


class PolicyPasses:
    """The forward-only passes a step's objective needs beside its training forward: the old policy's
    log-probs (and routing, when tracked), on the round's schedule; the frozen reference's log-probs
    (sft-kl, iw-sft). `read_step(step)` gives this rank's micro-batches of global batch `step`."""

    def __init__(self, model, frozen, routers, frozen_routers, schedule: OldPolicy, read_step, batching,
                 config, vocab_size: int):
        self.model, self.frozen, self.routers, self.frozen_routers = model, frozen, routers, frozen_routers
        self.schedule, self.read_step, self.batching, self.vocab_size = schedule, read_step, batching, vocab_size
        self.settings, self.micro_batch_size = config.old_policy, config.data.micro_batch_size
        self.fused_logprobs, self.first_psft_step = config.model.fused_logprobs, config.training.sft_warmup_steps

    def _old_policy_pass(self, chunks, routers, step: int) -> List[dict]:
        """The old policy's log-probs (and routing) for step `step`'s micro-batches, computed in micro-batches
        of --old-policy-micro-batch-size rows."""
        micro_batches = self.read_step(step)
        rows = self.settings.old_policy_micro_batch_size or self.micro_batch_size
        if rows == self.micro_batch_size:
            return forward_only_pass(chunks, micro_batches, self.vocab_size, routers, fused_logprobs=self.fused_logprobs)
        results = forward_only_pass(chunks, regroup(micro_batches, rows, self.batching), self.vocab_size,
                                    fused_logprobs=self.fused_logprobs)
        if not parallel.is_last_stage():
            return [{} for _ in micro_batches]
        logprobs = torch.cat([result["logprobs"] for result in results]).split(self.micro_batch_size)
        return [{"logprobs": values} for values in logprobs[:len(micro_batches)]]

    def attach(self, step: int, objective, micro_batches: List[dict]) -> None:
        """Put into each micro-batch the old-policy (or reference) log-probs and routing its objective needs."""
        if objective.needs_old_logprobs:
            never_refreshed = self.settings.old_policy_interval is None
            if step == self.first_psft_step and self.frozen and never_refreshed:
                freeze_copy(self.model, self.frozen)  # the fixed old policy is the model as PSFT begins
            old = self.schedule.for_step(step, lambda s: self._old_policy_pass(self.model, self.routers, s),
                                         lambda s: self._old_policy_pass(self.frozen, self.frozen_routers, s))
            for index, micro_batch in enumerate(micro_batches):
                if old.old_is_current:
                    micro_batch["old_is_current"] = True
                else:
                    micro_batch["old_logprobs"] = old.per_micro_batch[index].get("logprobs")  # None off the last stage
                    micro_batch["old_routing"] = old.per_micro_batch[index].get("routing")
        if objective.needs_reference_logprobs:
            reference = policy_logprobs(self.frozen, micro_batches, self.vocab_size, fused_logprobs=self.fused_logprobs)
            for micro_batch, logprobs in zip(micro_batches, reference or []):
                micro_batch["reference_logprobs"] = logprobs
