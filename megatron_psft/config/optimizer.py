"""Adam and its learning-rate / weight-decay schedule (Megatron-Core's optimizer and scheduler)."""

from dataclasses import dataclass

from megatron_psft.config.base import Section, setting

LR_DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class OptimConfig(Section):
    """Defaults are the paper's PSFT settings (tables 6/11/13)."""

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.1
    clip_grad: float = 1.0  # 0: no clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    lr_warmup_steps: int = setting(10, key="lr_warmup_iters")
    lr_decay_steps: int = setting(0, key="lr_decay_iters")  # 0: decay over the whole run
    lr_decay_style: str = "cosine"
    use_distributed_optimizer: bool = setting(True, flag="--no-distributed-optimizer")
    overlap_grad_reduce: bool = False

    def __post_init__(self):
        self.non_negative("lr", "min_lr", "weight_decay", "clip_grad", "lr_warmup_steps", "lr_decay_steps")
        self.require(self.min_lr <= self.lr, f"--min-lr {self.min_lr} must not exceed --lr {self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            self.require(0 <= getattr(self, name) < 1, f"{self.flag(name)} must lie in [0, 1), got {getattr(self, name)}")
        self.positive("adam_eps")
        self.require(self.lr_decay_style in LR_DECAY_STYLES,
                     f"--lr-decay-style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
