"""GPU tier, one GPU: the code paths cpu_compat replaces on CPU.

Without Transformer Engine: bf16 PSFT on the local spec through the real trainer (fused softmax
only where its extension is installed), a checkpoint, a resume whose steps match the uninterrupted
run, and the megatron-core 0.16 + no-TE MoE refusal. With TE: the TE spec with grouped GEMM, bf16
and the FP8 recipes, with recompute as the run script sets it. Run with ``bash tests/gpu/run.sh``;
skipped without CUDA.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from bundled import ROOT, preprocess_bundled_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SEQ = 128
TRAIN = ["--seq-length", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "1e-4",
         "--lr-warmup-iters", "2", "--params-dtype", "bf16", "--moe-aux-loss-coeff", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(tmp_path, name, *flags, check=True):
    """One single-GPU run of megatron_psft.train; returns (completed process, metric records)."""
    metrics = tmp_path / f"{name}.jsonl"
    env = {**os.environ, "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    result = subprocess.run([sys.executable, "-m", "megatron_psft.train", *TRAIN, "--metrics-file", str(metrics),
                             *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return result, records


def _megatron_core_router_needs_te() -> bool:
    import megatron.core

    from megatron_psft.platform import Platform

    platform = Platform.detect()
    return megatron.core.__version__.startswith("0.16.") and not platform.use_transformer_engine


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return preprocess_bundled_data(str(tmp_path_factory.mktemp("data") / "chat"), SEQ)


@pytest.fixture(scope="module")
def model_flags():
    """The debug MoE, or its dense twin where megatron-core 0.16 cannot route without TE."""
    if not _megatron_core_router_needs_te():
        return ["--hf-config", "debug"]
    path = os.path.join(ROOT, "megatron_psft", "models", "qwen3_moe", "configs", "debug.json")
    with open(path) as f:
        config = {**json.load(f), "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    dense = os.path.join(os.environ.get("TMPDIR", "/tmp"), "psft_gpu_dense_config.json")
    with open(dense, "w") as f:
        json.dump(config, f)
    return ["--hf-config", dense]


def test_bf16_psft_saves_and_resumes_like_an_uninterrupted_run(tmp_path, data_prefix, model_flags):
    common = ["--data-prefix", data_prefix, "--train-iters", "6", "--old-policy-interval", "3",
              "--sft-warmup-steps", "1", *model_flags]
    _, straight = train(tmp_path, "straight", *common)
    checkpoint = str(tmp_path / "checkpoint")
    _, first = train(tmp_path, "part1", *common, "--save", checkpoint, "--exit-interval", "3")
    _, second = train(tmp_path, "part2", *common, "--save", checkpoint, "--load", checkpoint)

    assert len(straight) == 6 and len(first) == 3 and len(second) == 3
    resumed = first + second
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for got, want in zip(resumed, straight):
        assert got["phase"] == want["phase"] and got["learning_rate"] == want["learning_rate"]
        # bf16 atomics make the backward non-bitwise-deterministic on a GPU; a lost RNG or old-policy
        # state would move these far more.
        for key in ("loss", "grad_norm", "entropy"):
            assert got[key] == pytest.approx(want[key], rel=2e-2), (key, got["step"])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in straight)
    # Step 4 is mid-round (rounds of 3 from step 2): its old log-probs came from the checkpoint.
    assert second[0]["old_policy_s"] == 0.0 and second[0]["ratio_min"] is not None
    assert open(os.path.join(checkpoint, "latest_checkpointed_iteration.txt")).read().strip() == "6"


def test_bf16_packed_steps_match_padded_steps(tmp_path, data_prefix, model_flags):
    """--pack-sequences on the GPU: THD attention with TE, the block-diagonal mask (unfused softmax) without;
    the larger old-policy micro-batch and evaluation ride along."""
    common = ["--data-prefix", data_prefix, "--train-iters", "4", "--old-policy-interval", "2",
              "--eval-data-prefix", f"held={data_prefix}", "--eval-iters", "1", *model_flags]
    _, padded = train(tmp_path, "padded", *common)
    _, packed = train(tmp_path, "packed", *common, "--pack-sequences", "--old-policy-micro-batch-size", "8")
    padded_steps = [r for r in padded if "loss" in r]
    packed_steps = [r for r in packed if "loss" in r]
    assert len(padded_steps) == len(packed_steps) == 4
    for got, want in zip(packed_steps, padded_steps):
        for key in ("loss", "grad_norm", "entropy"):
            assert got[key] == pytest.approx(want[key], rel=2e-2), (key, got["step"])
    evals = [r for r in packed if "eval/held/nll" in r]
    assert [r["step"] for r in evals] == [0, 4] and all(torch.isfinite(torch.tensor(r["eval/held/nll"])) for r in evals)


@pytest.mark.skipif(not _megatron_core_router_needs_te(), reason="this megatron-core routes without TE")
def test_moe_on_megatron_core_0_16_without_te_is_refused_up_front(tmp_path, data_prefix):
    result, records = train(tmp_path, "refused", "--data-prefix", data_prefix, "--train-iters", "2",
                            "--no-moe-grouped-gemm", check=False)
    assert result.returncode == 2 and "te_general_gemm" in result.stderr and not records


def _has_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


# The run script's precision settings, and delayed scaling without the recompute it cannot take.
TE_VARIANTS = {
    "bf16": ["--recompute-granularity", "selective", "--recompute-modules", "moe_act", "layernorm"],
    "fp8_tensorwise": ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--recompute-granularity",
                       "selective", "--recompute-modules", "moe_act", "layernorm"],
    "fp8_delayed": ["--fp8-format", "hybrid", "--fp8-recipe", "delayed"],
}


@pytest.mark.skipif(not _has_transformer_engine(), reason="needs Transformer Engine")
@pytest.mark.parametrize("variant", sorted(TE_VARIANTS))
def test_te_spec_with_grouped_gemm(tmp_path, data_prefix, variant):
    _, records = train(tmp_path, variant, "--data-prefix", data_prefix, "--train-iters", "4",
                       "--old-policy-interval", "4", "--moe-grouped-gemm", *TE_VARIANTS[variant])
    _, packed = train(tmp_path, f"{variant}_packed", "--data-prefix", data_prefix, "--train-iters", "4",
                      "--old-policy-interval", "4", "--moe-grouped-gemm", "--pack-sequences", *TE_VARIANTS[variant])
    assert len(packed) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in packed)
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[0]["ratio_min"] == 1.0 == records[0]["ratio_max"]  # the first step reuses its own log-probs


@pytest.mark.skipif(not _has_transformer_engine(), reason="needs Transformer Engine")
def test_te_model_uses_grouped_experts_and_fused_norms():
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, transformer_config

    parallel.initialize(parallel.ParallelLayout())
    args = Qwen3MoeArgs.from_pretrained("debug")
    config = transformer_config(args, parallel.ParallelLayout(), params_dtype=torch.bfloat16, moe_grouped_gemm=True)
    (model,) = build_model_chunks(args, config)
    names = [name for name, _ in model.named_parameters()]
    assert any("linear_qkv.layer_norm_weight" in n for n in names)
    assert any(n.endswith("experts.linear_fc1.weight0") for n in names)
    parallel.destroy()
