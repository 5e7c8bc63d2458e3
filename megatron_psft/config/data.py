"""The training data and how it is batched; the held-out sets evaluated during training."""

import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from megatron_psft.config.base import ConfigError, Section

# Set names become metric keys (eval/NAME/nll) and TensorBoard tags.
_SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def parse_data_prefix(items: Sequence[str]) -> Tuple[Tuple[str, ...], Optional[Tuple[float, ...]]]:
    """``--data-prefix`` as (prefixes, weights), read as Megatron reads ``--data-path``: ``W1 P1 W2 P2 ...``
    when every other item from the first is a number, else a list of prefixes (weights None: each
    source in proportion to its samples)."""
    pairs = len(items) % 2 == 0 and len(items) > 1
    weights = [_number(item) for item in items[::2]] if pairs else [None]
    if None in weights:
        numbers = [item for item in items if _number(item) is not None]
        if numbers:
            raise ConfigError(f"--data-prefix {' '.join(items)}: {numbers[0]} reads as a weight, but the items are not "
                              "WEIGHT PREFIX pairs")
        return tuple(items), None
    prefixes = tuple(items[1::2])
    for weight, prefix in zip(weights, prefixes):
        if not weight > 0 or weight == float("inf"):
            raise ConfigError(f"--data-prefix: the weight of {prefix} must be a positive number, got {weight}")
    return prefixes, tuple(weights)


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class DataConfig(Section):
    # Output prefixes of the preprocessing tool, optionally weighted (W1 PREFIX1 W2 PREFIX2 ...); required to train.
    data_prefix: Tuple[str, ...] = ()
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 32  # sequences per optimizer step (the paper's mini-batch)
    pack_sequences: bool = False
    tokenizer: Optional[str] = None  # the model's HF tokenizer; default: --hf-config's directory when it has one
    allow_tokenizer_mismatch: bool = False

    def __post_init__(self):
        if isinstance(self.data_prefix, str):  # one prefix, as Python callers and older checkpoints give it
            object.__setattr__(self, "data_prefix", (self.data_prefix,))
        for name in ("seq_length", "micro_batch_size", "global_batch_size"):
            self.at_least(name, 1)
        parse_data_prefix(self.data_prefix)  # refuses a weight that is not a positive number

    @property
    def blend(self) -> Tuple[Tuple[str, ...], Optional[Tuple[float, ...]]]:
        """The training sources and their weights (None: in proportion to their samples)."""
        return parse_data_prefix(self.data_prefix)


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
