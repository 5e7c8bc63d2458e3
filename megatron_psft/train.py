"""The PSFT training entry point: ``torchrun ... -m megatron_psft.train [flags]``.

One step reads top-down: this rank's micro-batches of the global batch (:mod:`megatron_psft.data.batching`)
-> the old-policy or reference log-probs the objective needs (:mod:`megatron_psft.old_policy`) ->
forward, log-probs, objective and Megatron's schedule (:func:`megatron_psft.step.train_step`) ->
metrics -> checkpoint. The flags and their resolution live in :mod:`megatron_psft.arguments`; the
parallel groups, the model, the optimizer and checkpoints come from Megatron-Core.
"""

import argparse
import os
import sys
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_psft import checkpoint, parallel, routing
from megatron_psft import platform as platforms
from megatron_psft.arguments import (load_datasets, objective_config, optim_config, parse_args,
                                     resolve_run, run_platform)
from megatron_psft.clipped_tokens import ClippedTokensWriter, path_next_to
from megatron_psft.data import global_batch_indices
from megatron_psft.data.batching import Batching, rank_micro_batches, regroup
from megatron_psft.evaluation import EvalSettings, evaluate
from megatron_psft.logger import MetricsLogger
from megatron_psft.memory import memory_record
from megatron_psft.metrics import global_real_tokens, model_flops_per_token, moe_load_balance, throughput
from megatron_psft.models.qwen3_moe import build_model_chunks
from megatron_psft.objectives import ObjectiveConfig
from megatron_psft.old_policy import OldPolicy, RoundSchedule, freeze_copy
from megatron_psft.optimizer import build_optimizer, wrap_with_ddp
from megatron_psft.plan import Sizes, format_plan, memory_per_gpu
from megatron_psft.precision import parse_dtype
from megatron_psft.run_config import run_config, write_run_config
from megatron_psft.step import forward_only_pass, micro_batch_multiple, policy_logprobs, train_step
from megatron_psft.stopping import ExitConditions
from megatron_psft.timers import Profiler, Timers


class Trainer:
    """Holds the policy, its optimizer, the old policy and the data position of one training run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        run = resolve_run(args)
        self.layout, self.hf_config, self.model_args = run.layout, run.hf_config, run.model_args
        self.transformer_config = run.transformer_config
        parallel.initialize(self.layout, seed=args.seed)
        if run.weights_from and run.weights_from == args.load:
            why = "--finetune" if args.finetune else "it holds weights only (no trainer state)"
            parallel.print_rank_last(f"starting from the weights of {args.load} at step 0: {why}")
        self.dataset, self.eval_sets = load_datasets(args, self.model_args)
        self.objective = objective_config(args)

        chunks = build_model_chunks(self.model_args, self.transformer_config)
        if run.weights_from:
            checkpoint.load_model(run.weights_from, chunks)
        # A frozen copy of the starting weights: the reference of sft-kl / iw-sft, or the never-refreshed old policy.
        needs_frozen = self.objective.needs_reference_logprobs or (
            self.objective.needs_old_logprobs and args.old_policy_interval is None)
        self.frozen = build_model_chunks(self.model_args, self.transformer_config) if needs_frozen else None
        if self.frozen:
            freeze_copy(chunks, self.frozen)
        track_routing = self.model_args.is_moe and (args.moe_router_replay or args.moe_routing_flip_stats)
        self.routers = routing.routers(chunks) if track_routing else None
        self.frozen_routers = routing.routers(self.frozen) if track_routing and self.frozen else None

        self.batching = Batching(args.seq_length, args.micro_batch_size, self.dataset.meta["pad_id"],
                                 pack=args.pack_sequences, micro_batch_multiple=micro_batch_multiple(chunks))
        optim = optim_config(args)
        self.model = wrap_with_ddp(chunks, self.transformer_config, optim)
        self.optimizer, self.scheduler = build_optimizer(self.model, optim, parse_dtype(args.params_dtype), args.train_iters)
        self.old_policy = OldPolicy(RoundSchedule(args.old_policy_interval, args.sft_warmup_steps, args.reuse_first_step,
                                                  end_step=args.train_iters))
        self.step = 0
        self.resumed = bool(run.resume_from)
        if self.resumed:
            self.step = checkpoint.resume(run.resume_from, args, self.model, self.optimizer, self.scheduler,
                                          self.frozen, self.old_policy)
        self.flops_per_token = model_flops_per_token(self.model_args, args.seq_length)
        self.timers = Timers(args.timing_log_level, nvtx=args.profile and torch.cuda.is_available())
        self.run_config = run_config(args, self.transformer_config, platforms.current(), dist.get_world_size())
        resumed_step = self.step if self.resumed else None
        if args.save and dist.get_rank() == 0:
            write_run_config(args.save, self.run_config)
        self.logger = MetricsLogger.from_args(args, self.run_config, resumed_step)
        self.clipped_tokens = None
        if args.log_clipped_tokens and self.logger.active and args.metrics_file:
            self.clipped_tokens = ClippedTokensWriter(path_next_to(args.metrics_file), resumed_step)
        self.memory_reported = False

    # --- data ---------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> List[dict]:
        """This data-parallel rank's share of global batch `step`, as micro-batches."""
        indices = global_batch_indices(len(self.dataset), self.args.global_batch_size, step, self.args.seed)
        return rank_micro_batches(self.dataset, indices, self.batching, parallel.device())

    def _old_policy_pass(self, chunks, routers, step):
        """The old policy's log-probs (and routing) for step `step`'s micro-batches, computed in micro-batches
        of --old-policy-micro-batch-size rows."""
        micro_batches = self.micro_batches(step)
        rows = self.args.old_policy_micro_batch_size or self.args.micro_batch_size
        if rows == self.args.micro_batch_size:
            return forward_only_pass(chunks, micro_batches, self.model_args.vocab_size, routers,
                                     fused_logprobs=self.args.fused_logprobs)
        results = forward_only_pass(chunks, regroup(micro_batches, rows, self.batching), self.model_args.vocab_size,
                                    fused_logprobs=self.args.fused_logprobs)
        if not parallel.is_last_stage():
            return [{} for _ in micro_batches]
        logprobs = torch.cat([result["logprobs"] for result in results]).split(self.args.micro_batch_size)
        return [{"logprobs": values} for values in logprobs[:len(micro_batches)]]

    def _attach_old_policy(self, step: int, objective: ObjectiveConfig, micro_batches: List[dict]) -> None:
        """The old-policy (or reference) log-probs and routing each micro-batch's objective needs."""
        args = self.args
        if objective.needs_old_logprobs:
            if step == args.sft_warmup_steps and self.frozen and args.old_policy_interval is None:
                freeze_copy(self.model, self.frozen)  # the fixed old policy is the model as PSFT begins
            old = self.old_policy.for_step(step, lambda s: self._old_policy_pass(self.model, self.routers, s),
                                           lambda s: self._old_policy_pass(self.frozen, self.frozen_routers, s))
            for index, micro_batch in enumerate(micro_batches):
                if old.old_is_current:
                    micro_batch["old_is_current"] = True
                else:
                    micro_batch["old_logprobs"] = old.per_micro_batch[index].get("logprobs")  # None off the last stage
                    micro_batch["old_routing"] = old.per_micro_batch[index].get("routing")
        if objective.needs_reference_logprobs:
            reference = policy_logprobs(self.frozen, micro_batches, self.model_args.vocab_size,
                                        fused_logprobs=args.fused_logprobs)
            for micro_batch, logprobs in zip(micro_batches, reference or []):
                micro_batch["reference_logprobs"] = logprobs

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
                            routers=self.routers, replay_routing=args.moe_router_replay, timers=self.timers,
                            fused_logprobs=args.fused_logprobs)
        seconds = time.perf_counter() - start
        self.step += 1

        record = dict(result.metrics)
        clipped = record.pop("clipped_token_counts_total", None)
        response = record.pop("response_token_counts_total", None)
        if clipped is not None and self.clipped_tokens:
            self.clipped_tokens.write(self.step, clipped, response)
        # Every rank computes as many rows; the old-policy and reference passes are one forward each.
        rows = len(micro_batches) * args.micro_batch_size * parallel.data_size()
        forward_passes = 3 + self.old_policy.last_pass_steps + objective.needs_reference_logprobs
        record.update(
            phase="sft-warmup" if in_warmup else objective.name,
            grad_norm=result.grad_norm,
            learning_rate=result.learning_rate,
            step_time_s=seconds,
            old_policy_s=self.old_policy.last_pass_seconds if objective.needs_old_logprobs else 0.0,
            routing_flip_fraction=result.routing_flip_fraction,
            **throughput(global_real_tokens(micro_batches), rows, args.seq_length, forward_passes,
                         self.flops_per_token, seconds),
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

    def run_evaluation(self) -> None:
        """Each --eval-data-prefix set at the current weights; forward-only, so training is unchanged."""
        if not self.eval_sets:
            return
        start = time.perf_counter()
        results = evaluate(self.model, self.eval_sets, EvalSettings.from_args(self.args), self.model_args.vocab_size)
        self.logger.log_eval(self.step, results, time.perf_counter() - start)

    # --- checkpoints --------------------------------------------------------------------------------
    def save(self) -> str:
        with self.timers("save"):
            path = checkpoint.save(
                self.args.save, self.step, self.model, self.hf_config, self.optimizer, self.scheduler,
                trainer_state=checkpoint.trainer_state(self.args, self.step),
                rank_state=checkpoint.capture_rank_state(self.old_policy.state_dict()),
                frozen_chunks=self.frozen, run_config=self.run_config)
        if dist.get_rank() == 0:
            write_run_config(self.args.save, self.run_config)
        parallel.print_rank_last(f"saved checkpoint {path}")
        return path

    # --- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        args = self.args
        saved_step = self.step if self.resumed else None  # a checkpoint of this step exists already
        exit_conditions = ExitConditions(args.exit_signal_handler, args.exit_duration_in_mins)
        profiler = Profiler(args.profile_step_start, args.profile_step_end,
                            args.profile_dir or os.path.join(args.save, "profile")) if args.profile else None
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
        if self.clipped_tokens:
            self.clipped_tokens.close()


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
