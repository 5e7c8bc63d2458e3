"""What a cluster launch resolves to, checked without a GPU: the platform's kernel choices, every
refusal at argument parsing (naming the flags), the dry run's plan against built models and the one
measured H100 point, and where a resumed rank's state is placed."""

import os

import pytest
import torch

from distributed import run_distributed
from megatron_psft import checkpoint
from megatron_psft.platform import parallel
from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, load_hf_config, transformer_config
from megatron_psft.platform.parallel import ParallelLayout
from megatron_psft.plan import Sizes, memory_per_gpu, parameters_per_gpu
from megatron_psft.platform import MIN_TRANSFORMER_ENGINE, Platform
from megatron_psft.config import DataConfig, TrainConfig
from megatron_psft.launch import check_data, parse_launch

GPU_NO_TE = Platform(cuda=True, transformer_engine=None, megatron_core="0.19.2", assumed=True)
GPU_TE = Platform(cuda=True, transformer_engine=MIN_TRANSFORMER_ENGINE, megatron_core="0.19.2", assumed=True)


def _args(name="30b-a3b", **changes):
    return Qwen3MoeArgs.from_hf_config({**load_hf_config(name), **changes})


# --- the platform decides the kernels -------------------------------------------------------------

def test_gpu_without_te_uses_no_fused_kernel_it_lacks():
    config = transformer_config(_args(), ParallelLayout(), params_dtype=torch.bfloat16, platform=GPU_NO_TE)
    assert not config.masked_softmax_fusion  # scaled_masked_softmax_cuda is not there: the H100 crash
    assert not (config.apply_rope_fusion or config.moe_permute_fusion or config.gradient_accumulation_fusion)
    assert not config.use_cpu_initialization and config.bf16


def test_fused_softmax_is_used_where_its_extension_exists():
    platform = Platform(cuda=True, transformer_engine=None, megatron_core="0.19.2", fused_softmax=True, assumed=True)
    assert transformer_config(_args(), ParallelLayout(), platform=platform).masked_softmax_fusion
    # ... but not for packed rows: its causal kernel applies its own triangle and ignores the block-diagonal mask.
    assert not transformer_config(_args(), ParallelLayout(), platform=platform, pack_sequences=True).masked_softmax_fusion


def test_cpu_platform_initialises_on_cpu():
    cpu = Platform(cuda=False, transformer_engine=None, megatron_core="0.16.1")
    config = transformer_config(_args("debug"), ParallelLayout(), platform=cpu)
    assert config.use_cpu_initialization and not config.masked_softmax_fusion


@pytest.mark.parametrize("platform, kwargs, message", [
    (GPU_NO_TE, dict(fp8="hybrid"), "--fp8-format hybrid needs Transformer Engine"),
    (Platform(cuda=False, transformer_engine=None, megatron_core="0.16.1"), dict(fp8="e4m3"), "--fp8-format"),
    (GPU_NO_TE, dict(moe_grouped_gemm=True), "--moe-grouped-gemm needs Transformer Engine"),
    (Platform(cuda=True, transformer_engine="2.1.0", megatron_core="0.19.2"), {}, "older than the supported"),
    (Platform(cuda=True, transformer_engine=None, megatron_core="0.16.1"), {}, "te_general_gemm"),
    (GPU_NO_TE, dict(recompute_granularity="selective", recompute_modules=["moe_act", "layernorm"]),
     "--recompute-modules layernorm needs Transformer Engine"),
])
def test_platform_refusals_name_the_fix(platform, kwargs, message):
    with pytest.raises(ValueError, match=message):
        transformer_config(_args(), ParallelLayout(), platform=platform, **kwargs)


def test_megatron_core_0_16_without_te_still_runs_a_dense_model():
    dense = Qwen3MoeArgs.from_hf_config({**load_hf_config("debug"), "architectures": ["Qwen3ForCausalLM"]})
    config = transformer_config(dense, ParallelLayout(),
                                platform=Platform(cuda=True, transformer_engine=None, megatron_core="0.16.1"))
    assert config.num_moe_experts is None


# --- refusals at argument parsing -------------------------------------------------------------------

CLUSTER = ["--hf-config", "30b-a3b", "--train-iters", "100", "--data-prefix", "unused", "--dry-run",
           "--dry-run-platform", "gpu-te", "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "8",
           "--expert-tensor-parallel-size", "1", "--sequence-parallel", "--moe-grouped-gemm",
           "--fp8-format", "hybrid", "--recompute-granularity", "selective", "--recompute-modules", "moe_act", "layernorm"]


@pytest.mark.parametrize("flags, world_size, named", [
    (["--fp8-recipe", "delayed"], 16, ["--fp8-recipe delayed", "--recompute-modules moe_act layernorm"]),
    (["--global-batch-size", "12"], 16, ["--global-batch-size 12", "--micro-batch-size"]),
    (["--seq-length", "4095"], 16, ["--seq-length", "--sequence-parallel"]),
    (["--expert-model-parallel-size", "3", "--global-batch-size", "24"], 24, ["--expert-model-parallel-size 3"]),
    (["--sft-warmup-steps", "100"], 16, ["--sft-warmup-steps"]),
    (["--moe-router-replay", "--recompute-modules", "moe", "layernorm"], 16, ["--moe-router-replay"]),
    (["--moe-router-replay", "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
     16, ["--moe-router-replay"]),
    (["--old-policy-interval", "sometimes"], 16, ["--old-policy-interval"]),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 6, ["world size 6"]),
    (["--tensor-model-parallel-size", "8"], 16, ["KV heads", "--tensor-model-parallel-size"]),
    (["--dry-run-platform", "gpu"], 16, ["--fp8-format hybrid needs Transformer Engine"]),
])
def test_bad_combinations_are_refused_at_parsing_naming_the_flags(flags, world_size, named, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(SystemExit) as exit_info:
        parse_launch(CLUSTER + flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    for flag in named:
        assert flag in error, error


def test_the_cluster_defaults_parse(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    args = parse_launch(CLUSTER + ["--fp8-recipe", "tensorwise"]).config.model
    assert args.params_dtype == "bf16"  # planned for a GPU


def test_data_prefix_is_required_outside_a_dry_run(capsys):
    with pytest.raises(SystemExit):
        parse_launch(["--train-iters", "4"])
    assert "--data-prefix is required" in capsys.readouterr().err


def test_fp8_on_this_machine_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_launch(["--train-iters", "4", "--data-prefix", "x", "--fp8-format", "hybrid"])
    assert "needs Transformer Engine" in capsys.readouterr().err


# --- the plan --------------------------------------------------------------------------------------

def test_memory_estimate_matches_the_measured_h100_point():
    """Qwen3-30B-A3B widths, 2 layers, seq 4096, micro-batch 1, bf16, TP1, local spec, distributed
    optimizer: 44.6 GiB peak allocated on one H100 (megatron-core 0.19.2)."""
    args = _args(num_hidden_layers=2)
    config = transformer_config(args, ParallelLayout(), params_dtype=torch.bfloat16, platform=GPU_NO_TE)
    memory = memory_per_gpu(args, config, Sizes.of(ParallelLayout(), 1), GPU_NO_TE, 4096, 1, 4, True)
    assert memory["total"] == pytest.approx(44.6, rel=0.1), memory


def test_memory_estimate_responds_to_sharding_and_recompute():
    args = _args(num_hidden_layers=4)
    layout = ParallelLayout(tensor=2, expert=8, expert_tensor=1, sequence_parallel=True)
    base = dict(params_dtype=torch.bfloat16, platform=GPU_TE)
    plain = transformer_config(args, layout, **base)
    recompute = transformer_config(args, layout, recompute_granularity="selective",
                                   recompute_modules=["moe_act", "layernorm"], **base)
    sizes = Sizes.of(layout, 16)
    with_recompute = memory_per_gpu(args, recompute, sizes, GPU_TE, 4096, 1, 32, True)
    without = memory_per_gpu(args, plain, sizes, GPU_TE, 4096, 1, 32, True)
    replicated = memory_per_gpu(args, plain, sizes, GPU_TE, 4096, 1, 32, False)
    assert with_recompute["activations"] < without["activations"]
    assert replicated["optimizer"] > 1.9 * without["optimizer"]  # 8-way dense / 2-way expert sharding gone


def test_fused_logprobs_auto_is_settled_for_the_shapes_and_planned_without_the_logits(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    plans = {}
    for seq in (4096, 32768):
        for mode in ("off", "auto"):
            launch = parse_launch(CLUSTER + ["--seq-length", str(seq), "--fused-logprobs", mode])
            plans[seq, mode] = launch.config.model.fused_logprobs, launch.memory_estimate()
    assert [fused for fused, _ in plans.values()] == [False, False, False, True]  # 32k x 151936/TP2 bf16: 4.6 GiB
    transient = "transient (log-probs or attention backward)"
    assert plans[4096, "off"][1] == plans[4096, "auto"][1]
    # Unfused, the logits and their gradient (2 x 4.6 GiB); fused, one 256 MiB chunk of each and an fp32
    # accumulator of the output weight's gradient (151936/2 x 2048 x 4 bytes: 0.58 GiB).
    assert plans[32768, "off"][1][transient] > 9.3 > 2.1 > plans[32768, "auto"][1][transient]


def test_the_megatron_lm_hook_settles_auto_by_the_same_rule():
    import argparse

    from megatron_psft.megatron_lm import add_psft_arguments, forward_step_from_args

    parser = add_psft_arguments(argparse.ArgumentParser())
    for flags, seq, tensor, fused in ((["--fused-logprobs", "auto"], 32768, 1, True),
                                      (["--fused-logprobs", "auto"], 32768, 4, False),
                                      (["--fused-logprobs", "auto"], 4096, 1, False),
                                      (["--fused-logprobs"], 4096, 1, True), ([], 32768, 1, False)):
        args = parser.parse_args(flags + ["--eps-low", "0.2"])
        args.__dict__.update(vocab_size=151936, seq_length=seq, micro_batch_size=1, tensor_model_parallel_size=tensor,
                             params_dtype=torch.bfloat16, moe_router_replay=False, moe_routing_flip_stats=False)
        assert forward_step_from_args(args).settings.fused_logprobs is fused, (flags, seq, tensor)


def _count_parameters(layouts):
    from megatron_psft.models.qwen3_moe import build_model_chunks

    import torch.distributed as dist

    args = _args("debug")
    counts = {}
    for name, layout_kwargs in layouts.items():
        layout = ParallelLayout(**layout_kwargs)
        parallel.initialize(layout)
        chunks = build_model_chunks(args, transformer_config(args, layout))
        expert = sum(p.numel() for chunk in chunks for n, p in chunk.named_parameters() if ".experts." in n)
        total = sum(p.numel() for chunk in chunks for p in chunk.parameters())
        parallel.destroy()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (total - expert, expert))
        counts[name] = gathered
    return counts


PARAMETER_LAYOUTS = {
    "tp1_dp4": dict(),
    "tp2_ep2_sp": dict(tensor=2, expert=2, sequence_parallel=True),
    "tp2_ep4_etp1_sp": dict(tensor=2, expert=4, expert_tensor=1, sequence_parallel=True),
    "pp2": dict(pipeline=2),
    "pp2_vpp2_tp2_sp": dict(pipeline=2, virtual_pipeline=2, tensor=2, sequence_parallel=True),
}


def test_parameters_per_gpu_match_the_built_model():
    counts = run_distributed(4, _count_parameters, PARAMETER_LAYOUTS)[0]
    args = _args("debug")
    for name, layout_kwargs in PARAMETER_LAYOUTS.items():
        planned = parameters_per_gpu(args, Sizes.of(ParallelLayout(**layout_kwargs), 4))
        most_loaded = max(counts[name], key=sum)
        assert (planned["dense"], planned["expert"]) == most_loaded, (name, planned, counts[name])


# --- a resumed rank's state --------------------------------------------------------------------------

def test_resume_keeps_rng_states_on_the_host_and_moves_the_old_policy_to_the_device(tmp_path, monkeypatch):
    """On a GPU, loading the rank state onto the device broke torch.set_rng_state. The "meta" device
    stands in for the GPU: torch.set_rng_state refuses it the same way."""
    from megatron.core import tensor_parallel

    os.makedirs(tmp_path / "rank_state")
    (tmp_path / "metadata.json").write_text("{}")  # makes tmp_path a checkpoint directory
    old_logprobs = torch.randn(2, 5)
    torch.save({"torch_rng": torch.get_rng_state(), "cuda_rng": None,
                "tracker_rng": {"model-parallel-rng": torch.get_rng_state()},
                "old_policy": {"outputs": {3: [{"logprobs": old_logprobs}]}}},
               tmp_path / "rank_state" / "rank_00000.pt")
    monkeypatch.setattr(checkpoint, "read_common_state", lambda root: {"trainer_state": {"step": 3}, "scheduler": {}})
    monkeypatch.setattr(checkpoint, "load_training_state", lambda root, *a, **k: {"step": 3})
    monkeypatch.setattr("megatron_psft.checkpoint.dist.get_rank", lambda: 0)
    monkeypatch.setattr(parallel, "device", lambda: torch.device("meta"))
    restored = {}
    monkeypatch.setattr(tensor_parallel.get_cuda_rng_tracker(), "set_states", lambda states: restored.update(states))

    class _OldPolicy:
        def load_state_dict(self, state):
            restored["old_policy"] = state

    config = parse_launch(["--train-iters", "4", "--data-prefix", "x", "--dry-run"]).config
    scheduler = type("Scheduler", (), {"state_dict": lambda self: {}})()
    monkeypatch.setattr("megatron_psft.checkpoint.dist.get_world_size", lambda: 1)
    assert checkpoint.resume(str(tmp_path), config, None, None, scheduler, None, _OldPolicy()) == 3
    assert restored["model-parallel-rng"].device.type == "cpu"
    assert restored["old_policy"]["outputs"][3][0]["logprobs"].device.type == "meta"


def test_setup_declares_the_transformer_engine_the_platform_requires():
    """moe_permute_fusion needs TE 2.1 and the default FP8 recompute 2.6: the install must not admit less."""
    import re

    from megatron_psft.platform.machine import _version_tuple

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")) as f:
        declared = re.search(r'"transformer-engine\[pytorch\]>=([0-9.]+)', f.read()).group(1)
    assert _version_tuple(declared) == _version_tuple(MIN_TRANSFORMER_ENGINE) >= (2, 6, 0)


@pytest.mark.parametrize("meta, message", [
    (dict(vocab_size=2000, seq_length=64), "has 2000 ids, the model only 1000"),
    (dict(vocab_size=1000, seq_length=256), "preprocessed for --seq-length 256 > 128"),
])
def test_data_that_does_not_fit_is_refused(meta, message):
    config = TrainConfig(data=DataConfig(data_prefix="/data/chat", seq_length=128))
    with pytest.raises(ValueError, match=message):
        check_data(meta, _args("debug"), config, "/data/chat")
    check_data(dict(vocab_size=1000, seq_length=128), _args("debug"), config, "/data/chat")  # the boundary fits


@pytest.mark.parametrize("flags, message", [
    (["--old-policy-interval", "0"], "--old-policy-interval must be a number of steps >= 1"),
    (["--old-policy-interval", "-2"], "--old-policy-interval"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
    (["--global-batch-size", "0"], "--global-batch-size must be at least 1"),
    (["--recompute-modules", "core_attn"], "--recompute-modules needs --recompute-granularity selective"),
    (["--fp8-recipe", "delayed"], "--fp8-recipe delayed has no effect without --fp8-format"),
    (["--recompute-granularity", "full", "--recompute-num-layers", "1"], "--recompute-method and --recompute-num-layers"),
    (["--recompute-method", "uniform"], "need --recompute-granularity full"),
    (["--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"], "exclude each other"),
    (["--finetune"], "need --load"),
    (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins must be positive"),
    (["--recompute-granularity", "selective", "--recompute-modules", "layernorm"],
     "--recompute-modules layernorm needs Transformer Engine"),
    (["--eval-interval", "5"], "--eval-interval / --eval-iters need --eval-data-prefix"),
    (["--eval-data-prefix", "x", "--eval-interval", "5"], "expected NAME=PREFIX"),
    (["--eval-data-prefix", "a=x", "a=y"], "names the set 'a' twice"),
    (["--eval-data-prefix", "a=x", "--eval-iters", "0"], "--eval-iters must be at least 1"),
    (["--old-policy-micro-batch-size", "0"], "--old-policy-micro-batch-size must be at least 1"),
    (["--old-policy-micro-batch-size", "4", "--moe-router-replay"], "--old-policy-micro-batch-size must equal"),
])
def test_flags_that_would_be_dropped_or_are_out_of_range_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_launch(["--train-iters", "4", "--data-prefix", "x", *flags])
    assert message in capsys.readouterr().err
