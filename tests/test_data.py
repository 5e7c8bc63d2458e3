"""Data pipeline (megatron_psft.data): bundled assets, preprocessing (tools/preprocess_data.py's CLI
behaviour via subprocesses), assistant masks under position-dependent chat templates (a Qwen3-like
one), the on-disk format's writer, SFTDataset and its load-time integrity checks, the tokenizer
identity, the global-batch schedule, collate and pack."""

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_psft.data import (FORMAT_VERSION, DataError, DatasetWriter, SFTDataset, check_tokenizer, collate,
                                global_batch_indices, pack, tokenizer_identity)
from megatron_psft.data import chat as chat_masking, dataset as dataset_module, preprocess
from megatron_psft.data.format import META_FIELDS, SUFFIXES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "megatron_psft", "assets")
TOKENIZER = os.path.join(ASSETS, "tokenizer")
CHAT_DATA = os.path.join(ASSETS, "chat_data.jsonl")
QWEN3_LIKE_TEMPLATE = os.path.join(REPO, "tests", "assets", "qwen3_like_template.jinja")
OFFLINE_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module



@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def run_preprocess(tmp_path, lines, *flags, seq_length=128, tokenizer=TOKENIZER):
    """Run the CLI on `lines` (dicts are JSON-encoded, strings written verbatim as UTF-8, bytes written
    as they are); returns (result, prefix)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    input_path = tmp_path / "input.jsonl"
    def encode(line):
        if isinstance(line, bytes):
            return line + b"\n"
        return ((json.dumps(line) if isinstance(line, dict) else line) + "\n").encode("utf-8")
    input_path.write_bytes(b"".join(encode(line) for line in lines))
    prefix = str(tmp_path / "out" / "data")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(input_path),
         "--output-prefix", prefix, "--tokenizer", str(tokenizer), "--seq-length", str(seq_length), *flags],
        capture_output=True, text=True, env=OFFLINE_ENV, timeout=180)
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
    preprocess.main(["--input", CHAT_DATA, "--output-prefix", prefix, "--tokenizer", TOKENIZER,
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


# ---------------------------------------------------------------- chat templates: Qwen3-like and others

def with_template(template: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    """The bundled tokenizer with a chat template that behaves like Qwen3's."""
    with open(QWEN3_LIKE_TEMPLATE) as f:
        return with_template(f.read())


@pytest.fixture(scope="module")
def qwen3_tokenizer_dir(qwen3_tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_like_tokenizer")
    qwen3_tokenizer.save_pretrained(directory)
    return str(directory)


def qwen3_assistant_texts(messages):
    """What Qwen3's template renders for each assistant message, end-of-turn token included: the oracle
    the masks are checked against, written from the template's rules rather than from a render."""
    last_query = len(messages) - 1
    for index in range(len(messages) - 1, -1, -1):
        content = messages[index]["content"]
        if messages[index]["role"] == "user" and not (content.startswith("<tool_response>")
                                                      and content.endswith("</tool_response>")):
            last_query = index
            break
    texts = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content, reasoning = message["content"], message.get("reasoning_content")
        if reasoning is None:
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        if index > last_query and (index == len(messages) - 1 or reasoning):
            text = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
        else:
            text = content
        texts.append(text + "<|im_end|>")
    return texts


QWEN3_CONVERSATIONS = [
    # system prompt; several turns; reasoning inside an earlier turn's content (dropped from the
    # history); reasoning_content on the last turn (its think block is trained)
    [{"role": "system", "content": "You are a careful calculator."},
     {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "<think>\nTwo plus three.\n</think>\n\n2 + 3 = 5"},
     {"role": "user", "content": "And doubled?"},
     {"role": "assistant", "content": "10", "reasoning_content": "Double 5."},
     {"role": "user", "content": "Minus one?"},
     {"role": "assistant", "content": "<think>\n10 - 1\n</think>\n\n9"}],
    # last turn without reasoning: an empty think block, still trained; earlier reasoning_content dropped
    [{"role": "user", "content": "Reverse \"dog\"."},
     {"role": "assistant", "content": "god", "reasoning_content": "d-o-g backwards"},
     {"role": "user", "content": "Uppercase it."},
     {"role": "assistant", "content": "GOD"}],
    # a single turn with reasoning in the content
    [{"role": "user", "content": "Count the letters in \"abc\"."},
     {"role": "assistant", "content": "<think>a, b, c</think>3"}],
    # two assistant messages after the last query (an intermediate one with reasoning keeps it)
    [{"role": "user", "content": "Say hi twice."},
     {"role": "assistant", "content": "hi", "reasoning_content": "first"},
     {"role": "assistant", "content": "hi again"}],
]


@pytest.mark.parametrize("conversation", range(len(QWEN3_CONVERSATIONS)))
def test_qwen3_like_template_masks_each_assistant_turn_once_and_nothing_else(qwen3_tokenizer, conversation):
    messages = chat_masking.parse_messages(json.dumps({"messages": QWEN3_CONVERSATIONS[conversation]}))
    rendered = qwen3_tokenizer.apply_chat_template(messages, tokenize=False)
    ids, mask = chat_masking.tokenize_with_assistant_mask(qwen3_tokenizer, messages)
    assert qwen3_tokenizer.decode(ids) == rendered
    assert masked_runs(qwen3_tokenizer, ids, mask) == qwen3_assistant_texts(messages)
    untrained = "".join(masked_runs(qwen3_tokenizer, ids, 1 - mask))
    assert "<|im_start|>assistant" in untrained and "<think>" not in untrained  # headers never, think blocks always


def test_qwen3_like_template_renders_like_qwen3(qwen3_tokenizer):
    rendered = qwen3_tokenizer.apply_chat_template(QWEN3_CONVERSATIONS[0], tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a careful calculator.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5<|im_end|>\n"
        "<|im_start|>user\nAnd doubled?<|im_end|>\n<|im_start|>assistant\n10<|im_end|>\n"
        "<|im_start|>user\nMinus one?<|im_end|>\n<|im_start|>assistant\n<think>\n10 - 1\n</think>\n\n9<|im_end|>\n")
    assert qwen3_tokenizer.apply_chat_template(QWEN3_CONVERSATIONS[1], tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\nGOD<|im_end|>\n")
    # The render of a prefix is not a prefix of the render: the old prefix-diff derivation cannot work.
    assert not rendered.startswith(qwen3_tokenizer.apply_chat_template(QWEN3_CONVERSATIONS[0][:3], tokenize=False))


def random_conversation(rng):
    pieces = ["What is 2 + 3?", "5", "hello", "  spaced  ", "\nleading newline", "trailing newline\n",
              "héllo ✓", "a\n\nb", "<b>tag</b>", "12 + 345 = 357", "x"]
    messages = [{"role": "system", "content": rng.choice(pieces)}] if rng.random() < 0.5 else []
    for turn in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": rng.choice(pieces)})
        if rng.random() < 0.2:  # a tool result between the query and the answer
            messages.append({"role": "tool", "content": rng.choice(pieces)})
        for _ in range(2 if rng.random() < 0.15 else 1):
            answer, reasoning = rng.choice(pieces), rng.choice(pieces + ["", "\n\nthink\n\n"])
            kind = rng.choice(["plain", "field", "inline"])
            message = {"role": "assistant", "content": answer}
            if kind == "field":
                message["reasoning_content"] = reasoning
            elif kind == "inline":
                message["content"] = f"<think>{reasoning}</think>{answer}"
            messages.append(message)
    if rng.random() < 0.15:
        messages.append({"role": "user", "content": rng.choice(pieces)})  # ends on a question: no think block
    return messages


def test_qwen3_like_template_random_conversations(qwen3_tokenizer):
    """Property: for any mix of system prompts, turns, tool results, reasoning as a field or inline,
    consecutive answers and leading/trailing whitespace, the trained text is exactly each assistant
    message's rendered text, once, in order, and everything else is untrained."""
    rng = random.Random(11)
    markers = chat_masking.TurnMarkers(qwen3_tokenizer)
    for case in range(150):
        messages = chat_masking.parse_messages(json.dumps({"messages": random_conversation(rng)}))
        ids, mask = chat_masking.tokenize_with_assistant_mask(qwen3_tokenizer, messages, markers)
        rendered = qwen3_tokenizer.apply_chat_template(messages, tokenize=False)
        assert qwen3_tokenizer.decode(ids) == rendered, case
        assert masked_runs(qwen3_tokenizer, ids, mask) == qwen3_assistant_texts(messages), (case, messages)


def test_generation_prompt_that_opens_the_think_block(qwen3_tokenizer):
    """Qwen3-Thinking-2507's generation prompt also opens <think>: the model generates what follows it,
    so the last turn trains from the reasoning on; earlier turns (no <think>) train their answer."""
    template = qwen3_tokenizer.chat_template.replace(
        "{{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking", "{{- '<|im_start|>assistant\\n<think>\\n' }}\n    {%- if enable_thinking")
    assert template != qwen3_tokenizer.chat_template
    thinking = with_template(template)
    messages = chat_masking.parse_messages(json.dumps({"messages": QWEN3_CONVERSATIONS[0]}))
    ids, mask = chat_masking.tokenize_with_assistant_mask(thinking, messages)
    expected = qwen3_assistant_texts(messages)
    assert masked_runs(thinking, ids, mask) == expected[:-1] + [expected[-1].removeprefix("<think>\n")]


def test_qwen3_like_multi_turn_data_preprocesses_with_on_error_stop(tmp_path, qwen3_tokenizer_dir, qwen3_tokenizer):
    lines = [{"messages": m} for m in QWEN3_CONVERSATIONS] + [
        {"prompt": "Say hi.", "response": "hi", "system": "Be brief."}]
    result, prefix = run_preprocess(tmp_path, lines, "--workers", "2", tokenizer=qwen3_tokenizer_dir, seq_length=256)
    assert result.returncode == 0, result.stderr
    dataset = SFTDataset(prefix)
    assert len(dataset) == len(lines) and dataset.meta["counts"]["skipped_malformed"] == 0
    for i, line in enumerate(lines):
        messages = chat_masking.parse_messages(json.dumps(line))
        assert masked_runs(qwen3_tokenizer, *dataset[i]) == qwen3_assistant_texts(messages), f"line {i + 1}"
    assert dataset.meta["assistant_mask"]["end_of_turn"] == "<|im_end|>"
    assert dataset.meta["tokenizer"]["name"] == os.path.abspath(qwen3_tokenizer_dir)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}SEP{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistantSEP{% endif %}")


def test_token_straddling_a_turn_edge_is_split_there(tokenizer):
    """A header ending in a space merges with the answer's first word (" the"): the turn is tokenized
    on its own, as at inference, so the trained text is still exactly the answer."""
    spaced = with_template(CHATML.replace("SEP", " "))
    messages = chat("Question?", "the answer", "Again?", "the end")["messages"]
    rendered = spaced.apply_chat_template(messages, tokenize=False)
    whole = spaced.encode(rendered, add_special_tokens=False)
    assert "Ġthe" in spaced.convert_ids_to_tokens(whole)  # the merge this test is about
    ids, mask = chat_masking.tokenize_with_assistant_mask(spaced, messages)
    assert spaced.decode(ids) == rendered
    assert masked_runs(spaced, ids, mask) == ["the answer<|im_end|>", "the end<|im_end|>"]


def test_generation_blocks_mark_what_is_trained(tokenizer):
    marked = with_template(
        "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{%- else %}{{ m['content'] }}{%- endif %}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    ids, mask = chat_masking.tokenize_with_assistant_mask(marked, chat("a", "first", "b", "second")["messages"])
    assert masked_runs(marked, ids, mask) == ["first", "second"]  # the template's marks, not <|im_end|>


def test_templates_that_cannot_be_masked_are_named_per_line(tmp_path, tokenizer):
    messages = chat("a", "first", "b", "second")["messages"]
    # Drops earlier assistant turns' text: the answer is not in its rendered turn.
    dropping = with_template(
        "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] if (m['role'] != 'assistant' or loop.last) else '' }}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    with pytest.raises(chat_masking.MalformedSample, match="message 1 .*answer is not where"):
        chat_masking.tokenize_with_assistant_mask(dropping, messages)
    # Renders assistant turns with another header than its generation prompt.
    other_header = with_template(CHATML.replace("SEP", "\n").replace("{{ m['role'] }}",
                                                                      "{{ 'model' if m['role'] == 'assistant' else m['role'] }}"))
    with pytest.raises(chat_masking.MalformedSample, match="message 1 .*unsupported template"):
        chat_masking.tokenize_with_assistant_mask(other_header, messages)
    # The same through the CLI: FILE:LINE and the reason.
    directory = tmp_path / "other_header"
    other_header.save_pretrained(directory)
    result, prefix = run_preprocess(tmp_path / "run", [chat("q", "a")] * 2, tokenizer=directory)
    assert result.returncode != 0 and "input.jsonl:1: message 1 (assistant)" in result.stderr
    assert "unsupported template" in result.stderr and output_files(prefix) == []
    # No special token after an answer: refused at start, naming the tokenizer.
    directory = tmp_path / "no_end"
    with_template("{%- for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{%- endfor %}"
                  "{%- if add_generation_prompt %}assistant: {%- endif %}").save_pretrained(directory)
    result, prefix = run_preprocess(tmp_path / "run2", [chat("q", "a")], tokenizer=directory)
    assert result.returncode != 0 and str(directory) in result.stderr and "no special token" in result.stderr


# ---------------------------------------------------------------- input encoding

def test_non_utf8_lines_are_reported_with_their_line_and_honour_on_error(tmp_path, tokenizer):
    good = chat("What is 3 + 4?", "3 + 4 = 7")
    lines = [good, b'{"prompt": "caf\xe9", "response": "ok"}', good, b"\xff\xfe", good]
    result, prefix = run_preprocess(tmp_path / "skip", lines, "--on-error", "skip")
    assert result.returncode == 0, result.stderr
    assert "input.jsonl:2: not valid UTF-8" in result.stderr and "input.jsonl:4: not valid UTF-8" in result.stderr
    dataset = SFTDataset(prefix)
    assert len(dataset) == 3 and dataset.meta["counts"]["skipped_malformed"] == 2

    result, prefix = run_preprocess(tmp_path / "stop", lines)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "input.jsonl:2: not valid UTF-8" in result.stderr and output_files(prefix) == []

    result, prefix = run_preprocess(tmp_path / "bom", ["\ufeff" + json.dumps(good)])  # a BOM is not an error
    assert result.returncode == 0, result.stderr

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


def copy_dataset(source_prefix, prefix):
    for suffix in SUFFIXES:
        shutil.copyfile(f"{source_prefix}.{suffix}", f"{prefix}.{suffix}")
    return prefix


def test_dataset_rejects_inconsistent_files(bundled_prefix, tmp_path):
    prefix = copy_dataset(bundled_prefix, str(tmp_path / "copy"))
    SFTDataset(prefix)
    with open(f"{prefix}.tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="tokens.bin holds 50 tokens"):
        SFTDataset(prefix)
    os.remove(f"{prefix}.mask.bin")
    with pytest.raises(FileNotFoundError, match="mask.bin"):
        SFTDataset(prefix)


def test_dataset_rejects_out_of_vocabulary_ids_naming_the_first_bad_sample(bundled_prefix, tmp_path):
    prefix = copy_dataset(bundled_prefix, str(tmp_path / "copy"))
    offsets = np.load(f"{prefix}.offsets.npy")
    tokens = np.memmap(f"{prefix}.tokens.bin", dtype=np.uint16, mode="r+")
    tokens[offsets[9] + 3] = 1000  # the vocabulary has ids 0..999
    tokens[offsets[20]] = 65535
    tokens.flush()
    del tokens
    with pytest.raises(DataError, match=r"tokens.bin: sample 9 \(token 3 of \d+\) has token id 1000 >= "
                                        r"meta.json's vocab_size 1000"):
        SFTDataset(prefix)
    # Against a smaller model vocabulary, the model's size is the bound.
    clean = copy_dataset(bundled_prefix, str(tmp_path / "clean"))
    largest = int(np.fromfile(f"{clean}.tokens.bin", dtype=np.uint16).max())
    SFTDataset(clean, vocab_size=largest + 1)
    with pytest.raises(DataError, match=f"has token id {largest} >= the model's vocab_size {largest}"):
        SFTDataset(clean, vocab_size=largest)


def test_dataset_rejects_mask_bytes_other_than_0_and_1(bundled_prefix, tmp_path):
    prefix = copy_dataset(bundled_prefix, str(tmp_path / "copy"))
    offsets = np.load(f"{prefix}.offsets.npy")
    mask = np.memmap(f"{prefix}.mask.bin", dtype=np.uint8, mode="r+")
    mask[offsets[7] + 1] = 2
    mask.flush()
    del mask
    with pytest.raises(DataError, match=r"mask.bin: sample 7 \(token 1 of \d+\) has mask byte 2, expected 0 or 1"):
        SFTDataset(prefix)


def test_dataset_scan_is_chunked(bundled_prefix, tmp_path, monkeypatch):
    """The integrity scan works in bounded chunks and finds a bad id past the first chunk."""
    prefix = copy_dataset(bundled_prefix, str(tmp_path / "copy"))
    monkeypatch.setattr(dataset_module, "_SCAN_CHUNK", 1000)
    SFTDataset(prefix)
    offsets = np.load(f"{prefix}.offsets.npy")
    tokens = np.memmap(f"{prefix}.tokens.bin", dtype=np.uint16, mode="r+")
    tokens[offsets[-2]] = 4000
    tokens.flush()
    del tokens
    with pytest.raises(DataError, match=f"sample {len(offsets) - 2} \\(token 0 of"):
        SFTDataset(prefix)


def edit_meta(prefix, change):
    with open(f"{prefix}.meta.json") as f:
        meta = json.load(f)
    change(meta)
    with open(f"{prefix}.meta.json", "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("change, message", [
    (lambda meta: meta.pop("vocab_size"), "missing key 'vocab_size'"),
    (lambda meta: meta.pop("num_tokens"), "missing key 'num_tokens'"),
    (lambda meta: meta.update(pad_id="0"), "key 'pad_id' must be an integer id below vocab_size, got '0'"),
    (lambda meta: meta.update(pad_id=1000), "key 'pad_id' must be an integer id below vocab_size, got 1000"),
    (lambda meta: meta.update(token_dtype="int8"), "key 'token_dtype' must be one of uint16, uint32"),
    (lambda meta: meta.update(seq_length=True), "key 'seq_length' must be a positive integer"),
    (lambda meta: meta.update(tokenizer="/path/to/tokenizer"), "key 'tokenizer' must be an object"),
    (lambda meta: meta.pop("format_version"), "missing key 'format_version'"),
    (lambda meta: meta.update(format_version=1), "format_version 1, this code reads version 2 .*older "
                                                 "tools/preprocess_data.py.*re-run tools/preprocess_data.py"),
    (lambda meta: meta.update(format_version=3), "format_version 3, this code reads version 2; re-run"),
])
def test_malformed_meta_is_a_clear_error_naming_file_and_key(bundled_prefix, tmp_path, change, message):
    prefix = copy_dataset(bundled_prefix, str(tmp_path / "copy"))
    edit_meta(prefix, change)
    with pytest.raises(DataError, match=f"copy.meta.json: {message}"):
        SFTDataset(prefix)


def test_meta_that_is_not_json_is_a_clear_error(bundled_prefix, tmp_path):
    prefix = copy_dataset(bundled_prefix, str(tmp_path / "copy"))
    with open(f"{prefix}.meta.json", "w") as f:
        f.write('{"format_version": 2, ')
    with pytest.raises(DataError, match="copy.meta.json: not valid JSON"):
        SFTDataset(prefix)
    with open(f"{prefix}.meta.json", "w") as f:
        f.write("[2]")
    with pytest.raises(DataError, match="copy.meta.json: expected a JSON object, got list"):
        SFTDataset(prefix)


def test_meta_json_holds_the_schema_keys_in_order(bundled_prefix):
    with open(f"{bundled_prefix}.meta.json") as f:
        written = json.load(f)
    assert list(written) == [field.key for field in META_FIELDS]
    assert written["format_version"] == FORMAT_VERSION == SFTDataset(bundled_prefix).meta["format_version"]


def random_samples(rng, vocab_size, count):
    samples = []
    for _ in range(count):
        length = int(rng.integers(2, 40))
        samples.append((rng.integers(0, vocab_size, length), rng.integers(0, 2, length).astype(np.uint8)))
    return samples


WRITER_FIELDS = dict(tokenizer={"name": "test", "vocab_sha256": "0" * 64, "vocab_size": 1}, assistant_mask={},
                     pad_id=0, eos_id=None, seq_length=64, overlong="truncate", input="test.jsonl", counts={})


@pytest.mark.parametrize("vocab_size, token_dtype", [(2**16, "uint16"), (2**16 + 1, "uint32")])
def test_dataset_writer_round_trips_through_sft_dataset(tmp_path, vocab_size, token_dtype):
    rng = np.random.default_rng(vocab_size)
    samples = random_samples(rng, vocab_size, 25)
    samples[0][0][0] = vocab_size - 1  # the largest id survives the narrowest dtype
    prefix = str(tmp_path / "new" / "data")
    with DatasetWriter(prefix, vocab_size) as writer:
        for ids, mask in samples:
            writer.append(ids, mask)
        meta = writer.finish(**WRITER_FIELDS)
    dataset = SFTDataset(prefix)
    assert dataset.meta == meta and meta["token_dtype"] == token_dtype and len(dataset) == len(samples)
    assert meta["num_tokens"] == sum(len(ids) for ids, _ in samples)
    assert meta["num_trained_tokens"] == sum(int(mask.sum()) for _, mask in samples)
    for (ids, mask), (read_ids, read_mask) in zip(samples, (dataset[i] for i in range(len(dataset)))):
        np.testing.assert_array_equal(read_ids, ids)
        np.testing.assert_array_equal(read_mask, mask.astype(bool))
    assert sorted(os.listdir(tmp_path / "new")) == [f"data.{suffix}" for suffix in
                                                    ("mask.bin", "meta.json", "offsets.npy", "tokens.bin")]


def test_dataset_writer_leaves_an_older_dataset_alone_when_it_does_not_finish(bundled_prefix, tmp_path):
    prefix = copy_dataset(bundled_prefix, str(tmp_path / "copy"))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.raises(RuntimeError, match="interrupted"):
        with DatasetWriter(prefix, 1000) as writer:
            writer.append(np.arange(5), np.ones(5, dtype=np.uint8))
            raise RuntimeError("interrupted")
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    with DatasetWriter(prefix, 1000) as writer:
        incomplete = {key: value for key, value in WRITER_FIELDS.items() if key != "counts"}
        with pytest.raises(TypeError, match=r"missing meta fields \['counts'\], unexpected \['extra'\]"):
            writer.finish(**incomplete, extra=1)
        with pytest.raises(DataError, match="at least one sample"):
            writer.finish(**WRITER_FIELDS)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


# ---------------------------------------------------------------- tokenizer identity

def test_meta_records_the_tokenizer_identity_and_check_tokenizer_compares_it(bundled_prefix, tokenizer, tmp_path):
    meta = SFTDataset(bundled_prefix).meta
    identity = tokenizer_identity(tokenizer, TOKENIZER)
    assert meta["tokenizer"] == identity
    assert identity["name"] == TOKENIZER and identity["vocab_size"] == 1000 and len(identity["vocab_sha256"]) == 64
    # The same vocabulary under another name (or template) is the same tokenizer.
    assert check_tokenizer(meta, TOKENIZER) is True
    assert check_tokenizer(meta, tokenizer) is True
    assert check_tokenizer(meta, dict(identity, name="elsewhere")) is True
    copy = tmp_path / "same_vocab"
    with_template("{{ messages }}").save_pretrained(copy)
    assert check_tokenizer(meta, str(copy)) is True

    # Another vocabulary: an error naming both, unless allowed.
    other = with_template(tokenizer.chat_template)
    other.add_tokens(["<extra>"])
    other_dir = tmp_path / "other_vocab"
    other.save_pretrained(other_dir)
    with pytest.raises(DataError, match=f"tokenizer mismatch: the data was tokenized with {TOKENIZER} "
                                        r"\(1000 tokens.*the model's tokenizer is .*other_vocab \(1001 tokens"
                                        r".*--allow-tokenizer-mismatch"):
        check_tokenizer(meta, str(other_dir))
    with pytest.warns(UserWarning, match="tokenizer mismatch.*allowed by --allow-tokenizer-mismatch"):
        assert check_tokenizer(meta, str(other_dir), allow_mismatch=True) is False
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot load the tokenizer"):
        check_tokenizer(meta, str(tmp_path / "empty"))
    with pytest.raises(DataError, match="records no tokenizer identity"):
        check_tokenizer(dict(meta, tokenizer="/old/path"), TOKENIZER)


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
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "segment_ids"}
    assert all(t.shape == (3, 6) for t in batch.values())
    assert batch["segment_ids"][0].tolist() == [0, 0, 0, 0, -1, -1] and batch["segment_ids"][2].tolist() == [2] * 6
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
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "segment_ids"}
    assert batch["tokens"].shape == (2, 8)
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, -1, -1], [2, 2, 2, 2, 2, 2, -1, -1]]
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
    assert full["segment_ids"].tolist() == [[0] * 8] and full["labels"][0].tolist() == list(range(1, 9))
    with pytest.raises(ValueError, match="longer than seq_length"):
        pack([sample(range(10), [1] * 10)], seq_length=8, pad_id=PAD)
