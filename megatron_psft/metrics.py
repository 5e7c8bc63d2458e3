"""Step metrics that reduce exactly across micro-batches and data-parallel ranks.

A metric is a tensor in one of three forms: a mean is ``[sum, count]`` (from :func:`mean_metric`), so
means combine by summing both parts, never by averaging averages; an extreme is a scalar whose name
ends in ``_min`` or ``_max`` (from :func:`extreme_metric`), holding the identity (+inf / -inf) when no
token contributed; a total is a scalar whose name ends in ``_total``, summed.
"""

from typing import Dict, List, Optional

import torch
import torch.distributed as dist


def mean_metric(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(torch.float32)
    return torch.stack([(values.float() * mask).sum(), mask.sum()])


def extreme_metric(values: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    identity = float("inf") if kind == "min" else float("-inf")
    masked = values.float().masked_fill(~mask.bool(), identity)
    if masked.numel() == 0:
        return masked.new_tensor(identity)
    return masked.min() if kind == "min" else masked.max()


def _kind(name: str) -> str:
    for kind in ("min", "max", "total"):
        if name.endswith("_" + kind):
            return kind
    return "mean"


def reduce_metrics(
    per_microbatch: List[Dict[str, torch.Tensor]], group: Optional[dist.ProcessGroup] = None
) -> Dict[str, Optional[float]]:
    """Combine the micro-batches' metrics, then across `group` (the data-parallel ranks).

    Every rank of `group` must call this with the same metric names. A metric no token contributed
    to is None, never NaN or a made-up zero.
    """
    names = sorted({name for metrics in per_microbatch for name in metrics})
    totals = {}
    for name in names:
        values = torch.stack([m[name].detach().float().cpu() for m in per_microbatch if name in m])
        kind = _kind(name)
        totals[name] = values.min() if kind == "min" else values.max() if kind == "max" else values.sum(0)
    if group is not None and dist.get_world_size(group) > 1:
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        for kind, op in (("mean", dist.ReduceOp.SUM), ("total", dist.ReduceOp.SUM), ("min", dist.ReduceOp.MIN),
                         ("max", dist.ReduceOp.MAX)):
            chosen = [n for n in names if _kind(n) == kind]
            if chosen:
                flat = torch.cat([totals[n].reshape(-1) for n in chosen]).to(device)
                dist.all_reduce(flat, op=op, group=group)
                parts = flat.cpu().split([totals[n].numel() for n in chosen])
                totals.update({n: p.reshape(totals[n].shape) for n, p in zip(chosen, parts)})
    result = {}
    for name, total in totals.items():
        if _kind(name) == "mean":
            result[name] = float(total[0] / total[1]) if total[1] > 0 else None
        elif _kind(name) == "total":
            result[name] = float(total)
        else:
            result[name] = float(total) if torch.isfinite(total) else None
    return result
