"""MoE routing record and replay between the old-policy pass and the training passes.

The PSFT ratio should measure how the weights changed, not which experts a token happened to be
routed to: with bf16/FP8 kernels that are not batch-invariant, a few percent of top-k choices flip
between two passes over the same tokens. Megatron-Core's router replay records each router's top-k
choices in one forward and imposes them in a later one; this module drives it for one model's
routers only (Megatron keeps one process-wide list that also holds frozen copies' routers).
"""

from typing import List, Sequence

import torch


def routers(model_chunks) -> list:
    """This rank's RouterReplay objects of `model_chunks`, in layer order."""
    found = []
    for chunk in model_chunks:
        for module in chunk.modules():
            replay = getattr(module, "router_replay", None)
            if replay is not None:
                found.append(replay)
    if not found:
        raise ValueError("the model has no router replay hooks: build it with routing_replay=True")
    return found


def start_recording(replays: Sequence) -> None:
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    for replay in replays:
        replay.clear_indices()
        replay.set_router_replay_action(RouterReplayAction.RECORD)


def recorded(replays: Sequence) -> List[torch.Tensor]:
    """The top-k expert ids each router chose in the last forward, ``[tokens, k]`` int16 (compact)."""
    return [replay.get_recorded_indices().to(torch.int16) for replay in replays]


def replay(replays: Sequence, routing: Sequence[torch.Tensor]) -> None:
    """Make the next forward route every token as `routing` says."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    for router_replay, indices in zip(replays, routing, strict=True):
        router_replay.clear_indices()
        router_replay.set_target_indices(indices.long())
        router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def stop(replays: Sequence) -> None:
    for replay in replays:
        replay.clear_router_replay_action()
        replay.clear_indices()


def differing_choices(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[differing, total]`` expert choices (token, slot) between two routings of the same tokens,
    comparing each token's top-k as a set."""
    differing, total = torch.zeros((), device=first[0].device), 0
    for a, b in zip(first, second, strict=True):
        # A token's choice is kept if its expert id appears anywhere in the other pass's top-k.
        kept = (a[:, :, None] == b[:, None, :]).any(-1)
        differing = differing + (~kept).sum()  # stays on the device: no sync per router
        total += kept.numel()
    return torch.stack([differing.float(), differing.new_tensor(float(total))])
