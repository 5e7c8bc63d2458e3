"""Metric records across a resume, and the FLOPs estimate."""

import json

import pytest

from megatron_psft.metrics import drop_steps_after, model_flops_per_token
from megatron_psft.models.qwen3_moe import Qwen3MoeArgs


def test_resume_forgets_the_steps_it_will_train_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": -1.0}) + "\n" for s in range(1, 8)))
    drop_steps_after(str(path), 4)  # the checkpoint was at step 4; steps 5-7 are trained again
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    drop_steps_after(str(tmp_path / "absent.jsonl"), 4)  # nothing logged yet: nothing to do


def test_flops_per_token_of_qwen3_30b_a3b():
    args = Qwen3MoeArgs.from_pretrained("30b-a3b")
    # ~3B active matmul parameters -> 2 x 3e9 forward FLOPs per token, plus causal attention at 4096.
    flops = model_flops_per_token(args, 4096)
    matmul = 2 * (48 * (2048 * (4096 + 2 * 512) + 4096 * 2048 + 8 * 3 * 2048 * 768 + 2048 * 128) + 2048 * 151936)
    attention = 48 * 2 * 4096 * 4096
    assert flops == pytest.approx(matmul + attention)
    # Cross-check with Megatron-Bridge's published figure: ~205 TFLOP/s at ~8.9k tokens/s per H100
    # is ~23 GFLOP per trained token, i.e. 3 x ~7.7 GFLOP forward.
    assert 3 * flops == pytest.approx(205e12 / 8.9e3, rel=0.05)
