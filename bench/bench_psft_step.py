"""PSFT's optimizer-step time over SFT's, same model and data, measured side by side in one run.

    python bench/bench_psft_step.py [--interval 8] [--rounds 2] [extra megatron_psft.train flags]
    python bench/bench_psft_step.py --widths 30b-a3b --seq-length 4096 --global-batch-size 8 --micro-batch-size 1
        # one GPU: Qwen3-30B-A3B's widths (hidden 2048, 128 experts top-8, vocab 151936) with --layers 2

PSFT pays one forward-only pass over each round's data. With the first step of a round reusing the
training forward's log-probs, the floor is about 1 + (K-1)/K * 1/3 = 1.29x at K = 8 (forward = 1/3
of forward + backward). Timed over whole rounds after a warm-up round; the data and the model are
the trainer's own.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Wider than the test model so matmuls, not Python, dominate a CPU step.
WIDE_CONFIG = {"hidden_size": 256, "head_dim": 64, "moe_intermediate_size": 256, "intermediate_size": 512}


def model_config(widths: str, layers: int) -> dict:
    """The HF config the bench trains: the debug model made wider ('wide'), or Qwen3-30B-A3B's ('30b-a3b'),
    with `layers` layers."""
    from megatron_psft.models.qwen3_moe import load_hf_config

    base = {**load_hf_config("debug"), **WIDE_CONFIG} if widths == "wide" else load_hf_config(widths)
    return {**base, "num_hidden_layers": layers}


def variants(micro_batch_size: int) -> dict:
    return {
        "sft": ["--objective", "sft"],
        "psft_reuse": ["--objective", "psft"],
        "psft_no_reuse": ["--objective", "psft", "--no-first-step-reuse"],
        # The forward-only pass in micro-batches of 4x the training ones (--old-policy-micro-batch-size).
        "psft_reuse_old_mbs_x4": ["--objective", "psft", "--old-policy-micro-batch-size", str(4 * micro_batch_size)],
    }


def _timed_steps(argv, steps, warmup_steps):
    from megatron_psft.platform import parallel
    from megatron_psft.train import Trainer, parse_launch

    trainer = Trainer(parse_launch(argv + ["--train-iters", str(steps)]))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_one_step()
        times.append(time.perf_counter() - start)
    parallel.destroy()
    return times[warmup_steps:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=int, default=8, help="K: optimizer steps per old-policy round")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (after one warm-up round)")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--widths", choices=("wide", "30b-a3b"), default="wide",
                        help="wide: the debug model at hidden 256 (CPU); 30b-a3b: Qwen3-30B-A3B's widths (a GPU)")
    parser.add_argument("--layers", type=int, default=2)
    args, train_flags = parser.parse_known_args()

    with tempfile.TemporaryDirectory(prefix="bench_psft_") as work:
        _bench(args, train_flags, work)


def _bench(args, train_flags, work):
    data_prefix = os.path.join(work, "chat")
    config_path = os.path.join(work, "config.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                    "--input", os.path.join(ROOT, "megatron_psft", "assets", "chat_data.jsonl"),
                    "--output-prefix", data_prefix, "--tokenizer", os.path.join(ROOT, "megatron_psft", "assets", "tokenizer"),
                    "--seq-length", str(args.seq_length)], check=True, capture_output=True)
    hf_config = model_config(args.widths, args.layers)
    with open(config_path, "w") as f:
        json.dump(hf_config, f)

    base = ["--data-prefix", data_prefix, "--hf-config", config_path, "--seq-length", str(args.seq_length),
            "--global-batch-size", str(args.global_batch_size), "--micro-batch-size", str(args.micro_batch_size),
            "--old-policy-interval", str(args.interval), "--lr", "1e-5", "--lr-warmup-iters", "0"] + train_flags
    steps = args.interval * (args.rounds + 1)
    results = {name: _timed_steps(base + flags, steps, args.interval)
               for name, flags in variants(args.micro_batch_size).items()}

    sft = statistics.mean(results["sft"])
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}: K = {args.interval}, {args.rounds} timed rounds of {args.interval} steps, global batch "
          f"{args.global_batch_size} x seq {args.seq_length}, {args.widths} widths (hidden {hf_config['hidden_size']}, "
          f"{hf_config['num_experts']} experts, vocab {hf_config['vocab_size']}), {args.layers} layers")
    print(f"{'variant':<24}{'mean step s':>13}{'/ sft':>8}")
    for name, times in results.items():
        print(f"{name:<24}{statistics.mean(times):>13.3f}{statistics.mean(times) / sft:>8.3f}")
    floor = 1 + (args.interval - 1) / args.interval / 3
    print(f"floor with reuse (forward = 1/3 of a step): {floor:.3f}; target <= 1.30")


if __name__ == "__main__":
    main()
