"""examples/run_psft_moe.sh's embedded default, shortened: trains, checkpoints, exports to HF and
writes the clipped-token report; the export loads in transformers."""

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_embedded_default_trains_saves_and_exports(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "RUN_DIR": str(tmp_path), "TRAIN_ITERS": "6",
           "SFT_WARMUP_STEPS": "2", "OLD_POLICY_INTERVAL": "2", "MASTER_PORT": "29533"}
    for cluster_variable in ("PRETRAINED", "DATA_PREFIX", "SAVE_DIR", "NNODES", "SLURM_JOB_ID"):
        env.pop(cluster_variable, None)
    result = subprocess.run(["bash", os.path.join(ROOT, "examples", "run_psft_moe.sh")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    checkpoints = tmp_path / "checkpoints"
    records = [json.loads(line) for line in (checkpoints / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["sft-warmup"] * 2 + ["psft"] * 4
    assert records[2]["ratio_max"] == 1.0 and records[3]["ratio_max"] != 1.0  # rounds of 2 start at step 3
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (checkpoints / "clipped_tokens.svg").is_file()

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_export"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf_export"))
    ids = tokenizer("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
