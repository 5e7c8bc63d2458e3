"""SFT data for the trainer: memory-mapped samples from tools/preprocess_data.py, the step-indexed
global-batch schedule, and batching (padding or packing) into shifted tokens / labels / loss mask.

Labels are always valid vocabulary ids: positions that are not trained (prompt, padding, the end of
a packed sample) carry ``pad_id`` with loss_mask 0, never -100, because the vocab-parallel log-prob
kernel rejects labels outside the vocabulary.
"""

import functools
import json
import os

import numpy as np
import torch

FORMAT_VERSION = 1


class SFTDataset:
    """Memory-mapped preprocessed samples (``PREFIX.{tokens.bin,mask.bin,offsets.npy,meta.json}``).

    ``dataset[i]`` is ``(token ids int64, loss mask bool)`` of the whole sample; the mask is 1 on the
    tokens that are trained as labels. ``meta`` is the contents of meta.json (``pad_id``,
    ``vocab_size``, ``seq_length``, ``tokenizer``, counts).
    """

    def __init__(self, prefix: str):
        meta_path = f"{prefix}.meta.json"
        if not os.path.exists(meta_path):
            raise FileNotFoundError(
                f"{meta_path} not found: {prefix!r} is not a finished preprocessed dataset "
                "(run tools/preprocess_data.py --output-prefix PREFIX)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {self.meta.get('format_version')!r}, "
                             f"this code reads version {FORMAT_VERSION}; re-run tools/preprocess_data.py")
        for path in (f"{prefix}.tokens.bin", f"{prefix}.mask.bin", f"{prefix}.offsets.npy"):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found (next to {meta_path})")

        num_samples, num_tokens = self.meta["num_samples"], self.meta["num_tokens"]
        self.offsets = np.load(f"{prefix}.offsets.npy", mmap_mode="r")
        self.tokens = np.memmap(f"{prefix}.tokens.bin", dtype=np.dtype(self.meta["token_dtype"]), mode="r")
        self.mask = np.memmap(f"{prefix}.mask.bin", dtype=np.uint8, mode="r")
        problems = []
        if self.offsets.shape != (num_samples + 1,):
            problems.append(f"offsets.npy has shape {self.offsets.shape}, expected ({num_samples + 1},)")
        elif self.offsets[0] != 0 or self.offsets[-1] != num_tokens or np.any(np.diff(self.offsets) <= 0):
            problems.append(f"offsets.npy is not increasing from 0 to num_tokens={num_tokens}")
        if self.tokens.size != num_tokens:
            problems.append(f"tokens.bin holds {self.tokens.size} tokens, meta says {num_tokens}")
        if self.mask.size != num_tokens:
            problems.append(f"mask.bin holds {self.mask.size} entries, meta says {num_tokens}")
        if problems:
            raise ValueError(f"inconsistent preprocessed dataset {prefix!r}: " + "; ".join(problems))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i) -> tuple[np.ndarray, np.ndarray]:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)}")
        start, end = self.offsets[i % len(self)], self.offsets[i % len(self) + 1]
        return self.tokens[start:end].astype(np.int64), self.mask[start:end].astype(bool)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    permutation = np.random.default_rng([seed, epoch]).permutation(num_samples)
    permutation.flags.writeable = False  # shared by the cache
    return permutation


def global_batch_indices(num_samples: int, global_batch_size: int, step: int, seed: int) -> list[int]:
    """Sample indices of optimizer step `step` (0-based): epochs of a seeded permutation, consumed in order,
    crossing epoch boundaries seamlessly. Pure function of its arguments, so resume is exact.

    Step ``s`` takes positions ``[s * gbs, (s + 1) * gbs)`` of the endless stream formed by
    concatenating per-epoch permutations (epoch ``e`` is seeded by ``(seed, e)``), so every sample
    appears exactly once per epoch.
    """
    if num_samples < 1 or global_batch_size < 1 or step < 0:
        raise ValueError(f"need num_samples >= 1, global_batch_size >= 1, step >= 0; got "
                         f"{num_samples}, {global_batch_size}, {step}")
    positions = np.arange(step * global_batch_size, (step + 1) * global_batch_size, dtype=np.int64)
    epochs, within = np.divmod(positions, num_samples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        indices[in_epoch] = _epoch_permutation(num_samples, seed, int(epoch))[within[in_epoch]]
    return indices.tolist()


def _check_lengths(samples, seq_length):
    for ids, mask in samples:
        if len(ids) != len(mask):
            raise ValueError(f"sample has {len(ids)} ids but {len(mask)} mask entries")
        if len(ids) > seq_length + 1:
            raise ValueError(f"sample of {len(ids)} tokens is longer than seq_length + 1 = {seq_length + 1} "
                             "(preprocess with a --seq-length no larger than the training one)")


def collate(samples: list[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad (right) every sample to exactly seq_length+1 ids, then shift: returns
    tokens [b, s] int64, labels [b, s] int64 (valid ids everywhere, pad_id where padded), loss_mask [b, s] float32
    (mask of the label position; 0 on padding), position_ids [b, s] int64. Raises ValueError on a sample longer
    than seq_length + 1.

    Labels are never -100: the log-prob kernel rejects out-of-vocabulary labels, so untrained
    positions hold pad_id and are excluded by loss_mask alone.
    """
    _check_lengths(samples, seq_length)
    ids = np.full((len(samples), seq_length + 1), pad_id, dtype=np.int64)
    mask = np.zeros((len(samples), seq_length + 1), dtype=np.float32)
    for row, (sample_ids, sample_mask) in enumerate(samples):
        ids[row, :len(sample_ids)] = sample_ids
        mask[row, :len(sample_mask)] = sample_mask
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    return {
        "tokens": ids[:, :-1].contiguous(),
        "labels": ids[:, 1:].contiguous(),
        "loss_mask": mask[:, 1:].contiguous(),
        "position_ids": torch.arange(seq_length, dtype=torch.int64).expand(len(samples), -1).contiguous(),
    }


def pack(samples, seq_length, pad_id) -> dict[str, torch.Tensor]:
    """Sequence packing for attention backends that support it (TE / THD on GPU): concatenate samples into rows of
    seq_length, position_ids restart per sample, plus `cu_seqlens` (int32) for megatron.core.packed_seq_params.PackedSeqParams.
    Same keys as collate, plus cu_seqlens. Labels never cross a sample boundary.

    Each sample is shifted on its own before packing: a sample of n ids contributes n - 1 positions
    (inputs ids[:-1], labels ids[1:], loss_mask mask[1:]), so the per-position tokens, labels and
    loss mask are exactly those ``collate`` gives, a sample's last position predicts its own final
    token, and the next sample's first token is never a label. Samples
    are placed in order, a new row starting when the next one does not fit (samples are never
    split); each row's tail is padding (pad_id, loss_mask 0) forming its own segment. The number of
    rows therefore depends on the lengths. ``cu_seqlens`` are the segment boundaries in the
    flattened ``[rows * seq_length]`` token stream, from 0 to rows * seq_length.

    Labels are never -100 (see collate): untrained positions hold pad_id.
    """
    _check_lengths(samples, seq_length)
    rows, row, row_used = [], [], 0
    for sample in samples:
        length = len(sample[0]) - 1
        if length < 1:
            raise ValueError("cannot pack a sample of fewer than 2 tokens (it has no label)")
        if row_used + length > seq_length:
            rows.append(row)
            row, row_used = [], 0
        row.append(sample)
        row_used += length
    if row:
        rows.append(row)

    tokens = np.full((len(rows), seq_length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_length), pad_id, dtype=np.int64)
    loss_mask = np.zeros((len(rows), seq_length), dtype=np.float32)
    position_ids = np.zeros((len(rows), seq_length), dtype=np.int64)
    cu_seqlens = [0]
    for r, row_samples in enumerate(rows):
        start = 0
        for sample_ids, sample_mask in row_samples:
            end = start + len(sample_ids) - 1
            tokens[r, start:end] = sample_ids[:-1]
            labels[r, start:end] = sample_ids[1:]
            loss_mask[r, start:end] = sample_mask[1:]
            position_ids[r, start:end] = np.arange(end - start)
            cu_seqlens.append(r * seq_length + end)
            start = end
        if start < seq_length:  # the padding tail attends only to itself
            position_ids[r, start:] = np.arange(seq_length - start)
            cu_seqlens.append((r + 1) * seq_length)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
    }
