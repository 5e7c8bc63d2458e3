"""Held-out evaluation during training: per named set, the token-mean NLL, the mean entropy and the
token count over its response tokens (loss mask 1), from a forward-only pass through Megatron's
pipeline schedule.

Training cannot tell whether it ran: the pass is the old-policy pass's forward under
``torch.no_grad``, where Megatron's router records no aux loss and updates no expert bias, and the
model has no dropout (models/qwen3_moe), so no random number is drawn and no gradient buffer,
optimizer or RNG state is touched.

Exact under every layout: the sums of NLL and entropy and the token count are summed over the
micro-batches and data-parallel ranks on the last pipeline stage, then shared with every stage
(:func:`megatron_psft.engine.step.reduce_over_stages`), so every rank returns the same numbers. Batches
are reduced one at a time and accumulated on the host in float64: Megatron's metric reduction is
fp32, which counts tokens exactly only up to 2**24, a bound a whole evaluation set can pass.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from megatron_psft.platform import parallel
from megatron_psft.data.batching import Batching, rank_micro_batches
from megatron_psft.data import SFTDataset
from megatron_psft.engine.step import micro_batch_multiple, output_logprobs, reduce_over_stages, run_schedule, stage_output

@dataclass(frozen=True)
class EvalSettings:
    """How evaluation batches a set: its stored order, `global_batch_size` samples per batch (the
    last may be short), the first `eval_iters` batches (None: the whole set), padded or packed into
    micro-batches as training does (:mod:`megatron_psft.data.batching`); log-probs from the logits or, with
    `fused_logprobs`, fused with the output layer as training takes them."""

    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    eval_iters: Optional[int] = None
    pack: bool = False
    fused_logprobs: bool = False

    def __post_init__(self):
        if self.eval_iters is not None and self.eval_iters < 1:
            raise ValueError(f"--eval-iters must be at least 1 (or left out for the whole set), got {self.eval_iters}")

    @classmethod
    def of(cls, config) -> "EvalSettings":
        """A run's evaluation settings: its batch shapes, --eval-iters and --fused-logprobs."""
        data = config.data
        return cls(data.seq_length, data.micro_batch_size, data.global_batch_size, config.evaluation.eval_iters,
                   data.pack_sequences, config.model.fused_logprobs)


@dataclass(frozen=True)
class EvalResult:
    nll: Optional[float]  # token mean of -log p(label); None when the evaluated samples hold no response token
    entropy: Optional[float]  # token mean of the full-vocabulary entropy (nats)
    tokens: int  # response tokens evaluated


def eval_batches(num_samples: int, global_batch_size: int, eval_iters: Optional[int] = None) -> List[range]:
    """The global sample indices of each evaluation batch: the set in its stored order."""
    batches = [range(start, min(start + global_batch_size, num_samples))
               for start in range(0, num_samples, global_batch_size)]
    return batches if eval_iters is None else batches[:eval_iters]


def evaluate(model_chunks, datasets: Dict[str, SFTDataset], settings: EvalSettings,
             vocab_size: int) -> Dict[str, EvalResult]:
    """Evaluate `model_chunks` (this rank's chunks, DDP-wrapped as the trainer holds them) on each
    named set. Every rank must call it with the same sets; every rank gets the same results."""
    return {name: _evaluate_set(model_chunks, dataset, settings, vocab_size) for name, dataset in datasets.items()}


def _evaluate_set(model_chunks, dataset: SFTDataset, settings: EvalSettings, vocab_size: int) -> EvalResult:
    def loss_func(logprobs_of, loss_mask, output):
        logprobs, entropy = logprobs_of(output)
        mask = loss_mask.float()
        sums = {"nll_total": -(logprobs * mask).sum(), "entropy_total": (entropy * mask).sum(),
                "tokens_total": mask.sum()}
        return sums["nll_total"], torch.tensor(0, dtype=torch.int), sums

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        output = stage_output(model, micro_batch, settings.fused_logprobs)
        logprobs_of = output_logprobs(model, micro_batch, vocab_size, settings.fused_logprobs, with_entropy=True)
        return output, lambda output: loss_func(logprobs_of, micro_batch["loss_mask"], output)

    batching = Batching(settings.seq_length, settings.micro_batch_size, dataset.meta["pad_id"], settings.pack,
                        micro_batch_multiple=micro_batch_multiple(model_chunks))
    totals = {"nll_total": 0.0, "entropy_total": 0.0, "tokens_total": 0.0}
    for indices in eval_batches(len(dataset), settings.global_batch_size, settings.eval_iters):
        micro_batches = rank_micro_batches(dataset, indices, batching, parallel.device())
        with torch.no_grad():
            per_microbatch = run_schedule(model_chunks, micro_batches, forward_step, forward_only=True)
        batch = reduce_over_stages(per_microbatch)
        for key in totals:
            totals[key] += batch[key]
    tokens = int(totals["tokens_total"])
    if tokens == 0:
        return EvalResult(None, None, 0)
    return EvalResult(totals["nll_total"] / tokens, totals["entropy_total"] / tokens, tokens)
