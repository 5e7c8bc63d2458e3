"""Tokenize JSONL chat data into memory-mappable SFT samples with an assistant-only loss mask.

    python tools/preprocess_data.py --input data.jsonl --output-prefix data/sft \\
        --tokenizer megatron_psft/assets/tokenizer --seq-length 128

Each input line is ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
or ``{"prompt": "...", "response": "..."}`` (optionally with ``"system"``). The conversation is
rendered with the tokenizer's own chat template. The loss mask is 1 exactly on each assistant turn's
content and its end-of-turn token, found by rendering the conversation prefix by prefix and diffing
token counts. Writes ``PREFIX.tokens.bin``, ``PREFIX.mask.bin``, ``PREFIX.offsets.npy`` and, last,
``PREFIX.meta.json`` (see docs/data.md); nothing is renamed into place until the run has succeeded.
"""

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool

import numpy as np

FORMAT_VERSION = 1
ROLES = ("system", "user", "assistant")
LINES_PER_TASK = 256  # lines a worker tokenizes per task; large enough to amortise pickling


class MalformedSample(ValueError):
    """An input line that cannot become a training sample; the message says why."""


def parse_messages(line: str) -> list[dict]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise MalformedSample(f"bad JSON: {e}") from None
    if not isinstance(row, dict):
        raise MalformedSample(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise MalformedSample('"messages" must be a non-empty list')
    elif "prompt" in row and "response" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        if "system" in row:
            messages.insert(0, {"role": "system", "content": row["system"]})
    else:
        raise MalformedSample('expected a "messages" list, or "prompt" and "response" fields')

    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise MalformedSample(f"message {i}: needs a \"role\" and a \"content\"")
        if message["role"] not in ROLES:
            raise MalformedSample(f"message {i}: unknown role {message['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise MalformedSample(f"message {i} ({message['role']}): empty or non-string content")
    if not any(message["role"] == "assistant" for message in messages):
        raise MalformedSample("no assistant turn")
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def tokenize_with_assistant_mask(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered conversation, and a mask that is 1 on each assistant turn's content
    plus its end-of-turn token.

    An assistant turn's tokens are those the full render of messages[:k+1] adds to the render of
    messages[:k] with the generation prompt; that span then ends at its last special token
    (``<|im_end|>`` for Qwen), because what follows (the newline) is formatting, never generated.
    Both renders must tokenize to a prefix of the full conversation, else the template rewrites
    earlier turns or BPE merges across the turn boundary and the mask cannot be trusted.
    """
    def render(prefix, add_generation_prompt):
        try:
            text = tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja errors from a template that rejects this conversation
            raise MalformedSample(f"chat template failed: {e}") from None
        return tokenizer.encode(text, add_special_tokens=False)

    ids = render(messages, add_generation_prompt=False)
    special_ids = set(tokenizer.all_special_ids)
    mask = np.zeros(len(ids), dtype=np.uint8)

    def prefix_length(prefix_ids, description):
        if ids[:len(prefix_ids)] != prefix_ids:
            raise MalformedSample(
                f"the chat template's rendering of {description} does not tokenize to a prefix of the full "
                "conversation (the template rewrites earlier turns, or BPE merges across the turn boundary), "
                "so the assistant mask cannot be derived")
        return len(prefix_ids)

    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = prefix_length(render(messages[:k], True), f"messages[:{k}] plus the generation prompt")
        end = prefix_length(render(messages[:k + 1], False), f"messages[:{k + 1}]")
        last_special = max((j for j in range(start, end) if ids[j] in special_ids), default=end - 1)
        mask[start:last_special + 1] = 1
    mask[:1] = 0  # the first token is never a label
    return np.asarray(ids, dtype=np.int64), mask


class Tokenization:
    """Per-process tokenizer and settings; each worker process builds one."""

    def __init__(self, tokenizer_path, seq_length, overlong):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        if not self.tokenizer.chat_template:
            raise SystemExit(f"error: tokenizer {tokenizer_path!r} has no chat_template")
        self.max_tokens = seq_length + 1  # inputs and labels are the sample shifted by one
        self.overlong = overlong

    def sample(self, line: str):
        """One line -> ("ok", ids, mask, truncated) | ("malformed", message) | ("overlong",) | ("untrained",)."""
        try:
            ids, mask = tokenize_with_assistant_mask(self.tokenizer, parse_messages(line))
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
    """(1-based line numbers, lines) in blocks, skipping blank lines, so memory stays bounded."""
    numbers, lines = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
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
    parser.add_argument("--log-interval", type=int, default=10000, help="report progress every this many lines")
    args = parser.parse_args(argv)
    if args.seq_length < 1:
        parser.error("--seq-length must be positive")
    if args.workers < 1:
        parser.error("--workers must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    tokenization = Tokenization(args.tokenizer, args.seq_length, args.overlong)
    tokenizer = tokenization.tokenizer
    vocab_size = len(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SystemExit(f"error: tokenizer {args.tokenizer!r} has neither a pad nor an eos token to pad with")
    token_dtype = np.uint16 if vocab_size <= 2**16 else np.uint32

    prefix = args.output_prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    final = {kind: f"{prefix}.{kind}" for kind in ("tokens.bin", "mask.bin", "offsets.npy", "meta.json")}
    temporary = {kind: f"{path}.tmp{os.getpid()}" for kind, path in final.items()}

    counts = dict(lines=0, written=0, truncated=0, dropped_overlong=0, dropped_no_trained_tokens=0, skipped_malformed=0)
    offsets = [0]
    num_trained_tokens = 0
    pool = Pool(args.workers, _init_worker, (args.tokenizer, args.seq_length, args.overlong)) if args.workers > 1 else None
    started = time.monotonic()
    next_report = args.log_interval
    try:
        with open(temporary["tokens.bin"], "wb") as tokens_file, open(temporary["mask.bin"], "wb") as mask_file:
            for numbers, lines in numbered_line_blocks(args.input, LINES_PER_TASK * args.workers * 4):
                if pool is None:
                    results = [tokenization.sample(line) for line in lines]
                else:
                    tasks = [lines[i:i + LINES_PER_TASK] for i in range(0, len(lines), LINES_PER_TASK)]
                    results = [result for chunk in pool.map(_tokenize_lines, tasks) for result in chunk]
                for number, result in zip(numbers, results):
                    counts["lines"] += 1
                    status = result[0]
                    if status == "malformed":
                        print(f"{args.input}:{number}: {result[1]}", file=sys.stderr)
                        if args.on_error == "stop":
                            raise SystemExit("error: stopping at the first malformed line (use --on-error skip to skip them)")
                        counts["skipped_malformed"] += 1
                    elif status == "overlong":
                        counts["dropped_overlong"] += 1
                    elif status == "untrained":
                        counts["dropped_no_trained_tokens"] += 1
                    else:
                        _, ids, mask, truncated = result
                        tokens_file.write(ids.astype(token_dtype).tobytes())
                        mask_file.write(mask.tobytes())
                        offsets.append(offsets[-1] + len(ids))
                        num_trained_tokens += int(mask.sum())
                        counts["written"] += 1
                        counts["truncated"] += truncated
                    if counts["lines"] == next_report:
                        elapsed = time.monotonic() - started
                        print(f"{counts['lines']} lines, {counts['written']} samples written, "
                              f"{counts['lines'] / elapsed:.0f} lines/s", file=sys.stderr)
                        next_report += args.log_interval
        if counts["written"] == 0:
            raise SystemExit(f"error: no samples written from {args.input} ({counts})")
        with open(temporary["offsets.npy"], "wb") as f:  # a file object, so np.save keeps the temporary name
            np.save(f, np.asarray(offsets, dtype=np.int64))

        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": os.path.abspath(args.tokenizer) if os.path.isdir(args.tokenizer) else args.tokenizer,
            "vocab_size": vocab_size,
            "pad_id": int(pad_id),
            "eos_id": tokenizer.eos_token_id,
            "seq_length": args.seq_length,
            "token_dtype": np.dtype(token_dtype).name,
            "mask_dtype": "uint8",
            "num_samples": counts["written"],
            "num_tokens": offsets[-1],
            "num_trained_tokens": num_trained_tokens,
            "overlong": args.overlong,
            "input": os.path.abspath(args.input),
            "counts": counts,
        }
        with open(temporary["meta.json"], "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        # meta.json marks a finished dataset: remove any old one first and rename the new one last,
        # so an interruption in between never pairs a meta with another run's data.
        if os.path.exists(final["meta.json"]):
            os.remove(final["meta.json"])
        for kind in ("tokens.bin", "mask.bin", "offsets.npy", "meta.json"):
            os.replace(temporary[kind], final[kind])
    finally:
        if pool is not None:
            pool.terminate()
        for path in temporary.values():
            if os.path.exists(path):
                os.remove(path)

    elapsed = time.monotonic() - started
    print(f"done in {elapsed:.1f}s: {counts['lines']} lines -> {counts['written']} samples "
          f"({counts['truncated']} truncated), dropped {counts['dropped_overlong']} over-long and "
          f"{counts['dropped_no_trained_tokens']} with no trained tokens, skipped {counts['skipped_malformed']} malformed; "
          f"{offsets[-1]} tokens, {num_trained_tokens} trained; wrote {prefix}.*")


if __name__ == "__main__":
    main()
