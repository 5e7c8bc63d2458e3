"""Log-prob memory and time: megatron-psft's kernels vs a naive gather-then-log_softmax and Megatron's
vocab_parallel_cross_entropy, forward + backward, measured side by side in one run.

    python bench/bench_logprobs.py [--tokens 2048] [--vocab 151936] [--dtype bf16]      # CPU
    python bench/bench_logprobs.py --device cuda [--tokens 4096]                        # one GPU, < 90 s
    python bench/bench_logprobs.py --quick                                              # CPU smoke run

CPU: each method runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. Extra peak memory
is reported in units of one fp32 logits shard (tokens x vocab x 4 bytes), and time as a ratio to ours.

CUDA: one process; time is the median of CUDA-event timings after a warm-up, extra memory the peak
allocation of one forward + backward above what was allocated before it (the inputs). Each method is
set against the bandwidth bound: read the logits once in forward, read them and write their gradient
once in backward, at 3.0 TB/s. Then the output layer + log-probs (hidden 2048) side by side: unfused (the
logits materialised), fused on torch, fused on Triton, Megatron's cross entropy on the logits, and the
peers where they import (Liger-Kernel's fused linear cross entropy, verl's linear_cross_entropy), against
the matmul bound, with a line of time and peak-memory ratios to unfused; then unfused and both fused
paths at 4k, 16k and 32k tokens.
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
           "megatron_cross_entropy", "output_layer_unfused", "output_layer_fused")
BANDWIDTH_BYTES_PER_S = 3.0e12  # H100 SXM HBM3, what the bound assumes
PEAK_FLOPS = 989e12  # H100 SXM dense bf16 tensor cores, the output layer's matmul bound


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_method(method, tokens, vocab, dtype_name, repeats, hidden_size):
    import torch

    from megatron_psft.platform.precision import parse_dtype

    torch.manual_seed(0)
    dtype = parse_dtype(dtype_name)
    labels = torch.randint(0, vocab, (tokens, 1))
    upstream = torch.randn(tokens, 1)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron_psft import vocab_parallel_logprobs
    from megatron_psft.platform import parallel
    from megatron_psft.kernels.fused_logprobs import fused_vocab_parallel_logprobs

    if method == "megatron_cross_entropy":
        parallel.initialize(parallel.ParallelLayout())
    if method.startswith("output_layer"):
        hidden = torch.randn(1, tokens, hidden_size, dtype=dtype).requires_grad_()
        weight = (torch.randn(vocab, hidden_size, dtype=dtype) / hidden_size**0.5).requires_grad_()
        labels = labels.view(1, tokens)
    else:
        logits = torch.randn(tokens, 1, vocab, dtype=dtype)

    def output_layer():
        if method == "output_layer_fused":
            logp, entropy = fused_vocab_parallel_logprobs(hidden, weight, labels, vocab, with_entropy=True)
        else:
            logp, entropy = vocab_parallel_logprobs(hidden @ weight.t(), labels, with_entropy=True)
        (logp.sum() + entropy.sum()).backward()
        hidden.grad = weight.grad = None

    def once():
        if method.startswith("output_layer"):
            return output_layer()
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


def _cuda_timing(fn, repeats):
    """(median ms, extra peak bytes) of `fn` (one forward + backward) on the current GPU."""
    import torch

    fn()  # warm-up: Triton compiles, cuBLAS picks its kernels
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return (statistics.median(times) if times else None), extra


def _cuda_bench(args):
    import torch

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron_psft import vocab_parallel_logprobs
    from megatron_psft.platform import parallel
    from megatron_psft.platform.precision import parse_dtype

    parallel.initialize(parallel.ParallelLayout())  # Megatron's cross entropy reads its TP group
    device = torch.device("cuda")
    dtype = parse_dtype(args.dtype)
    generator = torch.Generator(device).manual_seed(0)
    tokens, vocab = args.tokens, args.vocab
    logits = torch.randn(tokens, vocab, dtype=dtype, device=device, generator=generator).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    upstream = torch.randn(tokens, device=device, generator=generator)

    def psft(kernel, with_entropy):
        def run():
            out = vocab_parallel_logprobs(logits, labels, with_entropy=with_entropy, kernel=kernel)
            loss = (out[0] * upstream).sum() + out[1].sum() if with_entropy else (out * upstream).sum()
            loss.backward()
            logits.grad = None
        return run

    def naive():
        log_p = torch.log_softmax(logits.float(), dim=-1)
        loss = (log_p.gather(-1, labels[:, None]).squeeze(-1) * upstream).sum() - (log_p.exp() * log_p).sum()
        loss.backward()
        logits.grad = None

    def megatron_cross_entropy():
        # It overwrites its input, so a caller that still needs the logits pays for this clone.
        x = logits.detach().clone().requires_grad_()
        (-vocab_parallel_cross_entropy(x[:, None], labels[:, None]).squeeze(1) * upstream).sum().backward()

    methods = {
        "psft torch, logp + entropy": psft("torch", True),
        "psft torch, logp": psft("torch", False),
        "psft triton, logp + entropy": psft("triton", True),
        "psft triton, logp": psft("triton", False),
        "naive fp32 log_softmax + entropy": naive,
        "megatron vocab_parallel_cross_entropy": megatron_cross_entropy,
    }
    bound_bytes = 3 * tokens * vocab * logits.element_size()
    bound_ms = bound_bytes / BANDWIDTH_BYTES_PER_S * 1e3
    print(f"{torch.cuda.get_device_name()}; {tokens} tokens x vocab {vocab}, {args.dtype} logits, TP1, forward + "
          f"backward, median of {args.repeats}", flush=True)
    print(f"bandwidth bound: {bound_bytes / 1e9:.2f} GB (logits read in forward, read + gradient written in "
          f"backward) / {BANDWIDTH_BYTES_PER_S / 1e12:.1f} TB/s = {bound_ms:.3f} ms")
    print(f"{'method':<40}{'ms':>9}{'/ bound':>9}{'extra GiB':>11}")
    for name, fn in methods.items():
        ms, extra = _cuda_timing(fn, args.repeats)
        print(f"{name:<40}{ms:>9.3f}{ms / bound_ms:>9.2f}{extra / 2**30:>11.2f}", flush=True)
    del logits

    _cuda_output_layer(args, dtype, device, generator)


def _peer_output_layers():
    """Peers that fuse the output layer with the loss, by name, where they import: each takes
    (hidden [T, h], weight [V, h], labels [T]) and returns a scalar to differentiate."""
    peers = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")  # cross entropy only, no entropy
        peers["liger fused linear cross entropy"] = lambda hidden, weight, labels: liger(weight, hidden, labels)
    except ImportError:
        print("(Liger-Kernel not installed: pip install liger-kernel)")
    try:
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

        def verl(hidden, weight, labels):
            logp, entropy = linear_cross_entropy(hidden, weight, labels)
            return logp.sum() + entropy.sum()
        peers["verl linear_cross_entropy + entropy"] = verl
    except ImportError:
        print("(verl not installed: its linear_cross_entropy is left out)")
    return peers


def _cuda_output_layer(args, dtype, device, generator):
    """The output layer + log-probs + entropy: unfused, fused on torch, fused on Triton, and the peers."""
    import torch

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron_psft import vocab_parallel_logprobs
    from megatron_psft.kernels.fused_logprobs import fused_vocab_parallel_logprobs

    vocab, hidden_size = args.vocab, args.hidden
    ours = {
        "unfused (logits materialised)": lambda h, w, y: sum(
            t.sum() for t in vocab_parallel_logprobs(h @ w.t(), y, with_entropy=True)),
        "fused, torch": lambda h, w, y: sum(t.sum() for t in fused_vocab_parallel_logprobs(
            h[None], w, y[None], vocab, with_entropy=True, kernel="torch")),
        "fused, triton": lambda h, w, y: sum(t.sum() for t in fused_vocab_parallel_logprobs(
            h[None], w, y[None], vocab, with_entropy=True, kernel="triton")),
        "megatron cross entropy on the logits": lambda h, w, y: vocab_parallel_cross_entropy(
            (h @ w.t())[:, None], y[:, None]).sum(),
    }
    methods = {**ours, **_peer_output_layers()}

    def timed(name, tokens, repeats):
        hidden = torch.randn(tokens, hidden_size, dtype=dtype, device=device, generator=generator).requires_grad_()
        weight = (torch.randn(vocab, hidden_size, dtype=dtype, device=device, generator=generator) / 50).requires_grad_()
        labels = torch.randint(0, vocab, (tokens,), device=device, generator=generator)

        def run():
            methods[name](hidden, weight, labels).backward()
            hidden.grad = weight.grad = None
        return _cuda_timing(run, repeats)

    # The matmul bound: forward, and the two backward matmuls, at the H100's dense bf16 peak.
    bound_ms = 3 * 2 * args.tokens * hidden_size * vocab / PEAK_FLOPS * 1e3
    print(f"\noutput layer (hidden {hidden_size}, {args.dtype}) + log-probs (+ entropy where the method has it), "
          f"{args.tokens} tokens; matmul bound (3 output-layer matmuls at {PEAK_FLOPS / 1e12:.0f} TFLOP/s): "
          f"{bound_ms:.3f} ms")
    print(f"{'method':<40}{'ms':>9}{'/ bound':>9}{'extra GiB':>11}")
    measured = {}
    for name in methods:
        ms, extra = measured[name] = timed(name, args.tokens, args.repeats)
        print(f"{name:<40}{ms:>9.3f}{ms / bound_ms:>9.2f}{extra / 2**30:>11.2f}", flush=True)
    base_ms, base_extra = measured["unfused (logits materialised)"]
    print("ratios to unfused: " + ", ".join(f"{name}: time {ms / base_ms:.2f}x, peak {extra / base_extra:.2f}x"
                                             for name, (ms, extra) in measured.items()))
    print("\npeak extra memory vs tokens (GiB) and time (ms), output layer + log-probs + entropy:")
    sweep = ("unfused (logits materialised)", "fused, torch", "fused, triton")
    print(f"{'tokens':>8}" + "".join(f"{name[:20]:>24}" for name in sweep))
    for tokens in args.sweep_tokens:
        cells = []
        for name in sweep:
            ms, extra = timed(name, tokens, 3)
            cells.append(f"{extra / 2**30:>10.2f} GiB {ms:>7.1f} ms")
            torch.cuda.empty_cache()
        print(f"{tokens:>8}" + "".join(f"{cell:>24}" for cell in cells), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=None, help="default: 2048 on CPU, 4096 on CUDA")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 on CPU, 10 on CUDA")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--hidden", type=int, default=None,
                        help="the output layer's hidden size (default: 2048 on CUDA, 64 on CPU, to keep its matmuls cheap)")
    parser.add_argument("--sweep-tokens", type=int, nargs="+", default=[4096, 16384, 32768],
                        help="CUDA: token counts of the fused vs unfused memory sweep")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 256 tokens, vocab 32000, 1 repeat")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # internal: one method per process
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.vocab, args.repeats = 256, 32000, 1
    cuda = args.device == "cuda"
    args.repeats = args.repeats or (10 if cuda else 3)
    args.tokens = args.tokens or (4096 if cuda else 2048)
    args.hidden = args.hidden or (2048 if cuda else 64)
    if cuda:
        _cuda_bench(args)
        return
    if args.method:
        print(json.dumps(_run_method(args.method, args.tokens, args.vocab, args.dtype, args.repeats, args.hidden)))
        return

    shard_fp32 = args.tokens * args.vocab * 4
    print(f"tokens {args.tokens}, vocab {args.vocab}, logits {args.dtype}; one fp32 logits shard = "
          f"{shard_fp32 / 2**20:.0f} MiB; forward + backward, median of {args.repeats}", flush=True)
    results = {}
    for method in METHODS:
        out = subprocess.run([sys.executable, __file__, "--method", method, "--tokens", str(args.tokens),
                              "--vocab", str(args.vocab), "--dtype", args.dtype, "--repeats", str(args.repeats),
                              "--hidden", str(args.hidden)],
                             check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    ours = results["psft_logprobs"]
    print(f"output_layer_*: hidden {args.hidden} @ weight [vocab, {args.hidden}] + log-probs + entropy, logits "
          f"materialised (unfused) or not (fused)")
    print(f"{'method':<26}{'extra peak MiB':>16}{'x fp32 shard':>14}{'time s':>9}{'time / ours':>13}")
    for method, r in results.items():
        print(f"{method:<26}{r['extra_peak_bytes'] / 2**20:>16.0f}{r['extra_peak_bytes'] / shard_fp32:>14.2f}"
              f"{r['time_s']:>9.3f}{r['time_s'] / ours['time_s']:>13.2f}")
    for method in ("naive_log_softmax", "megatron_cross_entropy"):
        print(f"memory {method} / ours: {results[method]['extra_peak_bytes'] / max(ours['extra_peak_bytes'], 1):.2f}")
    fused, unfused = results["output_layer_fused"], results["output_layer_unfused"]
    print(f"output layer memory fused / unfused: {fused['extra_peak_bytes'] / max(unfused['extra_peak_bytes'], 1):.2f}")


if __name__ == "__main__":
    main()
