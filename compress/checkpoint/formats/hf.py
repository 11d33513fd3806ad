"""``hf``: a plain dense Hugging Face checkpoint, every quantized layer dequantized and every LoRA
adapter merged; any loader reads it. Its reload is close to the packed model, not equal (the
dequantized weights are rounded to the model's dtype)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from compress import __version__

from ...model_state import ModelState, Problem
from ..atomic import atomic_directory
from ..engines import Verdict, compress_verdict
from ..manifest import write_manifest
from ..tensors import DEFAULT_SHARD_BYTES
from ..write import config_dict, dense_copy, refuse_pruned_widths, write_common
from .base import UNEVEN, Format


class HF(Format):
    name = "hf"
    adapter_modes = ("peft", "merge")
    exact_reload = False
    stream_refusal = "format hf dequantizes the whole model; export gptq or native"

    def write(self, model: nn.Module, directory: Path, tokenizer=None, recipe: dict | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, shards=None, adapter_dtype: str | None = None) -> dict:
        refuse_pruned_widths(model, self.name)
        dense = dense_copy(model)
        with atomic_directory(directory) as staging:
            write_common(dense, staging, config_dict(dense), tokenizer, max_shard_bytes)
            return write_manifest(staging, {"format": self.name, "compress_version": __version__,
                                            "modules": {}, "recipe": recipe})

    def problems(self, state: ModelState) -> list[Problem]:
        return [Problem(UNEVEN, state.uneven_widths_by)] if state.uneven_widths_by else []

    def read_modules(self, quant: dict, names, path: Path) -> dict:
        return {}

    def verdicts(self, rows: list[dict]) -> list[Verdict]:
        return [Verdict(engine, True, kernel="dense") for engine in ("vllm", "vllm-cpu", "gptqmodel", "transformers")] \
            + [compress_verdict(rows)]
