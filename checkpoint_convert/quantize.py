"""Weight quantization for export: Qwen's published block-FP8 form (``--quantize fp8``).

The form of Qwen3-30B-A3B-FP8 and later Qwen FP8 releases, which vLLM, SGLang and transformers load:

* every linear projection (attention ``q/k/v/o_proj``, each expert's ``gate/up/down_proj``; a dense
  model's ``mlp.gate/up/down_proj``) is stored as ``float8_e4m3fn`` plus ``<name>_scale_inv``: one
  float32 scale per 128 x 128 block of the weight, shape ``ceil(out/128) x ceil(in/128)``, with
  ``weight ~= fp8 * scale`` block by block. A dimension that is not a multiple of 128 ends in a
  partial block; its scale covers just the rows / columns that exist;
* the embedding, ``lm_head``, every norm (q/k norms included) and the MoE router ``mlp.gate`` keep
  the output dtype (bf16 by default);
* ``config.json`` gets ``quantization_config`` with Qwen's keys, including its
  ``modules_to_not_convert`` list (``lm_head``; per layer the two norms and the router).

The scale of a block is ``amax / 448`` (448: the largest e4m3 value), so the block's largest element
maps to 448 and every element is rounded to the nearest e4m3 value: relative error at most 2^-4
(3 mantissa bits), or 2^-10 * scale for elements in e4m3's subnormal range (below 2^-6 * scale).
An all-zero block gets scale 1 (its elements stay exactly 0).

Quantization works on one HF tensor at a time, in float32, so the export's memory stays bounded.
"""

import fnmatch
from typing import Dict, List, Optional, Sequence, Tuple

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
SCALE_DTYPE = torch.float32
BLOCK = (128, 128)  # (rows = output features, columns = input features)
SCALE_SUFFIX = "_scale_inv"

# HF tensors stored in FP8; everything else keeps the output dtype.
QUANTIZED_PATTERNS: Tuple[str, ...] = (
    "model.layers.*.self_attn.[qkvo]_proj.weight",
    "model.layers.*.mlp.experts.*.gate_proj.weight",
    "model.layers.*.mlp.experts.*.up_proj.weight",
    "model.layers.*.mlp.experts.*.down_proj.weight",
    "model.layers.*.mlp.gate_proj.weight",  # dense Qwen3
    "model.layers.*.mlp.up_proj.weight",
    "model.layers.*.mlp.down_proj.weight",
)
# Qwen's `modules_to_not_convert`: lm_head (listed even when tied), and per layer these modules
# where the model has them. (Embedding, q/k norms and the final norm are not linear layers, so
# Qwen does not list them; a loader never converts them.)
NOT_CONVERTED_PER_LAYER: Tuple[str, ...] = ("input_layernorm", "mlp.gate", "post_attention_layernorm")

TensorSpec = Tuple[str, Tuple[int, ...], torch.dtype]


def scale_shape(shape: Sequence[int], block: Tuple[int, int] = BLOCK) -> Tuple[int, int]:
    rows, cols = shape
    return -(-rows // block[0]), -(-cols // block[1])


def quantize_blocks(weight: torch.Tensor, block: Tuple[int, int] = BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale per block) of a 2-D weight; ``dequantize_blocks`` inverts it."""
    if weight.dim() != 2:
        raise ValueError(f"block quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    grid = scale_shape(weight.shape, block)
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float32)
    padded[:rows, :cols] = weight  # zero padding never raises a block's amax
    blocks = padded.view(grid[0], block[0], grid[1], block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(SCALE_DTYPE)
    quantized = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized.view(padded.shape)[:rows, :cols].contiguous(), scale


def dequantize_blocks(quantized: torch.Tensor, scale: torch.Tensor, block: Tuple[int, int] = BLOCK) -> torch.Tensor:
    """float32 weight from an fp8 weight and its per-block scales (partial edge blocks included)."""
    rows, cols = quantized.shape
    if tuple(scale.shape) != scale_shape(quantized.shape, block):
        raise ValueError(f"scale grid {tuple(scale.shape)} does not fit weight {(rows, cols)} in {block} blocks")
    full = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return quantized.float() * full[:rows, :cols]


class NoQuantization:
    """Every tensor as it is, in the output dtype (the plain export)."""

    name = None

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def plan(self, name: str, shape: Tuple[int, ...]) -> List[TensorSpec]:
        return [(name, tuple(shape), self.dtype)]

    def apply(self, name: str, tensor: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
        return [(name, tensor.to(self.dtype))]

    def config_updates(self, hf_names: Sequence[str], num_layers: int) -> Dict[str, object]:
        return {}


class BlockFP8(NoQuantization):
    """Qwen's block-FP8: the matching projections as fp8 + ``weight_scale_inv``, the rest in `dtype`."""

    name = "fp8"

    @staticmethod
    def quantizes(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in QUANTIZED_PATTERNS)

    def plan(self, name: str, shape: Tuple[int, ...]) -> List[TensorSpec]:
        if not self.quantizes(name):
            return super().plan(name, shape)
        return [(name, tuple(shape), FP8), (name + SCALE_SUFFIX, scale_shape(shape), SCALE_DTYPE)]

    def apply(self, name: str, tensor: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
        if not self.quantizes(name):
            return super().apply(name, tensor)
        quantized, scale = quantize_blocks(tensor)
        return [(name, quantized), (name + SCALE_SUFFIX, scale)]

    def config_updates(self, hf_names: Sequence[str], num_layers: int) -> Dict[str, object]:
        present = set(hf_names)
        kept = ["lm_head"] + [f"model.layers.{layer}.{module}" for layer in range(num_layers)
                              for module in NOT_CONVERTED_PER_LAYER
                              if f"model.layers.{layer}.{module}.weight" in present]
        # Qwen's key order (alphabetical, as transformers writes configs).
        return {"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "modules_to_not_convert": kept,
                                        "quant_method": "fp8", "weight_block_size": list(BLOCK)}}


SCHEMES = {"fp8": BlockFP8}
DEFAULT_DTYPES = {"fp8": torch.bfloat16}  # the published form keeps the unquantized tensors in bf16


def default_dtype(quantize: Optional[str]) -> Optional[torch.dtype]:
    """The dtype of the unquantized tensors when ``--dtype`` is not given (None: the template's)."""
    return DEFAULT_DTYPES.get(quantize)


def scheme(quantize: Optional[str], dtype: torch.dtype) -> NoQuantization:
    """The scheme for ``--quantize`` (None: no quantization); unquantized tensors are written in `dtype`."""
    if quantize is None:
        return NoQuantization(dtype)
    if quantize not in SCHEMES:
        raise ValueError(f"unknown quantization {quantize!r} (choices: {', '.join(SCHEMES)})")
    return SCHEMES[quantize](dtype)
