"""What a run executes on: the machine and its kernel choices (:mod:`.machine`), process groups and Megatron's
parallel state (:mod:`.parallel`), the fenced CPU compatibility layer (:mod:`.cpu_compat`, never applied on a
GPU) and dtypes (:mod:`.precision`)."""

from megatron_psft.platform.machine import MIN_TRANSFORMER_ENGINE, Platform, current

__all__ = ["MIN_TRANSFORMER_ENGINE", "Platform", "current"]
