"""``compress.load(path)``: rebuild a model from any checkpoint we write, or from a GPTQ v1
checkpoint written by another tool (GPTQModel, AutoGPTQ), a compressed-tensors ``pack-quantized`` one
(llm-compressor, the ``compressed-tensors`` library), or a dense Hugging Face directory.

The model is built from ``config.json`` with parameters on the meta device, quantized layers become
``QuantLinear`` modules of the right config and shape, and the tensors are loaded with
``assign=True``. Every file listed in ``compress.json`` is checked against its sha256 first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.lowrank import LoRALinear
from compress.prune.shrink import resize_layers
from compress.quant import QuantConfig, QuantLinear, check_tensors

from ..dtypes import DTYPES
from ..errors import CheckpointError, brief
from ..targets import BASE, set_module
from .adapter_storage import restore
from .formats import FORMATS, format_named, format_of_config
from .manifest import ADAPTER_FORMAT, MANIFEST, read_manifest
from .tensors import TensorSource, load_tensors, tensor_files_present


# parts of tensor names that only our checkpoints hold outside a GPTQ config (packed codes, LoRA)
OUR_TENSOR_PARTS = (".qweight.", ".qzeros.", ".codes.", ".scale_codes.", ".scale_scales.", ".scale_offset.",
                    ".lora_A.", ".lora_B.")


@dataclass
class Layout:
    """What a checkpoint directory holds: its format, config, and each quantized module's config."""

    path: Path
    format: str  # a name of formats.FORMATS
    config: dict
    modules: dict[str, tuple[QuantConfig, tuple[int, int] | None]]
    manifest: dict | None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable JSON: {brief(err)}") from None


def refuse_adapter(path: Path, manifest: dict | None = None) -> None:
    """A PEFT adapter directory we wrote is not a model: say so instead of failing on its contents."""
    if manifest is None and (Path(path) / MANIFEST).is_file():
        manifest = read_manifest(Path(path), verify=False)
    if manifest is not None and manifest.get("format") == ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: a PEFT adapter, not a model: load its base and apply it "
                              "(compress.load_adapter, or PEFT's PeftModel.from_pretrained)")


def refuse_lost_manifest(path: Path, tensor_names: list[str] | None = None) -> None:
    """A directory without ``compress.json`` or a GPTQ config whose tensors are ones only compress
    writes (packed codes, LoRA factors inside the model) is one of our checkpoints that lost its
    manifest: nothing else says how to read those tensors, and Hugging Face would fill the layers
    it cannot find with random values. Refused as damaged."""
    if tensor_names is None:
        if not tensor_files_present(path):
            return  # no safetensors at all: not written by us
        tensor_names = TensorSource(path).names()
    ours = sorted(name for name in tensor_names if any(part in f"{name}." for part in OUR_TENSOR_PARTS))
    if ours:
        raise CheckpointError(f"{path}: damaged: it holds compress's packed tensors (e.g. {ours[0]}) but its "
                              f"{MANIFEST} is missing, so nothing says how to read them; export it again")


def read_layout(path: Path, verify: bool = True, tensor_names: list[str] | None = None) -> Layout:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    manifest = read_manifest(path, verify=verify) if (path / MANIFEST).is_file() else None
    refuse_adapter(path, manifest)
    config = _read_json(path / "config.json")
    quant = config.pop("quantization_config", None)
    if manifest is not None:
        modules = {name: (QuantConfig.from_dict(info["config"]), tuple(info["shape"]))
                   for name, info in manifest["modules"].items()}
        return Layout(path, format_named(manifest["format"], path).name, config, modules, manifest)
    fmt = format_of_config(quant, path)
    if quant is None:
        refuse_lost_manifest(path, tensor_names)
    names = (lambda: tensor_names) if tensor_names is not None else (lambda: TensorSource(path).names())
    return Layout(path, fmt.name, config, fmt.read_modules(quant, names, path), None)


def _shape_from_tensors(name: str, config: QuantConfig, tensors: dict) -> tuple[int, int]:
    try:
        return (tensors[f"{name}.scales"].shape[1], tensors[f"{name}.g_idx"].shape[0])
    except KeyError as err:
        raise CheckpointError(f"{name}: missing tensor {err.args[0]}") from None


def build_model(config: dict, modules: dict[str, tuple[QuantConfig, tuple[int, int]]],
                widths: dict | None = None) -> nn.Module:
    """The architecture of ``config`` with meta parameters, pruned per-layer ``widths`` (native
    checkpoints of non-uniformly pruned models) and QuantLinear modules in place."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"config.json: not a usable model config: {brief(err)}") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config)
    if widths:
        resize_layers(model, widths)
    for name, (qconfig, shape) in modules.items():
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{name}: no such module in a {hf_config.model_type} model") from None
        layer = QuantLinear(shape[1], shape[0], qconfig, bias=getattr(original, "bias", None) is not None,
                            device="meta")
        set_module(model, name, layer)
    return model


def load_checkpoint(path: Path, dtype: str | None = None, verify: bool = True) -> nn.Module:
    """The model stored in ``path``, in eval mode; dense tensors cast to ``dtype`` when given."""
    layout = read_layout(path, verify=verify)
    configs = {name: config for name, (config, _) in layout.modules.items()}
    tensors = FORMATS[layout.format].to_ours(load_tensors(layout.path), configs, str(layout.path))
    modules = {}
    for name, (config, shape) in layout.modules.items():
        shape = shape or _shape_from_tensors(name, config, tensors)
        subset = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        try:
            check_tensors(subset, config, shape)
        except ValueError as err:
            raise CheckpointError(f"{layout.path}: {name}: {brief(err)}") from None
        modules[name] = (config, shape)
    model = build_model(layout.config, modules, (layout.manifest or {}).get("layer_widths"))
    adapters = (layout.manifest or {}).get("adapters") or {}
    if adapters:
        tensors = restore(wrap_adapters(model, adapters, tensors, layout.path), adapters, layout.path)
    _load_state(model, tensors, layout.path)
    cast_dense(model, DTYPES[dtype] if dtype else None)
    return model.eval()


def wrap_adapters(model: nn.Module, adapters: dict[str, dict], tensors: dict, path: Path) -> dict:
    """Wrap the listed layers in LoRALinear and rename their base tensors to ``x.base_layer.*``."""
    for name, spec in adapters.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: adapter on {name}: no such module") from None
        set_module(model, name, LoRALinear(base, int(spec["rank"]), float(spec["alpha"])))
    renamed = {}
    for key, tensor in tensors.items():
        layer, _, leaf = key.rpartition(".")  # x.qweight -> x.base_layer.qweight; x.lora_A.weight stays
        renamed[f"{layer}{BASE}.{leaf}" if layer in adapters else key] = tensor
    return renamed


def is_tied_head(name: str, config) -> bool:
    """Whether a missing tensor is the output head that tied embeddings provide."""
    return name.endswith("lm_head.weight") and bool(getattr(config, "tie_word_embeddings", False))


def _load_state(model: nn.Module, tensors: dict, path: Path) -> None:
    expected = set(model.state_dict())
    tied = {name for name in expected - set(tensors) if is_tied_head(name, model.config)}
    missing, unexpected = sorted(expected - set(tensors) - tied), sorted(set(tensors) - expected)
    if missing or unexpected:
        what = [f"{len(missing)} missing (e.g. {missing[:3]})"] if missing else []
        what += [f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"] if unexpected else []
        raise CheckpointError(f"{path}: tensors do not match the model: {'; '.join(what)}")
    _refuse_misfits(model, tensors, path)
    model.load_state_dict(tensors, strict=False, assign=True)
    if tied:
        model.tie_weights()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_meta:
            raise CheckpointError(f"{path}: {name} was not loaded")


def _refuse_misfits(model: nn.Module, tensors: dict, path: Path) -> None:
    """Every tensor has its slot's shape, and is floating point where the model's is (dense weights
    are cast to the run's dtype later; packed codes were checked with their configs)."""
    expected = model.state_dict()
    for name, tensor in tensors.items():
        slot = expected[name]
        if tuple(tensor.shape) != tuple(slot.shape) or tensor.is_floating_point() != slot.is_floating_point():
            raise CheckpointError(f"{path}: {name} is {str(tensor.dtype).removeprefix('torch.')} "
                                  f"{list(tensor.shape)}, the model needs {str(slot.dtype).removeprefix('torch.')} "
                                  f"{list(slot.shape)}")


def cast_dense(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Cast dense parameters and QuantLinear biases; packed codes and scales keep their dtypes."""
    if dtype is None:
        return
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        if isinstance(module, QuantLinear) and module.bias is not None:
            module.bias = module.bias.to(dtype)
