"""From a global batch's sample indices to this data-parallel rank's micro-batches, padded or packed.

Padded (the default): each data-parallel rank takes its contiguous share of the samples, one sample
per row of ``seq_length``. Packed (``--pack-sequences``): the samples go to the ranks longest first,
each to the rank holding the fewest tokens so far, and each rank packs its share first-fit-decreasing
into rows (:func:`megatron_psft.data.pack`). Either way the rows are grouped into micro-batches of
``micro_batch_size`` rows, and every rank gets the same number of micro-batches, because Megatron's
schedule, the expert all-to-all and the gradient reduction run in lockstep across ranks: missing rows
are padding (loss_mask 0). Everything is a function of the indices and the sample lengths, so each
rank works out every other rank's share without communication, and a resumed run batches exactly as
an uninterrupted one.

A micro-batch holds ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` and ``segment_ids`` (the
sample each position belongs to, -1 on padding), all ``[micro_batch_size, seq_length]``; packed ones
add ``cu_seqlens`` (int32 boundaries of the samples in the flattened rows) and ``max_seqlen`` for
Transformer Engine's THD attention.
"""

import dataclasses
import heapq
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from megatron_psft.platform import parallel
from megatron_psft.data.dataset import collate, pack


@dataclass(frozen=True)
class Batching:
    seq_length: int
    micro_batch_size: int
    pad_id: int
    pack: bool = False
    # Megatron's interleaved (VPP) schedule runs micro-batches in groups of the pipeline size and refuses
    # a partial group: the number of micro-batches is rounded up to a multiple of this.
    micro_batch_multiple: int = 1

    def num_micro_batches(self, rows: int) -> int:
        count = max(1, math.ceil(rows / self.micro_batch_size))
        return math.ceil(count / self.micro_batch_multiple) * self.micro_batch_multiple


def shares_of_data_ranks(indices: Sequence[int], lengths: Sequence[int], data_size: int, packed: bool) -> List[List[int]]:
    """The sample indices each data-parallel rank holds. `lengths` are the samples' token counts."""
    if not packed:
        per_rank = math.ceil(len(indices) / data_size)
        return [list(indices[rank * per_rank:(rank + 1) * per_rank]) for rank in range(data_size)]
    shares = [[] for _ in range(data_size)]
    loads = [(0, rank) for rank in range(data_size)]  # (tokens held, rank): ties go to the lower rank
    for position in sorted(range(len(indices)), key=lambda k: (-lengths[k], k)):
        tokens, rank = heapq.heappop(loads)
        shares[rank].append(indices[position])
        heapq.heappush(loads, (tokens + lengths[position], rank))
    return shares


def pack_order(indices: Sequence[int], lengths: Sequence[int], seq_length: int) -> List[List[int]]:
    """First-fit-decreasing rows: each sample (longest first) goes to the first row with room for its
    ``length - 1`` positions. In this order, :func:`pack`'s in-order filling reproduces exactly these rows,
    since a sample placed in a later row did not fit any earlier row, which only filled up since."""
    rows, room = [], []
    for position in sorted(range(len(indices)), key=lambda k: (-lengths[k], k)):
        need = lengths[position] - 1
        row = next((r for r, free in enumerate(room) if free >= need), None)
        if row is None:
            rows.append([])
            room.append(seq_length)
            row = len(rows) - 1
        rows[row].append(indices[position])
        room[row] -= need
    return rows


def _padding_rows(count: int, batching: Batching) -> dict:
    shape = (count, batching.seq_length)
    return {
        "tokens": torch.full(shape, batching.pad_id, dtype=torch.int64),
        "labels": torch.full(shape, batching.pad_id, dtype=torch.int64),
        "loss_mask": torch.zeros(shape, dtype=torch.float32),
        "position_ids": torch.arange(batching.seq_length, dtype=torch.int64).expand(shape).contiguous(),
        "segment_ids": torch.full(shape, -1, dtype=torch.int64),
    }


def sample_boundaries(segment_ids: torch.Tensor) -> List[int]:
    """Cumulative sequence lengths of the flattened rows: a new segment at every row start and wherever
    the sample changes (a row's padding tail is a segment of its own)."""
    rows, seq_length = segment_ids.shape
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::seq_length] = True
    return starts.nonzero().flatten().tolist() + [rows * seq_length]


def rank_micro_batches(dataset, indices: Sequence[int], batching: Batching, device=None,
                       data_rank: Optional[int] = None, data_size: Optional[int] = None) -> List[dict]:
    """This data-parallel rank's micro-batches of the samples `indices` of `dataset` (an ``SFTDataset``
    or anything with ``dataset[i] -> (ids, mask)`` and ``sample_length(i)``), on `device`. The rank and
    the number of ranks default to Megatron's data-parallel group."""
    if data_rank is None:
        data_rank, data_size = parallel.data_rank(), parallel.data_size()
    all_lengths = [dataset.sample_length(i) for i in indices]
    shares = shares_of_data_ranks(indices, all_lengths, data_size, batching.pack)
    if batching.pack:
        length_of = dict(zip(indices, all_lengths))
        plans = [pack_order(share, [length_of[i] for i in share], batching.seq_length) for share in shares]
        rows_per_rank = [len(plan) for plan in plans]
        mine = [i for row in plans[data_rank] for i in row]
    else:
        rows_per_rank = [len(share) for share in shares]
        mine = shares[data_rank]
    num_micro_batches = batching.num_micro_batches(max(rows_per_rank))

    samples = [dataset[i] for i in mine]
    if not samples:
        rows = _padding_rows(0, batching)
    elif batching.pack:
        rows = pack(samples, batching.seq_length, batching.pad_id)
        assert len(rows["tokens"]) == rows_per_rank[data_rank], "pack() did not reproduce the planned rows"
    else:
        rows = collate(samples, batching.seq_length, batching.pad_id)
    return _micro_batches(rows, num_micro_batches * batching.micro_batch_size, batching, device)


def _with_padding_rows(rows: dict, count: int, batching: Batching) -> dict:
    padding = _padding_rows(count, batching)
    return {key: torch.cat([rows[key], padding[key].to(rows[key].device)]) for key in padding}


def _micro_batches(rows: dict, total_rows: int, batching: Batching, device) -> List[dict]:
    """`rows` completed with padding rows to `total_rows`, in micro-batches of the batching's size, on `device`."""
    if total_rows > len(rows["tokens"]):
        rows = _with_padding_rows(rows, total_rows - len(rows["tokens"]), batching)
    micro_batches = []
    for start in range(0, total_rows, batching.micro_batch_size):
        rows_here = slice(start, start + batching.micro_batch_size)
        micro_batch = {key: value[rows_here].to(device) for key, value in rows.items()}
        if batching.pack:  # from the rows as given (on the host when batched from a dataset), not the device copy
            boundaries = sample_boundaries(rows["segment_ids"][rows_here].cpu())
            micro_batch["cu_seqlens"] = torch.tensor(boundaries, dtype=torch.int32, device=device)
            micro_batch["max_seqlen"] = max(b - a for a, b in zip(boundaries, boundaries[1:]))
        micro_batches.append(micro_batch)
    return micro_batches


def regroup(micro_batches: List[dict], rows_per_micro_batch: int, batching: Batching) -> List[dict]:
    """The same rows in micro-batches of `rows_per_micro_batch` (the last completed with padding rows), e.g.
    for a forward-only pass that fits more rows than training does."""
    keys = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")
    rows = {key: torch.cat([micro_batch[key] for micro_batch in micro_batches]) for key in keys}
    batching = dataclasses.replace(batching, micro_batch_size=rows_per_micro_batch)
    total_rows = batching.num_micro_batches(len(rows["tokens"])) * rows_per_micro_batch
    return _micro_batches(rows, total_rows, batching, micro_batches[0]["tokens"].device)
