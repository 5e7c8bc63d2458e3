"""Real (non-padding) tokens per second, packed (--pack-sequences) over padded, same model, same samples,
measured side by side in one run.

    python bench/bench_packing.py [--seq-length 4096] [--mean-length 800] [--steps 3] [train flags]

The samples are synthetic with log-normal lengths (mean --mean-length, capped at --seq-length + 1, the
longest a row takes), a quarter prompt and three quarters response. Padded, every sample takes a row
of --seq-length; packed, rows hold as many whole samples as fit. Each variant trains --steps timed
optimizer steps after one warm-up step through the real trainer (PSFT: the run is one old-policy round,
whose pass falls in the warm-up step).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


class LogNormalSamples:
    """``dataset[i]``, ``sample_length(i)`` and ``len``, as the trainer reads an SFTDataset."""

    def __init__(self, count, mean_length, max_length, vocab_size, seed=0):
        rng = np.random.default_rng(seed)
        sigma = 0.8
        mu = np.log(mean_length) - sigma ** 2 / 2  # the log-normal's mean is exp(mu + sigma^2 / 2)
        self.lengths = np.clip(rng.lognormal(mu, sigma, size=count).astype(int), 8, max_length)
        self.samples = []
        for length in self.lengths:
            ids = rng.integers(1, vocab_size, size=length)
            mask = np.zeros(length, dtype=bool)
            mask[length // 4:] = True
            self.samples.append((ids.astype(np.int64), mask))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def sample_length(self, i):
        return int(self.lengths[i])


def _tokens_per_second(argv, dataset, steps):
    from megatron_psft.platform import parallel
    from megatron_psft.train import Trainer, parse_launch

    trainer = Trainer(parse_launch(argv + ["--train-iters", str(steps + 1)]))
    trainer.dataset = dataset  # the trainer's batching over synthetic lengths
    records = [trainer.train_one_step() for _ in range(steps + 1)][1:]
    parallel.destroy()
    seconds = sum(record["step_time_s"] for record in records)
    real_tokens = sum(record["tokens_per_s"] * record["step_time_s"] for record in records)
    return real_tokens / seconds, seconds / len(records)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--mean-length", type=int, default=800)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps, after one warm-up step")
    args, train_flags = parser.parse_known_args()

    from bundled import preprocess_bundled_data
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, load_hf_config

    with tempfile.TemporaryDirectory(prefix="bench_packing_") as work:
        data_prefix = preprocess_bundled_data(os.path.join(work, "chat"), args.seq_length)  # the trainer's checks
        vocab_size = Qwen3MoeArgs.from_hf_config(load_hf_config("debug")).vocab_size
        dataset = LogNormalSamples(args.samples, args.mean_length, args.seq_length + 1, vocab_size)
        base = ["--data-prefix", data_prefix, "--seq-length", str(args.seq_length),
                "--global-batch-size", str(args.global_batch_size), "--micro-batch-size", str(args.micro_batch_size),
                "--lr", "1e-5", "--lr-warmup-iters", "0",
                "--old-policy-interval", str(args.steps + 1)] + train_flags
        results = {name: _tokens_per_second(base + flags, dataset, args.steps)
                   for name, flags in (("padded", []), ("packed", ["--pack-sequences"]))}

    print(f"seq {args.seq_length}, {args.samples} log-normal samples (mean {dataset.lengths.mean():.0f} tokens, "
          f"max {dataset.lengths.max()}), global batch {args.global_batch_size}, {args.steps} timed steps")
    print(f"{'variant':<10}{'real tokens/s':>15}{'step s':>9}")
    for name, (tokens_per_s, step_s) in results.items():
        print(f"{name:<10}{tokens_per_s:>15.0f}{step_s:>9.3f}")
    print(f"packed / padded real tokens/s: {results['packed'][0] / results['padded'][0]:.2f} (goal >= 3)")


if __name__ == "__main__":
    main()
