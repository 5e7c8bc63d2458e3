"""Megatron-Core dist checkpoint -> Hugging Face Qwen3-MoE checkpoint, streamed layer by layer.

    python -m checkpoint_convert.megatron_to_hf --megatron-dir CKPT --hf-dir-template HF --out-dir OUT

Reads the latest iteration of CKPT (or ``--iteration N``), whatever TP / PP / EP / ETP layout the
trainer saved it at, and writes ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
with the config, tokenizer and other small files of the template. Only the "model" part of the
checkpoint is read, one layer at a time; tensors are appended to the current shard as they are made.

``--quantize fp8`` writes Qwen's published block-FP8 form instead (see quantize.py): the linear
projections as float8_e4m3fn with a float32 ``weight_scale_inv`` per 128 x 128 block, the rest in
bf16 (or ``--dtype``), and ``quantization_config`` in config.json. Each tensor is quantized as it
is written, so memory stays as in the plain export.
"""

import argparse
import itertools
import json
import os
import shutil
from typing import List, Optional

import torch

from checkpoint_convert import quantize as quantization
from checkpoint_convert.common import Progress, config_dtype, parse_size, staged_output
from checkpoint_convert.safetensors_io import ShardedSafetensorsWriter
from megatron_psft import checkpoint
from megatron_psft.platform import parallel
from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, load_hf_config
from megatron_psft.models.qwen3_moe import state_dict_adapter as adapter
from megatron_psft.platform.precision import parse_dtype

MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def check_stored_tensors(args: Qwen3MoeArgs, metadata: dict) -> None:
    """Check every rule's tensor is stored with the global shape the config implies (and nothing else is)."""
    keys = []
    for rule in adapter.rules(args):
        key = rule.megatron_key
        if key not in metadata:
            raise KeyError(f"checkpoint lacks tensor {key!r}")
        expected, stored = adapter.global_shape(rule, args), tuple(metadata[key].global_shape)
        row_axis = len(expected) - len(adapter.slice_shape(rule, args))
        # Vocabulary tensors carry whatever padding the saving TP size needed: at least the real rows.
        fits = len(stored) == len(expected) and all(
            s >= e if axis == row_axis and rule.transform == adapter.VOCAB else s == e
            for axis, (s, e) in enumerate(zip(stored, expected)))
        if not fits:
            raise ValueError(f"checkpoint tensor {key!r} has global shape {stored}, the config implies {expected}")
        keys.append(key)
    unknown = sorted(k for k in metadata if k.startswith(MODEL_KEY_PREFIXES) and k not in keys)
    if unknown:
        raise ValueError(f"checkpoint holds model tensors no conversion rule covers: {unknown[:5]}")


def _load_request(stage_slots: List[adapter.Slot], metadata: dict) -> dict:
    """A sharded state dict asking for one layer's slice of each tensor (every expert at once), or
    for a whole model-level tensor at its stored shape."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    request = {}
    for slot in stage_slots:
        key = slot.rule.megatron_key
        if key in request:
            continue
        stored = metadata[key]
        shape, offset = tuple(stored.global_shape), (0,) * len(stored.global_shape)
        if slot.layer is not None:
            shape, offset = (1,) + shape[1:], (slot.layer,) + offset[1:]
        request[key] = ShardedTensor(key=key, data=torch.empty(shape, dtype=stored.dtype), dtype=stored.dtype,
                                     local_shape=shape, global_shape=tuple(stored.global_shape),
                                     global_offset=offset, axis_fragmentations=None)
    return request


def convert(megatron_dir: str, hf_template_dir: str, out_dir: str, iteration: Optional[int] = None,
            dtype: Optional[torch.dtype] = None, max_shard_size: str = "5GB", overwrite: bool = False,
            quantize: Optional[str] = None) -> str:
    """Write an HF model directory `out_dir` from a Megatron checkpoint; returns `out_dir`.
    `quantize`: None, or "fp8" (Qwen's block-FP8; unquantized tensors in `dtype`, default bf16)."""
    from megatron.core import dist_checkpointing

    source = checkpoint.resolve(megatron_dir, iteration)
    args = Qwen3MoeArgs.from_hf_config(checkpoint.read_hf_config(source))
    template_config = load_hf_config(hf_template_dir)
    if Qwen3MoeArgs.from_hf_config(template_config) != args:
        raise ValueError(f"the template {hf_template_dir} describes a different model than {source}/hf_config.json")
    out_dtype = dtype or quantization.default_dtype(quantize) or config_dtype(template_config)

    with staged_output(out_dir, overwrite) as staging, parallel.single_process_group():
        metadata = dist_checkpointing.load_tensors_metadata(source)
        check_stored_tensors(args, metadata)
        out_dtype = out_dtype or metadata["embedding.word_embeddings.weight"].dtype
        scheme = quantization.scheme(quantize, out_dtype)
        shapes = adapter.hf_tensor_shapes(args)
        planned = [spec for name, shape in shapes.items() for spec in scheme.plan(name, shape)]
        writer = ShardedSafetensorsWriter(staging, planned, parse_size(max_shard_size))
        stages = [list(group) for _, group in itertools.groupby(adapter.slots(args), key=lambda s: s.stage)]
        total = sum(torch.Size(shape).numel() * dt.itemsize for _, shape, dt in planned)
        form = out_dtype if quantize is None else f"{quantize} + {out_dtype}"
        print(f"[megatron->hf] {source} -> {out_dir}: {len(planned)} tensors, {total / 1e9:.2f} GB as {form}, "
              f"{len(writer.shards)} shards", flush=True)
        progress = Progress("megatron->hf", total, stages=len(stages))
        try:
            for stage_slots in stages:
                progress.update(stage_slots[0].stage, 0)  # the stage's time includes its load
                # One layer is only part of each tensor: skip the check that a load covers all of it.
                loaded = dist_checkpointing.load(_load_request(stage_slots, metadata), source,
                                                 validate_access_integrity=False)
                for slot in stage_slots:
                    data = loaded[slot.rule.megatron_key]
                    if slot.layer is not None:
                        data = data[0] if slot.expert is None else data[0, slot.expert]
                    for hf_name, hf_tensor in zip(slot.hf_names(), adapter.to_hf(slot.rule, data, args)):
                        for name, tensor in scheme.apply(hf_name, hf_tensor):
                            writer.write(name, tensor)
                            progress.update(slot.stage, tensor.numel() * tensor.element_size())
                del loaded  # before the next layer's load, not after it
            writer.finish()
        finally:
            writer.close()
        progress.close()
        updates = scheme.config_updates(list(shapes), args.num_layers)
        _copy_template_files(hf_template_dir, staging, template_config, out_dtype, updates)
    return out_dir


def _copy_template_files(template_dir: str, out_dir: str, config: dict, dtype: torch.dtype,
                         updates: Optional[dict] = None) -> None:
    """Config, generation config, tokenizer, license...: every small file except the template's weights.
    The config is copied verbatim unless the output dtype differs from the one it declares or
    `updates` (e.g. a ``quantization_config``) are to be set in it."""
    updates = dict(updates or {})
    if config_dtype(config) not in (None, dtype):
        dtype_name = str(dtype).removeprefix("torch.")
        updates.update({k: dtype_name for k in ("dtype", "torch_dtype") if k in config})
    for name in sorted(os.listdir(template_dir)):
        path = os.path.join(template_dir, name)
        if not os.path.isfile(path) or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        if name == "config.json" and (updates or "quantization_config" in config):
            # A template that is itself quantized: its quantization_config goes unless replaced.
            updated = {k: v for k, v in config.items() if k != "quantization_config"}
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump({**updated, **updates}, f, indent=2)
            continue
        shutil.copyfile(path, os.path.join(out_dir, name))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-dir", required=True, help="checkpoint root (or one iter_* directory)")
    parser.add_argument("--hf-dir-template", required=True,
                        help="HF model directory whose config / tokenizer files the output gets")
    parser.add_argument("--out-dir", required=True, help="HF model directory to create")
    parser.add_argument("--iteration", type=int, default=None, help="iteration to export (default: the latest)")
    parser.add_argument("--dtype", default=None,
                        help="output dtype (of the unquantized tensors with --quantize; default: the template "
                             "config's dtype, bfloat16 with --quantize fp8)")
    parser.add_argument("--quantize", choices=sorted(quantization.SCHEMES), default=None,
                        help="fp8: Qwen's block-FP8 form (e4m3 weights, a float32 scale per 128x128 block) that "
                             "vLLM, SGLang and transformers load")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    options = parser.parse_args(argv)
    convert(options.megatron_dir, options.hf_dir_template, options.out_dir, iteration=options.iteration,
            dtype=options.dtype and parse_dtype(options.dtype), max_shard_size=options.max_shard_size,
            overwrite=options.overwrite, quantize=options.quantize)


if __name__ == "__main__":
    main()
