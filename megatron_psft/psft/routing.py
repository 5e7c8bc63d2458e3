"""MoE routing record and replay between the old-policy pass and the training passes.

The PSFT ratio should measure how the weights changed, not which experts a token happened to be
routed to: with bf16/FP8 kernels that are not batch-invariant, a few percent of top-k choices flip
between two passes over the same tokens. Megatron-Core's router replay records each router's top-k
choices in one forward and imposes them in a later one; this module drives it for one model's
routers only (Megatron keeps one process-wide list that also holds frozen copies' routers), and
observes which experts each router's last forward actually chose, replayed or not, so the flips
against a recorded routing can be counted either way (under replay they must be none).
"""

from typing import List, Optional, Sequence

import torch


class Router:
    """One MoE router: its Megatron ``RouterReplay`` and the routing map ``[tokens, experts]`` (bool)
    of its last forward, taken from the router module's output."""

    def __init__(self, module: torch.nn.Module):
        self.replay = module.router_replay
        self.routing_map: Optional[torch.Tensor] = None
        module.register_forward_hook(self._observe)

    def _observe(self, module, inputs, output) -> None:
        _, self.routing_map = output  # TopKRouter.forward returns (probs, routing_map)


def routers(model_chunks) -> List[Router]:
    """This rank's MoE routers of `model_chunks`, in layer order."""
    found = [Router(module) for chunk in model_chunks for module in chunk.modules()
             if getattr(module, "router_replay", None) is not None]
    if not found:
        raise ValueError("the model has no router replay hooks: build it with routing_replay=True")
    return found


def start_recording(routers: Sequence[Router]) -> None:
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    for router in routers:
        router.replay.clear_indices()
        router.replay.set_router_replay_action(RouterReplayAction.RECORD)


def recorded(routers: Sequence[Router]) -> List[torch.Tensor]:
    """The top-k expert ids each router chose in the last forward, ``[tokens, k]`` int16 (compact)."""
    return [router.replay.get_recorded_indices().to(torch.int16) for router in routers]


def replay(routers: Sequence[Router], routing: Sequence[torch.Tensor]) -> None:
    """Make the next forward route every token as `routing` says."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    for router, indices in zip(routers, routing, strict=True):
        router.replay.clear_indices()
        router.replay.set_target_indices(indices.long())
        router.replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def stop(routers: Sequence[Router]) -> None:
    for router in routers:
        router.replay.clear_router_replay_action()
        router.replay.clear_indices()
        router.routing_map = None


def flipped_choices(routers: Sequence[Router], routing: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[flipped, total]`` expert choices (token, slot) of `routing` (recorded top-k ids of the same
    tokens) that the routers' last forward did not route to."""
    flipped = torch.stack([(~router.routing_map.gather(1, indices.long())).sum()  # on the device: no sync
                           for router, indices in zip(routers, routing, strict=True)]).sum().float()
    return torch.stack([flipped, flipped.new_tensor(float(sum(indices.numel() for indices in routing)))])
