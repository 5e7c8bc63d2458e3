"""What a checkpoint save costs the training loop, synchronous vs --async-save, side by side in one run.

    python bench/bench_save_stall.py [--steps 12] [--save-interval 4] [--repeats 2] [extra megatron_psft.train flags]

The real trainer (``Trainer.run()``, the debug MoE on CPU, SFT so that every step does the same work,
Adam state included in the checkpoint) trains the same steps twice per repeat, once saving synchronously
and once with --async-save, in this process, alternating so that the machine's load falls on both alike.
A step's time is the wall time from the end of one step to the end of the next, so it holds whatever the
loop did in between: the save (its blocking part), and under --async-save the check for a finished write
and the publication. The save timed is the second (after step 2 x --save-interval): the first pays
one-time set-up (the writer's results queue, imports). Printed: the times of the steps around it, the
stall (the step holding the save less the median of the steps that hold none), the blocking time of the
save call, and what the end of the run (its last save and the wait for it) took.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def train_flags(args, data_prefix: str, save_dir: str) -> list:
    return ["--data-prefix", data_prefix, "--save", save_dir, "--save-interval", str(args.save_interval),
            "--objective", "sft",
            "--seq-length", str(args.seq_length), "--global-batch-size", str(args.global_batch_size),
            "--micro-batch-size", str(args.micro_batch_size), "--train-iters", str(args.steps),
            "--log-interval", str(args.steps), "--lr", "1e-4", "--lr-warmup-iters", "0"]


def timed_run(flags: list) -> dict:
    """One run of the trainer; the wall time at the end of each step, of each save call, and of the loop."""
    from megatron_psft.platform import parallel
    from megatron_psft.train import Trainer, parse_launch

    trainer = Trainer(parse_launch(flags))
    times = {"step_ends": [], "saves": []}
    train_one_step, save = trainer.train_one_step, trainer.save

    def timed_step():
        record = train_one_step()
        times["step_ends"].append(time.perf_counter())
        return record

    def timed_save():
        start = time.perf_counter()
        path = save()
        times["saves"].append(time.perf_counter() - start)
        return path

    trainer.train_one_step, trainer.save = timed_step, timed_save
    trainer.run()
    times["run_end"] = time.perf_counter()
    parallel.destroy()
    return times


def stall_figures(times: dict, save_interval: int) -> dict:
    """Step times (step i took step_ends[i-1] - step_ends[i-2]) and the stall of the second save."""
    ends = times["step_ends"]
    step_seconds = {step: ends[step - 1] - ends[step - 2] for step in range(2, len(ends) + 1)}
    baseline = statistics.median(seconds for step, seconds in step_seconds.items() if (step - 1) % save_interval)
    return {"steps": step_seconds, "baseline": baseline, "stall": step_seconds[2 * save_interval + 1] - baseline,
            "save_call": times["saves"][1], "final_save_and_wait": times["run_end"] - ends[-1]}


def print_report(figures: dict, args) -> None:
    modes = list(figures)
    timed = 2 * args.save_interval
    print(f"\ndebug MoE on CPU, SFT, seq {args.seq_length}, global batch {args.global_batch_size}, {args.steps} steps, "
          f"a save every {args.save_interval} (model + Adam state), the one after step {timed} timed; seconds, "
          f"median of {args.repeats} repeat(s)")
    print(f"{'step':>6}" + "".join(f"{mode:>12}" for mode in modes))
    for step in range(timed - 2, args.steps + 1):
        mark = "  <- holds the timed save" if step == timed + 1 else ""
        print(f"{step:>6}" + "".join(f"{figures[m]['steps'][step]:>12.3f}" for m in modes) + mark)
    for key, label in (("baseline", "median step without a save"), ("stall", "stall (step after the save - median)"),
                       ("save_call", "save call (blocking part)"), ("final_save_and_wait", "last save + wait at the end")):
        print(f"{label:>40}" + "".join(f"{figures[m][key]:>12.3f}" for m in modes))
    print(f"stall ratio sync / async: {figures['sync']['stall'] / max(figures['async']['stall'], 1e-9):.1f}x; "
          f"save call ratio: {figures['sync']['save_call'] / figures['async']['save_call']:.1f}x")


def median_figures(runs: list) -> dict:
    steps = {step: statistics.median(run["steps"][step] for run in runs) for step in runs[0]["steps"]}
    return {"steps": steps, **{key: statistics.median(run[key] for run in runs)
                               for key in ("baseline", "stall", "save_call", "final_save_and_wait")}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-interval", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    args, extra_flags = parser.parse_known_args()
    assert args.steps >= 3 * args.save_interval, "the timed save (the second) with steps after it"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from distributed import free_port  # imports torch: after the environment above

    os.environ.setdefault("MASTER_PORT", str(free_port()))  # the single-process group's; another run may hold 29500
    from bundled import preprocess_bundled_data

    runs = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory(prefix="bench_save_stall_") as work:
        data_prefix = preprocess_bundled_data(os.path.join(work, "chat"), args.seq_length)
        for repeat in range(args.repeats):
            for mode, mode_flags in (("sync", []), ("async", ["--async-save"])):
                save_dir = os.path.join(work, f"{mode}{repeat}")
                times = timed_run(train_flags(args, data_prefix, save_dir) + mode_flags + extra_flags)
                runs[mode].append(stall_figures(times, args.save_interval))
    print_report({mode: median_figures(mode_runs) for mode, mode_runs in runs.items()}, args)


if __name__ == "__main__":
    main()
