"""Log-prob memory and time: megatron-psft's kernel vs a naive gather-then-log_softmax and Megatron's
vocab_parallel_cross_entropy, forward + backward, measured side by side in one run.

    python bench/bench_logprobs.py [--tokens 2048] [--vocab 151936] [--dtype bf16]

Each method runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. Extra peak memory is
reported in units of one fp32 logits shard (tokens x vocab x 4 bytes), and time as a ratio to ours.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("psft_logprobs", "psft_logprobs_entropy", "psft_logprobs_unchunked", "naive_log_softmax",
           "megatron_cross_entropy")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_method(method, tokens, vocab, dtype_name, repeats):
    import torch

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    logits = torch.randn(tokens, 1, vocab, dtype=dtype)
    labels = torch.randint(0, vocab, (tokens, 1))
    upstream = torch.randn(tokens, 1)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron_psft import parallel, vocab_parallel_logprobs

    if method == "megatron_cross_entropy":
        parallel.initialize(parallel.ParallelLayout())

    def once():
        x = logits.clone().requires_grad_() if method == "megatron_cross_entropy" else logits.requires_grad_()
        if method.startswith("psft_logprobs"):
            if method.endswith("entropy"):
                logp, entropy = vocab_parallel_logprobs(x, labels, with_entropy=True)
                out = (logp * upstream).sum() + entropy.sum()
            else:
                chunk_tokens = tokens if method.endswith("unchunked") else None
                out = (vocab_parallel_logprobs(x, labels, chunk_tokens=chunk_tokens) * upstream).sum()
        elif method == "naive_log_softmax":
            # What a TP rank does without a vocab-parallel kernel: gather the vocab (a no-op at TP1), upcast.
            out = (torch.log_softmax(x.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1) * upstream).sum()
        else:
            # It overwrites its input, so a caller that still needs the logits pays for the clone above.
            out = (-vocab_parallel_cross_entropy(x, labels) * upstream).sum()
        out.backward()
        x.grad = None

    # The peak so far is the inputs; the allocator keeps freed pages, so only the first call shows
    # the method's own peak. Later calls are timed.
    baseline = _peak_rss_bytes()
    once()
    extra_peak = _peak_rss_bytes() - baseline
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return {"extra_peak_bytes": extra_peak, "time_s": statistics.median(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # internal: one method per process
    args = parser.parse_args()
    if args.method:
        print(json.dumps(_run_method(args.method, args.tokens, args.vocab, args.dtype, args.repeats)))
        return

    shard_fp32 = args.tokens * args.vocab * 4
    print(f"tokens {args.tokens}, vocab {args.vocab}, logits {args.dtype}; one fp32 logits shard = "
          f"{shard_fp32 / 2**20:.0f} MiB; forward + backward, median of {args.repeats}", flush=True)
    results = {}
    for method in METHODS:
        out = subprocess.run([sys.executable, __file__, "--method", method, "--tokens", str(args.tokens),
                              "--vocab", str(args.vocab), "--dtype", args.dtype, "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    ours = results["psft_logprobs"]
    print(f"{'method':<26}{'extra peak MiB':>16}{'x fp32 shard':>14}{'time s':>9}{'time / ours':>13}")
    for method, r in results.items():
        print(f"{method:<26}{r['extra_peak_bytes'] / 2**20:>16.0f}{r['extra_peak_bytes'] / shard_fp32:>14.2f}"
              f"{r['time_s']:>9.3f}{r['time_s'] / ours['time_s']:>13.2f}")
    for method in ("naive_log_softmax", "megatron_cross_entropy"):
        print(f"memory {method} / ours: {results[method]['extra_peak_bytes'] / max(ours['extra_peak_bytes'], 1):.2f}")


if __name__ == "__main__":
    main()
