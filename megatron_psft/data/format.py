"""The on-disk format of preprocessed SFT data: the files, meta.json's keys and their types, the
writer (:class:`DatasetWriter`) and the meta reader (:func:`read_meta`). docs/data.md describes it.

A dataset is four files sharing a prefix:

- ``PREFIX.tokens.bin``: every sample's token ids back to back, uint16 when the vocabulary fits, else uint32;
- ``PREFIX.mask.bin``: one uint8 per token, 1 where the token is trained as a label;
- ``PREFIX.offsets.npy``: int64, num_samples + 1 entries; sample i is ``[offsets[i], offsets[i+1])``;
- ``PREFIX.meta.json``: :data:`META_FIELDS`, in that order.

meta.json marks a finished dataset: the writer renames it into place last, after every other file.
"""

import json
import os
from typing import Callable, NamedTuple, Optional

import numpy as np

# 2: meta.json's "tokenizer" is the tokenizer's identity (name + vocabulary hash); multi-turn and
#    reasoning conversations are masked from the full render (docs/data.md).
FORMAT_VERSION = 2
SUFFIXES = ("tokens.bin", "mask.bin", "offsets.npy", "meta.json")  # the order they are renamed into place
TOKEN_DTYPES = ("uint16", "uint32")
MASK_DTYPE = "uint8"
OFFSETS_DTYPE = "int64"


class DataError(ValueError):
    """Preprocessed data that cannot be trained on; the message names the file and what is wrong."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value, meta) -> bool:
    return _is_int(value) and 0 <= value < meta["vocab_size"]


class MetaField(NamedTuple):
    key: str
    expected: str  # what the value must be, as an error message says it
    # (value, meta) -> whether the value is valid; None for a field the reader does not use (a record for people)
    valid: Optional[Callable[[object, dict], bool]]


# meta.json's keys in the order the writer puts them. The reader checks those it uses, in this order
# (vocab_size before the ids it bounds).
META_FIELDS = (
    MetaField("format_version", f"the data format version, {FORMAT_VERSION}", lambda v, meta: v == FORMAT_VERSION),
    MetaField("tokenizer", 'an object with "name" and "vocab_sha256" strings',
              lambda v, meta: isinstance(v, dict) and isinstance(v.get("name"), str)
              and isinstance(v.get("vocab_sha256"), str)),
    MetaField("assistant_mask", "how the assistant spans were found (megatron_psft.data.chat)", None),
    MetaField("vocab_size", "a positive integer", lambda v, meta: _is_int(v) and v > 0),
    MetaField("pad_id", "an integer id below vocab_size", _is_id),
    MetaField("eos_id", "an integer id below vocab_size, or null", lambda v, meta: v is None or _is_id(v, meta)),
    MetaField("seq_length", "a positive integer", lambda v, meta: _is_int(v) and v > 0),
    MetaField("token_dtype", f"one of {', '.join(TOKEN_DTYPES)}", lambda v, meta: v in TOKEN_DTYPES),
    MetaField("mask_dtype", f"'{MASK_DTYPE}'", lambda v, meta: v == MASK_DTYPE),
    MetaField("num_samples", "a positive integer", lambda v, meta: _is_int(v) and v > 0),
    MetaField("num_tokens", "a non-negative integer", lambda v, meta: _is_int(v) and v >= 0),
    MetaField("num_trained_tokens", "the number of mask bytes that are 1", None),
    MetaField("overlong", "truncate or drop (--overlong)", None),
    MetaField("input", "the input file's absolute path", None),
    MetaField("counts", "lines read, samples written, truncated, dropped and skipped", None),
)
# The fields the writer knows from the samples themselves; the caller of DatasetWriter.finish gives the rest.
_WRITER_FIELDS = ("format_version", "vocab_size", "token_dtype", "mask_dtype", "num_samples", "num_tokens",
                  "num_trained_tokens")


def dataset_paths(prefix: str) -> dict:
    """Suffix -> path of each file of the dataset at `prefix`."""
    return {suffix: f"{prefix}.{suffix}" for suffix in SUFFIXES}


def token_dtype_for(vocab_size: int) -> str:
    """The narrower of :data:`TOKEN_DTYPES` that holds every id of a vocabulary of `vocab_size`."""
    return TOKEN_DTYPES[0] if vocab_size <= np.iinfo(TOKEN_DTYPES[0]).max + 1 else TOKEN_DTYPES[1]


def read_meta(meta_path: str) -> dict:
    """meta.json, checked: a clear :class:`DataError` naming the file and the missing or bad key."""
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path}: not valid JSON ({e}); re-run tools/preprocess_data.py") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")

    version = meta.get("format_version")
    if "format_version" not in meta:
        raise DataError(f"{meta_path}: missing key 'format_version' ({META_FIELDS[0].expected})")
    if version != FORMAT_VERSION:
        why = (" (written by an older tools/preprocess_data.py, before the tokenizer identity and multi-turn "
               "masks)" if _is_int(version) and version < FORMAT_VERSION else "")
        raise DataError(f"{meta_path}: format_version {version!r}, this code reads version {FORMAT_VERSION}{why}; "
                        "re-run tools/preprocess_data.py")
    for field in META_FIELDS:
        if field.valid is None:
            continue
        if field.key not in meta:
            raise DataError(f"{meta_path}: missing key {field.key!r} ({field.expected})")
        if not field.valid(meta[field.key], meta):
            raise DataError(f"{meta_path}: key {field.key!r} must be {field.expected}, got {meta[field.key]!r}")
    if meta["vocab_size"] > np.iinfo(meta["token_dtype"]).max + 1:
        raise DataError(f"{meta_path}: token_dtype {meta['token_dtype']} cannot hold ids of a vocabulary of "
                        f"{meta['vocab_size']}")
    return meta


class DatasetWriter:
    """Writes a dataset at `prefix`, one sample at a time, under temporary names: ``append(ids, mask)``
    per sample, then ``finish(**fields)`` with the meta.json fields only the caller knows (the
    :data:`META_FIELDS` other than the counts and dtypes the writer keeps itself).

    Use it as a context manager. ``finish`` renames the files into place, meta.json last and any
    older meta.json removed first, so an interruption in between never pairs a meta.json with another
    run's data; leaving the context without ``finish`` (an error, an interrupt) removes the temporary
    files and writes nothing.
    """

    def __init__(self, prefix: str, vocab_size: int):
        self.prefix, self.vocab_size = prefix, vocab_size
        self.token_dtype = np.dtype(token_dtype_for(vocab_size))
        self.offsets = [0]
        self.num_trained_tokens = 0
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.paths = dataset_paths(prefix)
        self.temporary = {suffix: f"{path}.tmp{os.getpid()}" for suffix, path in self.paths.items()}
        self.tokens_file = open(self.temporary["tokens.bin"], "wb")
        self.mask_file = open(self.temporary["mask.bin"], "wb")

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    def append(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """One sample: its token ids (each below the writer's vocab_size) and its 0/1 loss mask."""
        self.tokens_file.write(ids.astype(self.token_dtype).tobytes())
        self.mask_file.write(mask.astype(MASK_DTYPE).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.num_trained_tokens += int(mask.sum())

    def finish(self, **fields) -> dict:
        """Write offsets.npy and meta.json and rename every file into place; returns the meta written."""
        given = set(fields)
        wanted = {field.key for field in META_FIELDS} - set(_WRITER_FIELDS)
        if given != wanted:
            raise TypeError(f"DatasetWriter.finish: missing meta fields {sorted(wanted - given)}, "
                            f"unexpected {sorted(given - wanted)}")
        if self.num_samples == 0:
            raise DataError(f"{self.prefix}: a dataset needs at least one sample")
        self.tokens_file.close()
        self.mask_file.close()
        with open(self.temporary["offsets.npy"], "wb") as f:  # a file object, so np.save keeps the temporary name
            np.save(f, np.asarray(self.offsets, dtype=OFFSETS_DTYPE))
        fields.update(format_version=FORMAT_VERSION, vocab_size=self.vocab_size, token_dtype=self.token_dtype.name,
                      mask_dtype=MASK_DTYPE, num_samples=self.num_samples, num_tokens=self.offsets[-1],
                      num_trained_tokens=self.num_trained_tokens)
        meta = {field.key: fields[field.key] for field in META_FIELDS}
        with open(self.temporary["meta.json"], "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        if os.path.exists(self.paths["meta.json"]):
            os.remove(self.paths["meta.json"])
        for suffix in SUFFIXES:
            os.replace(self.temporary[suffix], self.paths[suffix])
        return meta

    def close(self) -> None:
        """Remove whatever temporary file is left (all of them unless finish() ran)."""
        self.tokens_file.close()
        self.mask_file.close()
        for path in self.temporary.values():
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
