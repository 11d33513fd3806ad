"""Safetensors files, read and written by one small I/O stack for every stage and source.

A checkpoint holds one ``model.safetensors``, or shards with an index above a size (the Hugging
Face layout: ``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``). Whole
directories go through ``save_tensors`` / ``load_tensors``; streamed sources read a few tensors at a
time (``TensorSource``) and write one shard per unit (``ShardWriter``).

The format is simple enough to handle directly, which keeps memory exact: a file is an 8-byte
little-endian header length, a JSON header ``{"__metadata__": {...}, name: {"dtype", "shape",
"data_offsets": [begin, end]}}`` padded with spaces to a multiple of 8, then the tensors' bytes.
Writing streams each tensor's bytes from its own memory (no second copy of a shard), in the order
the ``safetensors`` library itself writes (dtype width first, then name: ``dtypes.WRITE_RANK``), so a file
written here is byte for byte the library's ``save_file`` of the same tensors (tests/test_shards.py
holds us to that). Reading checks what the library checks (offsets contiguous, the data exactly
fills the file) and copies one tensor's bytes straight into its destination, cast to a wider dtype
in slices of ``CHUNK_BYTES`` when asked.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..dtypes import CODES, SAFETENSORS, WRITE_RANK
from ..errors import CheckpointError, brief

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 << 30
CHUNK_BYTES = 16 << 20


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def read_header(path: Path) -> tuple[dict, int]:
    """(header without metadata, offset of the data) of a safetensors file; CheckpointError if it is
    not one, or if its tensors do not exactly fill the file (truncated or damaged)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if 8 + length > size:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        _check_layout(header, size - 8 - length)
    except (OSError, struct.error, ValueError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged?): "
                              f"{brief(err)}") from None
    return header, 8 + length


def _check_layout(header: dict, data_bytes: int) -> None:
    """Every entry a known dtype whose bytes hold its shape, the entries back to back from 0 to the
    end of the file."""
    end = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = entry["data_offsets"]
        if entry["dtype"] not in SAFETENSORS:
            raise ValueError(f"{name}: unknown dtype {entry['dtype']!r}")
        items = 1
        for dim in entry["shape"]:
            items *= int(dim)
        if begin != end or stop - begin != items * SAFETENSORS[entry["dtype"]].itemsize:
            raise ValueError(f"{name}: data_offsets {[begin, stop]} do not hold shape {entry['shape']}")
        end = stop
    if end != data_bytes:
        raise ValueError(f"the tensors hold {end} bytes, the file {data_bytes}")


def read_tensor(path: Path, entry: dict, start: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of a file (its header ``entry``), in ``dtype`` when given (converted slice by slice
    into its place)."""
    stored, shape = SAFETENSORS[entry["dtype"]], tuple(entry["shape"])
    begin, _ = entry["data_offsets"]
    out = torch.empty(shape, dtype=dtype or stored)
    flat = out.view(-1)
    per_item = stored.itemsize
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


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> int:
    """Write ``tensors`` as one safetensors file, laid out as the library lays it out; returns the
    data bytes. ``metadata``: the header's ``__metadata__`` (default ``{"format": "pt"}``, as
    transformers and PEFT write it; ``{}``: none, as the library's ``save_file`` without metadata).
    An I/O failure (a full disk) is an OSError naming the file."""
    names = sorted(tensors, key=lambda name: (WRITE_RANK[CODES[tensors[name].dtype]], name))
    metadata = {"format": "pt"} if metadata is None else metadata
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        size = _nbytes(tensors[name])
        header[name] = {"dtype": CODES[tensors[name].dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    try:
        with open(path, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)) + text)
            for name in names:
                data = tensors[name].detach().contiguous().cpu().view(-1)
                handle.write(memoryview(data.view(torch.uint8).numpy()))
    except OSError as err:
        raise OSError(err.errno, f"cannot write: {err.strerror}", str(path)) from None
    return offset


def save_tensors(tensors: dict[str, torch.Tensor], directory: Path,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write tensors (shards filled in sorted name order) and return the file names written."""
    names = sorted(tensors)
    total = sum(_nbytes(tensors[n]) for n in names)
    if total <= max_shard_bytes:
        write_safetensors(directory / SINGLE, tensors)
        return [SINGLE]
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + _nbytes(tensors[name]) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(tensors[name])
    writer = ShardWriter(directory, len(shards))
    for shard in shards:
        writer.write({n: tensors[n] for n in shard})
    writer.finish()
    return writer.files + [INDEX]


class ShardWriter:
    """Writes a checkpoint's tensors one shard per ``write`` (``model-00003-of-00026.safetensors``)
    and, at ``finish``, the Hugging Face index that maps each tensor to its shard."""

    def __init__(self, directory: Path, total: int):
        self.directory, self.total = Path(directory), total
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []
        self.size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        if len(self.files) == self.total:
            raise ValueError(f"ShardWriter: all {self.total} shards are written")
        file = f"model-{len(self.files) + 1:05d}-of-{self.total:05d}.safetensors"
        self.size += write_safetensors(self.directory / file, tensors)
        self.files.append(file)
        self.weight_map.update({name: file for name in tensors})

    def finish(self) -> None:
        if len(self.files) != self.total:
            raise ValueError(f"ShardWriter: {len(self.files)} of {self.total} shards written")
        index = {"metadata": {"total_size": self.size}, "weight_map": self.weight_map}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def tensor_files_present(directory: Path) -> bool:
    directory = Path(directory)
    return (directory / INDEX).is_file() or (directory / SINGLE).is_file()


def tensor_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{directory / INDEX}: unreadable shard index: {brief(err)}") from None
        return [directory / f for f in sorted(set(weight_map.values()))]
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX}")


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

    def dtype_code(self, name: str) -> str:
        """The tensor's safetensors dtype (``"F32"``, ``"I32"``, ...)."""
        return self.entries[name][1]["dtype"]

    def names(self, prefix: str | None = None) -> list[str]:
        """Every tensor name, or those under ``prefix.``."""
        return [n for n in self.entries if prefix is None or n.startswith(f"{prefix}.")]

    def read(self, names: list[str], dtype_for=None) -> dict[str, torch.Tensor]:
        """The named tensors; ``dtype_for(name, stored dtype)`` picks each one's dtype in memory."""
        tensors = {}
        for name in names:
            file, entry, start = self.entries[name]
            dtype = dtype_for(name, SAFETENSORS[entry["dtype"]]) if dtype_for else None
            tensors[name] = read_tensor(file, entry, start, dtype)
        return tensors


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, as stored."""
    header, start = read_header(path)
    return {name: read_tensor(path, entry, start) for name, entry in header.items()}


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, as stored."""
    return {name: tensor for path in tensor_files(directory) for name, tensor in read_safetensors(path).items()}
