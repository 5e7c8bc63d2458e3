"""FP8 export (``megatron_to_hf --quantize fp8``): Qwen's published block-FP8 form, on CPU.

Two tiny Qwen3-MoE models made by test_convert's helper go through ``hf_to_megatron`` and come back
twice, in bf16 and in FP8: the suite's tiny model (widths 32-128: one block per tensor) and a
``wide`` variant whose widths (hidden 320, q 160, kv 80, experts 136) give several 128 x 128 blocks
per tensor with partial edge blocks, and scale grids that are not square.

Loading through transformers: its FP8 loader needs ``accelerate`` (not in the pinned test
environments) and, without a GPU, only dequantizes the weights to bf16 on load; it also infers the
block size from the scale grid, so it cannot read partial edge blocks. So the logits test
dequantizes the export itself, on CPU, with its own block loop (independent of
checkpoint_convert.quantize), into a float32 safetensors directory that transformers loads as a
plain model. Where ``accelerate`` is installed, one more test loads the FP8 directory through
transformers' own FP8 loader and expects the same logits.

The accuracy bound (logits of the FP8 export against those of the bf16 export, both run in fp32;
relative RMS over all logits): e4m3 keeps 3 mantissa bits, so round-to-nearest leaves each weight
element a relative error of at most 2^-4 (half its 2^-3 spacing; elements below e4m3's normal range,
under 2^-6 of their block's scale, err by at most 2^-10 of the scale, less still). How that reaches
the logits depends on the network: the first-order estimate for independent errors (RMS 2^-4 /
sqrt(3) per product, four quantized products in series per layer, added in quadrature: 0.144 for
4 layers) already fails on the wide random model (0.147), whose layers amplify perturbations. So the
propagation is measured with a perturbation of known size: the bf16 export itself rounds every
weight of the fp32 source to nearest with 7 mantissa bits instead of 3, the same relative error
distribution 2^4 = 16 times smaller, so to first order the FP8 error (of a subset of the weights) is
at most 16 times the bf16 export's error against the fp32 source. Measured: 8 and 11 times.
Routing is discrete: a token whose top-k expert set flips (8 and 16 of 96 token-layer choices here) moves
by O(1) whatever the precision, so the other runs replay the bf16 export's expert choices (the
router weights are bf16 and identical in both exports). Figures: docs/conversion.md.
"""

import json
import math
import os
import shutil

import pytest
import torch

from test_convert import _save_hf_model, _tensors, _tokens

E4M3_MANTISSA_BITS, BF16_MANTISSA_BITS = 3, 7  # explicit significand bits (spacings 2^-3 and 2^-7)
E4M3_ROUNDING = 2.0 ** -4  # half of e4m3's relative spacing 2^-3 (3 mantissa bits)
E4M3_SUBNORMAL_STEP = 2.0 ** -9  # smallest e4m3 subnormal: its half is the absolute rounding error
QUANTIZED_PER_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
QUANTIZED_PER_EXPERT = ("gate_proj", "up_proj", "down_proj")
WIDE = dict(hidden_size=320, head_dim=40, moe_intermediate_size=136)  # q 160, kv 80: partial blocks
KINDS = ("moe", "wide")


def _save(path, kind):
    """test_convert's tiny MoE model; `wide`: the same with the widths of WIDE."""
    import transformers

    if kind == "moe":
        return _save_hf_model(path, "moe")
    config_class = transformers.Qwen3MoeConfig
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers, "Qwen3MoeConfig", lambda **kwargs: config_class(**{**kwargs, **WIDE}))
        _save_hf_model(path, "moe")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from checkpoint_convert import hf_to_megatron, megatron_to_hf

    root = tmp_path_factory.mktemp("fp8")
    result = {}
    for kind in KINDS:
        hf, ckpt, bf16, fp8 = (str(root / f"{kind}_{what}") for what in ("hf", "megatron", "bf16", "fp8"))
        _save(hf, kind)
        hf_to_megatron.convert(hf, ckpt)
        megatron_to_hf.convert(ckpt, hf, bf16, dtype=torch.bfloat16, max_shard_size="200KB")
        megatron_to_hf.main(["--megatron-dir", ckpt, "--hf-dir-template", hf, "--out-dir", fp8,
                             "--quantize", "fp8", "--max-shard-size", "200KB"])
        result[kind] = dict(hf=hf, bf16=bf16, fp8=fp8, dequantized=_dequantized_copy(fp8, str(root / f"{kind}_deq")))
    return result


# --- the block quantizer on a hand-made tensor ------------------------------------------------------

def _blocks(shape):
    """(block index, rows, columns) of every 128 x 128 block, edge blocks partial."""
    return [((i, j), slice(r, r + 128), slice(c, c + 128))
            for i, r in enumerate(range(0, shape[0], 128)) for j, c in enumerate(range(0, shape[1], 128))]


def _dequantize(quantized, scale):
    """The format's definition, block by block: weight = fp8 * scale of its block."""
    out = torch.empty(quantized.shape, dtype=torch.float32)
    for (i, j), rows, cols in _blocks(quantized.shape):
        out[rows, cols] = quantized[rows, cols].float() * scale[i, j]
    return out


def test_block_quantizer_on_a_ragged_tensor():
    from checkpoint_convert.quantize import quantize_blocks

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 200, generator=generator)  # 3 x 2 blocks; the last row / column blocks partial
    magnitudes = torch.tensor([[1.0, 1e-3], [50.0, 0.2], [0.0, 3e2]])  # one scale per block; one block zero
    for (i, j), rows, cols in _blocks(x.shape):
        x[rows, cols] *= magnitudes[i, j]
    first = (slice(0, 128), slice(0, 128))
    small = x[first].abs().max() / 448  # the first block's scale; e4m3 subnormals are multiples of 2^-9
    x[5, 7], x[6, 7] = 2.6 * 2.0 ** -9 * small, 0.4 * 2.0 ** -9 * small  # -> 3 * 2^-9 and 0 (flushed)
    quantized, scale = quantize_blocks(x)
    assert quantized.dtype == torch.float8_e4m3fn and tuple(quantized.shape) == (300, 200)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (3, 2)
    back = _dequantize(quantized, scale)
    for (i, j), rows, cols in _blocks(x.shape):
        block, amax = x[rows, cols], x[rows, cols].abs().max()
        if amax == 0:
            assert scale[i, j] == 1 and torch.equal(back[rows, cols], block), (i, j)
            continue
        assert scale[i, j] == (amax / 448).float(), (i, j, float(scale[i, j]), float(amax / 448))
        # the block's largest element maps to +-448 (up to float32 rounding of amax / 448 * 448)
        assert torch.isclose(back[rows, cols].abs().max(), amax, rtol=2 ** -22, atol=0), (i, j)
        bound = torch.clamp(E4M3_ROUNDING * block.abs(), min=E4M3_SUBNORMAL_STEP / 2 * scale[i, j])
        error = (back[rows, cols] - block).abs()
        assert (error <= bound * (1 + 2 ** -20)).all(), (i, j, float((error / bound).max()))
    # Subnormal range: rounded on the 2^-9 grid of the scale (15% off: the absolute bound applies).
    assert torch.isclose(back[5, 7], 3 * 2.0 ** -9 * scale[0, 0], rtol=2 ** -22, atol=0) and back[6, 7] == 0


# --- the exported directory --------------------------------------------------------------------------

def _header(model_dir):
    """{name: (safetensors dtype string, shape)} read with the safetensors library."""
    from safetensors import safe_open

    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    header = {}
    for name in files:
        with safe_open(os.path.join(model_dir, name), "pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                header[key] = (piece.get_dtype(), tuple(piece.get_shape()))
    return header


def _quantized_names(config):
    layers, experts = config["num_hidden_layers"], config.get("num_experts", config.get("num_local_experts"))
    return {f"model.layers.{layer}.{module}.weight" for layer in range(layers) for module in QUANTIZED_PER_LAYER} | {
        f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
        for layer in range(layers) for expert in range(experts) for proj in QUANTIZED_PER_EXPERT}


@pytest.mark.parametrize("kind", KINDS)
def test_export_has_the_published_names_dtypes_and_shapes(exports, kind):
    paths = exports[kind]
    with open(os.path.join(paths["hf"], "config.json")) as f:
        template = json.load(f)
    plain, fp8 = _header(paths["bf16"]), _header(paths["fp8"])
    quantized = _quantized_names(template)
    assert quantized <= set(plain)
    assert set(fp8) == set(plain) | {name + "_scale_inv" for name in quantized}
    for name, (dtype, shape) in plain.items():
        if name in quantized:
            rows, cols = shape
            assert fp8[name] == ("F8_E4M3", shape), name
            assert fp8[name + "_scale_inv"] == ("F32", (math.ceil(rows / 128), math.ceil(cols / 128))), name
        else:  # embedding, lm_head, norms (q/k norms too), the router mlp.gate
            assert fp8[name] == ("BF16", shape) == (dtype, shape), name
    assert {n for n in fp8 if n.endswith("mlp.gate.weight")} and not {n for n in quantized if "norm" in n}
    if kind == "wide":  # several blocks, partial edges, grids that are not square
        assert fp8["model.layers.0.self_attn.k_proj.weight_scale_inv"][1] == (1, 3)
        assert fp8["model.layers.0.mlp.experts.0.down_proj.weight_scale_inv"][1] == (3, 2)
    with open(os.path.join(paths["fp8"], "model.safetensors.index.json")) as f:
        assert set(json.load(f)["weight_map"]) == set(fp8)


def test_config_carries_qwens_quantization_config(exports):
    with open(os.path.join(exports["moe"]["hf"], "config.json")) as f:
        template = json.load(f)
    with open(os.path.join(exports["moe"]["fp8"], "config.json")) as f:
        config = json.load(f)
    layers = range(template["num_hidden_layers"])
    assert config.pop("quantization_config") == {
        "activation_scheme": "dynamic", "fmt": "e4m3",
        "modules_to_not_convert": ["lm_head"] + [f"model.layers.{layer}.{module}" for layer in layers
                                                 for module in ("input_layernorm", "mlp.gate",
                                                                "post_attention_layernorm")],
        "quant_method": "fp8", "weight_block_size": [128, 128]}
    assert template.pop("dtype") == "float32" and config.pop("dtype") == "bfloat16"
    assert config == template


def test_import_refuses_a_quantized_model(exports, tmp_path):
    from checkpoint_convert import hf_to_megatron

    with pytest.raises(ValueError, match="quantized model.*'fp8'.*bf16 release"):
        hf_to_megatron.convert(exports["moe"]["fp8"], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_cli_refuses_unknown_quantization(tmp_path):
    from checkpoint_convert import megatron_to_hf

    with pytest.raises(SystemExit):
        megatron_to_hf.main(["--megatron-dir", "x", "--hf-dir-template", "x", "--out-dir", str(tmp_path / "o"),
                             "--quantize", "int4"])


# --- accuracy ---------------------------------------------------------------------------------------

def _dequantized_copy(fp8_dir, out_dir):
    """The FP8 export dequantized to float32 (by _dequantize), config without quantization_config."""
    from safetensors.torch import save_file

    tensors = _tensors(fp8_dir)
    state = {name: (_dequantize(t, tensors[name + "_scale_inv"]) if name + "_scale_inv" in tensors else t.float())
             for name, t in tensors.items() if not name.endswith("_scale_inv")}
    os.makedirs(out_dir)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(fp8_dir, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**config, "dtype": "float32"}, f)
    shutil.copyfile(os.path.join(fp8_dir, "generation_config.json"), os.path.join(out_dir, "generation_config.json"))
    return out_dir


def _logits(model_dir, routing=None, dtype=torch.float32):
    """(logits, each layer's expert choices) of transformers' model; `routing`: choices to replay."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    chosen = []

    def replay(router, args, output):
        logits, scores, experts = output
        if routing is not None:
            experts = routing[len(chosen)]
            probs = torch.softmax(logits, dim=-1, dtype=torch.float).gather(-1, experts)
            scores = (probs / probs.sum(-1, keepdim=True) if router.norm_topk_prob else probs).to(logits.dtype)
        chosen.append(experts)
        return logits, scores, experts

    hooks = [layer.mlp.gate.register_forward_hook(replay) for layer in model.model.layers]
    with torch.no_grad():
        logits = model(_tokens()).logits.float()
    for hook in hooks:
        hook.remove()
    return logits, chosen


@pytest.mark.parametrize("kind", KINDS)
def test_fp8_logits_match_the_bf16_export_within_the_e4m3_bound(exports, kind):
    paths = exports[kind]
    plain, fp8 = _tensors(paths["bf16"]), _tensors(paths["fp8"])
    for name, tensor in plain.items():  # what is not quantized is the bf16 export's, bit for bit
        if fp8[name].dtype == torch.bfloat16:
            assert torch.equal(fp8[name], tensor), name
    reference, routing = _logits(paths["bf16"])
    logits, _ = _logits(paths["dequantized"], routing)
    source, _ = _logits(paths["hf"], routing)  # fp32: the bf16 export's own rounding error

    def relative_rms(x):
        return float((x - reference).norm() / reference.norm())

    bf16_error, error = relative_rms(source), relative_rms(logits)
    bound = 2 ** (BF16_MANTISSA_BITS - E4M3_MANTISSA_BITS) * bf16_error
    free, free_routing = _logits(paths["dequantized"])  # for the record: routing of its own
    flips = sum(int((a.sort(-1).values != b.sort(-1).values).any(-1).sum()) for a, b in zip(routing, free_routing))

    def summary(x):
        return (f"relative RMS {relative_rms(x):.4f}, max |diff| {(x - reference).abs().max():.3f} of max |logit| "
                f"{reference.abs().max():.3f}, top-1 agreement {(x.argmax(-1) == reference.argmax(-1)).float().mean():.3f}")

    print(f"\n{kind}: bf16 export vs fp32 source: {summary(source)}\n{kind}: fp8 vs bf16 export, routing replayed: "
          f"{summary(logits)} (bound {bound:.4f})\n{kind}: fp8 vs bf16 export, own routing: {summary(free)}; "
          f"{flips} of {sum(len(r) for r in routing)} token-layer expert sets differ")
    assert bf16_error < error <= bound  # the weights did change more than bf16 rounding, within e4m3's reach


def test_transformers_fp8_loader_reads_the_export(exports):
    """transformers' own FP8 loader (CPU: it dequantizes to bf16 on load) gives the logits of our
    dequantization run in bf16. Needs accelerate; single blocks only (it infers block sizes)."""
    pytest.importorskip("accelerate")
    paths = exports["moe"]
    theirs, _ = _logits(paths["fp8"], dtype=torch.bfloat16)
    ours, _ = _logits(paths["dequantized"], dtype=torch.bfloat16)
    assert torch.equal(theirs, ours)
