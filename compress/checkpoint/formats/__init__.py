"""Checkpoint formats as objects: one file and one class per format (its writer, what its reader
needs beyond our own layout, its checks of stored tensors, the problems that stop it holding a
model, and which engines load it), and ``FORMATS``, the one registry that export, load, inspect and
streaming read. Adding a format is one file here and one entry below."""

from __future__ import annotations

from pathlib import Path

from ...errors import CheckpointError
from .base import Format
from .compressed_tensors import CompressedTensors
from .gptq import GPTQ
from .hf import HF
from .native import Native

FORMATS: dict[str, Format] = {f.name: f for f in (GPTQ(), Native(), HF(), CompressedTensors())}
"""Name -> format, in the order recipes list them (``export: {format: ...}``)."""
FORMAT_NAMES = tuple(FORMATS)


def fuses_projections(recipe) -> bool:
    """Whether the recipe exports a format whose engines fuse q/k/v and gate/up (each group then
    needs one config: quantizing stages give them the most precise of theirs)."""
    return any(FORMATS[e.config.format].fuses_projections for e in recipe.stages if e.name == "export")


def format_named(name: str, path: Path) -> Format:
    """The format a manifest names; CheckpointError for one this version does not know."""
    if name not in FORMATS:
        raise CheckpointError(f"{path}: compress.json names format {name!r}, not one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_of_config(quant: dict | None, path: Path) -> Format:
    """The format of a checkpoint without a manifest, from its config.json ``quantization_config``
    (none: a dense Hugging Face directory)."""
    if quant is None:
        return FORMATS["hf"]
    method = quant.get("quant_method")
    found = next((f for f in FORMATS.values() if f.quant_method is not None and f.quant_method == method), None)
    if found is None:
        readable = ", ".join(f.quant_method for f in FORMATS.values() if f.quant_method)
        raise CheckpointError(f"{path}: quant_method {method!r} is not supported "
                              f"(compress reads {readable} and its own checkpoints)")
    return found


__all__ = ["FORMATS", "FORMAT_NAMES", "Format", "format_named", "format_of_config", "fuses_projections"]
