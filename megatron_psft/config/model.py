"""The model and how it computes: its HF config, precision, MoE dispatch, recompute, fused log-probs."""

from dataclasses import dataclass
from typing import Optional, Tuple

from megatron_psft.config.base import Section, setting

PARAMS_DTYPES = ("bf16", "fp32")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
DEFAULT_FP8_RECIPE = "tensorwise"  # docs/run_script.md says why
FUSED_LOGPROBS_MODES = ("off", "on", "auto")
PARAMS_DTYPE_BYTES = {"bf16": 2, "fp32": 4}
# --fused-logprobs auto fuses when one micro-batch's unfused logits slice would take more than this.
AUTO_FUSED_LOGITS_BYTES = 4 * 2**30


def fused_logprobs_pays(tokens: int, vocab_columns: int, element_bytes: int) -> bool:
    """Whether --fused-logprobs auto fuses the output layer with the log-probs for a micro-batch of `tokens`
    tokens (the whole sequence, gathered under SP) over `vocab_columns` = padded vocab / TP columns of
    `element_bytes`-wide logits.

    Measured on one H100 (bench/RESULTS.md, torch fused path, hidden 2048, vocab 151936, bf16): at 4k tokens
    fused took 24.1 ms against 12.3 ms unfused, while unfused held 1.16 GiB of logits plus as much of their
    gradient; fused memory stayed flat (2.0-2.1 GiB) from 4k to 32k tokens, where the unfused logits are
    9.3 GiB (18.6 GiB with the gradient). So the choice is memory against time: below a few GiB of logits
    the unfused path is faster and its memory affordable; above, the logits and their gradient take a
    sizeable share of an 80 GiB GPU (activations, optimizer state and MoE buffers need it), and fusing
    trades one more output-layer matmul for it. 4 GiB of logits is ~14k tokens of Qwen3's vocab at TP1 in
    bf16, ~28k at TP2. The hidden size does not enter: it scales the recompute and the matmuls both paths
    share alike. The Triton fused kernel's GPU timing is still to be measured; should it beat unfused at
    every length, this rule becomes 'always fuse on CUDA'."""
    return tokens * vocab_columns * element_bytes > AUTO_FUSED_LOGITS_BYTES


def fused_logprobs_on(mode: str, tokens: int, vocab_columns: int, element_bytes: int) -> bool:
    """--fused-logprobs `mode` (off, on, auto) for micro-batches of `tokens` tokens over `vocab_columns`
    `element_bytes`-wide logits: whether the log-probs are fused with the output layer."""
    return mode == "on" or (mode == "auto" and fused_logprobs_pays(tokens, vocab_columns, element_bytes))


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
    # --fused-logprobs off | on | auto; auto is settled for the run's shapes by the launch (settle_fused_logprobs)
    fused_logprobs_mode: str = setting("off", key="fused_logprobs")
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        if isinstance(self.fused_logprobs_mode, bool):  # configs saved before auto held True / False
            object.__setattr__(self, "fused_logprobs_mode", "on" if self.fused_logprobs_mode else "off")
        for name, allowed in (("params_dtype", PARAMS_DTYPES), ("fp8_format", FP8_FORMATS),
                              ("fp8_recipe", FP8_RECIPES), ("recompute_granularity", ("full", "selective")),
                              ("recompute_method", ("uniform", "block")),
                              ("moe_token_dispatcher_type", ("alltoall", "allgather")),
                              ("fused_logprobs_mode", FUSED_LOGPROBS_MODES)):
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

    @property
    def fused_logprobs(self) -> bool:
        """Log-probs fused with the output layer: --fused-logprobs on, or auto as the launch settled it."""
        if self.fused_logprobs_mode == "auto":
            raise ValueError("--fused-logprobs auto is settled by the launch (launch.resolve), for the run's shapes")
        return self.fused_logprobs_mode == "on"

    def settle_fused_logprobs(self, tokens_per_micro_batch: int, vocab_columns: int) -> "ModelConfig":
        """This configuration with --fused-logprobs auto settled to on or off (fused_logprobs_pays) for micro-batches
        of `tokens_per_micro_batch` tokens over `vocab_columns` (padded vocab / TP); params_dtype is set."""
        if self.fused_logprobs_mode != "auto":
            return self
        fused = fused_logprobs_pays(tokens_per_micro_batch, vocab_columns, PARAMS_DTYPE_BYTES[self.params_dtype])
        return self.replace(fused_logprobs_mode="on" if fused else "off")
