"""The clipped-token file: the writer's lines and resume (megatron_psft/observability/clipped_tokens.py), and the
report (megatron_psft/reports/clipped_tokens.py, tools/clipped_tokens.py):
the clipped-token tables, the SVG word cloud and the CLI's errors, on a synthetic clipped_tokens.jsonl with
known counts over the bundled tokenizer."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from megatron_psft.observability import clipped_tokens as clipped_tokens_writer
from megatron_psft.reports import clipped_tokens
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "clipped_tokens.py")
TOKENIZER = os.path.join(REPO, "megatron_psft", "assets", "tokenizer")
OFFLINE_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
SVG = "{http://www.w3.org/2000/svg}"

# Each token's text in the bundled tokenizer, as the report shows it, and its totals over steps 1..3.
WORDS = {" the": "▁the", "<|im_end|>": "<|im_end|>", " capital": "▁capital", "\n": "\\n", " Paris": "▁Paris",
         ".": ".", "What": "What"}
CLIPPED = {" the": 12, "<|im_end|>": 8, " capital": 5, "\n": 3, " Paris": 2, ".": 2, "What": 0}
RESPONSE = {" the": 40, "<|im_end|>": 10, " capital": 100, "\n": 4, " Paris": 5, ".": 20, "What": 50}


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=OFFLINE_ENV, timeout=120)


@pytest.fixture(scope="module")
def ids():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    ids = {}
    for word in WORDS:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        assert len(encoded) == 1, f"{word!r} is not a single token: {encoded}"
        ids[word] = encoded[0]
    return ids


def step_line(step, ids, clipped, response):
    return json.dumps({"step": step, "clipped": {str(ids[w]): c for w, c in clipped.items()},
                       "response": {str(ids[w]): c for w, c in response.items()}}) + "\n"


@pytest.fixture(scope="module")
def clipped_tokens_file(ids, tmp_path_factory):
    """Steps 1..3 summing to CLIPPED / RESPONSE; step 2 is logged twice (a resumed run) and only its later line counts."""
    path = tmp_path_factory.mktemp("run") / "clipped_tokens.jsonl"
    path.write_text(
        step_line(1, ids, {" the": 5, "<|im_end|>": 4, " capital": 5}, {" the": 20, "<|im_end|>": 5, " capital": 50, "What": 25})
        + step_line(2, ids, {" the": 100}, {" the": 100})
        + "\n"
        + step_line(3, ids, {"\n": 3, " Paris": 2, ".": 2}, {"\n": 4, " Paris": 5, ".": 20})
        + step_line(2, ids, {" the": 7, "<|im_end|>": 4}, {" the": 20, "<|im_end|>": 5, " capital": 50, "What": 25}))
    return path


def tables(stdout):
    """The rows of each table (split on whitespace: the report shows spaces as '▁') and the summary line."""
    blocks = stdout.strip().split("\n\n")
    parsed = [[line.split() for line in block.splitlines()[2:]] for block in blocks[:2]]
    return parsed[0], parsed[1], blocks[2].splitlines()[0]


def lower_id(word, other, ids):
    return word if ids[word] < ids[other] else other


def expected_row(rank, word, ids):
    return [str(rank), WORDS[word], str(ids[word]), str(CLIPPED[word]), str(RESPONSE[word]),
            f"{100 * CLIPPED[word] / RESPONSE[word]:.2f}%"]


@pytest.fixture(scope="module")
def report(clipped_tokens_file, tmp_path_factory):
    image = tmp_path_factory.mktemp("image") / "cloud.svg"
    result = run_tool("--clipped-tokens", str(clipped_tokens_file), "--tokenizer", TOKENIZER, "--top", "5",
                      "--image", str(image))
    assert result.returncode == 0, result.stderr
    return result.stdout, image


def test_tables_rank_by_count_and_by_rate(report, ids):
    by_count, by_rate, summary = tables(report[0])
    # Ties in clipped count ('.' and ' Paris': 2) go to the lower id; 'What' was never clipped.
    count_order = [" the", "<|im_end|>", " capital", "\n", lower_id(".", " Paris", ids)]
    assert by_count == [expected_row(rank, word, ids) for rank, word in enumerate(count_order, 1)]
    # '\n' (4 occurrences) is under --min-count 5; 'What' has rate 0 and is left out.
    rate_order = ["<|im_end|>", " Paris", " the", ".", " capital"]
    assert by_rate == [expected_row(rank, word, ids) for rank, word in enumerate(rate_order, 1)]
    assert summary == ("steps read: 3 (1..3); 1 repeated step line(s), the later kept; "
                       "clipped tokens: 32 / 229 response tokens (13.97%); distinct clipped ids: 6")


def test_step_range_and_min_count(clipped_tokens_file, ids):
    result = run_tool("--clipped-tokens", str(clipped_tokens_file), "--tokenizer", TOKENIZER, "--steps", "3:",
                      "--min-count", "1", "--top", "2")
    assert result.returncode == 0, result.stderr
    by_count, by_rate, summary = tables(result.stdout)
    assert [row[1] for row in by_count] == ["\\n", WORDS[lower_id(".", " Paris", ids)]]
    assert [row[1] for row in by_rate] == ["\\n", "▁Paris"]  # 75% and 40%; '\n' counts now that K is 1
    assert summary.startswith("steps read: 1 (3..3); clipped tokens: 7 / 29 response tokens (24.14%)")


def test_svg_word_cloud(report, ids):
    root = ET.parse(report[1]).getroot()
    assert root.tag == f"{SVG}svg"
    texts = [element for element in root.iter(f"{SVG}text")]
    assert texts[0].text.startswith("PSFT clipped tokens, steps 1..3: 32 / 229 response tokens")
    assert any("clip rate" in (element.text or "") for element in texts)  # the legend
    words = {element.text: element for element in texts if element.get("data-token-id")}
    assert set(words) == {"▁the", "<|im_end|>", "▁capital", "\\n", WORDS[lower_id(".", " Paris", ids)]}
    sizes = [float(words[token].get("font-size")) for token in ("▁the", "<|im_end|>", "▁capital", "\\n")]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4  # 12 > 8 > 5 > 3 clipped
    assert sizes[0] / sizes[1] == pytest.approx((12 / 8) ** 0.5, rel=1e-2)  # size ~ sqrt(count)

    boxes = []  # the glyphs' extent: textLength wide, about an em tall around the baseline
    for element in words.values():
        x, y, size = float(element.get("x")), float(element.get("y")), float(element.get("font-size"))
        boxes.append((x, y - 0.8 * size, x + float(element.get("textLength")), y + 0.25 * size))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), f"words overlap: {a} {b}"


def test_layout_never_overlaps_many_words():
    rows = [clipped_tokens.TokenRow("▁" + "x" * (1 + i % 9), i, 1 + (i * 37) % 500, 1000) for i in range(80)]
    rows.sort(key=lambda row: -row.clipped)
    boxes = [word.box() for word in clipped_tokens.cloud_layout(rows)]
    assert len(boxes) == 80
    assert not any(clipped_tokens._overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_token_text():
    from transformers import AutoTokenizer

    assert clipped_tokens.visible(" a\tb\nc\r\x00") == "▁a\\tb\\nc\\r\\x00"
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    pieces = tokenizer.encode(" é", add_special_tokens=False)  # the tiny vocabulary splits 'é' into its bytes
    assert [clipped_tokens.token_text(tokenizer, i) for i in pieces] == ["▁", "\\xc3", "\\xa9"]


@pytest.mark.parametrize("bad_line, reason", [
    ("{not json", "bad JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"clipped": {}, "response": {}}', '"step" must be an integer'),
    ('{"step": 2, "clipped": {"5": -1}, "response": {"5": 3}}', "count >= 0"),
    ('{"step": 2, "clipped": {"x": 1}, "response": {"5": 3}}', "<token id>"),
    ('{"step": 2, "clipped": {"5": 4}, "response": {"5": 3}}', "4 clipped but only 3"),
    ('{"step": 2, "clipped": {}}', '"response" must be an object'),
])
def test_malformed_line_names_its_number(tmp_path, bad_line, reason):
    path = tmp_path / "clipped_tokens.jsonl"
    path.write_text('{"step": 1, "clipped": {}, "response": {"5": 1}}\n\n' + bad_line + "\n")
    result = run_tool("--clipped-tokens", str(path), "--tokenizer", TOKENIZER)
    assert result.returncode != 0
    assert f"{path}:3: " in result.stderr and reason in result.stderr


def test_missing_empty_and_out_of_range(tmp_path):
    missing = run_tool("--clipped-tokens", str(tmp_path / "nope.jsonl"), "--tokenizer", TOKENIZER)
    assert missing.returncode != 0 and "no such file" in missing.stderr

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = run_tool("--clipped-tokens", str(empty), "--tokenizer", TOKENIZER)
    assert result.returncode != 0 and "is empty" in result.stderr

    one_step = tmp_path / "one_step.jsonl"
    one_step.write_text('{"step": 1, "clipped": {}, "response": {"5": 1}}\n')
    result = run_tool("--clipped-tokens", str(one_step), "--tokenizer", TOKENIZER, "--steps", "5:9")
    assert result.returncode != 0 and "no step" in result.stderr and "5:9" in result.stderr
    result = run_tool("--clipped-tokens", str(one_step), "--tokenizer", TOKENIZER, "--steps", "9:5")
    assert result.returncode != 0 and "empty step range" in result.stderr


def test_bad_tokenizer(tmp_path, capsys):
    path = tmp_path / "clipped_tokens.jsonl"
    path.write_text('{"step": 1, "clipped": {"5000": 1}, "response": {"5000": 1}}\n')
    with pytest.raises(SystemExit, match="cannot load a tokenizer"):
        clipped_tokens.main(["--clipped-tokens", str(path), "--tokenizer", str(tmp_path / "no_tokenizer")])
    with pytest.raises(SystemExit, match="5000 is beyond the tokenizer's 1000 ids"):
        clipped_tokens.main(["--clipped-tokens", str(path), "--tokenizer", TOKENIZER])


def test_writer_lines_and_resume(tmp_path):
    """The trainer's lines: vocabulary-long float histograms (as the loss returns them) with the ids never
    counted left out; a resumed run drops the lines after its checkpoint and the report counts each step once."""
    path = str(tmp_path / clipped_tokens_writer.FILE_NAME)
    assert clipped_tokens_writer.path_next_to(str(tmp_path / "metrics.jsonl")) == path
    response = torch.tensor([3.0, 2.0, 0.0, 1.0, 0.0])
    writer = clipped_tokens_writer.ClippedTokensWriter(path)
    for step in (1, 2, 3):
        writer.write(step, torch.tensor([0.0, step, 0.0, 1.0, 0.0]), response)
    writer.close()
    with open(path) as f:
        assert f.readline() == '{"step": 1, "clipped": {"1": 1, "3": 1}, "response": {"0": 3, "1": 2, "3": 1}}\n'

    writer = clipped_tokens_writer.ClippedTokensWriter(path, resumed_step=1)  # steps 2 and 3 are trained again
    writer.write(2, [0, 0, 0, 1, 0], [1, 0, 0, 1, 0])
    writer.close()
    with open(path) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    counts = clipped_tokens.read_clipped_tokens(path)
    assert counts.steps == [1, 2] and counts.repeated_steps == 0
    assert counts.clipped == {1: 1, 3: 2} and counts.response == {0: 4, 1: 2, 3: 2}
