"""LoRA adapters as a standard PEFT adapter directory, and PEFT over our packed layers.

A PEFT LoRA adapter is ``adapter_config.json`` (a ``LoraConfig``) plus ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``. Our ``LoRALinear`` uses
PEFT's names and scaling (alpha / r), so the tensors are written unchanged; ranks or alphas that differ
between modules go to ``rank_pattern`` / ``alpha_pattern``.

``load_peft_adapter(model, path)`` is ``PeftModel.from_pretrained`` with one addition: PEFT does not
know our ``QuantLinear``, so ``QuantLoraLinear`` (a PEFT ``LoraLayer`` that computes
``base(x) + scaling * B(A(dropout(x)))``, as PEFT's own GPTQ layer does) is registered for it through
PEFT's custom-module dispatch. Dense bases need nothing extra.

Beside PEFT's two files we write our ``compress.json`` (format ``peft``: the sha256 of each file), which
PEFT and engines ignore: it lets a rerun know the directory is ours to replace, and the loader catch
a damaged file.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from compress import __version__
from compress.lowrank import LoRALinear, set_module
from compress.quant import QuantLinear

from ..errors import CheckpointError
from .adapter_storage import stored_tensors
from .atomic import atomic_directory
from .manifest import ADAPTER_FORMAT, MANIFEST, read_manifest, write_manifest
from .tensors import write_safetensors
from .write import adapter_modules

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@contextmanager
def adapters_detached(model: nn.Module) -> Iterator[dict[str, LoRALinear]]:
    """Within the block every ``LoRALinear`` is replaced by its base layer (the model holds the base
    alone); on exit the adapters are put back. Yields the detached adapters by module name."""
    layers = adapter_modules(model)
    for name, layer in layers.items():
        set_module(model, name, layer.base_layer)
    try:
        yield layers
    finally:
        for name, layer in layers.items():
            set_module(model, name, layer)


def lora_config(layers: dict[str, LoRALinear], base_model: str | None) -> LoraConfig:
    ranks, alphas = Counter(m.rank for m in layers.values()), Counter(m.alpha for m in layers.values())
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    dropout = {m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0 for m in layers.values()}
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(layers), lora_dropout=max(dropout),
                      bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                      rank_pattern={n: m.rank for n, m in layers.items() if m.rank != rank},
                      alpha_pattern={n: m.alpha for n, m in layers.items() if m.alpha != alpha})


def write_peft_adapter(layers: dict[str, LoRALinear], directory: Path, base_model: str | None = None,
                       adapter_dtype: str | None = None) -> Path:
    """Write ``layers``' adapters (module name -> LoRALinear) as a PEFT adapter directory, atomically,
    stored as ``adapter_dtype`` says (``adapter_storage``: NF8 as its values in fp32)."""
    if not layers:
        raise CheckpointError(f"{directory}: the model carries no LoRA adapters to write")
    tensors = {}
    for name, layer in layers.items():
        if layer.merged:
            raise CheckpointError(f"{name}: adapter is merged into its base; unmerge it before writing")
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    with atomic_directory(Path(directory)) as staging:
        lora_config(layers, base_model).save_pretrained(str(staging))
        _sort_target_modules(staging / "adapter_config.json")
        write_safetensors(staging / WEIGHTS, stored_tensors(tensors, adapter_dtype, peft=True))
        write_manifest(staging, {"format": ADAPTER_FORMAT, "compress_version": __version__,
                                 **({"adapter_dtype": adapter_dtype} if adapter_dtype else {})})
    return Path(directory)


def _sort_target_modules(path: Path) -> None:
    """PEFT keeps target_modules as a set and writes it in hash order, which changes from process to
    process; sorted, the same adapter always gives the same bytes."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class QuantLoraLinear(nn.Module, LoraLayer):
    """PEFT's LoRA layer over a ``QuantLinear`` base (no merging: the base is packed)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            update = lora_B(lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype))))
            result = (result + update * self.scaling[name]).to(result.dtype)
        return result


def read_adapter_config(path: Path) -> LoraConfig:
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path}: not a PEFT adapter (needs {CONFIG} and {WEIGHTS})")
    try:
        return LoraConfig.from_pretrained(str(path))
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}/{CONFIG}: {err}") from None


def load_peft_adapter(model: nn.Module, path: Path, trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained(model, path)`` that also handles our packed ``QuantLinear`` bases
    (an adapter we wrote is checked against its manifest first)."""
    if (Path(path) / MANIFEST).is_file():
        read_manifest(Path(path), verify=True)
    config = read_adapter_config(path)
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    with warnings.catch_warnings():  # PEFT warns about any layer type it does not know, ours included
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return PeftModel.from_pretrained(model, str(path), config=config, is_trainable=trainable)
