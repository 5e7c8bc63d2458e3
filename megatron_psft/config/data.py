"""The training data and how it is batched; the held-out sets evaluated during training."""

import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from megatron_psft.config.base import ConfigError, Section

# Set names become metric keys (eval/NAME/nll) and TensorBoard tags.
_SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class DataConfig(Section):
    data_prefix: Optional[str] = None  # output prefix of the preprocessing tool (required to train)
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 32  # sequences per optimizer step (the paper's mini-batch)
    pack_sequences: bool = False
    tokenizer: Optional[str] = None  # the model's HF tokenizer; default: --hf-config's directory when it has one
    allow_tokenizer_mismatch: bool = False

    def __post_init__(self):
        for name in ("seq_length", "micro_batch_size", "global_batch_size"):
            self.at_least(name, 1)


def parse_eval_data_prefix(items: Sequence[str]) -> Dict[str, str]:
    """``--eval-data-prefix NAME=PREFIX [NAME=PREFIX ...]`` as ``{name: prefix}``, in the given order."""
    sets: Dict[str, str] = {}
    for item in items:
        name, separator, prefix = item.partition("=")
        if not separator or not prefix:
            raise ConfigError(f"--eval-data-prefix {item!r}: expected NAME=PREFIX (a name for the set, then the "
                              "--output-prefix of tools/preprocess_data.py)")
        if not _SET_NAME.fullmatch(name):
            raise ConfigError(f"--eval-data-prefix {item!r}: the set's name must be letters, digits, '_', '.' or '-' "
                              "(it becomes the metric key eval/NAME/nll)")
        if name in sets:
            raise ConfigError(f"--eval-data-prefix names the set {name!r} twice")
        sets[name] = prefix
    return sets


@dataclass(frozen=True)
class EvalConfig(Section):
    eval_data_prefix: Tuple[str, ...] = ()  # NAME=PREFIX items
    eval_interval: Optional[int] = None  # also at step 0 of a fresh run and at the last step
    eval_iters: Optional[int] = None  # None: the whole set

    def __post_init__(self):
        parse_eval_data_prefix(self.eval_data_prefix)
        self.at_least("eval_interval", 1, optional=True)
        self.at_least("eval_iters", 1, optional=True)
        self.require(not (self.eval_interval or self.eval_iters) or self.eval_data_prefix,
                     "--eval-interval / --eval-iters need --eval-data-prefix")

    @property
    def sets(self) -> Dict[str, str]:
        return parse_eval_data_prefix(self.eval_data_prefix)
