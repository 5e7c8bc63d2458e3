"""GPU tier: the Transformer Engine spec (grouped GEMM, fused norms), bf16 and FP8, through the real
trainer on one GPU. Skipped without CUDA and Transformer Engine; the CPU suite covers the math."""

import json
import subprocess
import sys

import pytest
import torch
from bundled import ROOT, preprocess_bundled_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    pytest.importorskip("transformer_engine.pytorch")
    return preprocess_bundled_data(str(tmp_path_factory.mktemp("data") / "chat"), 128)


def _train(tmp_path, data_prefix, *flags):
    metrics = tmp_path / "metrics.jsonl"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "megatron_psft.train",
                    "--data-prefix", data_prefix, "--seq-length", "128", "--micro-batch-size", "4",
                    "--global-batch-size", "8", "--train-iters", "4", "--old-policy-interval", "4",
                    "--lr", "1e-4", "--metrics-file", str(metrics), *flags], check=True, cwd=ROOT)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


@pytest.mark.parametrize("flags", [(), ("--fp8-format", "hybrid", "--fp8-recipe", "delayed"),
                                   ("--fp8-format", "hybrid", "--fp8-recipe", "tensorwise")],
                         ids=["bf16", "fp8-delayed", "fp8-tensorwise"])
def test_psft_steps_with_te_spec_and_grouped_gemm(tmp_path, data_prefix, flags):
    records = _train(tmp_path, data_prefix, "--params-dtype", "bf16", "--moe-grouped-gemm", *flags)
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[0]["ratio_min"] == 1.0 == records[0]["ratio_max"]  # the first step reuses its own log-probs


def test_te_model_uses_grouped_experts_and_fused_norms():
    pytest.importorskip("transformer_engine.pytorch")
    from megatron_psft import parallel
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, transformer_config

    parallel.initialize(parallel.ParallelLayout())
    args = Qwen3MoeArgs.from_pretrained("debug")
    (model,) = build_model_chunks(args, transformer_config(args, parallel.ParallelLayout(), params_dtype=torch.bfloat16))
    names = [name for name, _ in model.named_parameters()]
    assert any("linear_qkv.layer_norm_weight" in n for n in names)
    assert any(n.endswith("experts.linear_fc1.weight0") for n in names)
    parallel.destroy()
