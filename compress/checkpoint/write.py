"""Writing checkpoints: ``native`` (anything we can hold), ``gptq`` (GPTQ v1), ``compressed-tensors``
(pack-quantized: what vLLM serves at 2-8 bits) and ``hf`` (dense, every quantized layer dequantized).
All writes are atomic and carry a manifest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from compress import __version__
from compress.lowrank import LoRALinear, merge_adapters, set_module
from compress.prune.shrink import layer_widths
from compress.quant import QuantLinear

from ..errors import CheckpointError
from .adapter_storage import stored_tensors
from .atomic import atomic_directory
from . import compressed_tensors as ct
from .gptq import gptq_problems, quantization_config
from .manifest import write_manifest
from .tensors import DEFAULT_SHARD_BYTES, ShardWriter, save_tensors

FORMATS = ("gptq", "native", "hf", ct.FORMAT)
INTEGER_FORMATS = ("gptq", ct.FORMAT)  # packed uniform integers only, fused q/k/v and gate/up alike
Shards = tuple[int, Iterator[dict[str, torch.Tensor]]]


BASE = ".base_layer"  # LoRALinear keeps its base here; checkpoints store the base under the layer's name


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """QuantLinear layers by layer name (a base wrapped by a LoRA adapter counts under the layer's name)."""
    return {name.removesuffix(BASE): m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


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
        state[name.replace(BASE + ".", ".")] = tensor
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


def _write_common(model: nn.Module, staging: Path, config: dict, tokenizer, max_shard_bytes: int,
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


def _refuse_pruned_widths(model: nn.Module, fmt: str) -> None:
    widths = pruned_widths(model)
    if widths:
        raise CheckpointError(f"export format {fmt}: layers {', '.join(map(str, sorted(widths)))} have pruned widths "
                              "that differ from the others (non-uniform pruning); config.json cannot describe them: "
                              "export native, or prune with uniform: true")


def write_native(model: nn.Module, directory: Path, tokenizer=None, recipe: dict | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, shards: Shards | None = None,
                 adapter_dtype: str | None = None) -> dict:
    """Any mix of dense, uniform and NF layers, with their configs in ``compress.json`` (and the
    per-layer widths of a non-uniformly pruned model). ``shards``: the tensors of a streamed model
    (whose ``model`` is a skeleton), written as they come. Embedded LoRA adapters are stored as
    ``adapter_dtype`` says (``adapter_storage``)."""
    convert = (lambda tensors: stored_tensors(tensors, adapter_dtype)) if adapter_dtype else None
    with atomic_directory(directory) as staging:
        _write_common(model, staging, config_dict(model), tokenizer, max_shard_bytes, shards, convert)
        return write_manifest(staging, {"format": "native", "compress_version": __version__, "modules":
                                        describe_modules(model), "adapters": describe_adapters(model, adapter_dtype),
                                        "layer_widths": pruned_widths(model), "recipe": recipe})


def _layer_linears(model: nn.Module) -> list[str]:
    """Names of dense Linear layers inside decoder layers (GPTQ loaders would expect them quantized)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{name}"]


def _integer_modules(model: nn.Module, fmt: str, problems_of) -> dict[str, QuantLinear]:
    """The quantized layers of a model that format ``fmt`` (GPTQ, compressed-tensors: packed
    integers, the base alone) must hold; CheckpointError naming the first that it cannot."""
    modules = quantized_modules(model)
    if not modules:
        raise CheckpointError(f"export format {fmt}: the model has no quantized layers "
                              "(add a quantize stage before export)")
    adapters = adapter_modules(model)
    if adapters:
        raise CheckpointError(f"export format {fmt}: {len(adapters)} layers carry LoRA adapters "
                              f"(e.g. {next(iter(adapters))}); {fmt} holds the quantized base only: export "
                              "native, or hf to merge them")
    _refuse_pruned_widths(model, fmt)
    problems = problems_of({name: m.config for name, m in modules.items()}, {name: m.shape for name, m in modules.items()})
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"export format {fmt}: {problems[0]}{more}")
    return modules


def write_gptq(model: nn.Module, directory: Path, tokenizer=None, recipe: dict | None = None,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, shards: Shards | None = None) -> dict:
    """GPTQ v1 with per-module ``dynamic`` bits; fails before writing if a module does not fit.
    ``shards`` as for ``write_native``."""
    modules = _integer_modules(model, "gptq", gptq_problems)
    configs = {name: m.config for name, m in modules.items()}
    num_layers = getattr(model.config, "num_hidden_layers", 0)
    lm_head = any(name.endswith("lm_head") for name in modules)
    quant = quantization_config(configs, _layer_linears(model), num_layers, lm_head)
    config = dict(config_dict(model), quantization_config=quant)
    with atomic_directory(directory) as staging:
        _write_common(model, staging, config, tokenizer, max_shard_bytes, shards)
        (staging / "quantize_config.json").write_text(json.dumps(quant, indent=2, sort_keys=True) + "\n")
        return write_manifest(staging, {"format": "gptq", "compress_version": __version__,
                                        "modules": describe_modules(model), "recipe": recipe})


def write_compressed_tensors(model: nn.Module, directory: Path, tokenizer=None, recipe: dict | None = None,
                            max_shard_bytes: int = DEFAULT_SHARD_BYTES, shards: Shards | None = None) -> dict:
    """compressed-tensors ``pack-quantized`` (``checkpoint/compressed_tensors.py``): the packed
    tensors converted module by module as they are written; fails before writing if a module does
    not fit. ``shards`` as for ``write_native``."""
    modules = _integer_modules(model, ct.FORMAT, ct.ct_problems)
    layout = {name: (m.config, m.shape) for name, m in modules.items()}
    quant = ct.quantization_config({name: m.config for name, m in modules.items()}, _dense_linears(model),
                                   getattr(model.config, "num_hidden_layers", 0))
    config = dict(config_dict(model), quantization_config=quant)
    with atomic_directory(directory) as staging:
        _write_common(model, staging, config, tokenizer, max_shard_bytes, shards,
                      convert=lambda tensors: ct.convert_state(tensors, layout))
        return write_manifest(staging, {"format": ct.FORMAT, "compress_version": __version__,
                                        "modules": describe_modules(model), "recipe": recipe})


def _dense_linears(model: nn.Module) -> list[str]:
    """Every dense Linear, the head included (compressed-tensors lists what it does not quantize)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


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


def write_hf(model: nn.Module, directory: Path, tokenizer=None, recipe: dict | None = None,
             max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """A plain dense Hugging Face checkpoint (quantized layers dequantized); any loader reads it."""
    _refuse_pruned_widths(model, "hf")
    dense = dense_copy(model)
    with atomic_directory(directory) as staging:
        _write_common(dense, staging, config_dict(dense), tokenizer, max_shard_bytes)
        return write_manifest(staging, {"format": "hf", "compress_version": __version__,
                                        "modules": {}, "recipe": recipe})


WRITERS = {"gptq": write_gptq, "native": write_native, "hf": write_hf, ct.FORMAT: write_compressed_tensors}
