"""SFT data, from chat JSONL to micro-batches:

- :mod:`~megatron_psft.data.chat`: which tokens of a rendered conversation are trained (the chat-template mask);
- :mod:`~megatron_psft.data.format`: the files on disk, meta.json's schema, the writer and the meta reader;
- :mod:`~megatron_psft.data.preprocess`: the preprocessing command (``megatron-psft-preprocess``);
- :mod:`~megatron_psft.data.dataset`: the checked memory-mapped dataset, the tokenizer check, the
  global-batch schedule, padding and packing.

The names the trainer, evaluation and the tools use are importable from here.
"""

from megatron_psft.data.dataset import (SFTDataset, check_tokenizer, collate, global_batch_indices,
                                        load_tokenizer_identity, pack, tokenizer_identity)
from megatron_psft.data.format import FORMAT_VERSION, TOKEN_DTYPES, DataError, DatasetWriter, read_meta

__all__ = [
    "FORMAT_VERSION",
    "TOKEN_DTYPES",
    "DataError",
    "DatasetWriter",
    "SFTDataset",
    "check_tokenizer",
    "collate",
    "global_batch_indices",
    "load_tokenizer_identity",
    "pack",
    "read_meta",
    "tokenizer_identity",
]
