"""Data pipeline: bundled assets, tools/preprocess_data.py (CLI behaviour via subprocesses), SFTDataset,
the global-batch schedule, collate and pack."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_psft.data import SFTDataset, collate, global_batch_indices, pack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "megatron_psft", "assets")
TOKENIZER = os.path.join(ASSETS, "tokenizer")
CHAT_DATA = os.path.join(ASSETS, "chat_data.jsonl")
OFFLINE_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so worker processes can unpickle its functions
    spec.loader.exec_module(module)
    return module


preprocess_data = load_tool("preprocess_data")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def run_preprocess(tmp_path, lines, *flags, seq_length=128):
    """Run the CLI on `lines` (dicts are JSON-encoded, strings written verbatim); returns (result, prefix)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    input_path = tmp_path / "input.jsonl"
    input_path.write_text("".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines))
    prefix = str(tmp_path / "out" / "data")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(input_path),
         "--output-prefix", prefix, "--tokenizer", TOKENIZER, "--seq-length", str(seq_length), *flags],
        capture_output=True, text=True, env=OFFLINE_ENV, timeout=120)
    return result, prefix


def chat(*contents, system=None):
    """{"messages": ...} alternating user / assistant contents."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]
    return {"messages": messages}


def masked_runs(tokenizer, ids, mask):
    """Decoded text of each contiguous run of mask=1 tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [tokenizer.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]


def expected_runs(row):
    messages = row.get("messages") or [{"role": "assistant", "content": row["response"]}]
    return [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]


def output_files(prefix):
    directory = os.path.dirname(prefix)
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


# ---------------------------------------------------------------- bundled assets

def test_bundled_tokenizer_loads_offline_and_round_trips():
    code = (
        "from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({TOKENIZER!r})\n"
        "text = 'Reverse the word \"héllo\": ✓ 12 + 345 = 357\\n  done'\n"
        "assert t.decode(t.encode(text, add_special_tokens=False)) == text\n"
        "print(len(t), t.pad_token_id, t.eos_token_id, *t.convert_tokens_to_ids(['<|im_start|>', '<|im_end|>']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE_ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    vocab_size, pad_id, eos_id, im_start, im_end = map(int, result.stdout.split())
    assert 900 <= vocab_size <= 1024
    assert pad_id == eos_id and len({pad_id, im_start, im_end}) == 3 and max(pad_id, im_start, im_end) < vocab_size


def test_bundled_chat_template_is_qwen_style(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n")
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode("<|im_start|>user\nU<|im_end|>", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_bundled_assets_are_small_and_reproducible(tmp_path):
    paths = [CHAT_DATA] + [os.path.join(TOKENIZER, name) for name in os.listdir(TOKENIZER)]
    assert sum(os.path.getsize(p) for p in paths) < 1_000_000

    make_tiny_assets = load_tool("make_tiny_assets")
    rows = make_tiny_assets.make_chat_data()
    with open(CHAT_DATA) as f:
        assert [json.loads(line) for line in f] == rows
    assert 300 <= len(rows) <= 600
    assert sum("prompt" in row for row in rows) > 0
    assert sum(sum(m["role"] == "assistant" for m in row.get("messages", [])) > 1 for row in rows) > 0
    tokenizer_json = make_tiny_assets.make_tokenizer(rows).to_str()
    with open(os.path.join(TOKENIZER, "tokenizer.json")) as f:
        assert json.loads(f.read()) == json.loads(tokenizer_json)


# ---------------------------------------------------------------- preprocessing

@pytest.fixture(scope="module")
def bundled_prefix(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("bundled") / "chat")
    preprocess_data.main(["--input", CHAT_DATA, "--output-prefix", prefix, "--tokenizer", TOKENIZER,
                          "--seq-length", "128", "--workers", "2"])
    return prefix


def test_bundled_data_preprocesses_without_errors_and_masks_exactly_assistant_turns(bundled_prefix, tokenizer):
    dataset = SFTDataset(bundled_prefix)
    with open(CHAT_DATA) as f:
        rows = [json.loads(line) for line in f]
    counts = dataset.meta["counts"]
    assert counts == dict(lines=len(rows), written=len(rows), truncated=0, dropped_overlong=0,
                          dropped_no_trained_tokens=0, skipped_malformed=0)
    assert len(dataset) == len(rows)
    assert dataset.meta["token_dtype"] == "uint16" and dataset.meta["pad_id"] == tokenizer.pad_token_id
    assert sum(int(dataset[i][1].sum()) for i in range(len(dataset))) == dataset.meta["num_trained_tokens"]
    for i, row in enumerate(rows):
        ids, mask = dataset[i]
        assert ids.dtype == np.int64 and mask.dtype == bool and len(ids) <= 129
        assert masked_runs(tokenizer, ids, mask) == expected_runs(row), f"line {i + 1}"
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]},
                                           {"role": "assistant", "content": row["response"]}]
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_prompt_response_system_and_multi_turn_masks(tmp_path, tokenizer):
    lines = [
        {"prompt": "What is 2 + 2?", "response": "2 + 2 = 4"},
        {"prompt": "Say hi.", "response": "hi", "system": "Be brief."},
        chat("Reverse \"dog\".", "god", "Capitals?", "GOD", system="You are a helpful assistant."),
        chat("a", "first\nline", "b", "  spaced  "),
    ]
    result, prefix = run_preprocess(tmp_path, lines)
    assert result.returncode == 0, result.stderr
    dataset = SFTDataset(prefix)
    assert len(dataset) == 4
    expected = [["2 + 2 = 4<|im_end|>"], ["hi<|im_end|>"], ["god<|im_end|>", "GOD<|im_end|>"],
                ["first\nline<|im_end|>", "  spaced  <|im_end|>"]]
    assert [masked_runs(tokenizer, *dataset[i]) for i in range(4)] == expected
    ids, _ = dataset[1]
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi.")
    assert "4 samples" in result.stdout


def test_overlong_truncate_vs_drop(tmp_path, tokenizer):
    short = chat("What is 1 + 1?", "1 + 1 = 2")
    long_answer = chat("Count.", " ".join(["apple"] * 80))  # assistant turn crosses the limit
    long_prompt = chat(" ".join(["banana"] * 80), "yes")  # assistant turn lies wholly past the limit
    lines = [short, long_answer, long_prompt]
    seq_length = 32

    result, prefix = run_preprocess(tmp_path / "truncate", lines, seq_length=seq_length)
    assert result.returncode == 0, result.stderr
    dataset = SFTDataset(prefix)
    counts = dataset.meta["counts"]
    assert (counts["written"], counts["truncated"], counts["dropped_no_trained_tokens"]) == (2, 1, 1)
    assert len(dataset) == 2 and len(dataset[1][0]) == seq_length + 1
    assert masked_runs(tokenizer, *dataset[1])[0].startswith("apple apple")
    assert "1 truncated" in result.stdout and "1 with no trained tokens" in result.stdout

    result, prefix = run_preprocess(tmp_path / "drop", lines, "--overlong", "drop", seq_length=seq_length)
    assert result.returncode == 0, result.stderr
    dataset = SFTDataset(prefix)
    counts = dataset.meta["counts"]
    assert (counts["written"], counts["truncated"], counts["dropped_overlong"]) == (1, 0, 2)
    assert masked_runs(tokenizer, *dataset[0]) == ["1 + 1 = 2<|im_end|>"]
    assert "dropped 2 over-long" in result.stdout


MALFORMED = {
    2: "{not json",
    3: {"messages": [{"role": "user", "content": "only a question"}]},
    4: {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    5: {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
    6: {"prompt": "no response"},
    7: {"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]},
}


def malformed_input():
    good = chat("What is 3 + 4?", "3 + 4 = 7")
    return [good] + [MALFORMED[n] for n in sorted(MALFORMED)] + ["", good]  # a blank line is not an error


def test_malformed_lines_skipped_with_line_numbers(tmp_path):
    result, prefix = run_preprocess(tmp_path, malformed_input(), "--on-error", "skip")
    assert result.returncode == 0, result.stderr
    reported = sorted(int(line.split(":")[1]) for line in result.stderr.splitlines() if "input.jsonl:" in line)
    assert reported == sorted(MALFORMED)
    for needle in ("bad JSON", "no assistant turn", "unknown role 'robot'", "empty", '"prompt" and "response"'):
        assert needle in result.stderr
    dataset = SFTDataset(prefix)
    assert len(dataset) == 2 and dataset.meta["counts"]["skipped_malformed"] == len(MALFORMED)
    assert f"skipped {len(MALFORMED)} malformed" in result.stdout


def test_malformed_line_stops_and_leaves_no_output(tmp_path):
    result, prefix = run_preprocess(tmp_path, malformed_input())  # --on-error stop is the default
    assert result.returncode != 0
    assert "input.jsonl:2: bad JSON" in result.stderr and "input.jsonl:3" not in result.stderr
    assert output_files(prefix) == []  # neither final nor temporary files of the failed run
    with pytest.raises(FileNotFoundError, match="not a finished preprocessed dataset"):
        SFTDataset(prefix)


def test_all_samples_untrained_is_an_error_without_output(tmp_path):
    result, prefix = run_preprocess(tmp_path, [chat(" ".join(["banana"] * 80), "yes")], seq_length=16)
    assert result.returncode != 0 and "no samples written" in result.stderr
    assert output_files(prefix) == []


def test_template_that_rewrites_earlier_turns_is_rejected(tokenizer):
    rewriting = tokenizer.__class__.from_pretrained(TOKENIZER)
    # Drops earlier assistant turns' content, like reasoning templates that strip old <think> blocks.
    rewriting.chat_template = (
        "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] if (m['role'] != 'assistant' or loop.last) else '' }}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    messages = chat("a", "first", "b", "second")["messages"]
    with pytest.raises(preprocess_data.MalformedSample, match="does not tokenize to a prefix"):
        preprocess_data.tokenize_with_assistant_mask(rewriting, messages)
    ids, mask = preprocess_data.tokenize_with_assistant_mask(tokenizer, messages)
    assert masked_runs(tokenizer, ids, mask) == ["first<|im_end|>", "second<|im_end|>"]


# ---------------------------------------------------------------- SFTDataset

def test_dataset_reads_the_written_files(bundled_prefix):
    dataset = SFTDataset(bundled_prefix)
    offsets = np.load(f"{bundled_prefix}.offsets.npy")
    tokens = np.fromfile(f"{bundled_prefix}.tokens.bin", dtype=np.uint16)
    ids, mask = dataset[7]
    np.testing.assert_array_equal(ids, tokens[offsets[7]:offsets[8]])
    np.testing.assert_array_equal(dataset[-1][0], tokens[offsets[-2]:])
    assert dataset.meta["seq_length"] == 128 and dataset.meta["vocab_size"] == 1000
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_dataset_rejects_inconsistent_files(bundled_prefix, tmp_path):
    prefix = str(tmp_path / "copy")
    for suffix in ("tokens.bin", "mask.bin", "offsets.npy", "meta.json"):
        with open(f"{bundled_prefix}.{suffix}", "rb") as src, open(f"{prefix}.{suffix}", "wb") as dst:
            dst.write(src.read())
    SFTDataset(prefix)
    with open(f"{prefix}.tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="tokens.bin holds 50 tokens"):
        SFTDataset(prefix)
    os.remove(f"{prefix}.mask.bin")
    with pytest.raises(FileNotFoundError, match="mask.bin"):
        SFTDataset(prefix)


# ---------------------------------------------------------------- global batch schedule

def test_global_batch_indices_cover_each_epoch_once_and_cross_epochs():
    num_samples, batch = 10, 4
    stream = [i for step in range(10) for i in global_batch_indices(num_samples, batch, step, seed=3)]
    epochs = [stream[e * num_samples:(e + 1) * num_samples] for e in range(4)]
    assert all(sorted(epoch) == list(range(num_samples)) for epoch in epochs)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    assert global_batch_indices(num_samples, batch, 2, seed=3) == stream[8:12]  # step 2 spans epochs 0 and 1
    assert global_batch_indices(num_samples, batch, 7, seed=3) == global_batch_indices(num_samples, batch, 7, seed=3)
    assert global_batch_indices(num_samples, batch, 7, seed=4) != stream[28:32]


def test_global_batch_indices_batch_larger_than_dataset():
    indices = global_batch_indices(3, 7, 1, seed=0)  # positions 7..13: epochs 2, 3 and 4
    assert len(indices) == 7 and all(0 <= i < 3 for i in indices)
    assert sorted(indices[2:5]) == [0, 1, 2]
    with pytest.raises(ValueError):
        global_batch_indices(0, 4, 0, seed=0)


# ---------------------------------------------------------------- collate and pack

def sample(ids, mask):
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


SAMPLES = [sample([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), sample([6, 7, 8], [0, 1, 1]), sample([9, 10, 11, 12, 13, 14, 15], [0, 0, 0, 1, 1, 0, 1])]
PAD = 99


def test_collate_pads_and_shifts():
    batch = collate(SAMPLES, seq_length=6, pad_id=PAD)
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert all(t.shape == (3, 6) for t in batch.values())
    assert batch["tokens"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["tokens"][0].tolist() == [1, 2, 3, 4, 5, PAD]
    assert batch["labels"][0].tolist() == [2, 3, 4, 5, PAD, PAD]
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 1, 0, 0]
    assert batch["tokens"][2].tolist() == [9, 10, 11, 12, 13, 14] and batch["labels"][2].tolist() == [10, 11, 12, 13, 14, 15]
    assert batch["loss_mask"][2].tolist() == [0, 0, 1, 1, 0, 1]
    assert batch["position_ids"][1].tolist() == list(range(6))
    assert (batch["labels"] >= 0).all()
    with pytest.raises(ValueError, match="longer than seq_length"):
        collate(SAMPLES, seq_length=5, pad_id=PAD)


def test_pack_segments_positions_and_boundaries():
    batch = pack(SAMPLES, seq_length=8, pad_id=PAD)  # 4 + 2 positions fit a row; the 6-position sample starts a new one
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "cu_seqlens"}
    assert batch["tokens"].shape == (2, 8) and batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 4, 6, 8, 14, 16]
    assert batch["tokens"][0].tolist() == [1, 2, 3, 4, 6, 7, PAD, PAD]
    assert batch["labels"][0].tolist() == [2, 3, 4, 5, 7, 8, PAD, PAD]  # sample 0 ends on its own token 5, not on 6
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 1, 1, 1, 0, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]

    # Every trained (token, label) pair is the same as with collate, packed or not.
    padded = collate(SAMPLES, seq_length=8, pad_id=PAD)
    def trained(b):
        keep = b["loss_mask"].flatten() > 0
        return sorted(zip(b["tokens"].flatten()[keep].tolist(), b["labels"].flatten()[keep].tolist()))
    assert trained(batch) == trained(padded)

    full = pack([sample(range(9), [1] * 9)], seq_length=8, pad_id=PAD)  # seq_length + 1 ids fill a row exactly
    assert full["cu_seqlens"].tolist() == [0, 8] and full["labels"][0].tolist() == list(range(1, 9))
    with pytest.raises(ValueError, match="longer than seq_length"):
        pack([sample(range(10), [1] * 10)], seq_length=8, pad_id=PAD)
