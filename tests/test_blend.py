"""Weighted data blends (``--data-prefix W1 P1 W2 P2 ...``): the schedule against a brute-force merge of
exact times, its proportions, each source's epochs, the refusals naming the source, the dry run's
blend, and the trainer on a blend: per-source counts in the metrics and resume equal to the
uninterrupted run."""

import json
import os
import shutil
from fractions import Fraction

import numpy as np
import pytest

from bundled import ASSETS, preprocess_bundled_data
from distributed import run_distributed
from megatron_psft.config import ConfigError, DataConfig
from megatron_psft.data import SFTDataset, global_batch_indices
from megatron_psft.data.blend import BlendedDataset, BlendSchedule, epochs_over_run, source_names
from megatron_psft.data.format import DataError
from megatron_psft.launch import parse_launch

SEQ = 96
WEIGHT_SETS = [(0.7, 0.3), (1, 1), (0.5, 0.3, 0.2), (0.001, 0.999), (3, 1, 1e-3, 2.5), (1 / 3, 2 / 3)]


def _merged_order(weights, positions):
    """The first `positions` draws by brute force: every source's draws at exact times (k + 1/2) / w, sorted,
    ties to the earlier source."""
    fractions = [Fraction(weight) for weight in weights]
    draws = [(Fraction(2 * k + 1, 2) / weight, source, k)
             for source, weight in enumerate(fractions) for k in range(positions)]
    return [(source, k) for _, source, k in sorted(draws)[:positions]]


@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_the_schedule_is_the_merge_of_exact_times_and_windows_tile_the_stream(weights):
    positions = 300
    sources, draws = BlendSchedule(weights).window(0, positions)
    assert list(zip(sources.tolist(), draws.tolist())) == _merged_order(weights, positions)
    # Any split into windows gives the same stream: a global batch is a pure function of its step.
    schedule = BlendSchedule(weights)
    pieces = [schedule.window(start, start + 37) for start in range(0, positions, 37)]
    assert np.concatenate([piece[0] for piece in pieces])[:positions].tolist() == sources.tolist()
    assert np.concatenate([piece[1] for piece in pieces])[:positions].tolist() == draws.tolist()


@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_each_source_is_within_one_draw_of_its_weight_at_every_point(weights):
    schedule, total = BlendSchedule(weights), sum(weights)
    for positions in list(range(0, 200)) + [10_007, 1_234_567, 10**9 + 3]:
        counts = schedule.draws(positions)
        assert sum(counts) == positions
        for count, weight in zip(counts, weights):
            assert abs(count - positions * weight / total) <= 1, (positions, counts)


def test_weights_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        BlendSchedule([0.5, 0])


def _write_jsonl_subset(path, count):
    with open(os.path.join(ASSETS, "chat_data.jsonl")) as source, open(path, "w") as target:
        for _, line in zip(range(count), source):
            target.write(line)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two preprocessed sources: the bundled conversations (a), and its first 40 (b)."""
    root = tmp_path_factory.mktemp("blend")
    big = preprocess_bundled_data(str(root / "a" / "chat"), SEQ)
    _write_jsonl_subset(root / "small.jsonl", 40)
    small = preprocess_bundled_data(str(root / "b" / "chat"), SEQ, jsonl=str(root / "small.jsonl"))
    return root, big, small


def test_every_sample_of_a_source_is_drawn_once_per_epoch_of_that_source(sources):
    _, big, small = sources
    datasets = [SFTDataset(big), SFTDataset(small)]
    blend = BlendedDataset([big, small], datasets, [0.6, 0.4])
    batch, steps = 20, 25  # 500 draws: 200 of the 40-sample source, five epochs
    stream = [index for step in range(steps) for index in blend.batch_indices(step, batch, seed=5)]
    small_draws = [index - len(datasets[0]) for index in stream if index >= len(datasets[0])]
    big_draws = [index for index in stream if index < len(datasets[0])]
    assert len(small_draws) == 200 and len(big_draws) == 300
    for epoch in range(5):
        assert sorted(small_draws[40 * epoch:40 * (epoch + 1)]) == list(range(40))
    assert len(set(big_draws)) == 300  # fewer draws than samples: no repeats
    assert blend[len(datasets[0]) + 3][0].tolist() == datasets[1][3][0].tolist()
    # Per-source counts of a batch, against the samples themselves.
    indices = blend.batch_indices(7, batch, seed=5)
    counts = blend.batch_counts(indices)
    in_small = [index for index in indices if index >= len(datasets[0])]
    assert counts["data/1-chat/samples"] == len(in_small)
    assert counts["data/0-chat/tokens"] + counts["data/1-chat/tokens"] == sum(len(blend[i][0]) for i in indices)
    assert counts["data/1-chat/trained_tokens"] == sum(int(blend[i][1][1:].sum()) for i in in_small)
    assert counts["data/0-chat/trained_tokens"] == sum(int(blend[i][1][1:].sum()) for i in indices if i not in in_small)


def test_one_source_draws_exactly_the_unblended_stream(sources):
    _, big, _ = sources
    dataset = SFTDataset(big)
    blend = BlendedDataset([big], [dataset], None)
    for step in (0, 3, 17):
        assert blend.batch_indices(step, 64, seed=11) == global_batch_indices(len(dataset), 64, step, 11)
    assert blend.batch_counts(blend.batch_indices(0, 64, 11)) == {}


def test_source_names_are_the_prefixes_file_names_numbered_when_they_clash():
    assert source_names(["/d/chat", "/e/code"]) == ["chat", "code"]
    assert source_names(["/d/chat", "/e/chat"]) == ["0-chat", "1-chat"]


@pytest.mark.parametrize("items, message", [
    (["0.7", "a", "b"], "0.7 reads as a weight"),
    (["0.7", "a", "-1", "b"], "the weight of b must be a positive number"),
    (["0.7", "a", "0", "b"], "the weight of b must be a positive number"),
])
def test_bad_blends_are_refused_naming_the_item(items, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(data_prefix=tuple(items))


def test_blend_forms_read_as_megatron_reads_data_path():
    assert DataConfig(data_prefix="a").blend == (("a",), None)
    assert DataConfig(data_prefix=("a", "b")).blend == (("a", "b"), None)
    assert DataConfig(data_prefix=("2", "a", "1", "b")).blend == (("a", "b"), (2.0, 1.0))


def _copy_source(prefix, target, edit_meta):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    for suffix in (".tokens.bin", ".mask.bin", ".offsets.npy", ".meta.json"):
        shutil.copy(prefix + suffix, target + suffix)
    with open(target + ".meta.json") as f:
        meta = json.load(f)
    edit_meta(meta)
    with open(target + ".meta.json", "w") as f:
        json.dump(meta, f)
    return target


LAUNCH = ["--train-iters", "4", "--seq-length", str(SEQ), "--global-batch-size", "4", "--micro-batch-size", "2"]


@pytest.mark.parametrize("edit, message", [
    (lambda meta: meta["tokenizer"].update(vocab_sha256="0" * 64, name="other"), "was tokenized with other"),
    (lambda meta: meta.update(seq_length=SEQ // 2), f"was preprocessed with --seq-length {SEQ // 2}"),
])
def test_a_source_made_otherwise_is_refused_naming_it(sources, edit, message, tmp_path, capsys):
    _, big, _ = sources
    other = _copy_source(big, str(tmp_path / "other" / "chat"), edit)
    with pytest.raises(SystemExit) as exit_info:
        parse_launch(LAUNCH + ["--data-prefix", "0.5", big, "0.5", other])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last and other in last, last


def test_the_dry_run_prints_each_sources_weight_and_epochs(sources, capsys):
    from megatron_psft.plan import format_plan

    _, big, small = sources
    launch = parse_launch(LAUNCH + ["--train-iters", "50", "--data-prefix", "3", big, "1", small, "--dry-run"])
    plan = format_plan(launch)
    sizes = [SFTDataset(big).meta["num_samples"], 40]
    epochs = epochs_over_run([3, 1], sizes, 50 * 4)
    assert f"{big}: weight 0.750, {sizes[0]} samples, {epochs[0]:.2f} epochs over the run" in plan, plan
    assert f"{small}: weight 0.250, 40 samples, {epochs[1]:.2f} epochs over the run" in plan, plan
    assert epochs[1] == pytest.approx(50 / 40)


def _blend_runs(root, big, small):
    from megatron_psft.platform import parallel
    from megatron_psft.train import Trainer

    common = ["--seq-length", str(SEQ), "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-4",
              "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--old-policy-interval", "2",
              "--train-iters", "4", "--data-prefix", "0.6", big, "0.4", small]
    # Stopped after step 3, mid-round, then resumed; against the same four steps uninterrupted.
    for name, extra in (("straight", []), ("first", ["--exit-interval", "3"]), ("resumed", [])):
        save = os.path.join(root, "straight" if name == "straight" else "resume")
        Trainer(parse_launch(common + extra + ["--save", save, "--load", save,
                                               "--metrics-file", os.path.join(root, f"{name}.jsonl")])).run()
        parallel.destroy()


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_the_trainer_on_a_blend_counts_each_source_and_resumes_exactly(sources):
    root, big, small = sources
    run_distributed(2, _blend_runs, str(root), big, small)
    straight = _records(root / "straight.jsonl")
    resumed = _records(root / "first.jsonl") + _records(root / "resumed.jsonl")
    assert [r["step"] for r in straight] == [r["step"] for r in resumed] == [1, 2, 3, 4]
    for got, want in zip(resumed, straight):
        for key in ("loss", "grad_norm", "entropy", "data/0-chat/samples", "data/1-chat/tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)
    schedule = BlendSchedule([0.6, 0.4])
    for record in straight:
        expected = np.subtract(schedule.draws(8 * record["step"]), schedule.draws(8 * (record["step"] - 1)))
        assert [record["data/0-chat/samples"], record["data/1-chat/samples"]] == expected.tolist()
        # the sources' loss-carrying tokens are the step's: each trained token is counted once, under its source
        assert record["data/0-chat/trained_tokens"] + record["data/1-chat/trained_tokens"] == \
            record["trained_tokens_total"]
