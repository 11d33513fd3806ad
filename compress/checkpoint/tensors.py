"""Safetensors files of a checkpoint: one ``model.safetensors``, or shards with an index above a size
(the Hugging Face layout: ``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``).

Whole directories go through ``save_tensors`` / ``load_tensors``; streaming stages read and write a few
tensors at a time (``shards.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
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
        _save_file(prepared, directory / SINGLE)
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
        _save_file({n: prepared[n] for n in shard}, directory / file)
        files.append(file)
        weight_map.update({n: file for n in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files + [INDEX]


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' writer, its I/O failures (a full disk) raised as OSError naming the file."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as err:
        raise OSError(0, f"cannot write: {brief(err)}", str(path)) from None


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


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in tensor_files(directory):
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: cannot read safetensors (corrupt or truncated?): {brief(err)}") from None
    return tensors
