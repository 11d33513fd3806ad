"""The run's own checkpoints (the model after each stage in ``.stages/``, loram's caches): written
in the native format, which holds anything a stage leaves (NF layers, adapters, per-layer widths),
and read back with ``load_checkpoint``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .formats import FORMATS
from .load import load_checkpoint


def save_model(model: nn.Module, directory: Path, shards=None) -> dict:
    """Write ``model`` (or a streamed model's ``shards``) to ``directory`` atomically; returns its manifest."""
    return FORMATS["native"].write(model, directory, shards=shards)


__all__ = ["load_checkpoint", "save_model"]
