"""What every checkpoint writer shares (``formats/*.py``: one class per format): the model's state
with ties stored once and adapter bases unwrapped, config.json, the manifest's module and adapter
entries, the tensors written whole or shard by shard, and the dense copy of a packed model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from compress.lowrank import LoRALinear, merge_adapters, set_module
from compress.prune.shrink import layer_widths
from compress.quant import QuantLinear

from ..errors import CheckpointError
from ..targets import layer_name, stored_name
from .tensors import ShardWriter, save_tensors

Shards = tuple[int, Iterator[dict[str, torch.Tensor]]]


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """QuantLinear layers by layer name (a base wrapped by a LoRA adapter counts under the layer's name)."""
    return {layer_name(name): m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def adapter_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def describe_adapters(model: nn.Module, dtype: str | None = None) -> dict[str, dict]:
    """Manifest entries of the adapters: rank, alpha, shape and (``adapter_storage``) stored dtype."""
    extra = {"dtype": dtype} if dtype else {}
    return {name: {"rank": m.rank, "alpha": m.alpha, "in_features": m.in_features, "out_features": m.out_features,
                   **extra} for name, m in adapter_modules(model).items()}


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (the first name keeps them) and adapter bases
    unwrapped (``x.base_layer.qweight`` is stored as ``x.qweight``; ``x.lora_A.weight`` stays)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        state[stored_name(name)] = tensor
    return state


def dense_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def config_dict(model: nn.Module) -> dict:
    """The model's config.json: engines pick the model class from ``architectures``; private keys
    (``_name_or_path`` would leak a local path) are dropped."""
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(dense_dtype(model)).removeprefix("torch.")
    config["tie_word_embeddings"] = _tied(model)
    return config


def _tied(model: nn.Module) -> bool:
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return outputs is not None and isinstance(outputs, nn.Linear) and outputs.weight is inputs.weight


def describe_modules(model: nn.Module) -> dict[str, dict]:
    return {name: {"config": m.config.to_dict(), "shape": list(m.shape), "bias": m.bias is not None}
            for name, m in quantized_modules(model).items()}


def write_common(model: nn.Module, staging: Path, config: dict, tokenizer, max_shard_bytes: int,
                  shards: Shards | None = None, convert=None) -> None:
    """Tensors (the model's state, or ``shards`` of a streamed model: (count, iterator of tensor
    dicts), one file each; each passed through ``convert`` when given), config.json, generation
    config, tokenizer."""
    convert = convert or (lambda tensors: tensors)
    if shards is None:
        save_tensors(convert(model_state(model)), staging, max_shard_bytes)
    else:
        writer = ShardWriter(staging, shards[0])
        for tensors in shards[1]:
            writer.write(convert(tensors))
            del tensors  # before the producer moves on: a unit's tensors must not outlive it
        writer.finish()
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        (staging / "generation_config.json").write_text(generation.to_json_string(use_diff=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)


def pruned_widths(model: nn.Module) -> dict:
    """Per-layer widths of a non-uniformly pruned model ({} when every layer matches the config)."""
    try:
        return layer_widths(model)
    except (ValueError, AttributeError):  # not a Llama-family layout: nothing was pruned by us
        return {}


def refuse_pruned_widths(model: nn.Module, fmt: str) -> None:
    widths = pruned_widths(model)
    if widths:
        raise CheckpointError(f"export format {fmt}: layers {', '.join(map(str, sorted(widths)))} have pruned widths "
                              "that differ from the others (non-uniform pruning); config.json cannot describe them: "
                              "export native, or prune with uniform: true")


def dense_copy(model: nn.Module) -> nn.Module:
    """A deep copy in which every LoRA adapter is merged and every QuantLinear is replaced by the
    nn.Linear it dequantizes to."""
    import copy

    clone = copy.deepcopy(model)
    dtype = dense_dtype(model)
    merge_adapters(clone, dtype)  # base + scaling * B @ A
    for name, layer in quantized_modules(clone).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(layer.dequantize(dtype), requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.to(dtype), requires_grad=False)
        set_module(clone, name, linear)
    return clone
