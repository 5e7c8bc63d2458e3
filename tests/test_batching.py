"""Batching a global batch into this rank's micro-batches, padded or packed (megatron_psft/batching.py),
and what packing must not change: every sample's per-token log-probs equal the padded ones."""

import numpy as np
import pytest
import torch

from distributed import run_distributed
from megatron_psft.data.batching import (Batching, pack_order, rank_micro_batches, regroup, sample_boundaries,
                                   shares_of_data_ranks)

PAD = 0


class Samples:
    """A dataset of random samples: ``dataset[i]`` and ``sample_length(i)`` as SFTDataset has them."""

    def __init__(self, lengths, vocab=100, seed=0):
        rng = np.random.default_rng(seed)
        self.samples = []
        for length in lengths:
            ids = rng.integers(1, vocab, size=length)
            mask = np.zeros(length, dtype=bool)
            mask[rng.integers(1, length):] = True  # a prompt, then the response
            self.samples.append((ids, mask))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def sample_length(self, i):
        return len(self.samples[i][0])


def _trained_positions(micro_batches):
    """{(first token id, sample length in positions, position): (token, label)} over all trained positions."""
    seen = {}
    for micro_batch in micro_batches:
        for row in range(len(micro_batch["tokens"])):
            segments = micro_batch["segment_ids"][row]
            for segment in segments[segments >= 0].unique().tolist():
                where = (segments == segment).nonzero().flatten()
                tokens, labels = micro_batch["tokens"][row, where], micro_batch["labels"][row, where]
                assert micro_batch["position_ids"][row, where].tolist() == list(range(len(where)))
                for position, (token, label, trained) in enumerate(zip(tokens, labels, micro_batch["loss_mask"][row, where])):
                    if trained:
                        seen[(int(tokens[0]), len(where), position)] = (int(token), int(label))
    return seen


def test_padded_shares_are_the_contiguous_slices_of_before():
    assert shares_of_data_ranks(list(range(8)), [5] * 8, 4, packed=False) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert shares_of_data_ranks(list(range(5)), [5] * 5, 2, packed=False) == [[0, 1, 2], [3, 4]]


def test_packed_shares_balance_tokens_and_hold_every_sample_once():
    rng = np.random.default_rng(1)
    lengths = rng.lognormal(4, 1, size=64).astype(int) + 2
    indices = list(rng.permutation(1000)[:64])
    shares = shares_of_data_ranks(indices, list(lengths), 4, packed=True)
    assert sorted(i for share in shares for i in share) == sorted(indices)
    length_of = dict(zip(indices, lengths))
    loads = [sum(length_of[i] for i in share) for share in shares]
    # Longest-first to the least-loaded rank: no rank exceeds another by more than the longest sample.
    assert max(loads) - min(loads) <= max(lengths)
    assert shares == shares_of_data_ranks(indices, list(lengths), 4, packed=True)  # deterministic


def test_pack_order_is_first_fit_decreasing_and_fills_rows():
    lengths = [9, 5, 5, 4, 3, 2]  # positions: 8, 4, 4, 3, 2, 1
    rows = pack_order(list(range(6)), lengths, seq_length=8)
    assert rows == [[0], [1, 2], [3, 4, 5]]
    with_room = pack_order([0, 1, 2], [5, 9, 5], seq_length=12)  # 4 + 8 fill a row; the last 4 starts a new one
    assert with_room == [[1, 0], [2]]


def test_sample_boundaries_split_rows_and_samples():
    segments = torch.tensor([[0, 0, 1, -1], [2, 2, 2, 2], [-1, -1, -1, -1]])
    assert sample_boundaries(segments) == [0, 2, 3, 4, 8, 12]


@pytest.mark.parametrize("packed", [False, True])
def test_every_rank_gets_the_same_number_of_micro_batches_and_all_samples_once(packed):
    rng = np.random.default_rng(2)
    dataset = Samples(list(rng.integers(2, 40, size=30)))
    batching = Batching(seq_length=40, micro_batch_size=2, pad_id=PAD, pack=packed)
    indices = list(rng.permutation(30)[:13])  # an uneven batch: like the last eval batch
    per_rank = [rank_micro_batches(dataset, indices, batching, data_rank=rank, data_size=3) for rank in range(3)]
    assert len({len(micro_batches) for micro_batches in per_rank}) == 1
    samples_held = 0
    for micro_batches in per_rank:
        for micro_batch in micro_batches:
            assert micro_batch["tokens"].shape == (2, 40)
            assert (micro_batch["loss_mask"][micro_batch["segment_ids"] < 0] == 0).all()
            assert (micro_batch["labels"][micro_batch["segment_ids"] < 0] == PAD).all()
            samples_held += sum(len(row[row >= 0].unique()) for row in micro_batch["segment_ids"])
            if packed:
                assert micro_batch["cu_seqlens"].tolist() == sample_boundaries(micro_batch["segment_ids"])
    assert samples_held == len(indices)
    # The same trained (token, label) pairs at the same in-sample positions as padding one sample per row.
    every_pair = {}
    for micro_batches in per_rank:
        every_pair.update(_trained_positions(micro_batches))
    padded = rank_micro_batches(dataset, indices, Batching(40, 13, PAD), data_rank=0, data_size=1)
    assert every_pair == _trained_positions(padded)


def test_micro_batch_count_is_a_multiple_for_the_interleaved_schedule():
    dataset = Samples([10] * 6)
    batching = Batching(seq_length=20, micro_batch_size=1, pad_id=PAD, pack=True, micro_batch_multiple=4)
    micro_batches = rank_micro_batches(dataset, list(range(6)), batching, data_rank=0, data_size=1)
    assert len(micro_batches) == 4  # 3 packed rows, topped up with a padding row
    assert (micro_batches[-1]["segment_ids"] == -1).all() and (micro_batches[-1]["loss_mask"] == 0).all()
    assert len(regroup(micro_batches, 3, batching)) == 4  # 2 micro-batches of 3 rows, topped up to 4


@pytest.mark.parametrize("packed", [False, True])
def test_regroup_keeps_the_rows_in_order_and_pads_the_last_micro_batch(packed):
    dataset = Samples(list(np.random.default_rng(5).integers(2, 20, size=10)))
    batching = Batching(seq_length=20, micro_batch_size=2, pad_id=PAD, pack=packed)
    micro_batches = rank_micro_batches(dataset, list(range(10)), batching, data_rank=0, data_size=1)
    larger = regroup(micro_batches, 3, batching)
    assert all(micro_batch["tokens"].shape == (3, 20) for micro_batch in larger)
    for key in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"):
        before, after = torch.cat([m[key] for m in micro_batches]), torch.cat([m[key] for m in larger])
        assert torch.equal(after[:len(before)], before), key
        assert (torch.cat([m["loss_mask"] for m in larger])[len(before):] == 0).all()
    if packed:
        assert all(m["cu_seqlens"].tolist() == sample_boundaries(m["segment_ids"]) for m in larger)


def test_packing_needs_fewer_rows_on_skewed_lengths():
    rng = np.random.default_rng(3)
    dataset = Samples(list(np.minimum(rng.lognormal(3, 0.8, size=64).astype(int) + 2, 129)))
    padded = rank_micro_batches(dataset, list(range(64)), Batching(128, 1, PAD), data_rank=0, data_size=1)
    packed = rank_micro_batches(dataset, list(range(64)), Batching(128, 1, PAD, pack=True), data_rank=0, data_size=1)
    assert len(padded) == 64 and len(packed) < 64 / 3


def _logprobs_padded_and_packed():
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, load_hf_config, transformer_config
    from megatron_psft.engine.step import policy_logprobs

    args = Qwen3MoeArgs.from_hf_config(load_hf_config("debug"))
    layout = parallel.ParallelLayout()
    parallel.initialize(layout, seed=7)
    chunks = build_model_chunks(args, transformer_config(args, layout, pack_sequences=True))
    for chunk in chunks:
        chunk.eval()
    rng = np.random.default_rng(4)
    dataset = Samples(list(rng.integers(40, 200, size=12)), vocab=args.vocab_size)
    results = {}
    for name, batching in (("padded", Batching(512, 2, PAD)), ("packed", Batching(512, 2, PAD, pack=True))):
        micro_batches = rank_micro_batches(dataset, list(range(12)), batching)
        logprobs = policy_logprobs(chunks, micro_batches, args.vocab_size)
        per_sample = {}
        for micro_batch, values in zip(micro_batches, logprobs):
            for row in range(len(values)):
                segments = micro_batch["segment_ids"][row]
                for segment in segments[segments >= 0].unique().tolist():
                    where = segments == segment
                    per_sample[tuple(micro_batch["tokens"][row, where].tolist())] = values[row, where].tolist()
        results[name] = per_sample
    parallel.destroy()
    return results


def test_packed_logprobs_equal_padded_logprobs():
    """Block-diagonal attention and per-sample RoPE positions: each sample sees only itself, as when padded."""
    (results,) = run_distributed(1, _logprobs_padded_and_packed)
    padded, packed = results["padded"], results["packed"]
    assert len(padded) == 12 and padded.keys() == packed.keys()
    worst = max(np.abs(np.subtract(padded[key], packed[key])).max() for key in padded)
    assert worst <= 1e-5, worst
