"""Metric records: across a resume, averaged over the log interval, to JSONL and W&B (offline); the
timers, the run's configuration artefact, and the FLOPs estimate."""

import glob
import json

import pytest

from megatron_psft.observability.logger import MetricsLogger, average_records, drop_steps_after
from megatron_psft.observability.metrics import model_flops_per_token
from megatron_psft.models.qwen3_moe import Qwen3MoeArgs


def test_resume_forgets_the_steps_it_will_train_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": -1.0}) + "\n" for s in range(1, 8)))
    drop_steps_after(str(path), 4)  # the checkpoint was at step 4; steps 5-7 are trained again
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    drop_steps_after(str(tmp_path / "absent.jsonl"), 4)  # nothing logged yet: nothing to do


def test_a_truncated_last_record_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": -1.0}) + "\n" + '{"step": 2, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl:2: dropping an unreadable"):
        drop_steps_after(str(path), 4)
    assert path.read_text() == json.dumps({"step": 1, "loss": -1.0}) + "\n"


def test_interval_average_takes_means_and_extremes():
    records = [{"loss": 1.0, "ratio_min": 0.9, "ratio_max": 1.1, "entropy": None, "phase": "psft"},
               {"loss": 3.0, "ratio_min": 0.7, "ratio_max": 1.3, "entropy": 2.0, "phase": "psft"}]
    assert average_records(records) == {"loss": 2.0, "ratio_min": 0.7, "ratio_max": 1.3, "entropy": 2.0,
                                        "phase": "psft"}


def _log_steps(logger, steps):
    for step in range(steps):
        logger.log(step, {"phase": "psft", "loss": float(step), "ratio_max": 1.0 + step / 10,
                          "memory/peak_gib": 2.0, "time/forward-backward_s": 0.5})
    logger.close()


def test_console_averages_over_the_interval_with_eta_and_the_file_keeps_every_step(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _log_steps(MetricsLogger(str(path), None, train_steps=7, log_interval=3), 7)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[0].split()[1] for line in lines] == ["3/", "6/", "7/"]
    assert "loss: 1.00000" in lines[0] and "ratio max: 1.200" in lines[0] and "loss: 4.00000" in lines[1]
    assert "ETA" in lines[0] and "elapsed" in lines[0] and "peak GiB: 2.00" in lines[0]
    assert "forward-backward 0.50" in lines[0]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 8)) and records[4]["loss"] == 4.0
    assert {"memory/peak_gib", "time/forward-backward_s", "phase"} <= set(records[0])


def test_metrics_file_can_follow_the_interval(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log_steps(MetricsLogger(str(path), None, train_steps=7, log_interval=3, jsonl_every_interval=True), 7)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(3, 1.0), (6, 4.0), (7, 6.0)]


def test_weights_and_biases_run_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(None, None, train_steps=3, wandb=dict(project="psft-test", name="offline-run",
                                                                 save_dir=str(tmp_path), config={"lr": 1e-6}))
    _log_steps(logger, 3)
    import wandb

    wandb.teardown()  # the service writes the run file; let it finish
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    content = open(run_file, "rb").read()
    assert b"train/loss" in content and b"memory/peak_gib" in content and b"psft-test" in content


def test_timers_cost_nothing_when_off_and_report_the_slowest_rank():
    from megatron_psft.observability.timers import Timers

    off = Timers(0)
    with off("forward-backward"):
        pass
    assert off.collect() == {} and off.straggler(1.5) is None
    on = Timers(1)
    on.per_rank_forward_backward = [1.0, 1.1, 0.9, 3.0]
    assert "rank 3's forward-backward took 3.000 s" in on.straggler(1.5)
    on.per_rank_forward_backward = [1.0, 1.1, 0.9, 1.2]
    assert on.straggler(1.5) is None


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
