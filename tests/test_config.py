"""The typed configuration: every bad setting is refused with one line naming its flag and the allowed
range, exit code 2, before any process group; the same configuration from flags and from Python; its
plain-dict form round-trips; every setting has its flag."""

import dataclasses
import os

import pytest
import torch.distributed as dist

from bundled import preprocess_bundled_data
from megatron_psft.config import (ConfigError, DataConfig, ModelConfig, ObjectiveConfig, OldPolicyConfig,
                                  OptimConfig, TrainConfig, TrainingConfig)
from megatron_psft.config.base import key_of
from megatron_psft.config.flags import build_parser, parse_config
from megatron_psft.launch import parse_launch

EMBEDDED = ["--train-iters", "4", "--seq-length", "128", "--global-batch-size", "4", "--micro-batch-size", "2"]


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return preprocess_bundled_data(str(tmp_path_factory.mktemp("data") / "chat"), 128)


# The table of issue 20: one bad flag each on the embedded setup.
@pytest.mark.parametrize("flags, message", [
    (["--eps-low", "1.0"], "--eps-low must lie in [0, 1), got 1.0"),
    (["--eps-high", "-0.5"], "--eps-high must not be negative, got -0.5"),
    (["--objective", "psft-ent", "--entropy-top-fraction", "0"], "--entropy-top-fraction must lie in (0, 1], got 0.0"),
    (["--lr", "-1"], "--lr must not be negative, got -1.0"),
    (["--objective", "sft-kl", "--kl-coef", "-1"], "--kl-coef must not be negative, got -1.0"),
    (["--old-policy-interval", "0"], "--old-policy-interval must be a number of steps >= 1 or 'never', got 0"),
    (["--global-batch-size", "7", "--micro-batch-size", "4"], "--global-batch-size 7 is not divisible"),
    (["--hf-config", "nope"], "no HF config at 'nope'"),
    (["--seq-length", "100000"], "the plan needs"),
    (["--adam-beta2", "1.0"], "--adam-beta2 must lie in [0, 1), got 1.0"),
    (["--min-lr", "1e-3", "--lr", "1e-4"], "--min-lr 0.001 must not exceed --lr 0.0001"),
    (["--straggler-factor", "0.5"], "--straggler-factor must exceed 1"),
])
def test_each_bad_flag_exits_2_with_one_line_before_any_process_group(flags, message, data_prefix, tmp_path, capsys):
    save = tmp_path / "save"
    with pytest.raises(SystemExit) as exit_info:
        parse_launch(EMBEDDED + ["--data-prefix", data_prefix, "--save", str(save)] + flags)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last, last
    assert not dist.is_initialized() and not save.exists()


def test_the_memory_refusal_states_the_plan_and_the_machine(data_prefix, capsys):
    with pytest.raises(SystemExit):
        parse_launch(EMBEDDED + ["--data-prefix", data_prefix, "--seq-length", "100000"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "GiB per process" in line and "GiB is available" in line and "--seq-length 100000" in line, line


def test_a_good_launch_resolves_with_its_data(data_prefix):
    launch = parse_launch(EMBEDDED + ["--data-prefix", data_prefix])
    assert not launch.planned and len(launch.train_set) > 0 and launch.config.model.params_dtype == "fp32"
    assert launch.sizes.data == 1 and launch.transformer_config.num_moe_experts == launch.model_args.num_experts


@pytest.mark.parametrize("build, message", [
    (lambda: ObjectiveConfig(eps_low=-0.1), "--eps-low"),
    (lambda: OldPolicyConfig(old_policy_interval=0), "--old-policy-interval"),
    (lambda: OptimConfig(lr=-1.0), "--lr must not be negative"),
    (lambda: DataConfig(seq_length=0), "--seq-length must be at least 1"),
    (lambda: TrainConfig(training=TrainingConfig(train_iters=4, sft_warmup_steps=4)), "--sft-warmup-steps"),
    (lambda: ModelConfig(fp8_recipe="delayed"), "--fp8-recipe delayed has no effect"),
    (lambda: ModelConfig(params_dtype="fp16"), "--params-dtype must be one of"),
])
def test_built_in_python_the_same_checks_apply(build, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build()


def test_flags_and_python_build_the_same_configuration():
    config, _ = parse_config(["--train-iters", "10", "--data-prefix", "d", "--seq-length", "256", "--eps-high", "0.3",
                              "--old-policy-interval", "never", "--no-first-step-reuse", "--lr", "2e-6",
                              "--no-distributed-optimizer", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                              "--recompute-granularity", "selective", "--recompute-modules", "moe_act",
                              "--eval-data-prefix", "a=x", "--save", "out"])
    from megatron_psft.config import CheckpointConfig, EvalConfig, ParallelLayout

    built = TrainConfig(
        model=ModelConfig(recompute_granularity="selective", recompute_modules=("moe_act",)),
        parallel=ParallelLayout(tensor=2, sequence_parallel=True), data=DataConfig(data_prefix="d", seq_length=256),
        objective=ObjectiveConfig(eps_high=0.3), old_policy=OldPolicyConfig(None, reuse_first_step=False),
        optimizer=OptimConfig(lr=2e-6, use_distributed_optimizer=False), training=TrainingConfig(train_iters=10),
        checkpoint=CheckpointConfig(save="out"), evaluation=EvalConfig(("a=x",)))
    assert config == built
    assert config.logging.metrics_file == "out/metrics.jsonl"  # the derived default
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_every_setting_has_its_flag_and_every_flag_its_setting():
    """A field without a flag could not be set by users; a flag without a field would be dropped."""
    python_only = {"iw_weight_min", "iw_weight_max"}
    command_line_only = {"dry_run", "dry_run_platform", "help"}
    keys = {key_of(f) for section in TrainConfig().sections().values() for f in dataclasses.fields(section)}
    dests = {action.dest for action in build_parser()._actions}
    assert keys - dests == python_only
    assert dests - keys == command_line_only
    for key in keys - python_only:  # the flag each refusal names is the one that sets the field
        option = next(a for a in build_parser()._actions if a.dest == key)
        assert TrainConfig().flag(key) in option.option_strings, key


def test_every_flag_is_documented():
    """The trainer's flags are listed in the README's flags table, the Megatron-LM hook's in its docs page."""
    import argparse

    from megatron_psft.megatron_lm import add_psft_arguments

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for parser, page in [(build_parser(), "README.md"), (add_psft_arguments(argparse.ArgumentParser()),
                                                          "docs/megatron_lm.md")]:
        with open(os.path.join(root, page)) as text:
            documented = text.read()
        options = {option for action in parser._actions for option in action.option_strings if option.startswith("--") and option != "--help"}
        assert {option for option in options if f"`{option}" not in documented} == set(), page


def test_configuration_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().data.seq_length = 8
