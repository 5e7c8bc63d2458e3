"""The model and how it computes: its HF config, precision, MoE dispatch, recompute, fused log-probs."""

from dataclasses import dataclass
from typing import Optional, Tuple

from megatron_psft.config.base import Section

PARAMS_DTYPES = ("bf16", "fp32")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
DEFAULT_FP8_RECIPE = "tensorwise"  # docs/run_script.md says why


@dataclass(frozen=True)
class ModelConfig(Section):
    hf_config: str = "debug"  # HF config.json, HF model dir, or a bundled flavour (debug, 30b-a3b)
    params_dtype: Optional[str] = None  # None: bf16 on a GPU, fp32 on CPU (filled in by the launch)
    fp8_format: Optional[str] = None
    fp8_recipe: Optional[str] = None  # with fp8_format, default DEFAULT_FP8_RECIPE
    moe_token_dispatcher_type: str = "alltoall"
    moe_grouped_gemm: Optional[bool] = None  # None: on with Transformer Engine
    moe_aux_loss_coeff: Optional[float] = None  # None: the HF config's router_aux_loss_coef
    moe_router_replay: bool = False
    moe_routing_flip_stats: bool = False
    fused_logprobs: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        for name, allowed in (("params_dtype", PARAMS_DTYPES), ("fp8_format", FP8_FORMATS),
                              ("fp8_recipe", FP8_RECIPES), ("recompute_granularity", ("full", "selective")),
                              ("recompute_method", ("uniform", "block")),
                              ("moe_token_dispatcher_type", ("alltoall", "allgather"))):
            value = getattr(self, name)
            self.require(value is None or value in allowed, f"{self.flag(name)} must be one of {allowed}, got {value!r}")
        self.require(not self.fp8_recipe or self.fp8_format,
                     f"--fp8-recipe {self.fp8_recipe} has no effect without --fp8-format")
        if self.fp8_format and self.fp8_recipe is None:
            object.__setattr__(self, "fp8_recipe", DEFAULT_FP8_RECIPE)
        if self.moe_aux_loss_coeff is not None:
            self.non_negative("moe_aux_loss_coeff")
        self.require(not self.recompute_modules or self.recompute_granularity == "selective",
                     "--recompute-modules needs --recompute-granularity selective")
        self.require(not (self.recompute_method or self.recompute_num_layers is not None)
                     or self.recompute_granularity == "full",
                     "--recompute-method / --recompute-num-layers need --recompute-granularity full")
        self.require((self.recompute_method is None) == (self.recompute_num_layers is None),
                     "--recompute-method and --recompute-num-layers go together")
        self.at_least("recompute_num_layers", 1, optional=True)
        self.require(not self.moe_router_replay or not (
            self.recompute_granularity == "full" or "moe" in (self.recompute_modules or ())),
            "--moe-router-replay cannot recompute the router (full or 'moe' recompute): it would re-route")

    @property
    def tracks_routing(self) -> bool:
        """The old-policy pass records the routing (to replay it, or to count the choices that flip)."""
        return self.moe_router_replay or self.moe_routing_flip_stats
