"""examples/run_psft_moe.sh: its embedded default, shortened (trains, evaluates a held-out slice kept
out of training, checkpoints, exports to HF and writes the clipped-token report; the export loads in
transformers), and DRY_RUN plans of the cluster defaults and of every variant docs/run_script.md
documents, resolved as the launch would resolve them."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "run_psft_moe.sh")
CLUSTER_VARIABLES = ("PRETRAINED", "DATA_PREFIX", "SAVE_DIR", "NNODES", "SLURM_JOB_ID", "HF_CONFIG", "DRY_RUN",
                     "FP8_FORMAT", "FP8_RECIPE", "TP", "EP", "ETP", "PP", "SEQUENCE_PARALLEL", "GPUS_PER_NODE",
                     "EVAL_DATA", "EVAL_INTERVAL", "EVAL_ITERS")


def _script_env(**variables):
    env = {key: value for key, value in os.environ.items() if key not in CLUSTER_VARIABLES}
    return {**env, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **variables}


def _dry_run(**variables):
    return subprocess.run(["bash", SCRIPT], env=_script_env(DRY_RUN="1", **variables), capture_output=True,
                          text=True, timeout=900)


def _git(*args):
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True)


def test_embedded_default_trains_saves_and_exports(tmp_path):
    head_before = _git("rev-parse", "HEAD")
    env = _script_env(RUN_DIR=str(tmp_path), TRAIN_ITERS="6", SFT_WARMUP_STEPS="2", OLD_POLICY_INTERVAL="2",
                      EVAL_INTERVAL="4", MASTER_PORT="29533")
    result = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    checkpoints = tmp_path / "checkpoints"
    # What a user watches: averaged console lines at the log interval (2) with elapsed time, ETA,
    # memory and per-phase times; the first step's memory against the plan.
    lines = [line for line in result.stdout.splitlines() if line.startswith(" iteration")]
    assert [line.split()[1] for line in lines] == ["2/", "4/", "6/"], lines
    assert all("ETA" in line and "mem GiB" in line and "forward-backward" in line for line in lines), lines[0]
    assert "memory after the first step" in result.stdout and "the plan estimated" in result.stdout
    run_config = json.loads((checkpoints / "run_config.json").read_text())
    assert run_config["args"]["seq_length"] == 128 and run_config["transformer_config"]["num_layers"] == 4
    assert run_config["world_size"] == 4 and run_config["versions"]["megatron_core"]
    if head_before.returncode == 0:  # a checkout: its commit is recorded (with -dirty for local changes), one
        # between HEAD before the run and HEAD now (a shared checkout may take commits meanwhile)
        recorded = run_config["git_revision"].split("-")[0]
        assert _git("merge-base", "--is-ancestor", head_before.stdout.strip(), recorded).returncode == 0, recorded
        assert _git("merge-base", "--is-ancestor", recorded, "HEAD").returncode == 0, recorded
    else:
        assert run_config["git_revision"] is None
    assert json.loads((checkpoints / "iter_0000006" / "run_config.json").read_text()) == run_config
    rank_state = torch.load(checkpoints / "iter_0000006" / "rank_state" / "rank_00003.pt", weights_only=True)
    assert rank_state["torch_rng"].dtype == torch.uint8 and "old_policy" in rank_state
    lines = [json.loads(line) for line in (checkpoints / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "loss" in r]
    assert {"memory/allocated_gib", "memory/reserved_gib", "memory/peak_gib", "time/data_s", "time/old-policy_s",
            "time/forward-backward_s", "time/optimizer_s", "time/save_s"} <= set(records[0])
    assert [r["phase"] for r in records] == ["sft-warmup"] * 2 + ["psft"] * 4
    assert records[2]["ratio_max"] == 1.0 and records[3]["ratio_max"] != 1.0  # rounds of 2 start at step 3
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (checkpoints / "clipped_tokens.svg").is_file()

    # The held-out slice: the bundled data's last conversations, none of them in the training set,
    # evaluated at step 0, every EVAL_INTERVAL (4) steps and at the end, on the console and in the JSONL.
    data = tmp_path / "data"
    held_out = (data / "chat_heldout.jsonl").read_text().splitlines()
    bundled = open(os.path.join(ROOT, "megatron_psft", "assets", "chat_data.jsonl")).read().splitlines()
    assert held_out == bundled[-len(held_out):] and len(held_out) >= 16
    training = (data / "chat_train.jsonl").read_text().splitlines()
    assert not set(training) & set(held_out) and set(training) | set(held_out) == set(bundled)
    evaluations = [r for r in lines if "eval/heldout/nll" in r]
    assert [r["step"] for r in evaluations] == [0, 4, 6]
    assert len({r["eval/heldout/tokens"] for r in evaluations}) == 1 and evaluations[0]["eval/heldout/tokens"] > 0
    assert evaluations[-1]["eval/heldout/nll"] < evaluations[0]["eval/heldout/nll"]  # it learned the templates
    console = [line for line in result.stdout.splitlines() if line.startswith(" evaluation")]
    assert [line.split()[3] for line in console] == ["0/", "4/", "6/"] and "heldout: nll" in console[0], console

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_export"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf_export"))
    ids = tokenizer("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_dry_run_plans_the_cluster_defaults():
    result = _dry_run(HF_CONFIG="30b-a3b", NNODES="2")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = result.stdout
    assert "16 GPUs: TP2 x PP1 x DP8, SP on" in plan and "EP8 x ETP1 x expert-DP2" in plan, plan
    assert "FP8 hybrid (tensorwise)" in plan and "recompute selective: moe_act layernorm" in plan, plan
    assert "Transformer Engine" in plan and "total" in plan


def test_dry_run_refuses_delayed_scaling_with_the_default_recompute():
    result = _dry_run(HF_CONFIG="30b-a3b", NNODES="2", FP8_RECIPE="delayed")
    assert result.returncode != 0
    assert "--fp8-recipe delayed" in result.stderr and "--recompute-modules moe_act layernorm" in result.stderr


# Every variant docs/run_script.md documents, on top of HF_CONFIG=30b-a3b NNODES=2: what the plan must show.
VARIANTS = {
    "one_node": (dict(NNODES="1", EP="8", TP="1", SEQUENCE_PARALLEL="0"), "8 GPUs: TP1 x PP1 x DP8, SP off"),
    "bf16": (dict(FP8_FORMAT=""), "bf16, no FP8"),
    "pipeline": (dict(PP="2"), "TP2 x PP2 x DP4"),
    "no_recompute": (dict(RECOMPUTE_GRANULARITY=""), "recompute off"),
    "delayed_without_recompute": (dict(FP8_RECIPE="delayed", RECOMPUTE_GRANULARITY=""), "FP8 hybrid (delayed)"),
    "never_refresh": (dict(OLD_POLICY_INTERVAL="never"), "old policy never refreshed"),
    "sft_kl_allgather_replay": (dict(OBJECTIVE="sft-kl", MOE_DISPATCHER="allgather", MOE_ROUTER_REPLAY="1"),
                                "objective    sft-kl"),
    "embedded": (dict(HF_CONFIG="", NNODES=""), "4 processes: TP2 x PP1 x DP2, SP on"),
    "padded": (dict(PACK_SEQUENCES="0"), "global 32 = DP8 x micro 1 x 4 micro-batches, seq 4096"),
    "eval_sets": (dict(EVAL_DATA="chat=/data/chat_eval code=/data/code_eval", EVAL_INTERVAL="50", EVAL_ITERS="4"),
                  "objective    psft"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_dry_run_of_each_documented_variant(name):
    variables, expected = VARIANTS[name]
    variables = {**dict(HF_CONFIG="30b-a3b", NNODES="2"), **variables}
    result = _dry_run(**{key: value for key, value in variables.items() if value or key not in ("HF_CONFIG", "NNODES")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout, result.stdout


def test_dry_run_refuses_a_malformed_eval_set():
    result = _dry_run(HF_CONFIG="30b-a3b", NNODES="2", EVAL_DATA="chat=/data/chat_eval /data/code_eval")
    assert result.returncode == 2
    assert "--eval-data-prefix '/data/code_eval': expected NAME=PREFIX" in result.stderr, result.stderr[-3000:]


def test_dry_run_reads_the_hf_config_next_to_a_checkpoint(tmp_path):
    with open(os.path.join(ROOT, "megatron_psft", "models", "qwen3_moe", "configs", "30b-a3b.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = 24  # something only this file says
    (tmp_path / "hf_config.json").write_text(json.dumps(config))
    result = _dry_run(PRETRAINED=str(tmp_path), NNODES="2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "24 layers" in result.stdout
