"""examples/toy_fidelity.sh at its smallest setting (SETTING=smoke): every output exists and is
well-formed (its numbers are not checked: a few steps of a tiny model prove nothing about PSFT);
the domain generator is deterministic with disjoint held-out splits; the summariser's matched-NLL
reading against hand-computed interpolations."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "toy_fidelity.sh")
sys.path.insert(0, os.path.join(ROOT, "examples", "toy_fidelity"))

import make_domains  # noqa: E402
import summarise  # noqa: E402

OBJECTIVES = ("sft", "psft", "iw-sft")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("toy_fidelity")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "SETTING": "smoke"}
    result = subprocess.run(["bash", SCRIPT, str(out_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out_dir, result.stdout


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_runs_start_from_the_pretraining_and_evaluate_both_domains(smoke_run):
    out_dir, _ = smoke_run
    pretrain = out_dir / "pretrain_a"
    assert (pretrain / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    pretrain_records = _records(pretrain / "metrics.jsonl")
    assert {r["phase"] for r in pretrain_records if "phase" in r} == {"sft"}
    starts = []
    for objective in OBJECTIVES:
        records = _records(out_dir / "runs" / objective / "metrics.jsonl")
        assert {r["phase"] for r in records if "phase" in r} == {objective}
        assert sorted(r["step"] for r in records if "loss" in r) == [1, 2, 3, 4]
        evals = {r["step"]: r for r in records if "eval/A/nll" in r}
        assert sorted(evals) == [0, 2, 4]  # step 0, every 2 steps, the end
        for record in evals.values():
            for key in ("eval/A/nll", "eval/A/entropy", "eval/B/nll", "eval/B/entropy"):
                assert math.isfinite(record[key]) and record[key] >= 0, (objective, key, record)
        starts.append({key: value for key, value in evals[0].items() if key.startswith("eval/")})
    # The same pre-trained weights and eval sets: step 0 is the same for every objective.
    assert all(start == starts[0] for start in starts), starts


def test_table_summary_and_plots_are_written(smoke_run):
    out_dir, stdout = smoke_run
    table = (out_dir / "table.md").read_text()
    assert table in stdout
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert "B NLL (in-domain), last" in header and "A NLL there" in header
    assert [row.split("|")[1].strip() for row in body] == list(OBJECTIVES)
    assert all(len(row.split("|")) == len(header.split("|")) for row in body)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert list(summary["runs"]) == list(OBJECTIVES)
    for run in summary["runs"].values():  # every run reaches the matched level, by its definition
        assert run["matched"] is not None and run["matched"]["in_nll"] == pytest.approx(summary["matched_in_nll"])
    for name in ("tradeoff.png", "curves.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG_SIGNATURE, name


def test_domains_are_deterministic_with_held_out_eval_splits(tmp_path):
    for directory in (tmp_path / "first", tmp_path / "second"):
        subprocess.run([sys.executable, make_domains.__file__, "--out-dir", str(directory), "--train-samples", "200",
                        "--eval-samples", "40"], check=True, capture_output=True)
    names = sorted(os.listdir(tmp_path / "first"))
    assert names == ["a_eval.jsonl", "a_train.jsonl", "b_eval.jsonl", "b_train.jsonl"]
    for name in names:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name

    def conversations(name):
        return [json.dumps(row["messages"]) for row in _records(tmp_path / "first" / name)]

    words = {}
    for domain in ("a", "b"):
        train, held_out = conversations(f"{domain}_train.jsonl"), conversations(f"{domain}_eval.jsonl")
        assert len(train) == 200 and len(held_out) == 40 == len(set(held_out))
        assert not set(train) & set(held_out)
        words[domain] = {word for row in _records(tmp_path / "first" / f"{domain}_train.jsonl")
                         for word in row["messages"][1]["content"].replace(",", " ").replace(".", " ").split()}
    # Distinct vocabularies: no answer word of one domain appears in the other's answers.
    assert not words["a"] & words["b"], words["a"] & words["b"]


def test_matched_level_reading():
    curve = [(0, dict(in_nll=10.0, out_nll=0.0, in_entropy=1.0, out_entropy=0.0)),
             (10, dict(in_nll=6.0, out_nll=4.0, in_entropy=3.0, out_entropy=2.0)),
             (20, dict(in_nll=2.0, out_nll=5.0, in_entropy=2.0, out_entropy=3.0)),
             (30, dict(in_nll=3.0, out_nll=9.0, in_entropy=0.0, out_entropy=9.0))]
    # Level 5 lies a quarter of the way from step 10 (6.0) to step 20 (2.0).
    assert summarise.at_in_domain_level(curve, 5.0) == dict(step=12.5, in_nll=5.0, out_nll=4.25, in_entropy=2.75,
                                                            out_entropy=2.25)
    assert summarise.at_in_domain_level(curve, 2.5)["step"] == 18.75  # the first crossing, not the later rise
    assert summarise.at_in_domain_level(curve, 10.0)["step"] == 0.0
    assert summarise.at_in_domain_level(curve, 1.0) is None


def test_summary_matches_at_the_lowest_level_every_run_reaches(tmp_path):
    def write(name, in_nlls, out_nlls):
        path = tmp_path / f"{name}.jsonl"
        with open(path, "w") as f:
            for step, (in_nll, out_nll) in enumerate(zip(in_nlls, out_nlls)):
                f.write(json.dumps({"step": step * 5, "loss": in_nll, "entropy": 1.0 + step}) + "\n")
                f.write(json.dumps({"step": step * 5, "eval/B/nll": in_nll, "eval/B/entropy": 2.0,
                                    "eval/A/nll": out_nll, "eval/A/entropy": 0.5}) + "\n")
        return str(path)

    runs = {"fast": write("fast", [8.0, 4.0, 1.0], [0.0, 2.0, 6.0]), "slow": write("slow", [8.0, 6.0, 3.0], [0.0, 1.0, 2.0])}
    summary = summarise.summarise(runs, "B", "A", last_steps=2)
    assert summary["matched_in_nll"] == 3.0
    fast, slow = summary["runs"]["fast"], summary["runs"]["slow"]
    assert fast["matched"]["step"] == pytest.approx(5 + 5 / 3) and fast["matched"]["out_nll"] == pytest.approx(2 + 4 / 3)
    assert slow["matched"]["step"] == 10 and slow["matched"]["out_nll"] == 2.0
    assert fast["end"]["in_nll"] == 1.0 and fast["train_entropy"] == 2.5  # mean of the last 2 steps' entropy (2, 3)
    table = summarise.markdown_table(summary, "B", "A", last_steps=2)
    assert "| fast | 1.000 | 6.000 | 2.000 | 2.500 | 6.7 | 3.333 | 2.000 | 0.500 |" in table
    with pytest.raises(ValueError, match="--eval-data-prefix"):
        summarise.summarise({"no_eval": write("no_eval", [1.0], [1.0])}, "B", "A")
