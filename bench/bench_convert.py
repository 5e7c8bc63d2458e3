"""Conversion memory does not grow with the model: peak RSS at 2 and 4 layers of Qwen3-30B-A3B widths.

    python bench/bench_convert.py [--layers 2 4] [--work-dir DIR]

For each layer count, writes a random bf16 HF checkpoint at the real widths (hidden 2048, 32/4 heads
of 128, 128 experts of 768, vocab 151936) tensor by tensor, then runs the import and the export each
in its own process and reads that process's peak RSS from the kernel (VmHWM). A converter that
holds the model would grow by the two extra layers (~2.5 GB); a streaming one stays flat. Disk: about
3 x the checkpoint size of the largest run (19 GB at 4 layers), removed afterwards.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from checkpoint_convert.safetensors_io import ShardedSafetensorsWriter  # noqa: E402
from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, load_hf_config  # noqa: E402
from megatron_psft.models.qwen3_moe import state_dict_adapter as adapter  # noqa: E402


def write_random_hf_checkpoint(path: str, layers: int) -> int:
    """Qwen3-30B-A3B's config cut to `layers`, random bf16 weights; returns the bytes written."""
    config = dict(load_hf_config("30b-a3b"), num_hidden_layers=layers)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shapes = adapter.hf_tensor_shapes(Qwen3MoeArgs.from_hf_config(config))
    writer = ShardedSafetensorsWriter(path, [(n, s, torch.bfloat16) for n, s in shapes.items()], 2 * 10**9)
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.write(name, (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16))
    writer.finish()
    return writer.total_bytes


def run_measured(command: list, log_path: str) -> tuple:
    """Run `command`; return (its peak RSS in bytes, wall seconds).

    The peak is the kernel's high-water mark of the process's own memory (VmHWM), polled until it
    exits: getrusage's maxrss would also count the parent's memory at fork time."""
    start = time.perf_counter()
    peak = 0
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            try:
                with open(f"/proc/{process.pid}/status") as status:
                    peak = max(peak, next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM")))
            except (FileNotFoundError, StopIteration):  # exiting
                pass
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        with open(log_path) as f:
            raise RuntimeError(f"{' '.join(command)} failed:\n{f.read()[-3000:]}")
    return peak, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--work-dir", default=None, help="scratch directory (default: a new temporary one)")
    options = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench_convert_", dir=options.work_dir)
    rows = []
    try:
        for layers in options.layers:
            hf, megatron, back = (os.path.join(work, f"{layers}L_{what}") for what in ("hf", "megatron", "hf_back"))
            print(f"--- {layers} layers: writing the random HF checkpoint", flush=True)
            size = write_random_hf_checkpoint(hf, layers)
            runs = {
                "import": [sys.executable, "-m", "checkpoint_convert.hf_to_megatron", "--hf-dir", hf,
                           "--out-dir", megatron],
                "export": [sys.executable, "-m", "checkpoint_convert.megatron_to_hf", "--megatron-dir", megatron,
                           "--hf-dir-template", hf, "--out-dir", back],
            }
            for direction, command in runs.items():
                log = os.path.join(work, f"{layers}L_{direction}.log")
                peak, seconds = run_measured(command, log)
                with open(log) as f:
                    done = [line.strip() for line in f if "] done" in line]
                rows.append((layers, direction, size, peak, seconds))
                print(f"{layers} layers {direction}: {size / 1e9:.2f} GB in {seconds:.1f} s "
                      f"({size / 1e6 / seconds:.0f} MB/s incl. start-up), peak RSS {peak / 2**30:.2f} GiB; {done[-1]}",
                      flush=True)
            for path in (hf, megatron, back):
                shutil.rmtree(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nlayers  direction  model GB  peak RSS GiB   MB/s")
    for layers, direction, size, peak, seconds in rows:
        print(f"{layers:>6}  {direction:<9}  {size / 1e9:8.2f}  {peak / 2**30:12.2f}  {size / 1e6 / seconds:5.0f}")
    smallest, largest = min(options.layers), max(options.layers)
    peaks = {(layers, direction): peak for layers, direction, _, peak, _ in rows}
    worst = 0.0
    for direction in ("import", "export"):
        ratio = peaks[(largest, direction)] / peaks[(smallest, direction)]
        worst = max(worst, abs(ratio - 1))
        print(f"{direction}: peak RSS {largest} layers / {smallest} layers = {ratio:.3f}")
    print(f"{'PASS' if worst <= 0.15 else 'FAIL'}: peak RSS stays within 15% as the model grows")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
