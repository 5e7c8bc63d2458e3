"""Per-phase wall-clock timers in the style of Megatron-LM's ``Timers``: named, levelled, and
reduced to the maximum over ranks (the slowest rank sets the step time).

With ``--timing-log-level 0`` every timer is a no-op and nothing synchronises; level 1 times the
phases of a step (data, old-policy pass, forward-backward, optimizer, checkpoint save),
synchronising the device at each boundary so a phase's time is its own.
"""

import os
import statistics
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_psft.platform import parallel

PHASES = ("data", "old-policy", "forward-backward", "optimizer", "save")


class _Timer:
    def __init__(self, name: str, nvtx: bool):
        self.name, self.nvtx = name, nvtx
        self.elapsed = 0.0
        self._started: Optional[float] = None

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def start(self) -> "_Timer":
        self._sync()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        self._started = time.perf_counter()
        return self

    def stop(self) -> None:
        self._sync()
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self.elapsed += time.perf_counter() - self._started
        self._started = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class _NullTimer:
    def start(self):
        return self

    def stop(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


_NULL = _NullTimer()


class Timers:
    """``timers("forward-backward")`` is a context manager / start-stop timer; ``collect()`` returns
    each phase's seconds since the last collect, the maximum over ranks, and resets. With `nvtx`
    (profiling on a GPU) each phase is also an NVTX range."""

    def __init__(self, log_level: int, nvtx: bool = False):
        self.log_level, self.nvtx = log_level, nvtx  # nvtx: name each phase for Nsight / the profiler
        self.timers: Dict[str, _Timer] = {}

    def __call__(self, name: str):
        if self.log_level < 1 and not self.nvtx:
            return _NULL
        if name not in self.timers:
            self.timers[name] = _Timer(name, self.nvtx)
        return self.timers[name]

    def collect(self) -> Dict[str, float]:
        """Collective over all ranks (when timing is on): every rank must call it."""
        if self.log_level < 1:
            return {}
        elapsed = torch.tensor([self.timers[name].elapsed if name in self.timers else 0.0 for name in PHASES],
                               dtype=torch.float64, device=parallel.device())
        for timer in self.timers.values():
            timer.elapsed = 0.0
        everyone = [torch.zeros_like(elapsed) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, elapsed)
        per_rank = torch.stack(everyone).cpu()
        result = {f"time/{name}_s": float(per_rank[:, i].max()) for i, name in enumerate(PHASES)}
        self.per_rank_forward_backward: List[float] = per_rank[:, PHASES.index("forward-backward")].tolist()
        return result

    def straggler(self, factor: float) -> Optional[str]:
        """A hint when one rank's forward-backward took `factor` times the median of all ranks' or more."""
        times = getattr(self, "per_rank_forward_backward", None)
        if not times or len(times) < 2:
            return None
        median = statistics.median(times)
        slowest = max(range(len(times)), key=times.__getitem__)
        if median > 0 and times[slowest] >= factor * median:
            return (f"straggler: rank {slowest}'s forward-backward took {times[slowest]:.3f} s, "
                    f"{times[slowest] / median:.1f}x the median {median:.3f} s")
        return None


class Profiler:
    """--profile: the PyTorch profiler over steps --profile-step-start..--profile-step-end (1-based),
    one Chrome trace per rank; CUDA kernels too on a GPU."""

    def __init__(self, start_step: int, end_step: int, directory: str):
        self.start, self.end, self.directory = start_step, end_step, directory
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile = torch.profiler.profile(activities=activities, record_shapes=True)
        self.running = False

    def before_step(self, step: int) -> None:
        if step == self.start:
            self.profile.start()
            self.running = True

    def after_step(self, step: int) -> None:
        if self.running and step == self.end:
            self.profile.stop()
            self.running = False
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"trace_rank{dist.get_rank():05d}.json")
            self.profile.export_chrome_trace(path)
            parallel.print_rank_last(f"profile of steps {self.start}-{self.end} written to {self.directory}")
