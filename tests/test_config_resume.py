"""Checkpoints written before the typed configuration still resume: tests/assets/checkpoint_2337daf was
written by main at 2337daf (its trainer_state keeps flag-named settings). Resumed with today's code, its
steps 3-4 equal today's uninterrupted run, whose steps 1-2 equal what 2337daf logged."""

import json
import os
import shutil

import pytest

from bundled import ROOT, preprocess_bundled_data
from distributed import run_distributed

FIXTURE = os.path.join(ROOT, "tests", "assets", "checkpoint_2337daf")
# make_legacy.py's flags, less --save / --exit-interval / --metrics-file.
FLAGS = ["--hf-config", "tiny_config.json", "--data-prefix", "data/chat", "--seq-length", "64",
         "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--lr-warmup-iters", "1",
         "--train-iters", "4", "--old-policy-interval", "3", "--seed", "7"]
KEYS = ("loss", "grad_norm", "entropy", "ratio_mean", "clip_fraction", "learning_rate")


def _runs(work):
    from megatron_psft.platform import parallel
    from megatron_psft.train import Trainer, parse_launch

    os.chdir(work)  # the legacy checkpoint recorded the relative data prefix data/chat
    Trainer(parse_launch(FLAGS + ["--metrics-file", "straight.jsonl"])).run()
    parallel.destroy()
    trainer = Trainer(parse_launch(FLAGS + ["--load", "checkpoint", "--save", "checkpoint",
                                            "--metrics-file", "resumed.jsonl"]))
    resumed_at = trainer.step
    trainer.run()
    parallel.destroy()
    return resumed_at


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if '"eval/' not in line]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("legacy")
    shutil.copytree(os.path.join(FIXTURE, "checkpoint"), work / "checkpoint")
    shutil.copy(os.path.join(FIXTURE, "tiny_config.json"), work)
    preprocess_bundled_data(str(work / "data" / "chat"), 64)
    resumed_at = run_distributed(1, _runs, str(work))[0]
    return work, resumed_at


def test_a_legacy_checkpoint_resumes_where_it_stopped_and_continues_as_an_uninterrupted_run(work):
    work, resumed_at = work
    assert resumed_at == 2
    straight, resumed = _records(work / "straight.jsonl"), _records(work / "resumed.jsonl")
    assert [r["step"] for r in resumed] == [3, 4] and [r["step"] for r in straight] == [1, 2, 3, 4]
    for got, want in zip(resumed, straight[2:]):
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)


def test_todays_code_trains_as_the_legacy_commit_did(work):
    """No behaviour change: the first two steps as 2337daf logged them."""
    work, _ = work
    legacy = _records(os.path.join(FIXTURE, "legacy_metrics.jsonl"))
    for got, want in zip(_records(work / "straight.jsonl")[:2], legacy):
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)


def test_the_resumed_checkpoint_records_the_typed_configuration(work):
    from megatron_psft import checkpoint

    work, _ = work
    state = checkpoint.read_common_state(str(work / "checkpoint"))["trainer_state"]
    assert state["step"] == 4 and state["world_size"] == 1
    assert state["config"]["old_policy"]["old_policy_interval"] == 3 and state["config"]["data"]["data_prefix"] == ["data/chat"]
    settings = checkpoint.saved_settings(state)
    assert settings["seed"] == 7 and settings["objective"] == "psft"
