"""Tokenize chat data into memory-mappable SFT samples with an assistant-only loss mask.

    megatron-psft-preprocess --input data.jsonl --output-prefix data/sft \\
        --tokenizer megatron_psft/assets/tokenizer --seq-length 128
    (or, from a checkout: python tools/preprocess_data.py ...)

The input is a JSONL file, a ``.parquet`` file or a directory of them, or a directory written by
`datasets`' ``save_to_disk`` (a ``DatasetDict``'s split chosen with ``--split``, default train), read
offline a block at a time. Each record (line or row) is ``{"messages": [{"role": "system"|"user"|
"assistant"|"tool", "content": "..."}, ...]}`` (assistant messages may carry ``reasoning_content``
and ``tool_calls``), ShareGPT's ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."},
...]}`` or ``{"prompt": "...", "response": "..."}`` (optionally with ``"system"``); the same
conversations give the same output bytes in any of these forms. The conversation is rendered once
with the tokenizer's own chat template, and the loss mask is 1 exactly on each assistant message's
rendered text (its answer, a <think> block where the template renders one, and its end-of-turn
token) as it stands in that render, which also holds for templates that render a turn differently by
its position (Qwen3's). Writes ``PREFIX.tokens.bin``, ``PREFIX.mask.bin``, ``PREFIX.offsets.npy``
and, last, ``PREFIX.meta.json`` (see docs/data.md); nothing is renamed into place until the run has
succeeded.
"""
import argparse
import bisect
import functools
import glob
import importlib
import itertools
import os
import sys
import time
from multiprocessing import Pool

from megatron_psft.data.chat import (MalformedSample, TurnMarkers, UnsupportedTemplate, parse_messages,
                                     tokenize_with_assistant_mask, uses_generation_blocks)
from megatron_psft.data.dataset import tokenizer_identity
from megatron_psft.data.format import DatasetWriter
from megatron_psft.observability.progress import ProgressBar, count_lines

RECORDS_PER_TASK = 256  # records a worker tokenizes per task; large enough to amortise pickling
# Files that `datasets`' save_to_disk writes: a Dataset's (state.json, dataset_info.json), a DatasetDict's.
DATASETS_DIR_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")


class Tokenization:
    """Per-process tokenizer and settings; each worker process builds one."""

    def __init__(self, tokenizer_path, seq_length, overlong):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        if not self.tokenizer.chat_template:
            raise SystemExit(f"error: tokenizer {tokenizer_path!r} has no chat_template")
        self.markers = None
        if not uses_generation_blocks(self.tokenizer):
            try:
                self.markers = TurnMarkers(self.tokenizer)
            except UnsupportedTemplate as e:
                raise SystemExit(f"error: tokenizer {tokenizer_path!r}: {e}; give the template {{% generation %}} "
                                 "blocks around what the assistant generates, or use a ChatML-like template") from None
        self.max_tokens = seq_length + 1  # inputs and labels are the sample shifted by one
        self.overlong = overlong

    def mask_method(self) -> dict:
        return self.markers.as_dict() if self.markers else {"method": "generation_blocks"}

    def sample(self, record):
        """One record (a JSONL line, a row's dict, or the MalformedSample it already is) ->
        ("ok", ids, mask, truncated) | ("malformed", message) | ("overlong",) | ("untrained",)."""
        try:
            if isinstance(record, MalformedSample):
                raise record
            ids, mask = tokenize_with_assistant_mask(self.tokenizer, parse_messages(record), self.markers)
        except MalformedSample as e:
            return ("malformed", str(e))
        truncated = len(ids) > self.max_tokens
        if truncated:
            if self.overlong == "drop":
                return ("overlong",)
            ids, mask = ids[:self.max_tokens], mask[:self.max_tokens]
        if not mask.any():
            return ("untrained",)
        return ("ok", ids, mask, truncated)


_worker_tokenization = None


def _init_worker(tokenizer_path, seq_length, overlong):
    global _worker_tokenization
    _worker_tokenization = Tokenization(tokenizer_path, seq_length, overlong)


def _tokenize_records(records):
    return [_worker_tokenization.sample(record) for record in records]


def numbered_line_blocks(path, block_lines):
    """(1-based line numbers, lines) in blocks, skipping blank lines, so memory stays bounded. A line
    that is not UTF-8 comes as a MalformedSample saying so (reported with its line number like any
    malformed line); a UTF-8 byte-order mark on the first line is dropped."""
    numbers, lines = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                line = MalformedSample(f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}...)")
            if isinstance(line, MalformedSample) or line.strip():
                numbers.append(number)
                lines.append(line)
            if len(lines) == block_lines:
                yield numbers, lines
                numbers, lines = [], []
    if lines:
        yield numbers, lines


def one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def import_for_input(module: str, path: str):
    """`module` (pyarrow, datasets), or a one-line refusal naming the extra that installs it: JSONL alone needs neither."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"error: reading {path} needs the {module} package: pip install 'megatron-psft[data]'") from None


class JsonlInput:
    """A JSONL file: a record per non-blank line, its position the 1-based line number."""

    unit = "line"

    def __init__(self, path):
        try:
            open(path, "rb").close()  # fail before the tokenizer loads, as the other forms do
        except OSError as e:
            raise SystemExit(f"error: cannot read {path}: {e.strerror}") from None
        self.path = path

    def total(self) -> int:
        return count_lines(self.path)

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"

    def blocks(self, size):
        return numbered_line_blocks(self.path, size)


class ArrowInput:
    """Rows of Arrow data in parts (parquet files, or a `datasets` split), read a record batch at a time.

    ``parts`` holds (name, number of rows, batches) with ``batches(size)`` yielding pyarrow record
    batches or tables of at most `size` rows. A row's position is its 1-based count over the whole
    input; it is named by its part and its 0-based index there, as ``table.slice`` and ``dataset[i]`` take it.
    """

    unit = "row"

    def __init__(self, parts):
        self.parts = parts
        self.starts = list(itertools.accumulate((rows for _, rows, _ in parts), initial=0))

    def total(self) -> int:
        return self.starts[-1]

    def where(self, position: int) -> str:
        part = bisect.bisect_right(self.starts, position - 1) - 1
        return f"{self.parts[part][0]}: row {position - 1 - self.starts[part]}"

    def blocks(self, size):
        import pyarrow

        for (name, _, batches), start in zip(self.parts, self.starts):
            try:
                for batch in batches(size):
                    rows = batch.to_pylist()
                    yield list(range(start + 1, start + 1 + len(rows))), rows
                    start += len(rows)
            except (OSError, pyarrow.ArrowException) as e:
                raise SystemExit(f"error: cannot read {name}: {one_line(e)}") from None


def parquet_batches(path, size):
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        yield from parquet.iter_batches(batch_size=size)


def parquet_input(path) -> ArrowInput:
    """A .parquet file, or the .parquet files of a directory in name order."""
    pyarrow = import_for_input("pyarrow", path)
    import pyarrow.parquet as pq

    parts = []
    for file in [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.parquet"))):
        try:
            with pq.ParquetFile(file) as parquet:  # reads the footer only
                rows = parquet.metadata.num_rows
        except (OSError, pyarrow.ArrowException) as e:
            raise SystemExit(f"error: cannot read {file} as parquet: {one_line(e)}") from None
        parts.append((file, rows, functools.partial(parquet_batches, file)))
    return ArrowInput(parts)


def datasets_input(path, split) -> ArrowInput:
    """A directory from `datasets`' save_to_disk: a Dataset, or a DatasetDict's `split` (default train).
    Its Arrow files are memory-mapped, not read into memory."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # read before `datasets` is first imported; nothing is downloaded
    datasets = import_for_input("datasets", path)

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises many types for a broken directory; each is the same refusal
        raise SystemExit(f"error: cannot read {path} as a datasets directory: {type(e).__name__}: {one_line(e)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise SystemExit(f"error: {path} has no split {split!r} (it has {', '.join(loaded)}); choose one with --split")
        dataset, name = loaded[split], f"{path} (split {split})"
    elif split is not None:
        raise SystemExit(f"error: --split {split}: {path} holds a single Dataset, not a DatasetDict with splits")
    else:
        dataset, name = loaded, path
    arrow_rows = dataset.with_format("arrow")
    return ArrowInput([(name, len(dataset), lambda size: arrow_rows.iter(batch_size=size))])


def open_input(path, split):
    """The input by the form its path shows: a `datasets` directory, .parquet files, else JSONL."""
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in DATASETS_DIR_FILES):
        return datasets_input(path, split)
    if split is not None:
        raise SystemExit(f"error: --split is for a datasets directory saved from a DatasetDict; {path} is not one")
    if os.path.isdir(path):
        if not glob.glob(os.path.join(path, "*.parquet")):
            raise SystemExit(f"error: {path} is a directory with neither .parquet files nor a datasets save_to_disk "
                             f"({', '.join(DATASETS_DIR_FILES)})")
        return parquet_input(path)
    if not os.path.exists(path):
        raise SystemExit(f"error: {path}: no such file or directory")
    return parquet_input(path) if path.endswith(".parquet") else JsonlInput(path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="chat data: a JSONL file, a .parquet file or a directory of them, or a datasets "
                             "save_to_disk directory")
    parser.add_argument("--split", default=None,
                        help="the split of a datasets directory saved from a DatasetDict (default: train)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.{tokens.bin,mask.bin,offsets.npy,meta.json}")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory or name (the model's own, with a chat template)")
    parser.add_argument("--seq-length", type=int, required=True, help="training sequence length; samples keep at most seq-length + 1 tokens")
    parser.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                        help="what to do with samples longer than seq-length + 1 tokens (default: truncate)")
    parser.add_argument("--on-error", choices=["skip", "stop"], default="stop",
                        help="malformed records: skip and count them, or stop with a non-zero exit (default: stop)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--log-interval", type=int, default=10000,
                        help="report progress every this many records (a live bar instead when stderr is a terminal)")
    args = parser.parse_args(argv)
    if args.seq_length < 1:
        parser.error("--seq-length must be positive")
    if args.workers < 1:
        parser.error("--workers must be positive")
    return args



def tokenized_blocks(source, tokenization, pool, workers):
    """(positions, ``Tokenization.sample`` results) of the input's records, a block at a time."""
    for positions, records in source.blocks(RECORDS_PER_TASK * workers * 4):
        if pool is None:
            yield positions, [tokenization.sample(record) for record in records]
        else:
            tasks = [records[i:i + RECORDS_PER_TASK] for i in range(0, len(records), RECORDS_PER_TASK)]
            yield positions, [result for chunk in pool.map(_tokenize_records, tasks) for result in chunk]


def write_samples(args, source, tokenization, pool, writer: DatasetWriter, bar: ProgressBar, started: float) -> dict:
    """Tokenize the input's records into `writer`, reporting malformed ones and progress; returns the
    counts (``lines``: records read; written, truncated, dropped, skipped) that meta.json records."""
    counts = dict(lines=0, written=0, truncated=0, dropped_overlong=0, dropped_no_trained_tokens=0, skipped_malformed=0)
    next_report = args.log_interval
    bar_position = 0  # the input line or row the bar has reached
    for positions, results in tokenized_blocks(source, tokenization, pool, args.workers):
        for position, result in zip(positions, results):
            counts["lines"] += 1
            status = result[0]
            if status == "malformed":
                bar.write(f"{source.where(position)}: {result[1]}", file=sys.stderr)
                if args.on_error == "stop":
                    raise SystemExit(f"error: stopping at the first malformed {source.unit} (use --on-error skip to "
                                     "skip them)")
                counts["skipped_malformed"] += 1
            elif status == "overlong":
                counts["dropped_overlong"] += 1
            elif status == "untrained":
                counts["dropped_no_trained_tokens"] += 1
            else:
                _, ids, mask, truncated = result
                if ids.max() >= writer.vocab_size:  # the loader's check would refuse the whole dataset
                    raise SystemExit(f"error: {source.where(position)}: token id {int(ids.max())} >= the "
                                     f"tokenizer's size {writer.vocab_size}")
                writer.append(ids, mask)
                counts["written"] += 1
                counts["truncated"] += truncated
            if counts["lines"] == next_report:
                if not bar.active:  # the bar shows as much, live
                    elapsed = time.monotonic() - started
                    print(f"{counts['lines']} {source.unit}s, {counts['written']} samples written, "
                          f"{counts['lines'] / elapsed:.0f} {source.unit}s/s", file=sys.stderr)
                next_report += args.log_interval
        bar.update(positions[-1] - bar_position, f"{counts['written']} samples")  # line numbers count blank lines too
        bar_position = positions[-1]
    return counts


def main(argv=None):
    args = parse_args(argv)
    source = open_input(args.input, args.split)  # a bad input fails before the tokenizer loads
    tokenization = Tokenization(args.tokenizer, args.seq_length, args.overlong)
    tokenizer = tokenization.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SystemExit(f"error: tokenizer {args.tokenizer!r} has neither a pad nor an eos token to pad with")

    pool = Pool(args.workers, _init_worker, (args.tokenizer, args.seq_length, args.overlong)) if args.workers > 1 else None
    started = time.monotonic()
    bar = ProgressBar("preprocessing", total=source.total, unit=source.unit)
    try:
        with DatasetWriter(args.output_prefix, len(tokenizer)) as writer:
            counts = write_samples(args, source, tokenization, pool, writer, bar, started)
            if counts["written"] == 0:
                raise SystemExit(f"error: no samples written from {args.input} ({counts})")
            meta = writer.finish(
                tokenizer=tokenizer_identity(
                    tokenizer, os.path.abspath(args.tokenizer) if os.path.isdir(args.tokenizer) else args.tokenizer),
                assistant_mask=tokenization.mask_method(), pad_id=int(pad_id), eos_id=tokenizer.eos_token_id,
                seq_length=args.seq_length, overlong=args.overlong, input=os.path.abspath(args.input), counts=counts)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()

    elapsed = time.monotonic() - started
    print(f"done in {elapsed:.1f}s: {counts['lines']} {source.unit}s -> {counts['written']} samples "
          f"({counts['truncated']} truncated), dropped {counts['dropped_overlong']} over-long and "
          f"{counts['dropped_no_trained_tokens']} with no trained tokens, skipped {counts['skipped_malformed']} malformed; "
          f"{meta['num_tokens']} tokens, {meta['num_trained_tokens']} trained; wrote {args.output_prefix}.*")


if __name__ == "__main__":
    main()
