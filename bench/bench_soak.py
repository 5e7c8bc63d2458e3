"""Memory over a long run: the debug MoE trained for thousands of steps, packed, with periodic evaluation
and saves, its memory sampled at intervals and its slope after warm-up.

    python bench/bench_soak.py [--steps 2000] [--device cpu|cuda] [--quick] [extra megatron_psft.train flags]

The trainer runs in this process through ``Trainer.run()`` (evaluation and saves as a real run makes
them); every --sample-interval steps the bench records the resident set, glibc's heap (bytes in use by
live allocations, bytes free but kept by the allocator, mmapped chunks: ``mallinfo2``), the number of
objects Python's garbage collector tracks, and on a GPU CUDA's allocated and reserved memory. The slope
is the least-squares fit over the samples of the second half of the run, in GiB per 1,000 steps: memory
that still grows there is a leak; growth of the free-but-kept heap alone is the allocator's. The
process's CPU time and page faults show what an allocator setting costs, e.g.
``MALLOC_MMAP_THRESHOLD_=1048576 python bench/bench_soak.py`` (bench/RESULTS.md, "Memory over a long run").
On a GPU with megatron-core 0.16 and no Transformer Engine the MoE router is refused: pass a dense
``--hf-config`` there (tests/gpu/test_gpu_tier.py makes one).
"""

import argparse
import ctypes
import ctypes.util
import gc
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
GiB = 2**30


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _glibc_mallinfo2():
    """glibc's ``mallinfo2`` (2.33 and later; summed over every arena), or None on another C library."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


MALLINFO2 = _glibc_mallinfo2()


def memory_sample(step: int) -> dict:
    """Memory now, in GiB: resident set, glibc heap in use / free-but-kept / mmapped, CUDA allocated /
    reserved (on a GPU), and the objects the garbage collector tracks."""
    import psutil
    import torch

    sample = {"step": step, "rss": psutil.Process().memory_info().rss / GiB, "objects": len(gc.get_objects())}
    if MALLINFO2 is not None:
        info = MALLINFO2()
        sample.update(heap_used=info.uordblks / GiB, heap_free=info.fordblks / GiB, mmapped=info.hblkhd / GiB)
    if torch.cuda.is_available():
        sample.update(cuda_allocated=torch.cuda.memory_allocated() / GiB,
                      cuda_reserved=torch.cuda.memory_reserved() / GiB)
    return sample


def slope_per_1000_steps(samples: list, key: str) -> float:
    """Least-squares slope of `key` over the samples of the second half of the run, GiB per 1,000 steps."""
    last_step = samples[-1]["step"]
    tail = [s for s in samples if s["step"] >= last_step / 2]
    mean_step = sum(s["step"] for s in tail) / len(tail)
    mean_value = sum(s[key] for s in tail) / len(tail)
    covariance = sum((s["step"] - mean_step) * (s[key] - mean_value) for s in tail)
    variance = sum((s["step"] - mean_step) ** 2 for s in tail)
    return 1000 * covariance / variance if variance else 0.0


def record_memory_every(trainer, interval: int, samples: list) -> None:
    """Make the trainer's own loop sample memory after step 1 and every `interval` steps."""
    train_one_step = trainer.train_one_step

    def sampled_step():
        record = train_one_step()
        if trainer.step == 1 or trainer.step % interval == 0:
            samples.append(memory_sample(trainer.step))
        return record

    trainer.train_one_step = sampled_step


def train_flags(args, work: str) -> list:
    from bundled import preprocess_bundled_data

    data_prefix = preprocess_bundled_data(os.path.join(work, "chat"), args.seq_length)
    return ["--data-prefix", data_prefix, "--eval-data-prefix", f"held={data_prefix}", "--eval-iters", "1",
            "--eval-interval", str(args.eval_interval), "--save", os.path.join(work, "checkpoints"),
            "--save-interval", str(args.save_interval), "--seq-length", str(args.seq_length), "--pack-sequences",
            "--global-batch-size", str(args.global_batch_size), "--micro-batch-size", str(args.micro_batch_size),
            "--train-iters", str(args.steps), "--log-interval", str(args.sample_interval),
            "--lr", "1e-4", "--lr-warmup-iters", "10"]


def soak(args, extra_flags: list) -> list:
    """Train in this process; returns the memory samples."""
    from megatron_psft.platform import parallel
    from megatron_psft.train import Trainer, parse_launch

    samples = []
    with tempfile.TemporaryDirectory(prefix="bench_soak_") as work:
        trainer = Trainer(parse_launch(train_flags(args, work) + extra_flags))
        samples.append(memory_sample(0))
        record_memory_every(trainer, args.sample_interval, samples)
        trainer.run()
        parallel.destroy()
    return samples


def print_report(samples: list, seconds: float, args) -> None:
    keys = [key for key in ("rss", "heap_used", "heap_free", "mmapped", "cuda_allocated", "cuda_reserved")
            if key in samples[0]]
    print(f"\n{args.steps} steps of the debug model on {args.device}, seq {args.seq_length} packed, global batch "
          f"{args.global_batch_size}, eval every {args.eval_interval}, save every {args.save_interval}: "
          f"{seconds / 60:.1f} min wall, set-up included ({seconds / args.steps:.3f} s/step)")
    print(f"{'step':>6}" + "".join(f"{key + ' GiB':>18}" for key in keys) + f"{'gc objects':>12}")
    for sample in samples:
        print(f"{sample['step']:>6}" + "".join(f"{sample[key]:>18.3f}" for key in keys) + f"{sample['objects']:>12}")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"process CPU time: user {usage.ru_utime:.1f} s, system {usage.ru_stime:.1f} s; "
          f"minor page faults {usage.ru_minflt}")
    print("slope over the second half, GiB per 1,000 steps: "
          + ", ".join(f"{key} {slope_per_1000_steps(samples, key):+.4f}" for key in keys)
          + f"; gc objects {slope_per_1000_steps(samples, 'objects'):+.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 steps, everything every 10 (too short for the slope)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sample-interval", type=int, default=100, help="steps between memory samples")
    parser.add_argument("--eval-interval", type=int, default=200)
    parser.add_argument("--save-interval", type=int, default=500)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    args, extra_flags = parser.parse_known_args()
    if args.quick:
        args.steps, args.sample_interval, args.eval_interval, args.save_interval = 40, 10, 20, 20
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from distributed import free_port  # imports torch: after the environment above

    os.environ.setdefault("MASTER_PORT", str(free_port()))  # the single-process group's; another run may hold 29500

    start = time.perf_counter()
    samples = soak(args, extra_flags)
    print_report(samples, time.perf_counter() - start, args)


if __name__ == "__main__":
    main()
