"""PSFT's step inside Megatron-LM's ``pretrain()`` (megatron_psft.megatron_lm's forward step, through
examples/megatron_lm/pretrain_psft.py) next to megatron-psft's own trainer: same model, weights and data,
one process on CPU, side by side in one run (Python 3.12 with megatron-core >= 0.18: the py312 leg).

    .venv312/bin/python bench/bench_megatron_lm.py [--interval 4] [--rounds 2]

Prints the mean step time of each over whole rounds (the trainer pays its old-policy pass on a round's
first step, the hook on the round's later ones: a median would hide either) and their ratio, and each
one's old-policy time per step: the
trainer's look-ahead (a forward-only pass over the round's other K-1 global batches at its start) and the
hook's frozen copy (a forward of the copy on each micro-batch of the round's later steps, plus the copy's
refresh). Timed over whole rounds after a warm-up round.
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
sys.path.insert(0, os.path.join(ROOT, "examples", "megatron_lm"))
# Wider than the test model so matmuls, not Python, dominate a CPU step (as bench_psft_step.py).
WIDE_CONFIG = {"hidden_size": 256, "head_dim": 64, "moe_intermediate_size": 256, "intermediate_size": 512}


class _Clock:
    """Seconds spent in `owner.name` while installed, taken step by step."""

    def __init__(self, owner, name):
        self.owner, self.name, self.original = owner, name, getattr(owner, name)
        self.seconds = 0.0
        clock = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return clock.original(*args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start

        setattr(owner, name, timed)

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def remove(self):
        setattr(self.owner, self.name, self.original)


def _trainer_steps(flags, work):
    from megatron_psft import train

    metrics = os.path.join(work, "trainer.jsonl")
    train.main(flags + ["--metrics-file", metrics])
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    return [(r["step_time_s"], r["old_policy_s"]) for r in records if "step_time_s" in r]


def _megatron_lm_steps(flags, hf_config):
    """(seconds, old-policy seconds) of each ``train_step`` Megatron-LM's loop runs: the forward-backward over
    the global batch (its data read inside the forward step) and the optimizer step, as the trainer's step."""
    import pretrain_psft
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine
    from megatron.training import training
    from qwen3_moe_flags import model_flags

    from megatron_psft.megatron_lm import FrozenWeights, PsftForwardStep

    destroy_rerun_state_machine()  # the trainer's; Megatron-LM's start-up makes its own
    steps = []
    step = _Clock(training, "train_step")
    old_policy = [_Clock(PsftForwardStep, "_old_forward"), _Clock(FrozenWeights, "refresh")]
    timed_train_step = training.train_step

    def train_step(*args, **kwargs):
        result = timed_train_step(*args, **kwargs)
        steps.append((step.take(), sum(clock.take() for clock in old_policy)))
        return result

    training.train_step = train_step
    sys.argv = ["pretrain_psft.py", *model_flags(hf_config), *flags]
    try:
        pretrain_psft.main()
    finally:
        training.train_step = timed_train_step
        for clock in (step, *old_policy):
            clock.remove()
    return steps


def _save_initial_weights(root, hf_config):
    from megatron_psft import checkpoint
    from megatron_psft.config import ParallelLayout
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, transformer_config
    from megatron_psft.platform import parallel

    args = Qwen3MoeArgs.from_hf_config(hf_config)
    parallel.initialize(ParallelLayout(), seed=3)
    checkpoint.save(root, 0, build_model_chunks(args, transformer_config(args, ParallelLayout())), hf_config)
    parallel.destroy()


def _bench(args, work):
    from megatron_psft.models.qwen3_moe import load_hf_config
    from megatron_psft.platform import parallel

    data_prefix, initial = os.path.join(work, "chat"), os.path.join(work, "initial")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                    "--input", os.path.join(ROOT, "megatron_psft", "assets", "chat_data.jsonl"),
                    "--output-prefix", data_prefix,
                    "--tokenizer", os.path.join(ROOT, "megatron_psft", "assets", "tokenizer"),
                    "--seq-length", str(args.seq_length)], check=True, capture_output=True)
    hf_config = {**load_hf_config("debug"), **WIDE_CONFIG}
    parallel.init_process_group()
    _save_initial_weights(initial, hf_config)
    shared = ["--seq-length", str(args.seq_length), "--global-batch-size", str(args.global_batch_size),
              "--micro-batch-size", str(args.micro_batch_size), "--old-policy-interval", str(args.interval),
              "--train-iters", str(args.interval * (args.rounds + 1)), "--lr", "1e-5", "--lr-warmup-iters", "0",
              "--lr-decay-style", "constant", "--moe-aux-loss-coeff", "0"]
    trainer = _trainer_steps(shared + ["--data-prefix", data_prefix, "--pretrained-checkpoint", initial], work)
    megatron_lm = _megatron_lm_steps(shared + [
        "--data-path", data_prefix, "--load", initial, "--finetune", "--no-load-optim", "--no-load-rng",
        "--weight-decay", "0.1", "--adam-beta2", "0.95", "--use-distributed-optimizer",
        "--moe-token-dispatcher-type", "alltoall", "--transformer-impl", "local", "--no-masked-softmax-fusion",
        "--no-bias-swiglu-fusion", "--no-rope-fusion", "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
        "--use-cpu-initialization", "--log-interval", "1000", "--eval-iters", "0", "--eval-interval", "100000",
        "--num-workers", "0"], hf_config)
    return trainer[args.interval:], megatron_lm[args.interval:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=int, default=4, help="K: optimizer steps per old-policy round")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (after one warm-up round)")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_megatron_lm_") as work:
        trainer, megatron_lm = _bench(args, work)
    runs = (("trainer", trainer), ("hook", megatron_lm))
    step = {name: statistics.mean(seconds for seconds, _ in steps) for name, steps in runs}
    old = {name: statistics.mean(old_policy for _, old_policy in steps) for name, steps in runs}
    print(f"K={args.interval}, {args.rounds} rounds timed, seq {args.seq_length}, global batch "
          f"{args.global_batch_size}, micro-batch {args.micro_batch_size}, one CPU process")
    print(f"mean step: trainer {step['trainer']:.3f} s, Megatron-LM + hook {step['hook']:.3f} s, "
          f"ratio hook/trainer {step['hook'] / step['trainer']:.3f}")
    print(f"old policy per step: trainer's look-ahead {old['trainer']:.3f} s, hook's frozen copy {old['hook']:.3f} s, "
          f"ratio {old['hook'] / old['trainer']:.3f}")


if __name__ == "__main__":
    main()
