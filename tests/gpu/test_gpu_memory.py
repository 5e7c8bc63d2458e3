"""GPU tier, one GPU: device memory stays flat over a long run (issue 22, item 5).

A packed bf16 PSFT run with evaluation and saves through the real trainer; its per-step records
(``memory/allocated_gib``, ``memory/reserved_gib``: CUDA's allocated and reserved bytes after each step)
must not grow once the first evaluations and saves are behind it. Allocated memory is compared at round
boundaries, where the old policy holds no outputs, so the live tensors are the same every time: the
weights, gradient buffers and optimizer state. ``bench/bench_soak.py --device cuda`` is the long form.
Run with ``bash tests/gpu/run.sh``; skipped without CUDA.
"""

import pytest
import torch

from test_gpu_tier import data_prefix, model_flags, train  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
STEPS, ROUND, EVAL_INTERVAL, SAVE_INTERVAL = 240, 4, 40, 60
SETTLED = STEPS // 2  # two saves and three evaluations behind
MiB_IN_GiB = 1 / 1024


def test_cuda_memory_is_flat_over_a_packed_run_with_evaluation_and_saves(tmp_path, data_prefix, model_flags):
    _, records = train(tmp_path, "soak", "--data-prefix", data_prefix, "--train-iters", str(STEPS),
                       "--old-policy-interval", str(ROUND), "--pack-sequences", "--log-interval", str(EVAL_INTERVAL),
                       "--eval-data-prefix", f"held={data_prefix}", "--eval-iters", "1",
                       "--eval-interval", str(EVAL_INTERVAL), "--save", str(tmp_path / "checkpoint"),
                       "--save-interval", str(SAVE_INTERVAL), *model_flags)
    steps = [record for record in records if "loss" in record]
    assert [record["step"] for record in steps] == list(range(1, STEPS + 1))

    allocated = {r["step"]: r["memory/allocated_gib"] for r in steps if r["step"] % ROUND == 0}
    growth = {step: value - allocated[SETTLED] for step, value in allocated.items() if step > SETTLED}
    assert all(abs(change) <= MiB_IN_GiB for change in growth.values()), \
        f"CUDA allocated memory moved after step {SETTLED} (GiB): {growth}"

    reserved_before = max(r["memory/reserved_gib"] for r in steps if r["step"] <= SETTLED)
    reserved_after = max(r["memory/reserved_gib"] for r in steps if r["step"] > SETTLED)
    assert reserved_after <= reserved_before + 64 * MiB_IN_GiB, \
        f"CUDA reserved memory grew from {reserved_before:.3f} to {reserved_after:.3f} GiB in the second half"
