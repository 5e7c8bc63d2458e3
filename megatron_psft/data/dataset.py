"""Reading preprocessed SFT data: memory-mapped samples (:class:`SFTDataset`, checked once at load),
the tokenizer they were made with (``tokenizer_identity``, ``check_tokenizer``), the step-indexed
global-batch schedule, and batching (padding or packing) into shifted tokens / labels / loss mask.

Labels are always valid vocabulary ids: positions that are not trained (prompt, padding, the end of
a packed sample) carry ``pad_id`` with loss_mask 0, never -100, because the vocab-parallel log-prob
kernel rejects labels outside the vocabulary.

Loading checks the data once (``SFTDataset``): meta.json's keys and types
(:func:`megatron_psft.data.format.read_meta`), the files' sizes, every token id below the vocabulary
size and every mask byte 0 or 1, naming the first bad sample. The tokenizer the data was made with is
recorded in meta.json (``tokenizer_identity``) and compared with the model's by ``check_tokenizer``.
"""

import functools
import hashlib
import json
import os
import warnings

import numpy as np
import torch

from megatron_psft.data.format import MASK_DTYPE, DataError, dataset_paths, read_meta

_SCAN_CHUNK = 1 << 24  # elements per vectorised pass over the memory maps (64 MiB of uint32 ids)


def tokenizer_identity(tokenizer, name: str = None) -> dict:
    """``{"name", "vocab_sha256", "vocab_size"}`` of a Hugging Face tokenizer: sha256 of its sorted
    (token, id) items (added tokens included), so two tokenizers agree iff they map the same strings
    to the same ids. ``name`` defaults to the tokenizer's ``name_or_path``."""
    vocab = tokenizer.get_vocab()
    items = sorted((str(token), int(index)) for token, index in vocab.items())
    digest = hashlib.sha256(json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()
    if name is None:
        name = getattr(tokenizer, "name_or_path", "") or "?"
    return {"name": str(name), "vocab_sha256": digest, "vocab_size": len(vocab)}


def load_tokenizer_identity(tokenizer: str) -> dict:
    """The identity of the tokenizer at a HF directory (or hub name); a directory's name is its absolute path."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as e:  # missing files, no network for a hub name, ...
        raise DataError(f"cannot load the tokenizer {tokenizer!r} to compare it with the data's: {e}") from None
    return tokenizer_identity(loaded, os.path.abspath(tokenizer) if os.path.isdir(tokenizer) else tokenizer)


def check_tokenizer(meta: dict, tokenizer, allow_mismatch: bool = False) -> bool:
    """Compare the tokenizer the data was preprocessed with (``meta["tokenizer"]``, from
    ``SFTDataset.meta``) with the model's: ``tokenizer`` is a HF tokenizer directory or name, a loaded
    tokenizer, or an identity dict from :func:`tokenizer_identity`.

    Returns True when the vocabularies are the same. On a mismatch raises :class:`DataError` naming
    both tokenizers, or with ``allow_mismatch`` warns (``UserWarning``) and returns False.
    """
    if isinstance(tokenizer, dict):
        model = tokenizer
    elif isinstance(tokenizer, (str, os.PathLike)):
        model = load_tokenizer_identity(os.fspath(tokenizer))
    else:
        model = tokenizer_identity(tokenizer)
    data = meta.get("tokenizer")
    if not isinstance(data, dict) or "vocab_sha256" not in data:
        raise DataError(f"the data's meta.json records no tokenizer identity ({data!r}); re-run tools/preprocess_data.py")
    if data["vocab_sha256"] == model.get("vocab_sha256"):
        return True

    def describe(identity):
        return (f"{identity.get('name', '?')} ({identity.get('vocab_size', '?')} tokens, vocabulary sha256 "
                f"{str(identity.get('vocab_sha256'))[:12]}...)")
    message = (f"tokenizer mismatch: the data was tokenized with {describe(data)}, the model's tokenizer is "
               f"{describe(model)}; the token ids would mean other strings to the model")
    if not allow_mismatch:
        raise DataError(message + " (re-run tools/preprocess_data.py with the model's tokenizer, or pass "
                                  "--allow-tokenizer-mismatch to train anyway)")
    warnings.warn(message + " (allowed by --allow-tokenizer-mismatch)", stacklevel=2)
    return False


def _first_at_or_above(array: np.ndarray, bound: int):
    """Index of the first element >= bound, or None; vectorised in chunks so memory stays bounded."""
    for start in range(0, array.size, _SCAN_CHUNK):
        chunk = array[start:start + _SCAN_CHUNK]
        if chunk.size and chunk.max() >= bound:
            return start + int(np.argmax(chunk >= bound))
    return None


class SFTDataset:
    """Memory-mapped preprocessed samples (``PREFIX.{tokens.bin,mask.bin,offsets.npy,meta.json}``).

    ``dataset[i]`` is ``(token ids int64, loss mask bool)`` of the whole sample; the mask is 1 on the
    tokens that are trained as labels. ``meta`` is the contents of meta.json (``pad_id``,
    ``vocab_size``, ``seq_length``, ``tokenizer`` identity, counts).

    Loading checks meta.json, the files' sizes and offsets, and, in one vectorised pass over the
    memory maps, that every token id is below ``vocab_size`` (meta's, and the model's when given)
    and every mask byte is 0 or 1; a violation is a :class:`DataError` naming the first bad sample.
    """

    def __init__(self, prefix: str, vocab_size: int = None):
        paths = dataset_paths(prefix)
        meta_path = paths["meta.json"]
        if not os.path.exists(meta_path):
            raise FileNotFoundError(
                f"{meta_path} not found: {prefix!r} is not a finished preprocessed dataset "
                "(run tools/preprocess_data.py --output-prefix PREFIX)")
        self.meta = read_meta(meta_path)
        for path in (paths["tokens.bin"], paths["mask.bin"], paths["offsets.npy"]):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found (next to {meta_path})")

        num_samples, num_tokens = self.meta["num_samples"], self.meta["num_tokens"]
        try:
            self.offsets = np.load(paths["offsets.npy"], mmap_mode="r")
        except ValueError as e:
            raise DataError(f"{paths['offsets.npy']}: not a numpy array file ({e})") from None
        self.tokens = np.memmap(paths["tokens.bin"], dtype=np.dtype(self.meta["token_dtype"]), mode="r")
        self.mask = np.memmap(paths["mask.bin"], dtype=np.dtype(MASK_DTYPE), mode="r")
        problems = []
        if self.offsets.shape != (num_samples + 1,) or not np.issubdtype(self.offsets.dtype, np.integer):
            problems.append(f"offsets.npy has shape {self.offsets.shape} and dtype {self.offsets.dtype}, "
                            f"expected ({num_samples + 1},) integers")
        elif self.offsets[0] != 0 or self.offsets[-1] != num_tokens or np.any(np.diff(self.offsets) <= 0):
            problems.append(f"offsets.npy is not increasing from 0 to num_tokens={num_tokens}")
        if self.tokens.size != num_tokens:
            problems.append(f"tokens.bin holds {self.tokens.size} tokens, meta says {num_tokens}")
        if self.mask.size != num_tokens:
            problems.append(f"mask.bin holds {self.mask.size} entries, meta says {num_tokens}")
        if problems:
            raise DataError(f"inconsistent preprocessed dataset {prefix!r}: " + "; ".join(problems))
        self._check_contents(prefix, vocab_size)

    def _sample_of(self, position: int) -> str:
        sample = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return f"sample {sample} (token {position - int(self.offsets[sample])} of {self.sample_length(sample)})"

    def sample_length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def trained_tokens(self, i: int) -> int:
        """The positions of sample `i` that carry a loss: its mask after the first token (the shifted labels')."""
        return int(np.count_nonzero(self.mask[self.offsets[i] + 1:self.offsets[i + 1]]))

    def _check_contents(self, prefix, model_vocab_size):
        """Every id < vocab size and every mask byte in {0, 1}: O(num_tokens), once, vectorised."""
        vocab_size, whose = self.meta["vocab_size"], "meta.json's vocab_size"
        if model_vocab_size is not None and model_vocab_size < vocab_size:
            vocab_size, whose = int(model_vocab_size), "the model's vocab_size"
        bad = _first_at_or_above(self.tokens, vocab_size)
        if bad is not None:
            raise DataError(f"{prefix}.tokens.bin: {self._sample_of(bad)} has token id {int(self.tokens[bad])} >= "
                            f"{whose} {vocab_size} (corrupt data, or data from another tokenizer); "
                            "re-run tools/preprocess_data.py")
        bad = _first_at_or_above(self.mask, 2)
        if bad is not None:
            raise DataError(f"{prefix}.mask.bin: {self._sample_of(bad)} has mask byte {int(self.mask[bad])}, "
                            "expected 0 or 1 (corrupt data); re-run tools/preprocess_data.py")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i) -> tuple[np.ndarray, np.ndarray]:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)}")
        start, end = self.offsets[i % len(self)], self.offsets[i % len(self) + 1]
        return self.tokens[start:end].astype(np.int64), self.mask[start:end].astype(bool)


@functools.lru_cache(maxsize=8)
def _epoch_permutation(num_samples: int, key: tuple) -> np.ndarray:
    permutation = np.random.default_rng(list(key)).permutation(num_samples)
    permutation.flags.writeable = False  # shared by the cache
    return permutation


def stream_samples(num_samples: int, positions: np.ndarray, key: tuple) -> np.ndarray:
    """The samples at `positions` of the endless stream of per-epoch permutations of `num_samples`
    samples, epoch ``e`` seeded by ``key + (e,)``: every sample appears exactly once per epoch."""
    epochs, within = np.divmod(positions, num_samples)
    samples = np.empty_like(positions)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        samples[in_epoch] = _epoch_permutation(num_samples, key + (int(epoch),))[within[in_epoch]]
    return samples


def global_batch_indices(num_samples: int, global_batch_size: int, step: int, seed: int) -> list[int]:
    """Sample indices of optimizer step `step` (0-based): positions ``[s * gbs, (s + 1) * gbs)`` of the
    stream of seeded epochs (:func:`stream_samples`, epoch ``e`` seeded by ``(seed, e)``), crossing epoch
    boundaries seamlessly. Pure function of its arguments, so resume is exact.
    """
    if num_samples < 1 or global_batch_size < 1 or step < 0:
        raise ValueError(f"need num_samples >= 1, global_batch_size >= 1, step >= 0; got "
                         f"{num_samples}, {global_batch_size}, {step}")
    positions = np.arange(step * global_batch_size, (step + 1) * global_batch_size, dtype=np.int64)
    return stream_samples(num_samples, positions, (seed,)).tolist()


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
    (mask of the label position; 0 on padding), position_ids [b, s] int64 and segment_ids [b, s] int64 (the
    sample's index in `samples`, -1 on padding). Raises ValueError on a sample longer than seq_length + 1.

    Labels are never -100: the log-prob kernel rejects out-of-vocabulary labels, so untrained
    positions hold pad_id and are excluded by loss_mask alone.
    """
    _check_lengths(samples, seq_length)
    ids = np.full((len(samples), seq_length + 1), pad_id, dtype=np.int64)
    mask = np.zeros((len(samples), seq_length + 1), dtype=np.float32)
    segment_ids = np.full((len(samples), seq_length), -1, dtype=np.int64)
    for row, (sample_ids, sample_mask) in enumerate(samples):
        ids[row, :len(sample_ids)] = sample_ids
        mask[row, :len(sample_mask)] = sample_mask
        segment_ids[row, :len(sample_ids) - 1] = row
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    return {
        "tokens": ids[:, :-1].contiguous(),
        "labels": ids[:, 1:].contiguous(),
        "loss_mask": mask[:, 1:].contiguous(),
        "position_ids": torch.arange(seq_length, dtype=torch.int64).expand(len(samples), -1).contiguous(),
        "segment_ids": torch.from_numpy(segment_ids),
    }


def pack(samples, seq_length, pad_id) -> dict[str, torch.Tensor]:
    """Sequence packing: concatenate samples into rows of seq_length. Same keys as collate; position_ids
    restart per sample and segment_ids (the sample's index in `samples`, -1 on a row's padding tail) say
    which positions may attend to which. Labels never cross a sample boundary.

    Each sample is shifted on its own before packing: a sample of n ids contributes n - 1 positions
    (inputs ids[:-1], labels ids[1:], loss_mask mask[1:]), so the per-position tokens, labels and
    loss mask are exactly those ``collate`` gives, a sample's last position predicts its own final
    token, and the next sample's first token is never a label. Samples are placed in order, a new
    row starting when the next one does not fit (samples are never split); each row's tail is
    padding (pad_id, loss_mask 0). The number of rows therefore depends on the lengths and the order.

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
    segment_ids = np.full((len(rows), seq_length), -1, dtype=np.int64)
    index = 0
    for r, row_samples in enumerate(rows):
        start = 0
        for sample_ids, sample_mask in row_samples:
            end = start + len(sample_ids) - 1
            tokens[r, start:end] = sample_ids[:-1]
            labels[r, start:end] = sample_ids[1:]
            loss_mask[r, start:end] = sample_mask[1:]
            position_ids[r, start:end] = np.arange(end - start)
            segment_ids[r, start:end] = index
            index += 1
            start = end
        position_ids[r, start:] = np.arange(seq_length - start)  # the padding tail attends only to itself
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
    }
