"""What a run executes on, and the kernel choices that follow from it.

Megatron-Core turns on fused kernels by config flags and only finds out at the first forward that a
kernel is missing. Here the platform is read once (CUDA, Transformer Engine and its version, the
optional fused kernels, megatron-core's version) and every kernel flag is derived from it, so a run
never asks for a kernel its machine does not have. A dry run plans for a platform it is not on
(``Platform.assumed``): the cluster's, from a laptop.
"""

import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch

# The oldest Transformer Engine the run script's defaults work with: FP8 with selective recompute of
# moe_act / layernorm needs 2.6 in megatron-core's own check (and a current-scaling recipe);
# moe_permute_fusion needs 2.1.
MIN_TRANSFORMER_ENGINE = "2.6.0"
# megatron-core 0.16.x's MoE router calls te_general_gemm, a name it defines only when TE imports.
_ROUTER_NEEDS_TE = ("0.16.",)


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


@dataclass(frozen=True)
class Platform:
    cuda: bool
    transformer_engine: Optional[str]  # TE's version; None without TE
    megatron_core: str
    fused_softmax: bool = False  # Megatron's scaled_masked_softmax_cuda extension
    grad_accumulation_fusion: bool = False  # APEX's fused_weight_gradient_mlp_cuda
    assumed: bool = False  # planned for, not detected: kernels that only import there are not checked here

    @classmethod
    def detect(cls) -> "Platform":
        import megatron.core

        from megatron_psft.platform import parallel

        cuda = torch.cuda.is_available()
        te_version = None
        if cuda:  # TE does not import without a GPU (and breaks megatron.core there)
            parallel.select_local_device()
            try:
                import transformer_engine

                te_version = str(getattr(transformer_engine, "__version__", "0"))
            except ImportError:
                pass
        grad_accumulation_fusion = False
        if cuda:
            from megatron.core.tensor_parallel import layers

            grad_accumulation_fusion = bool(layers._grad_accum_fusion_available)
        return cls(cuda=cuda, transformer_engine=te_version, megatron_core=megatron.core.__version__,
                   fused_softmax=cuda and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
                   grad_accumulation_fusion=grad_accumulation_fusion)

    @classmethod
    def planned(cls, kind: str) -> "Platform":
        """A platform to plan for: ``gpu-te`` (the cluster: a GPU with Transformer Engine at its
        minimum version), ``gpu`` (a GPU without it) or ``cpu``."""
        import megatron.core

        if kind not in ("gpu-te", "gpu", "cpu"):
            raise ValueError(f"unknown platform {kind!r}; choose gpu-te, gpu or cpu")
        return cls(cuda=kind != "cpu", transformer_engine=MIN_TRANSFORMER_ENGINE if kind == "gpu-te" else None,
                   megatron_core=megatron.core.__version__, assumed=True)

    @property
    def use_transformer_engine(self) -> bool:
        return self.transformer_engine is not None

    def describe(self) -> str:
        device = "GPU" if self.cuda else "CPU"
        te = f"Transformer Engine {self.transformer_engine}" if self.transformer_engine else "no Transformer Engine"
        how = "assumed for planning" if self.assumed else "detected"
        return f"{device}, {te}, megatron-core {self.megatron_core} ({how})"

    @contextlib.contextmanager
    def as_megatron_sees_it(self):
        """Megatron-Core's TransformerConfig asks for the installed TE version; planning for a platform
        with TE from one without, answer with the planned version (restored afterwards)."""
        if not (self.assumed and self.use_transformer_engine):
            yield
            return
        from megatron.core import utils
        from packaging.version import Version

        saved, utils._te_version = utils._te_version, Version(self.transformer_engine)
        try:
            yield
        finally:
            utils._te_version = saved

    def check(self, *, moe: bool, fp8: Optional[str], moe_grouped_gemm: Optional[bool],
              recompute_modules: Optional[list] = None) -> None:
        """Refuse combinations this platform cannot run, naming the flag and the fix."""
        if fp8 and not self.use_transformer_engine:
            raise ValueError(f"--fp8-format {fp8} needs Transformer Engine on a GPU; this platform has "
                             f"{self.describe()}. Drop --fp8-format (bf16) or install transformer-engine[pytorch]"
                             f">={MIN_TRANSFORMER_ENGINE}")
        if moe_grouped_gemm and not self.use_transformer_engine:
            raise ValueError("--moe-grouped-gemm needs Transformer Engine on a GPU; use --no-moe-grouped-gemm "
                             f"here ({self.describe()})")
        if self.use_transformer_engine and _version_tuple(self.transformer_engine) < _version_tuple(MIN_TRANSFORMER_ENGINE):
            raise ValueError(f"Transformer Engine {self.transformer_engine} is older than the supported "
                             f"{MIN_TRANSFORMER_ENGINE}: upgrade it (pip install 'transformer-engine[pytorch]"
                             f">={MIN_TRANSFORMER_ENGINE}')")
        if moe and self.cuda and not self.use_transformer_engine and self.megatron_core.startswith(_ROUTER_NEEDS_TE):
            raise ValueError(f"megatron-core {self.megatron_core}'s MoE router needs Transformer Engine on a GPU "
                             "(it calls te_general_gemm, defined only when TE imports): install "
                             f"transformer-engine[pytorch]>={MIN_TRANSFORMER_ENGINE}, or megatron-core 0.19.2")
        if "layernorm" in (recompute_modules or []) and not self.use_transformer_engine:
            # megatron-core's CheckpointWithoutOutput sets fp8 = (fp8 is not None), always true, and then
            # reaches TE's FP8GlobalStateManager: a NameError in the first backward without TE.
            raise ValueError(f"--recompute-modules layernorm needs Transformer Engine (megatron-core's norm "
                             f"recompute calls into TE); this platform has {self.describe()}. Leave 'layernorm' out")


@functools.lru_cache(maxsize=None)
def current() -> Platform:
    """This machine's platform (read once per process)."""
    return Platform.detect()
