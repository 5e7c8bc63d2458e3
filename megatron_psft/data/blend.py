"""Weighted blends of preprocessed datasets: Megatron's ``--data-path W1 PREFIX1 W2 PREFIX2 ...`` form.

The blended stream is an endless sequence of samples; global batch ``s`` is its positions
``[s * gbs, (s + 1) * gbs)``, so a batch is a pure function of the step and the seed and a resume
is exact. Which source each position draws from is fixed by the weights alone
(:class:`BlendSchedule`): source ``d``'s ``k``-th draw sits at time ``(k + 1/2) / w_d`` and the
stream takes the draws in time order, ties to the earlier source (the Sainte-Lague divisor
sequence). After any ``n`` positions each source has had ``n * w_d / sum(w)`` draws to within one,
as with Megatron's ``BlendedDataset``, but the counts before position ``n`` come from a binary
search instead of a table built over the whole run. Weights are compared as exact fractions, so
every rank draws the same stream. Within a source, draw ``k`` takes that source's sample in a seeded
permutation per epoch (:func:`~megatron_psft.data.dataset.global_batch_indices`'s scheme), so each
sample is drawn once per epoch of that source; a single source is exactly the unblended schedule.
"""

import math
import os
import re
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_psft.data.dataset import SFTDataset, stream_samples
from megatron_psft.data.format import DataError


class BlendSchedule:
    """Which source each position of the blended stream draws from, for positive `weights`."""

    def __init__(self, weights: Sequence[float]):
        fractions = [Fraction(weight) for weight in weights]  # exact: the same stream on every rank
        if not fractions or min(fractions) <= 0:
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        scale = math.lcm(*(fraction.denominator for fraction in fractions))
        self.weights = [int(fraction * scale) for fraction in fractions]

    def _draws_before(self, source: int, other: int, draw: int) -> int:
        """How many of `source`'s draws come before draw `draw` of `other`: those whose time
        ``(2k + 1) / w_source`` is earlier than ``(2 draw + 1) / w_other``, or equal with source < other."""
        bound = (2 * draw + 1) * self.weights[source]
        weight = self.weights[other]
        largest_odd = bound // weight if source < other else (bound - 1) // weight
        return (largest_odd + 1) // 2

    def position(self, source: int, draw: int) -> int:
        """The stream position of `source`'s draw number `draw` (both from 0)."""
        return draw + sum(self._draws_before(other, source, draw) for other in range(len(self.weights))
                          if other != source)

    def draws(self, positions: int) -> List[int]:
        """Each source's number of draws among the stream's first `positions` positions."""
        counts = []
        for source in range(len(self.weights)):
            low, high = 0, positions  # the answer: the number of draws whose position is below `positions`
            while low < high:
                middle = (low + high) // 2
                if self.position(source, middle) < positions:
                    low = middle + 1
                else:
                    high = middle
            counts.append(low)
        return counts

    def window(self, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        """(source, draw number) of each stream position in ``[start, stop)``, in order."""
        first, last = self.draws(start), self.draws(stop)
        sources = np.empty(stop - start, dtype=np.int64)
        draws = np.empty(stop - start, dtype=np.int64)
        for source, (begin, end) in enumerate(zip(first, last)):
            for draw in range(begin, end):
                offset = self.position(source, draw) - start
                sources[offset], draws[offset] = source, draw
        return sources, draws


_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]")


def source_names(prefixes: Sequence[str]) -> List[str]:
    """Metric names of the sources (``data/NAME/samples``): each prefix's file name, numbered when two agree."""
    names = [_NAME_CHARACTERS.sub("_", os.path.basename(os.path.normpath(prefix))) or "data" for prefix in prefixes]
    if len(set(names)) < len(names):
        names = [f"{index}-{name}" for index, name in enumerate(names)]
    return names


class BlendedDataset:
    """The training sources of a run and the schedule drawing every global batch from them.

    Sample indices are global: source ``d``'s sample ``i`` is index ``offsets[d] + i``, so
    ``dataset[index]`` and ``len(dataset)`` serve batching as one :class:`SFTDataset` does.
    """

    def __init__(self, prefixes: Sequence[str], datasets: Sequence[SFTDataset], weights: Optional[Sequence[float]]):
        check_sources_agree(prefixes, [dataset.meta for dataset in datasets])
        self.datasets, self.names = list(datasets), source_names(prefixes)
        sizes = [len(dataset) for dataset in datasets]
        self.schedule = BlendSchedule(blend_weights(weights, sizes))
        self.offsets = np.cumsum([0] + sizes)
        self.meta = datasets[0].meta

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, index: int) -> Tuple[int, int]:
        """(source, the sample's index within it) of global sample `index`."""
        source = int(np.searchsorted(self.offsets, int(index), side="right")) - 1
        return source, int(index) - int(self.offsets[source])

    def __getitem__(self, index) -> tuple:
        source, sample = self.source_of(index)
        return self.datasets[source][sample]

    def sample_length(self, index: int) -> int:
        source, sample = self.source_of(index)
        return self.datasets[source].sample_length(sample)

    def batch_indices(self, step: int, global_batch_size: int, seed: int) -> List[int]:
        """The global sample indices of optimizer step `step` (0-based)."""
        sources, draws = self.schedule.window(step * global_batch_size, (step + 1) * global_batch_size)
        indices = np.empty_like(draws)
        for source in np.unique(sources):
            taken = sources == source
            # One source keeps the unblended stream's seeds; in a blend each source has its own.
            key = (seed,) if len(self.datasets) == 1 else (seed, int(source))
            indices[taken] = stream_samples(len(self.datasets[source]), draws[taken], key) + self.offsets[source]
        return indices.tolist()

    def batch_counts(self, indices: Sequence[int]) -> Dict[str, int]:
        """Per source, the samples among a global batch's `indices` (:meth:`batch_indices`), their tokens and
        the tokens that carry a loss (``data/NAME/samples``, ``data/NAME/tokens``, ``data/NAME/trained_tokens``);
        empty for a single source, whose counts are the batch's own."""
        if len(self.datasets) == 1:
            return {}
        counts = {f"data/{name}/{what}": 0 for name in self.names for what in ("samples", "tokens", "trained_tokens")}
        for index in indices:
            source, sample = self.source_of(index)
            name = self.names[source]
            counts[f"data/{name}/samples"] += 1
            counts[f"data/{name}/tokens"] += self.datasets[source].sample_length(sample)
            counts[f"data/{name}/trained_tokens"] += self.datasets[source].trained_tokens(sample)
        return counts


def blend_weights(weights: Optional[Sequence[float]], sizes: Sequence[int]) -> List[float]:
    """The weights a blend draws by: the given ones, or without them each source's number of samples (as
    Megatron blends an unweighted ``--data-path`` list)."""
    return list(weights) if weights is not None else list(sizes)


def normalized_weights(weights: Optional[Sequence[float]], sizes: Sequence[int]) -> List[float]:
    """The blend's weights (:func:`blend_weights`) summing to 1."""
    raw = blend_weights(weights, sizes)
    total = float(sum(raw))
    return [float(weight) / total for weight in raw]


def epochs_over_run(weights: Optional[Sequence[float]], sizes: Sequence[int], samples: int) -> List[float]:
    """Each source's epochs over a run of `samples` blended samples."""
    draws = BlendSchedule(blend_weights(weights, sizes)).draws(samples)
    return [count / size for count, size in zip(draws, sizes)]


def check_sources_agree(prefixes: Sequence[str], metas: Sequence[dict]) -> None:
    """Every source of a blend was made with the first one's tokenizer, sequence length and padding id."""
    first, first_meta = prefixes[0], metas[0]
    for prefix, meta in zip(prefixes[1:], metas[1:]):
        tokenizer, first_tokenizer = meta.get("tokenizer") or {}, first_meta.get("tokenizer") or {}
        if tokenizer.get("vocab_sha256") != first_tokenizer.get("vocab_sha256"):
            raise DataError(f"--data-prefix: {prefix} was tokenized with {tokenizer.get('name', '?')} and {first} with "
                            f"{first_tokenizer.get('name', '?')} (another vocabulary); every source of a blend needs "
                            "the same tokenizer")
        for key, what in (("seq_length", "--seq-length"), ("pad_id", "padding id")):
            if meta[key] != first_meta[key]:
                raise DataError(f"--data-prefix: {prefix} was preprocessed with {what} {meta[key]} and {first} with "
                                f"{first_meta[key]}; preprocess every source of a blend alike")
