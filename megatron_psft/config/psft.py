"""PSFT's own settings: the objective (PSFT or a baseline) and the old policy's refresh schedule.

These two sections are all that the forward-step hook for Megatron's own loops needs
(:mod:`megatron_psft.megatron_lm`); the trainer takes them inside :class:`~megatron_psft.config.TrainConfig`.
"""

from dataclasses import dataclass
from typing import Optional

from megatron_psft.config.base import Section, setting

OBJECTIVES = ("psft", "sft", "sft-kl", "dft", "psft-ent", "iw-sft")


@dataclass(frozen=True)
class ObjectiveConfig(Section):
    """Defaults are the paper's (arXiv 2508.17784, tables 6/11/13, appendix C.2, and C.4 for iw-SFT's
    weight clipping)."""

    name: str = setting("psft", key="objective")
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.5  # sft-kl: weight of the KL to the frozen reference
    entropy_top_fraction: float = 0.2  # psft-ent: fraction of tokens trained
    iw_weight_min: float = 0.2
    iw_weight_max: float = 1.8

    def __post_init__(self):
        self.require(self.name in OBJECTIVES, f"unknown objective {self.name!r}; choose one of {OBJECTIVES}")
        self.require(0 <= self.eps_low < 1, f"--eps-low must lie in [0, 1), got {self.eps_low}")
        self.non_negative("eps_high", "kl_coef")
        self.require(0 < self.entropy_top_fraction <= 1,
                     f"--entropy-top-fraction must lie in (0, 1], got {self.entropy_top_fraction}")
        self.require(0 <= self.iw_weight_min <= 1 <= self.iw_weight_max,
                     f"need 0 <= iw_weight_min <= 1 <= iw_weight_max, got {self.iw_weight_min}, {self.iw_weight_max}")

    @property
    def needs_old_logprobs(self) -> bool:
        return self.name in ("psft", "psft-ent")

    @property
    def needs_reference_logprobs(self) -> bool:
        return self.name in ("sft-kl", "iw-sft")


@dataclass(frozen=True)
class OldPolicyConfig(Section):
    """The old policy is the model as it was at the start of a round of `old_policy_interval` optimizer
    steps (the paper: 8); None never refreshes it (its fixed-reference ablation)."""

    old_policy_interval: Optional[int] = 8
    # A round's first step takes its old log-probs from its own training forward (exactly equal).
    reuse_first_step: bool = setting(True, flag="--no-first-step-reuse")
    old_policy_micro_batch_size: Optional[int] = None  # rows per forward-only micro-batch (default: training's)

    def __post_init__(self):
        self.require(self.old_policy_interval is None or self.old_policy_interval >= 1,
                     f"--old-policy-interval must be a number of steps >= 1 or 'never', got {self.old_policy_interval}")
        self.at_least("old_policy_micro_batch_size", 1, optional=True)
