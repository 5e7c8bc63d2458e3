"""When a run stops before --train-iters: --exit-signal-handler and --exit-duration-in-mins.

Every rank must stop after the same step, so it saves a consistent checkpoint: a SIGTERM may reach
only some ranks, and clocks differ, so the ranks agree by an all-reduce after each step. The run then
saves and, under --async-save, waits for the checkpoint writes in flight before it exits (train.py).
"""

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_psft.platform import parallel


class ExitConditions:
    def __init__(self, on_sigterm: bool, duration_in_mins: Optional[float]):
        self.signal_received = False
        self.deadline = None if duration_in_mins is None else time.monotonic() + 60 * duration_in_mins
        self.active = on_sigterm or self.deadline is not None
        if on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.signal_received = True  # acted on after the step in progress

    def reason(self) -> Optional[str]:
        """Why every rank stops after this step, or None to go on (collective when active)."""
        if not self.active:
            return None
        flags = torch.tensor([float(self.signal_received),
                              float(self.deadline is not None and time.monotonic() > self.deadline)],
                             device=parallel.device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return "SIGTERM received (--exit-signal-handler)"
        return "--exit-duration-in-mins reached" if flags[1] else None
