"""megatron-psft: Proximal Supervised Fine-Tuning (arXiv 2508.17784) on Megatron-Core."""

from megatron_psft.kernels.logprobs import vocab_parallel_logprobs
from megatron_psft.psft.objectives import (
    ObjectiveConfig,
    dft_loss,
    iw_sft_loss,
    make_loss_func,
    psft_loss,
    psft_top_entropy_loss,
    sft_kl_loss,
    sft_loss,
)
from megatron_psft.observability.metrics import reduce_metrics
from megatron_psft.megatron_lm import HookSettings, PsftForwardStep, add_psft_arguments, forward_step_from_args

__version__ = "0.1.0"

__all__ = [
    "HookSettings",
    "ObjectiveConfig",
    "PsftForwardStep",
    "add_psft_arguments",
    "dft_loss",
    "forward_step_from_args",
    "iw_sft_loss",
    "make_loss_func",
    "psft_loss",
    "psft_top_entropy_loss",
    "reduce_metrics",
    "sft_kl_loss",
    "sft_loss",
    "vocab_parallel_logprobs",
]
