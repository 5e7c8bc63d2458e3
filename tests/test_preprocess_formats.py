"""Preprocessing's input forms (JSONL, parquet, a `datasets` save_to_disk directory) and record forms
(messages, ShareGPT conversations, prompt/response): the same conversations give the same bytes in
every form, and each refusal is one line naming the record or the file."""

import json
import os
import subprocess
import sys

import pytest

from megatron_psft.data import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "megatron_psft", "assets")
TOKENIZER = os.path.join(ASSETS, "tokenizer")
CHAT_DATA = os.path.join(ASSETS, "chat_data.jsonl")
OFFLINE_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
OUTPUT_FILES = ("tokens.bin", "mask.bin", "offsets.npy")
# ShareGPT speakers: FastChat's names, and the role names some exports use.
HUMAN_GPT = {"system": "system", "user": "human", "assistant": "gpt"}
USER_ASSISTANT = {"system": "system", "user": "user", "assistant": "assistant"}


def bundled_rows():
    with open(CHAT_DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sharegpt(row, speakers):
    """The bundled row (messages or prompt/response) as a ShareGPT record."""
    messages = row.get("messages") or (
        [{"role": "system", "content": row["system"]}] if "system" in row else []
    ) + [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    return {"conversations": [{"from": speakers[m["role"]], "value": m["content"]} for m in messages]}


def sharegpt_rows():
    return [sharegpt(row, (HUMAN_GPT, USER_ASSISTANT)[i % 2]) for i, row in enumerate(bundled_rows())]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def arrow_table(rows):
    """Rows as an Arrow table with every row's fields, null where a row has none (``from_pylist`` and
    ``Dataset.from_list`` take the columns from the first row only)."""
    import pyarrow as pa

    columns = dict.fromkeys(key for row in rows for key in row)
    return pa.Table.from_pydict({key: [row.get(key) for row in rows] for key in columns})


def write_parquet(path, rows, row_group_size=100):
    import pyarrow.parquet as pq

    pq.write_table(arrow_table(rows), str(path), row_group_size=row_group_size)
    return str(path)


def write_datasets_dir(path, splits):
    """A DatasetDict of `splits` ({name: rows}) saved with save_to_disk, or a Dataset for rows alone."""
    import datasets

    saved = datasets.Dataset(arrow_table(splits)) if isinstance(splits, list) else datasets.DatasetDict(
        {name: datasets.Dataset(arrow_table(rows)) for name, rows in splits.items()})
    saved.save_to_disk(str(path))
    return str(path)


def preprocessed(input_path, prefix, *flags):
    preprocess.main(["--input", input_path, "--output-prefix", str(prefix), "--tokenizer", TOKENIZER,
                     "--seq-length", "128", *flags])
    return str(prefix)


def refusal(capsys, input_path, tmp_path, *flags):
    """The SystemExit message and stderr of a run that must fail, and that it left no output."""
    capsys.readouterr()  # what came before (save_to_disk's progress) is not the run's
    with pytest.raises(SystemExit) as exit_info:
        preprocessed(input_path, tmp_path / "out" / "data", *flags)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    return str(exit_info.value.code), capsys.readouterr().err


# ---------------------------------------------------------------- the same bytes in every form

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The bundled conversations in each input and record form."""
    root = tmp_path_factory.mktemp("forms")
    rows, shared = bundled_rows(), sharegpt_rows()
    (root / "parquet_dir").mkdir()
    half = len(shared) // 2
    write_parquet(root / "parquet_dir" / "part-0.parquet", shared[:half])
    write_parquet(root / "parquet_dir" / "part-1.parquet", shared[half:])
    return {
        "jsonl messages": CHAT_DATA,
        "jsonl sharegpt": write_jsonl(root / "sharegpt.jsonl", shared),
        # Mixed messages and prompt/response rows: each row has the other form's columns, null.
        "parquet": write_parquet(root / "mixed.parquet", rows),
        "parquet directory": str(root / "parquet_dir"),
        "datasets DatasetDict": write_datasets_dir(root / "dataset_dict", {"train": shared, "test": shared[:7]}),
        "datasets Dataset": write_datasets_dir(root / "dataset", rows[:1] + shared[1:]),
    }


def test_every_input_and_record_form_gives_the_same_bytes(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess, "RECORDS_PER_TASK", 16)  # many blocks: records cross block and batch edges
    outputs = {}
    for name, input_path in inputs.items():
        workers = "2" if name == "parquet" else "1"  # rows' dicts go through the worker pool too
        prefix = preprocessed(input_path, tmp_path / name.replace(" ", "_") / "data", "--workers", workers)
        files = {suffix: open(f"{prefix}.{suffix}", "rb").read() for suffix in OUTPUT_FILES}
        with open(f"{prefix}.meta.json") as f:
            meta = json.load(f)
        assert meta.pop("input") == os.path.abspath(input_path)
        outputs[name] = files, meta
    reference_files, reference_meta = outputs["jsonl messages"]
    assert reference_meta["counts"]["written"] == len(bundled_rows())
    for name, (files, meta) in outputs.items():
        assert meta == reference_meta, name
        for suffix in OUTPUT_FILES:
            assert files[suffix] == reference_files[suffix], f"{name}: {suffix} differs"


def test_cli_reads_a_datasets_split_offline(inputs, tmp_path):
    prefix = str(tmp_path / "out" / "data")
    env = {key: value for key, value in OFFLINE_ENV.items() if key != "HF_DATASETS_OFFLINE"}  # the tool sets it
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", inputs["datasets DatasetDict"],
         "--split", "test", "--output-prefix", prefix, "--tokenizer", TOKENIZER, "--seq-length", "128"],
        capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "7 rows -> 7 samples" in result.stdout
    with open(f"{prefix}.meta.json") as f:
        assert json.load(f)["counts"]["lines"] == 7


def test_datasets_is_imported_only_for_its_inputs():
    code = ("import sys, megatron_psft.data, megatron_psft.data.preprocess\n"
            "print(sorted(name for name in ('datasets', 'pyarrow') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE_ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- refusals, one line each

GOOD = {"conversations": [{"from": "human", "value": "What is 3 + 4?"}, {"from": "gpt", "value": "7"}]}
BAD_RECORDS = {
    "unknown role": ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]},
                     "conversations[1]: unknown ShareGPT role 'bot' (expected one of human, user, gpt, assistant, "
                     "system)"),
    "neither form": ({"text": "Hi", "label": "Hello"},
                     'expected a "messages" list, a ShareGPT "conversations" list, or "prompt" and "response" fields'),
    "two forms": ({**GOOD, "prompt": "Hi", "response": "Hello"},
                  "has fields of more than one form (conversations and prompt/response); expected one"),
    "turn without value": ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
                           'conversations[0]: needs a "from" and a "value"'),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_is_one_line_naming_it_in_jsonl(case, tmp_path, capsys):
    record, reason = BAD_RECORDS[case]
    input_path = write_jsonl(tmp_path / "in.jsonl", [GOOD, record, GOOD])
    message, stderr = refusal(capsys, input_path, tmp_path)
    assert stderr.splitlines() == [f"{input_path}:2: {reason}"]
    assert message == "error: stopping at the first malformed line (use --on-error skip to skip them)"


def test_bad_rows_are_named_by_file_and_row_in_parquet(tmp_path, capsys):
    (tmp_path / "parts").mkdir()
    write_parquet(tmp_path / "parts" / "a.parquet", [GOOD] * 3)
    record, reason = BAD_RECORDS["unknown role"]
    second = write_parquet(tmp_path / "parts" / "b.parquet", [GOOD, GOOD, record, GOOD], row_group_size=2)
    message, stderr = refusal(capsys, str(tmp_path / "parts"), tmp_path)
    assert stderr.splitlines() == [f"{second}: row 2: {reason}"]
    assert message == "error: stopping at the first malformed row (use --on-error skip to skip them)"

    prefix = preprocessed(str(tmp_path / "parts"), tmp_path / "skipped" / "data", "--on-error", "skip")
    with open(f"{prefix}.meta.json") as f:
        counts = json.load(f)["counts"]
    assert (counts["lines"], counts["written"], counts["skipped_malformed"]) == (7, 6, 1)


def test_bad_row_is_named_by_split_in_a_datasets_directory(tmp_path, capsys):
    record, reason = BAD_RECORDS["neither form"]
    saved = write_datasets_dir(tmp_path / "saved", {"train": [GOOD, record]})
    message, stderr = refusal(capsys, saved, tmp_path)
    assert stderr.splitlines() == [f"{saved} (split train): row 1: {reason}"]


def test_unreadable_inputs_are_refused_in_one_line(tmp_path, capsys):
    not_parquet = tmp_path / "broken.parquet"
    not_parquet.write_bytes(b"PAR1 this is no parquet file\n")
    broken_save = tmp_path / "broken_save"
    broken_save.mkdir()
    (broken_save / "state.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    expected = {
        str(not_parquet): f"error: cannot read {not_parquet} as parquet: ",
        str(broken_save): f"error: cannot read {broken_save} as a datasets directory: ",
        str(tmp_path / "missing.jsonl"): f"error: {tmp_path / 'missing.jsonl'}: no such file or directory",
        str(tmp_path / "empty"): f"error: {tmp_path / 'empty'} is a directory with neither .parquet files nor a "
                                 "datasets save_to_disk",
    }
    for input_path, start in expected.items():
        message, _ = refusal(capsys, input_path, tmp_path)
        assert message.startswith(start) and "\n" not in message, message


def test_split_is_checked(tmp_path, capsys):
    splits = write_datasets_dir(tmp_path / "splits", {"train": [GOOD], "test": [GOOD]})
    single = write_datasets_dir(tmp_path / "single", [GOOD])
    jsonl = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    assert refusal(capsys, splits, tmp_path, "--split", "validation")[0] == (
        f"error: {splits} has no split 'validation' (it has train, test); choose one with --split")
    assert refusal(capsys, single, tmp_path, "--split", "train")[0] == (
        f"error: --split train: {single} holds a single Dataset, not a DatasetDict with splits")
    assert refusal(capsys, jsonl, tmp_path, "--split", "train")[0] == (
        f"error: --split is for a datasets directory saved from a DatasetDict; {jsonl} is not one")


def test_a_missing_library_is_one_line_naming_the_extra():
    with pytest.raises(SystemExit) as exit_info:
        preprocess.import_for_input("psft_no_such_module", "data.parquet")
    assert str(exit_info.value.code) == (
        "error: reading data.parquet needs the psft_no_such_module package: pip install 'megatron-psft[data]'")
