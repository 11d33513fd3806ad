"""Safetensors files of a checkpoint: one ``model.safetensors``, or shards with an index above a size
(the Hugging Face layout: ``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``).

Whole directories go through ``save_tensors`` / ``load_tensors``; streaming stages read a few tensors at
a time (``TensorSource``) and write one shard per unit (``ShardWriter``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, brief

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 << 30


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def save_tensors(tensors: dict[str, torch.Tensor], directory: Path,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write tensors (in sorted name order) and return the file names written."""
    names = sorted(tensors)
    prepared = {n: tensors[n].detach().contiguous().cpu() for n in names}
    total = sum(_nbytes(t) for t in prepared.values())
    if total <= max_shard_bytes:
        save_file(prepared, str(directory / SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + _nbytes(prepared[name]) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(prepared[name])
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: prepared[n] for n in shard}, str(directory / file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update({n: file for n in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files + [INDEX]


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


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in tensor_files(directory):
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: cannot read safetensors (corrupt or truncated?): {brief(err)}") from None
    return tensors


class TensorSource:
    """The tensors of a checkpoint directory (one file or shards with an index), read by name."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.file_of: dict[str, Path] = {}
        for file in tensor_files(self.directory):
            try:
                with safe_open(str(file), "pt") as handle:
                    self.file_of.update({name: file for name in handle.keys()})
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{file}: cannot read safetensors (corrupt or truncated?): {brief(err)}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from its file's header (no data read)."""
        with safe_open(str(self.file_of[name]), "pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def names(self, prefix: str | None = None) -> list[str]:
        """Every tensor name, or those under ``prefix.``."""
        return [n for n in self.file_of if prefix is None or n.startswith(f"{prefix}.")]

    def read(self, names: list[str], convert=None) -> dict[str, torch.Tensor]:
        """The named tensors, each copied out of its file (opened for that tensor alone, so the
        file's pages leave the process with it) and passed through ``convert(name, tensor)``."""
        tensors = {}
        for name in names:
            file = self.file_of[name]
            try:
                with safe_open(str(file), "pt") as handle:
                    tensor = handle.get_tensor(name).clone()
            except (SafetensorError, OSError, RuntimeError) as err:
                raise CheckpointError(f"{file}: cannot read {name} (corrupt or truncated?): {brief(err)}") from None
            tensors[name] = convert(name, tensor) if convert else tensor
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
        prepared = {n: tensors[n].detach().contiguous().cpu() for n in sorted(tensors)}
        save_file(prepared, str(self.directory / file), metadata={"format": "pt"})
        self.weight_map.update({name: file for name in prepared})
        self.size += sum(t.numel() * t.element_size() for t in prepared.values())

    def finish(self) -> None:
        if self.count != self.total:
            raise ValueError(f"ShardWriter: {self.count} of {self.total} shards written")
        index = {"metadata": {"total_size": self.size}, "weight_map": self.weight_map}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
