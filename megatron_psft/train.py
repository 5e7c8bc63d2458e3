"""The PSFT training entry point: ``torchrun ... -m megatron_psft.train [flags]``.

flags -> :class:`~megatron_psft.config.TrainConfig` (:mod:`megatron_psft.config.flags`) -> a
:class:`~megatron_psft.launch.Launch` resolved once (:mod:`megatron_psft.launch`) -> :class:`Trainer`.
One step reads top-down: this rank's micro-batches of the global batch (:mod:`megatron_psft.data.batching`)
-> the old-policy or reference log-probs the objective needs (:mod:`megatron_psft.psft.old_policy`) ->
forward, log-probs, objective and Megatron's schedule (:func:`megatron_psft.engine.step.train_step`) ->
metrics -> checkpoint.
"""

import os
import sys
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_psft import checkpoint
from megatron_psft.platform import parallel
from megatron_psft.psft import routing
from megatron_psft.observability.clipped_tokens import ClippedTokensWriter, path_next_to
from megatron_psft.config import ObjectiveConfig
from megatron_psft.data.batching import Batching, rank_micro_batches
from megatron_psft.engine.evaluation import EvalSettings, evaluate
from megatron_psft.launch import Launch, parse_launch
from megatron_psft.observability.logger import MetricsLogger
from megatron_psft.observability.metrics import model_flops_per_token, step_record
from megatron_psft.models.qwen3_moe import build_model_chunks
from megatron_psft.psft.old_policy import OldPolicy, PolicyPasses, RoundSchedule, freeze_copy
from megatron_psft.engine.optimizer import build_optimizer, wrap_with_ddp
from megatron_psft.plan import format_plan
from megatron_psft.platform.precision import parse_dtype
from megatron_psft.observability.run_config import run_config, write_run_config
from megatron_psft.engine.step import micro_batch_multiple, train_step
from megatron_psft.engine.stopping import ExitConditions
from megatron_psft.observability.timers import Profiler, Timers


class Trainer:
    """Holds the policy, its optimizer, the old policy and the data position of one training run."""

    def __init__(self, launch: Launch):
        self.launch, self.config = launch, launch.config
        config, model_config = launch.config, launch.config.model
        self.model_args, self.transformer_config = launch.model_args, launch.transformer_config
        parallel.initialize(launch.layout, seed=config.training.seed)
        if launch.weights_from and launch.weights_from == config.checkpoint.load:
            why = "--finetune" if config.checkpoint.finetune else "it holds weights only (no trainer state)"
            parallel.print_rank_last(f"starting from the weights of {config.checkpoint.load} at step 0: {why}")
        self.dataset, self.eval_sets = launch.train_set, launch.eval_sets
        self.objective = config.objective

        chunks = build_model_chunks(self.model_args, self.transformer_config)
        if launch.weights_from:
            checkpoint.load_model(launch.weights_from, chunks)
        # A frozen copy of the starting weights: the reference of sft-kl / iw-sft, or the never-refreshed old policy.
        needs_frozen = self.objective.needs_reference_logprobs or (
            self.objective.needs_old_logprobs and config.old_policy.old_policy_interval is None)
        self.frozen = build_model_chunks(self.model_args, self.transformer_config) if needs_frozen else None
        if self.frozen:
            freeze_copy(chunks, self.frozen)
        track_routing = self.model_args.is_moe and model_config.tracks_routing
        self.routers = routing.routers(chunks) if track_routing else None

        self.batching = Batching(config.data.seq_length, config.data.micro_batch_size, self.dataset.meta["pad_id"],
                                 pack=config.data.pack_sequences, micro_batch_multiple=micro_batch_multiple(chunks))
        self.model = wrap_with_ddp(chunks, self.transformer_config, config.optimizer)
        self.optimizer, self.scheduler = build_optimizer(self.model, config.optimizer,
                                                         parse_dtype(model_config.params_dtype), config.training.train_iters)
        self.old_policy = OldPolicy(RoundSchedule.of(config))
        self.passes = PolicyPasses(self.model, self.frozen, self.routers,
                                   routing.routers(self.frozen) if track_routing and self.frozen else None,
                                   self.old_policy, self.micro_batches, self.batching, config, self.model_args.vocab_size)
        self.resumed = bool(launch.resume_from)
        self.step = checkpoint.resume(launch.resume_from, config, self.model, self.optimizer, self.scheduler,
                                      self.frozen, self.old_policy) if self.resumed else 0
        self._start_reporting()

    def _start_reporting(self) -> None:
        config = self.config
        self.flops_per_token = model_flops_per_token(self.model_args, config.data.seq_length)
        self.timers = Timers(config.logging.timing_log_level, nvtx=config.logging.profile and torch.cuda.is_available())
        self.run_config = run_config(config, self.transformer_config, self.launch.platform, dist.get_world_size())
        resumed_step = self.step if self.resumed else None
        if config.checkpoint.save and dist.get_rank() == 0:
            write_run_config(config.checkpoint.save, self.run_config)
        self.logger = MetricsLogger.from_config(config, self.run_config, resumed_step)
        metrics_file = config.logging.metrics_file
        self.clipped_tokens = (ClippedTokensWriter(path_next_to(metrics_file), resumed_step)
                               if config.logging.log_clipped_tokens and self.logger.active and metrics_file else None)
        self.memory_reported = False
        self.background_saves = checkpoint.BackgroundSaves() if config.checkpoint.async_save else None

    def global_batch(self, step: int) -> List[int]:
        """The sample indices of global batch `step`."""
        return self.dataset.batch_indices(step, self.config.data.global_batch_size, self.config.training.seed)

    def rank_share(self, indices: List[int]) -> List[dict]:
        """This data-parallel rank's share of a global batch's `indices`, as micro-batches."""
        return rank_micro_batches(self.dataset, indices, self.batching, parallel.device())

    def micro_batches(self, step: int) -> List[dict]:
        """This data-parallel rank's share of global batch `step` (what the old-policy look-ahead reads)."""
        return self.rank_share(self.global_batch(step))

    def train_one_step(self) -> dict:
        config, step = self.config, self.step
        in_warmup = step < config.training.sft_warmup_steps
        objective = ObjectiveConfig("sft") if in_warmup else self.objective
        start = time.perf_counter()
        with self.timers("data"):
            indices = self.global_batch(step)
            micro_batches = self.rank_share(indices)
        with self.timers("old-policy"):
            self.passes.attach(step, objective, micro_batches)
        if config.training.sft_warmup_lr is not None:  # one schedule over the run; its peak differs per phase
            for group in self.optimizer.param_groups:
                group["max_lr"] = config.training.sft_warmup_lr if in_warmup else config.optimizer.lr
        result = train_step(self.model, self.optimizer, self.scheduler, micro_batches, objective,
                            self.model_args.vocab_size, token_histograms=config.logging.log_clipped_tokens,
                            routers=self.routers, replay_routing=config.model.moe_router_replay, timers=self.timers,
                            fused_logprobs=config.model.fused_logprobs)
        seconds = time.perf_counter() - start
        self.step += 1
        record = step_record(result, micro_batches, objective, "sft-warmup" if in_warmup else objective.name, seconds,
                             self.old_policy, self.launch, self.flops_per_token)
        clipped = record.pop("clipped_token_counts_total", None)
        response = record.pop("response_token_counts_total", None)
        if clipped is not None and self.clipped_tokens:
            self.clipped_tokens.write(self.step, clipped, response)
        record.update(self.dataset.batch_counts(indices))
        record.update(self.timers.collect())
        if not self.memory_reported:
            self.memory_reported = True
            self.logger.note(f"memory after the first step (worst rank): {record['memory/peak_gib']:.2f} GiB peak, "
                             f"{record['memory/reserved_gib']:.2f} GiB reserved; the plan estimated "
                             f"{self.launch.memory_estimate()['total']:.2f} GiB (--dry-run)")
        straggler = self.timers.straggler(config.logging.straggler_factor)
        if straggler:
            self.logger.note(straggler)
        self.logger.log(step, record)
        return record

    def run_evaluation(self) -> None:
        """Each --eval-data-prefix set at the current weights; forward-only, so training is unchanged."""
        if not self.eval_sets:
            return
        start = time.perf_counter()
        results = evaluate(self.model, self.eval_sets, EvalSettings.of(self.config), self.model_args.vocab_size)
        self.logger.log_eval(self.step, results, time.perf_counter() - start)

    def save(self) -> str:
        root = self.config.checkpoint.save
        with self.timers("save"):
            path = checkpoint.save(
                root, self.step, self.model, self.launch.hf_config, self.optimizer, self.scheduler,
                trainer_state=checkpoint.trainer_state(self.config, self.step, dist.get_world_size(), self.optimizer),
                rank_state=checkpoint.capture_rank_state(self.old_policy.state_dict()),
                frozen_chunks=self.frozen, run_config=self.run_config, background=self.background_saves)
        if dist.get_rank() == 0:
            write_run_config(root, self.run_config)
        parallel.print_rank_last(f"{'writing' if self.background_saves else 'saved'} checkpoint {path}")
        return path

    def run(self) -> None:
        training, settings, logging = self.config.training, self.config.checkpoint, self.config.logging
        saved_step = self.step if self.resumed else None  # a checkpoint of this step exists already
        exit_conditions = ExitConditions(training.exit_signal_handler, training.exit_duration_in_mins)
        profiler = Profiler(logging.profile_step_start, logging.profile_step_end,
                            logging.profile_dir or os.path.join(settings.save, "profile")) if logging.profile else None
        if self.step == 0 and not self.resumed:
            self.run_evaluation()
        while self.step < training.train_iters:
            if profiler:
                profiler.before_step(self.step + 1)
            self.train_one_step()
            if profiler:
                profiler.after_step(self.step)
            if self.background_saves:  # publish a save written in the background once every rank has written it
                self.background_saves.poll()
            # Before any save, so a run resumed from this step has its evaluation already, as an uninterrupted run.
            interval = self.config.evaluation.eval_interval
            if self.step == training.train_iters or (interval and self.step % interval == 0):
                self.run_evaluation()
            if training.exit_interval and self.step % training.exit_interval == 0:
                break
            if settings.save and settings.save_interval and self.step % settings.save_interval == 0:
                self.save()
                saved_step = self.step
            reason = exit_conditions.reason()
            if reason:
                parallel.print_rank_last(f"stopping after step {self.step}: {reason}")
                break
        if settings.save and saved_step != self.step:
            self.save()
        if self.background_saves:
            self.background_saves.wait()
        self.logger.close()
        if self.clipped_tokens:
            self.clipped_tokens.close()


def main(argv: Optional[List[str]] = None) -> None:
    launch = parse_launch(argv)
    if launch.planned:
        print(format_plan(launch))
        sys.exit(0)
    trainer = Trainer(launch)
    trainer.run()
    parallel.destroy()


if __name__ == "__main__":
    main()
