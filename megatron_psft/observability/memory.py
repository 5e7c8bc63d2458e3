"""Memory per rank, reduced to the worst rank: what the dry run's plan is checked against."""

import resource
from typing import Dict

import psutil
import torch
import torch.distributed as dist

from megatron_psft.platform import parallel

GiB = 2**30


def memory_record() -> Dict[str, float]:
    """GPU memory allocated and reserved now, and the peak allocated since start, in GiB, the
    maximum over ranks; on CPU the process's resident set (now and its peak). Collective."""
    if torch.cuda.is_available():
        values = [torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), torch.cuda.max_memory_allocated()]
    else:
        rss = psutil.Process().memory_info().rss
        values = [rss, rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]  # ru_maxrss is in KiB
    reduced = torch.tensor(values, dtype=torch.float64, device=parallel.device()) / GiB
    if dist.is_initialized():
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    allocated, reserved, peak = reduced.tolist()
    return {"memory/allocated_gib": allocated, "memory/reserved_gib": reserved, "memory/peak_gib": peak}
