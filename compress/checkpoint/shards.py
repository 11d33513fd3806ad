"""Safetensors shards read and written a few tensors at a time, for streaming stages.

The format is simple enough to handle directly, which keeps memory exact: a file is an 8-byte
little-endian header length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}`` padded with spaces to a multiple of 8, then the tensors' bytes. Reading
copies one tensor's bytes straight into its destination (cast to a wider dtype in slices of
``CHUNK_BYTES``), so nothing is mapped and no second copy exists; writing streams each tensor's bytes
from its own memory. Files written here are ordinary safetensors files: the ``safetensors`` library,
``transformers`` and GPTQModel read them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError
from .tensors import INDEX, tensor_files

CHUNK_BYTES = 16 << 20
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {dtype: code for code, dtype in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """(header without metadata, offset of the data) of a safetensors file; CheckpointError if it is
    not one, or if a tensor's bytes would lie past the end of the file (truncated)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if 8 + length > size:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__})") from None
    header.pop("__metadata__", None)
    start = 8 + length
    for name, entry in header.items():
        if entry.get("dtype") not in DTYPES or start + entry["data_offsets"][1] > size:
            raise CheckpointError(f"{path}: {name}: unknown dtype or data past the end of the file (truncated?)")
    return header, start


def read_tensor(path: Path, entry: dict, start: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of a file, in ``dtype`` when given (converted slice by slice into its place)."""
    stored, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    out = torch.empty(shape, dtype=dtype or stored)
    flat = out.view(-1)
    per_item = torch.empty((), dtype=stored).element_size()
    if end - begin != flat.numel() * per_item:
        raise CheckpointError(f"{path}: {end - begin} bytes cannot hold a tensor of shape {list(shape)}")
    items = max(1, CHUNK_BYTES // per_item)
    with open(path, "rb") as handle:
        handle.seek(start + begin)
        if out.dtype == stored:
            _read_exact(handle, flat.view(torch.uint8), path)
            return out
        buffer = torch.empty(min(items, flat.numel()) * per_item, dtype=torch.uint8)
        for first in range(0, flat.numel(), items):
            count = min(items, flat.numel() - first)
            chunk = buffer[: count * per_item]
            _read_exact(handle, chunk, path)
            flat[first:first + count] = chunk.view(stored)
    return out


def _read_exact(handle, target: torch.Tensor, path: Path) -> None:
    view = memoryview(target.numpy()).cast("B")
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{path}: ends early (truncated)")
        done += got


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write ``tensors`` (in the given order) as one safetensors file; returns the data bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for tensor in tensors.values():
            handle.write(memoryview(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()))
    return offset


class TensorSource:
    """The tensors of a checkpoint directory (one file or shards with an index), read by name."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for file in tensor_files(self.directory):
            header, start = read_header(file)
            self.entries.update({name: (file, entry, start) for name, entry in header.items()})

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def names(self, prefix: str | None = None) -> list[str]:
        """Every tensor name, or those under ``prefix.``."""
        return [n for n in self.entries if prefix is None or n.startswith(f"{prefix}.")]

    def read(self, names: list[str], dtype_for=None) -> dict[str, torch.Tensor]:
        """The named tensors; ``dtype_for(name, stored dtype)`` picks each one's dtype in memory."""
        tensors = {}
        for name in names:
            file, entry, start = self.entries[name]
            dtype = dtype_for(name, DTYPES[entry["dtype"]]) if dtype_for else None
            tensors[name] = read_tensor(file, entry, start, dtype)
        return tensors


class ShardWriter:
    """Writes a checkpoint's tensors one shard per ``write`` (``model-00003-of-00026.safetensors``)
    and, at ``finish``, the Hugging Face index that maps each tensor to its shard."""

    def __init__(self, directory: Path, total: int):
        self.directory, self.total = Path(directory), total
        self.weight_map: dict[str, str] = {}
        self.size, self.count = 0, 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.count == self.total:
            raise ValueError(f"ShardWriter: all {self.total} shards are written")
        self.count += 1
        file = f"model-{self.count:05d}-of-{self.total:05d}.safetensors"
        self.size += write_safetensors(self.directory / file, {n: tensors[n] for n in sorted(tensors)})
        self.weight_map.update({name: file for name in tensors})

    def finish(self) -> None:
        if self.count != self.total:
            raise ValueError(f"ShardWriter: {self.count} of {self.total} shards written")
        index = {"metadata": {"total_size": self.size}, "weight_map": self.weight_map}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
