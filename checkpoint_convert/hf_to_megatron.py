"""Hugging Face Qwen3-MoE checkpoint -> Megatron-Core dist checkpoint (torch_dist), streamed.

    python -m checkpoint_convert.hf_to_megatron --hf-dir HF --out-dir CKPT

CKPT gets ``latest_checkpointed_iteration.txt`` and ``iter_0000000/`` (the ``{"model": ...}`` sharded
state dict plus ``hf_config.json``), loadable at any TP / PP / EP / ETP layout.

Memory stays at about one HF tensor: the sharded state dict is declared from the rule table with
data-less (meta) tensors, and each checkpoint chunk is read from the safetensors files only when
torch.distributed.checkpoint writes it (a save planner whose ``resolve_data`` produces it).
"""

import argparse
import itertools
import os
import shutil
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from checkpoint_convert.common import Progress, config_dtype, staged_output
from checkpoint_convert.safetensors_io import SafetensorsReader
from megatron_psft import checkpoint
from megatron_psft.platform import parallel
from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, load_hf_config
from megatron_psft.models.qwen3_moe import state_dict_adapter as adapter
from megatron_psft.platform.precision import parse_dtype


class Chunk(NamedTuple):
    """One checkpoint chunk: rows of one HF tensor (or zero padding) at `offset` in `key`."""

    key: str
    offset: Tuple[int, ...]
    shape: Tuple[int, ...]
    slot: adapter.Slot
    placement: adapter.Placement


def chunks(args: Qwen3MoeArgs) -> List[Chunk]:
    """Every chunk of the checkpoint, in HF order (layer by layer)."""
    result = []
    for slot in adapter.slots(args):
        trailing = adapter.slice_shape(slot.rule, args)[1:]
        leading = tuple(i for i in (slot.layer, slot.expert) if i is not None)
        for p in adapter.placements(slot.rule, args):
            rows = p.slice_rows.stop - p.slice_rows.start
            result.append(Chunk(slot.rule.megatron_key, leading + (p.slice_rows.start,) + (0,) * len(trailing),
                                (1,) * len(leading) + (rows,) + trailing, slot, p))
    return result


def check_hf_checkpoint(reader: SafetensorsReader, args: Qwen3MoeArgs) -> None:
    """Every tensor the config implies is there with its shape, and nothing else is."""
    expected = adapter.hf_tensor_shapes(args)
    missing = [name for name in expected if name not in reader]
    if missing:
        raise KeyError(f"HF checkpoint lacks {len(missing)} tensors the config implies, e.g. {missing[:5]}")
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise ValueError(f"HF tensor {name!r} has shape {reader.shape(name)}, the config implies {shape}")
    unknown = sorted(set(reader.names()) - set(expected))
    if unknown:
        raise ValueError(f"HF checkpoint holds {len(unknown)} tensors no conversion rule covers, e.g. {unknown[:5]}")


def sharded_state_dict(args: Qwen3MoeArgs, all_chunks: List[Chunk], dtype: torch.dtype) -> dict:
    """The model's sharded state dict, as ``GPTModel.sharded_state_dict()`` would describe it, with
    meta tensors: shapes and places only. Chunks use explicit offsets (no regular grid), since
    query-group rows are uneven."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    global_shapes = {rule.megatron_key: adapter.global_shape(rule, args) for rule in adapter.rules(args)}
    state = {}
    for c in all_chunks:
        state[f"{c.key}@{c.offset}"] = ShardedTensor(
            key=c.key, data=torch.empty(c.shape, dtype=dtype, device="meta"), dtype=dtype, local_shape=c.shape,
            global_shape=global_shapes[c.key], global_offset=c.offset, axis_fragmentations=None,
            allow_shape_mismatch=c.slot.rule.transform == adapter.VOCAB)
    for key, shape in adapter.extra_state_shapes(args).items():
        for offset in itertools.product(*map(range, shape)):
            state[f"{key}@{offset}"] = ShardedObject(key, None, shape, offset, replica_id=0)
    return state


def streaming_save_strategy(produce: Callable[[str, Tuple[int, ...]], torch.Tensor], order: Dict[tuple, int]):
    """Megatron's torch_dist format, written by torch.distributed.checkpoint one chunk at a time.

    Megatron's own writer materialises every tensor before writing; here the planner produces each
    chunk when the (single-threaded) writer asks for it, in `order` (layer by layer)."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.planner import WriteItemType

    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict)

    class StreamingPlanner(MCoreSavePlanner):
        def finish_plan(self, new_plan):
            items = sorted(new_plan.items, key=lambda item: -1 if item.type == WriteItemType.BYTE_IO
                           else order[(item.index.fqn, tuple(item.index.offset))])
            new_plan.items[:] = items
            return super().finish_plan(new_plan)

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            return produce(write_item.index.fqn, tuple(write_item.index.offset))

    class StreamingTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
            writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1)
            dcp.save(mcore_to_pyt_state_dict(by_key, False), storage_writer=writer,
                     planner=StreamingPlanner(dedup_replicated_tensors=False, flatten_state_dict=False))

    return StreamingTorchDistSave("torch_dist", 1, thread_count=1)


def convert(hf_dir: str, out_dir: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> str:
    """Write the Megatron checkpoint root `out_dir` from the HF model in `hf_dir`; returns `out_dir`."""
    from megatron.core import dist_checkpointing

    hf_config = load_hf_config(hf_dir)
    if hf_config.get("quantization_config"):  # e.g. an FP8 release: its weights are not the model's values
        method = hf_config["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{hf_dir} holds a quantized model (quant_method {method!r}): import its bf16 release")
    args = Qwen3MoeArgs.from_hf_config(hf_config)
    reader = SafetensorsReader(hf_dir)
    check_hf_checkpoint(reader, args)
    dtype = dtype or config_dtype(hf_config) or reader.dtype("model.embed_tokens.weight")
    all_chunks = chunks(args)
    by_place = {(c.key, c.offset): c for c in all_chunks}
    order = {place: i for i, place in enumerate(by_place)}
    total = sum(torch.Size(c.shape).numel() for c in all_chunks) * dtype.itemsize
    progress = Progress("hf->megatron", total, stages=len({c.slot.stage for c in all_chunks}))

    def produce(key, offset):
        c = by_place[(key, offset)]
        if c.placement.source is None:
            data = torch.zeros(c.shape, dtype=dtype)
        else:
            name = c.slot.hf_names()[c.placement.source]
            data = reader.read(name, c.placement.hf_rows).to(dtype).reshape(c.shape)
        progress.update(c.slot.stage, data.numel() * data.element_size())
        return data

    print(f"[hf->megatron] {hf_dir} -> {out_dir}: {len(all_chunks)} chunks, {total / 1e9:.2f} GB as {dtype}",
          flush=True)
    with staged_output(out_dir, overwrite) as staging, parallel.single_process_group():
        iteration_dir = checkpoint.iteration_dir(staging, 0)
        os.makedirs(iteration_dir)
        dist_checkpointing.save({"model": sharded_state_dict(args, all_chunks, dtype)}, iteration_dir,
                                sharded_strategy=streaming_save_strategy(produce, order))
        progress.close()
        shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(iteration_dir, checkpoint.HF_CONFIG_FILE))
        with open(os.path.join(staging, checkpoint.LATEST_FILE), "w") as f:
            f.write("0")
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out-dir", required=True, help="Megatron checkpoint root to create")
    parser.add_argument("--dtype", default=None, help="stored dtype (default: the HF config's dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    options = parser.parse_args(argv)
    convert(options.hf_dir, options.out_dir, dtype=options.dtype and parse_dtype(options.dtype),
            overwrite=options.overwrite)


if __name__ == "__main__":
    main()
