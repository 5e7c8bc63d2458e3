"""Tokenize JSONL chat data into memory-mappable SFT samples with an assistant-only loss mask.

    megatron-psft-preprocess --input data.jsonl --output-prefix data/sft \\
        --tokenizer megatron_psft/assets/tokenizer --seq-length 128
    (or, from a checkout: python tools/preprocess_data.py ...)

Each input line is ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}``
(assistant messages may carry ``reasoning_content`` and ``tool_calls``) or ``{"prompt": "...",
"response": "..."}`` (optionally with ``"system"``). The conversation is rendered once with the
tokenizer's own chat template, and the loss mask is 1 exactly on each assistant message's rendered
text (its answer, a <think> block where the template renders one, and its end-of-turn token) as it
stands in that render, which also holds for templates that render a turn differently by its position
(Qwen3's). Writes ``PREFIX.tokens.bin``, ``PREFIX.mask.bin``, ``PREFIX.offsets.npy`` and, last,
``PREFIX.meta.json`` (see docs/data.md); nothing is renamed into place until the run has succeeded.
"""

import argparse
import os
import sys
import time
from multiprocessing import Pool

from megatron_psft.data.chat import (MalformedSample, TurnMarkers, UnsupportedTemplate, parse_messages,
                                     tokenize_with_assistant_mask, uses_generation_blocks)
from megatron_psft.data.dataset import tokenizer_identity
from megatron_psft.data.format import DatasetWriter
from megatron_psft.observability.progress import ProgressBar, count_lines

LINES_PER_TASK = 256  # lines a worker tokenizes per task; large enough to amortise pickling



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

    def sample(self, line):
        """One line (a str, or the MalformedSample it already is) -> ("ok", ids, mask, truncated) |
        ("malformed", message) | ("overlong",) | ("untrained",)."""
        try:
            if isinstance(line, MalformedSample):
                raise line
            ids, mask = tokenize_with_assistant_mask(self.tokenizer, parse_messages(line), self.markers)
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


def _tokenize_lines(lines):
    return [_worker_tokenization.sample(line) for line in lines]


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL chat data")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.{tokens.bin,mask.bin,offsets.npy,meta.json}")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory or name (the model's own, with a chat template)")
    parser.add_argument("--seq-length", type=int, required=True, help="training sequence length; samples keep at most seq-length + 1 tokens")
    parser.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                        help="what to do with samples longer than seq-length + 1 tokens (default: truncate)")
    parser.add_argument("--on-error", choices=["skip", "stop"], default="stop",
                        help="malformed lines: skip and count them, or stop with a non-zero exit (default: stop)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--log-interval", type=int, default=10000,
                        help="report progress every this many lines (a live bar instead when stderr is a terminal)")
    args = parser.parse_args(argv)
    if args.seq_length < 1:
        parser.error("--seq-length must be positive")
    if args.workers < 1:
        parser.error("--workers must be positive")
    return args



def tokenized_blocks(args, tokenization, pool):
    """(line numbers, ``Tokenization.sample`` results) of the input's non-blank lines, a block at a time."""
    for numbers, lines in numbered_line_blocks(args.input, LINES_PER_TASK * args.workers * 4):
        if pool is None:
            yield numbers, [tokenization.sample(line) for line in lines]
        else:
            tasks = [lines[i:i + LINES_PER_TASK] for i in range(0, len(lines), LINES_PER_TASK)]
            yield numbers, [result for chunk in pool.map(_tokenize_lines, tasks) for result in chunk]


def write_samples(args, tokenization, pool, writer: DatasetWriter, bar: ProgressBar, started: float) -> dict:
    """Tokenize the input into `writer`, reporting malformed lines and progress; returns the counts
    (lines, written, truncated, dropped, skipped) that meta.json records."""
    counts = dict(lines=0, written=0, truncated=0, dropped_overlong=0, dropped_no_trained_tokens=0, skipped_malformed=0)
    next_report = args.log_interval
    bar_line = 0  # the input line the bar has reached
    for numbers, results in tokenized_blocks(args, tokenization, pool):
        for number, result in zip(numbers, results):
            counts["lines"] += 1
            status = result[0]
            if status == "malformed":
                bar.write(f"{args.input}:{number}: {result[1]}", file=sys.stderr)
                if args.on_error == "stop":
                    raise SystemExit("error: stopping at the first malformed line (use --on-error skip to skip them)")
                counts["skipped_malformed"] += 1
            elif status == "overlong":
                counts["dropped_overlong"] += 1
            elif status == "untrained":
                counts["dropped_no_trained_tokens"] += 1
            else:
                _, ids, mask, truncated = result
                if ids.max() >= writer.vocab_size:  # the loader's check would refuse the whole dataset
                    raise SystemExit(f"error: {args.input}:{number}: token id {int(ids.max())} >= the "
                                     f"tokenizer's size {writer.vocab_size}")
                writer.append(ids, mask)
                counts["written"] += 1
                counts["truncated"] += truncated
            if counts["lines"] == next_report:
                if not bar.active:  # the bar shows as much, live
                    elapsed = time.monotonic() - started
                    print(f"{counts['lines']} lines, {counts['written']} samples written, "
                          f"{counts['lines'] / elapsed:.0f} lines/s", file=sys.stderr)
                next_report += args.log_interval
        bar.update(numbers[-1] - bar_line, f"{counts['written']} samples")  # numbers count blank lines too
        bar_line = numbers[-1]
    return counts


def main(argv=None):
    args = parse_args(argv)
    tokenization = Tokenization(args.tokenizer, args.seq_length, args.overlong)
    tokenizer = tokenization.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SystemExit(f"error: tokenizer {args.tokenizer!r} has neither a pad nor an eos token to pad with")

    pool = Pool(args.workers, _init_worker, (args.tokenizer, args.seq_length, args.overlong)) if args.workers > 1 else None
    started = time.monotonic()
    bar = ProgressBar("preprocessing", total=lambda: count_lines(args.input), unit="line")
    try:
        with DatasetWriter(args.output_prefix, len(tokenizer)) as writer:
            counts = write_samples(args, tokenization, pool, writer, bar, started)
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
    print(f"done in {elapsed:.1f}s: {counts['lines']} lines -> {counts['written']} samples "
          f"({counts['truncated']} truncated), dropped {counts['dropped_overlong']} over-long and "
          f"{counts['dropped_no_trained_tokens']} with no trained tokens, skipped {counts['skipped_malformed']} malformed; "
          f"{meta['num_tokens']} tokens, {meta['num_trained_tokens']} trained; wrote {args.output_prefix}.*")


if __name__ == "__main__":
    main()
