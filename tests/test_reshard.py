"""Resume at another layout with the optimizer state (Megatron-Core's fully_reshardable distributed-optimizer
format): 2 ranks -> 1 rank, and TP2 x EP2 (SP, DP2) -> TP1 x EP2 (DP4); TP2 x EP2 -> TP1 x EP1, where
Megatron-Core chains the dense and expert optimizer states differently, is refused naming the way on. Resumed at a round boundary, the steps after
the resume equal a run that used the new layout from the start (same initial weights), to fp32 tolerance;
resumed mid-round, the interrupted round's old log-probs come from the resumed weights (ratio 1 at the
resumed step). A checkpoint saved dp_reshardable (before this format) is still refused at another layout."""

import json
import os
import shutil

import pytest

from bundled import ROOT, preprocess_bundled_data
from distributed import run_distributed

LEGACY = os.path.join(ROOT, "tests", "assets", "checkpoint_2337daf")
FLAGS = ["--data-prefix", "data/chat", "--seq-length", "64", "--global-batch-size", "4", "--micro-batch-size", "1",
         "--lr", "1e-3", "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--moe-aux-loss-coeff", "0",
         "--old-policy-interval", "2", "--train-iters", "4", "--pretrained-checkpoint", "init"]
TP2_EP2 = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--sequence-parallel"]
KEYS = ("loss", "grad_norm", "entropy", "ratio_mean", "clip_fraction")


def _train(argv):
    from megatron_psft.platform import parallel
    from megatron_psft.train import Trainer, parse_launch

    try:
        Trainer(parse_launch(FLAGS + argv)).run()
    finally:
        parallel.destroy()


def _two_ranks(work):
    from megatron_psft import checkpoint
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, load_hf_config, transformer_config
    from megatron_psft.platform import parallel

    os.chdir(work)
    args = Qwen3MoeArgs.from_hf_config(load_hf_config("debug"))
    parallel.initialize(parallel.ParallelLayout(), seed=5)
    checkpoint.save("init", 0, build_model_chunks(args, transformer_config(args, parallel.ParallelLayout())),
                    load_hf_config("debug"))
    parallel.destroy()
    _train(["--exit-interval", "2", "--save", "dp2_boundary", "--metrics-file", "dp2_part1.jsonl"])
    _train(["--exit-interval", "3", "--save", "dp2_mid_round", "--metrics-file", "dp2_mid_part1.jsonl"])
    from megatron_psft.platform import parallel as platform_parallel
    from megatron_psft.train import Trainer, parse_launch

    legacy_flags = ["--hf-config", "tiny_config.json", "--data-prefix", "data/chat", "--seq-length", "64",
                    "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--lr-warmup-iters", "1",
                    "--train-iters", "4", "--old-policy-interval", "3", "--seed", "7", "--load", "legacy"]
    try:
        Trainer(parse_launch(legacy_flags))
        refusal = None
    except ValueError as error:
        refusal = str(error)
    platform_parallel.destroy()
    return refusal


def _one_rank(work):
    os.chdir(work)
    _train(["--metrics-file", "dp1_straight.jsonl"])
    _train(["--load", "dp2_boundary", "--save", "dp2_boundary", "--metrics-file", "dp1_resumed.jsonl"])
    _train(["--load", "dp2_mid_round", "--save", "dp2_mid_round", "--metrics-file", "dp1_mid_resumed.jsonl"])


def _four_ranks(work):
    os.chdir(work)
    _train(["--expert-model-parallel-size", "2", "--metrics-file", "dp4_straight.jsonl"])
    _train(TP2_EP2 + ["--exit-interval", "2", "--save", "tp2ep2", "--metrics-file", "tp2ep2_part1.jsonl"])
    try:
        _train(["--load", "tp2ep2", "--metrics-file", "refused.jsonl"])
        refusal = None
    except ValueError as error:
        refusal = str(error)
    _train(["--expert-model-parallel-size", "2", "--load", "tp2ep2", "--save", "tp2ep2",
            "--metrics-file", "dp4_resumed.jsonl"])
    return refusal


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("reshard")
    preprocess_bundled_data(str(work / "data" / "chat"), 64)
    shutil.copytree(os.path.join(LEGACY, "checkpoint"), work / "legacy")
    shutil.copy(os.path.join(LEGACY, "tiny_config.json"), work)
    refusals = run_distributed(2, _two_ranks, str(work))
    run_distributed(1, _one_rank, str(work))
    chained_refusals = run_distributed(4, _four_ranks, str(work))
    return work, refusals, chained_refusals


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _assert_equal_steps(resumed, straight, steps):
    assert [r["step"] for r in resumed] == list(steps)
    by_step = {r["step"]: r for r in straight}
    for got in resumed:
        want = by_step[got["step"]]
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)


def test_two_ranks_to_one_at_a_round_boundary_equals_one_rank_from_the_start(work):
    work = work[0]
    _assert_equal_steps(_records(work / "dp1_resumed.jsonl"), _records(work / "dp1_straight.jsonl"), [3, 4])


def test_tp2_ep2_to_tp1_ep2_dp4_at_a_round_boundary_equals_that_layout_from_the_start(work):
    work = work[0]
    _assert_equal_steps(_records(work / "dp4_resumed.jsonl"), _records(work / "dp4_straight.jsonl"), [3, 4])


def test_mid_round_the_old_policy_restarts_from_the_resumed_weights(work):
    work = work[0]
    resumed = _records(work / "dp1_mid_resumed.jsonl")
    assert [r["step"] for r in resumed] == [4]
    assert resumed[0]["ratio_mean"] == 1.0 and resumed[0]["clip_fraction"] == 0.0


def test_a_dp_reshardable_checkpoint_is_still_refused_at_another_layout(work):
    for refusal in work[1]:
        assert refusal and "dp_reshardable" in refusal and "world_size" in refusal and "--no-load-optim" in refusal


def test_a_change_across_the_chained_expert_optimizer_is_refused_naming_the_way_on(work):
    for refusal in work[2]:
        assert refusal and "part(s)" in refusal and "expert_model_parallel_size" in refusal and "--no-load-optim" in refusal
