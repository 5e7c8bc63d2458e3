"""What both conversion directions share: staged output, progress, flag parsing."""

import contextlib
import os
import re
import shutil
import sys
import time
from typing import Optional

import torch

from megatron_psft.platform.precision import DTYPES
from megatron_psft.observability.progress import ProgressBar, is_terminal

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def config_dtype(hf_config: dict) -> Optional[torch.dtype]:
    """The dtype an HF config declares (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (decimal units, as transformers' max_shard_size; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not match:
        raise ValueError(f"cannot read size {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


@contextlib.contextmanager
def staged_output(out_dir: str, overwrite: bool):
    """Yield a temporary directory next to `out_dir`; it becomes `out_dir` only if the body completes.

    An existing non-empty `out_dir` is an error unless `overwrite`. On any failure (including Ctrl-C)
    the temporary directory is removed and `out_dir` is left as it was.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise FileExistsError(f"output {out_dir} exists and is not empty (pass --overwrite to replace it)")
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.incomplete-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        replaced = staging + ".replaced"
        os.replace(out_dir, replaced)
        os.replace(staging, out_dir)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


class Progress:
    """Progress by stage (a layer, or the embedding / output tensors): a bar over the bytes on stderr
    when that is a terminal, and one line per finished stage with its throughput on `stream`
    (stdout) unless the bar is already on that terminal; a final line either way."""

    def __init__(self, label: str, total_bytes: int, stages: int, stream=None):
        self.label, self.total_bytes, self.stages = label, total_bytes, stages
        self.stream = stream or sys.stdout
        self.start = self.stage_start = time.perf_counter()
        self.done_bytes = self.stage_bytes = self.done_stages = 0
        self.stage: Optional[str] = None
        self.bar = ProgressBar(label, total=total_bytes, unit="B", unit_scale=True)
        self.stage_lines = not (self.bar.active and is_terminal(self.stream))

    def update(self, stage: str, nbytes: int) -> None:
        status = None
        if stage != self.stage:
            self._end_stage()
            self.stage = stage
            status = f"{stage} ({self.done_stages + 1}/{self.stages})"
        self.stage_bytes += nbytes
        self.bar.update(nbytes, status)

    def close(self) -> None:
        self._end_stage()
        self.bar.close()
        elapsed = time.perf_counter() - self.start
        print(f"[{self.label}] done: {self.done_bytes / 1e6:,.1f} MB in {elapsed:.1f} s "
              f"({self.done_bytes / 1e6 / max(elapsed, 1e-9):,.1f} MB/s)", file=self.stream, flush=True)

    def _end_stage(self) -> None:
        if self.stage is None:
            return
        now = time.perf_counter()
        seconds = now - self.stage_start
        self.done_bytes += self.stage_bytes
        self.done_stages += 1
        if self.stage_lines:
            self.bar.write(f"[{self.label}] {self.stage:<32} {self.done_stages:>4}/{self.stages}  "
                           f"{self.stage_bytes / 1e6:10,.1f} MB  {self.stage_bytes / 1e6 / max(seconds, 1e-9):8,.1f} MB/s  "
                           f"{100 * self.done_bytes / max(self.total_bytes, 1):5.1f}% of {self.total_bytes / 1e9:,.2f} GB",
                           file=self.stream)
        self.stage, self.stage_bytes, self.stage_start = None, 0, now
