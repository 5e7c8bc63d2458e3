"""The trainer end to end on the bundled data, in one 4-rank launch: layout invariance over 6 steps,
resume equals uninterrupted, the first step of each round, the fixed reference, every objective."""

import json
import os

import pytest
import torch

from bundled import preprocess_bundled_data
from distributed import run_distributed

SEQ = 96
COMMON = ["--seq-length", str(SEQ), "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-4",
          "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--moe-aux-loss-coeff", "0"]
LAYOUTS = {
    "tp1_dp4": [],
    "tp2_ep2_sp_dp2": ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--sequence-parallel"],
    "pp2_dp2": ["--pipeline-model-parallel-size", "2"],
    "tp2_sp_pp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2"],
    "pp2_vpp2_dp2": ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
}
RESUME_LAYOUT = LAYOUTS["tp2_ep2_sp_dp2"]


def _metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _train(argv):
    from megatron_psft.train import Trainer, parse_args

    trainer = Trainer(parse_args(argv))
    trainer.run()
    return trainer


def _weights(chunks):
    return {k: v.detach().clone() for chunk in chunks
            for k, v in (chunk.module if hasattr(chunk, "module") else chunk).state_dict().items() if "_extra_state" not in k}


def _scenarios(tmp, data_prefix):
    from megatron_psft import checkpoint, parallel
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, load_hf_config, transformer_config

    base = COMMON + ["--data-prefix", data_prefix]
    init = os.path.join(tmp, "init")
    hf_config = load_hf_config("debug")
    args = Qwen3MoeArgs.from_hf_config(hf_config)
    parallel.initialize(parallel.ParallelLayout(), seed=3)
    checkpoint.save(init, 0, build_model_chunks(args, transformer_config(args, parallel.ParallelLayout())), hf_config)
    parallel.destroy()
    start = base + ["--pretrained-checkpoint", init]

    for name, layout in LAYOUTS.items():
        _train(start + layout + ["--train-iters", "6", "--old-policy-interval", "4",
                                 "--metrics-file", os.path.join(tmp, f"layout_{name}.jsonl")])
        parallel.destroy()

    resume = start + RESUME_LAYOUT + ["--train-iters", "8", "--old-policy-interval", "3"]
    _train(resume + ["--metrics-file", os.path.join(tmp, "straight.jsonl")]); parallel.destroy()
    ckpt = os.path.join(tmp, "resume_ckpt")
    _train(resume + ["--save", ckpt, "--exit-interval", "4", "--metrics-file", os.path.join(tmp, "part1.jsonl")])
    parallel.destroy()
    _train(resume + ["--save", ckpt, "--load", ckpt, "--metrics-file", os.path.join(tmp, "part2.jsonl")])
    parallel.destroy()

    # Fixed reference: the frozen old policy must stay the starting weights while the model moves.
    trainer = _train(start + ["--train-iters", "3", "--old-policy-interval", "never",
                              "--metrics-file", os.path.join(tmp, "never.jsonl")])
    frozen, trained = _weights(trainer.frozen), _weights(trainer.model)
    initial_chunks = build_model_chunks(args, transformer_config(args, trainer.layout))
    checkpoint.load_model(init, initial_chunks)
    initial = _weights(initial_chunks)
    never = {"frozen_is_initial": all(torch.equal(frozen[k], initial[k]) for k in initial),
             "trained_moved": any(not torch.equal(trained[k], initial[k]) for k in initial)}
    parallel.destroy()

    for objective in ("sft", "sft-kl", "dft", "psft-ent"):
        _train(start + ["--train-iters", "2", "--objective", objective,
                        "--metrics-file", os.path.join(tmp, f"objective_{objective}.jsonl")])
        parallel.destroy()
    for name, flag in (("flips", "--moe-routing-flip-stats"), ("replay", "--moe-router-replay")):
        _train(start + LAYOUTS["tp2_ep2_sp_dp2"] + [
            "--train-iters", "3", "--old-policy-interval", "3", "--no-first-step-reuse", "--lr", "1e-3", flag,
            "--metrics-file", os.path.join(tmp, f"routing_{name}.jsonl")])
        parallel.destroy()
    _train(start + ["--train-iters", "4", "--sft-warmup-steps", "2", "--sft-warmup-lr", "1e-3",
                    "--old-policy-interval", "2", "--metrics-file", os.path.join(tmp, "warmup.jsonl")])
    parallel.destroy()
    return never


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("trainer"))
    data_prefix = preprocess_bundled_data(os.path.join(tmp, "data", "chat"), SEQ)
    never = run_distributed(4, _scenarios, tmp, data_prefix)
    return tmp, never


def test_six_steps_agree_across_layouts(run):
    tmp, _ = run
    reference = _metrics(os.path.join(tmp, "layout_tp1_dp4.jsonl"))
    assert len(reference) == 6
    for name in LAYOUTS:
        records = _metrics(os.path.join(tmp, f"layout_{name}.jsonl"))
        for got, want in zip(records, reference):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-6), (name, got["step"])
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (name, got["step"])
            assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-4), (name, got["step"])
    # Training moved the policy: later steps of a round see ratios away from 1.
    assert reference[2]["ratio_max"] > 1.0 and reference[2]["approx_kl"] > 0


def test_first_step_of_each_round_has_ratio_exactly_one(run):
    tmp, _ = run
    for name in LAYOUTS:
        records = _metrics(os.path.join(tmp, f"layout_{name}.jsonl"))
        for record in records:
            if record["step"] in (1, 5):  # interval 4: rounds start at steps 1 and 5
                assert record["clip_fraction"] == 0.0 and record["ratio_min"] == 1.0 == record["ratio_max"], record
                assert record["old_policy_s"] > 0  # the pass over the rest of the round ran here
            else:
                assert record["old_policy_s"] == 0.0


def test_resume_equals_uninterrupted(run):
    tmp, _ = run
    straight = _metrics(os.path.join(tmp, "straight.jsonl"))
    resumed = _metrics(os.path.join(tmp, "part1.jsonl")) + _metrics(os.path.join(tmp, "part2.jsonl"))
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for got, want in zip(resumed, straight):
        for key in ("loss", "grad_norm", "ratio_mean", "clip_fraction", "entropy"):
            assert got[key] == pytest.approx(want[key], rel=0, abs=1e-6), (key, got["step"], got[key], want[key])
    # Step 5 is mid-round (rounds of 3 start at steps 1, 4, 7): its old log-probs came from the checkpoint.
    assert resumed[4]["old_policy_s"] == 0.0 and resumed[4]["ratio_min"] != 1.0


def test_fixed_reference_stays_the_initial_model(run):
    tmp, never = run
    assert all(r["frozen_is_initial"] and r["trained_moved"] for r in never), never
    records = _metrics(os.path.join(tmp, "never.jsonl"))
    assert records[0]["ratio_max"] == 1.0 and records[2]["approx_kl"] > records[1]["approx_kl"] > 0


def test_every_objective_trains(run):
    tmp, _ = run
    for objective in ("sft", "sft-kl", "dft", "psft-ent"):
        records = _metrics(os.path.join(tmp, f"objective_{objective}.jsonl"))
        assert [r["phase"] for r in records] == [objective] * 2
        assert all(r["grad_norm"] > 0 and r["entropy"] > 0 for r in records)
    assert _metrics(os.path.join(tmp, "objective_sft-kl.jsonl"))[0]["reference_kl"] == 0.0
    assert _metrics(os.path.join(tmp, "objective_psft-ent.jsonl"))[0]["selected_fraction"] == pytest.approx(0.2, abs=0.02)


def test_sft_warm_up_then_psft_rounds(run):
    tmp, _ = run
    records = _metrics(os.path.join(tmp, "warmup.jsonl"))
    assert [r["phase"] for r in records] == ["sft-warmup", "sft-warmup", "psft", "psft"]
    assert records[0]["learning_rate"] == pytest.approx(1e-3) and records[2]["learning_rate"] == pytest.approx(1e-4)
    assert records[2]["ratio_min"] == 1.0 == records[2]["ratio_max"]


def test_routing_flips_are_measured_and_replay_imposes_the_old_routing(run):
    tmp, _ = run
    flips = _metrics(os.path.join(tmp, "routing_flips.jsonl"))
    replay = _metrics(os.path.join(tmp, "routing_replay.jsonl"))
    # Step 1 without reuse: the old-policy pass and the training pass see identical weights and
    # micro-batch shapes; on CPU in fp32 both routing and log-probs agree bit for bit.
    assert flips[0]["routing_flip_fraction"] == 0.0 and flips[0]["ratio_min"] == 1.0 == flips[0]["ratio_max"]
    assert flips[1]["routing_flip_fraction"] > 0 and flips[2]["routing_flip_fraction"] > 0
    assert all(r["routing_flip_fraction"] is None for r in replay)
    assert replay[0]["loss"] == flips[0]["loss"]
    assert replay[1]["ratio_mean"] != flips[1]["ratio_mean"]  # same weights, routing imposed from the old pass
