"""Streaming reads and writes of (sharded) safetensors checkpoints.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets of
each tensor) and the raw bytes. Reading with plain file reads (no mmap) keeps resident memory at
the tensors actually held; writing the header first, from a plan of every tensor's shape and dtype,
lets tensors be appended one at a time as they are produced, so memory never holds a whole shard.
"""

import json
import os
import struct
from typing import Dict, Iterable, List, Optional, Tuple

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_header(path: str) -> Tuple[dict, int]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


class SafetensorsReader:
    """Every tensor of an HF model directory (one file or an index of shards), read on demand."""

    def __init__(self, model_dir: str):
        index = os.path.join(model_dir, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(model_dir, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {model_dir}")
        self._entries: Dict[str, Tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(model_dir, name)
            header, data_start = _read_header(path)
            for tensor, info in header.items():
                self._entries[tensor] = (path, info, data_start)

    def names(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._info(name)[1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._info(name)[1]["dtype"]]

    def nbytes(self, name: str) -> int:
        begin, end = self._info(name)[1]["data_offsets"]
        return end - begin

    def read(self, name: str, rows: Optional[slice] = None) -> torch.Tensor:
        """The tensor, or only `rows` of its first dimension (read straight from disk)."""
        path, info, data_start = self._info(name)
        shape, dtype = list(info["shape"]), DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if rows is not None:
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            start, stop, _ = rows.indices(shape[0])
            begin, shape[0] = begin + start * row_bytes, stop - start
        out = torch.empty(shape, dtype=dtype)
        buffer = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise IOError(f"{path} ends inside tensor {name!r}: the file is truncated")
        return out

    def _info(self, name: str):
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} is missing from the HF checkpoint")
        return self._entries[name]


def plan_shards(tensors: Iterable[Tuple[str, Tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> List[List[tuple]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: List[List[tuple]] = [[]]
    size = 0
    for name, shape, dtype in tensors:
        nbytes = _numel(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype))
        size += nbytes
    return shards


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class ShardedSafetensorsWriter:
    """Writes ``model-0000i-of-0000n.safetensors`` and the index, tensor by tensor, in planned order.

    `tensors` is the full list (name, shape, dtype) in the order :meth:`write` will be called.
    """

    def __init__(self, out_dir: str, tensors: List[Tuple[str, Tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.out_dir = out_dir
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.weight_map: Dict[str, str] = {}
        self._queue = [(shard_index, entry) for shard_index, shard in enumerate(self.shards) for entry in shard]
        self._next = 0
        self._file = None
        self._open_shard = -1
        self.total_bytes = 0

    def file_name(self, shard_index: int) -> str:
        return f"model-{shard_index + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise ValueError(f"tensor {name!r} was not planned for the output")
        shard_index, (expected_name, shape, dtype) = self._queue[self._next]
        if name != expected_name:
            raise ValueError(f"tensor {name!r} produced where {expected_name!r} was expected")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}")
        if shard_index != self._open_shard:
            self._start_shard(shard_index)
        data = tensor.detach().contiguous().reshape(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self.weight_map[name] = self.file_name(shard_index)
        self.total_bytes += data.numel() * dtype.itemsize
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard_index:
            self._file.close()
            self._file = None

    def _start_shard(self, shard_index: int) -> None:
        header, offset = {}, 0
        for name, shape, dtype in self.shards[shard_index]:
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self._file = open(os.path.join(self.out_dir, self.file_name(shard_index)), "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._open_shard = shard_index

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        if self._next != len(self._queue):
            missing = [entry[1][0] for entry in self._queue[self._next:self._next + 3]]
            raise ValueError(f"output incomplete: {len(self._queue) - self._next} tensors not written, e.g. {missing}")
        with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}, f, indent=2)
