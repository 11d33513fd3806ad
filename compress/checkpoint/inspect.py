"""``compress inspect``: what a checkpoint stores, module by module, and its bits per parameter.

``bits_per_param`` counts what the papers count over the quantized linear layers: codes, scales
and zero points (asymmetric only: a symmetric zero is a constant the format merely repeats),
and for NF the scale codes, second-level scales and offset. ``bits_per_param_total`` divides every
stored byte (embeddings, norms, g_idx, ...) by every parameter of the model. ``engines`` says which
inference engines load the checkpoint, with which kernel, and what stops the others (``engines.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from compress.quant import QuantConfig

from ..errors import CheckpointError
from . import compressed_tensors as ct
from .engines import engine_verdicts
from .load import read_layout, refuse_adapter
from .tensors import TensorSource

BYTES_PER = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "U8": 1, "I8": 1, "F64": 8, "BOOL": 1}
FLOATS = ("F16", "BF16", "F32", "F64")
SAFETENSORS_DTYPES = {torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def _tensor_meta(source: TensorSource) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape), read from the headers only."""
    return {name: (source.dtype_code(name), source.shape(name)) for name in source.names()}


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * BYTES_PER.get(dtype, 4)


def _dense_linear_bits(dense: list[dict]) -> float:
    """Bits per weight of the dense linear layers inside decoder layers (a dense checkpoint)."""
    linears = [d for d in dense if ".layers." in d["name"] and d["name"].endswith(".weight")
               and len(d["shape"]) == 2]
    params = sum(d["params"] for d in linears)
    return 8 * sum(d["bytes"] for d in linears) / params if params else 0.0


def _check_stored(name: str, config: QuantConfig, shape, tensors: dict) -> None:
    """The stored tensors are what ``config`` says (a checkpoint without its manifest is described by
    its config.json alone, which may be wrong): the answer comes from the tensors, or there is none."""
    for leaf, (dtype, expected) in config.tensor_specs(shape).items():
        got = tensors.get(leaf)
        if got is None:
            raise CheckpointError(f"{name}: missing tensor {leaf} for {config.name} {list(shape)}")
        if got[0] != SAFETENSORS_DTYPES[dtype] or got[1] != expected:
            raise CheckpointError(f"{name}.{leaf} is {got[0]} {list(got[1])}, but {config.name} {list(shape)} stores "
                                  f"{SAFETENSORS_DTYPES[dtype]} {list(expected)}: the tensors do not hold what the "
                                  "checkpoint's config says")


def _check_stored_ct(name: str, config: QuantConfig, shape, tensors: dict) -> None:
    """As ``_check_stored``, for a compressed-tensors module (its scales may be any float dtype)."""
    for leaf, (dtype, expected) in ct.stored_specs(config, shape).items():
        got = tensors.get(leaf)
        if got is None:
            raise CheckpointError(f"{name}: missing tensor {leaf} for {config.name} {list(shape)}")
        if (dtype or got[0]) != got[0] or got[1] != expected or (dtype is None and got[0] not in FLOATS):
            raise CheckpointError(f"{name}.{leaf} is {got[0]} {list(got[1])}, but {config.name} {list(shape)} stores "
                                  f"{dtype or 'a float'} {list(expected)}: the tensors do not hold what the "
                                  "checkpoint's config says")


def _stored_shape(name: str, tensors: dict, source: TensorSource, ct_format: bool) -> tuple[int, int]:
    """A module's (out, in) from its tensors, when the manifest does not give it."""
    if ct_format:
        if "weight_shape" not in tensors:
            raise CheckpointError(f"{name}: packed weights without weight_shape")
        values = source.read([f"{name}.weight_shape"])[f"{name}.weight_shape"]
        return tuple(int(v) for v in values.tolist())
    if "scales" not in tensors or "g_idx" not in tensors:
        raise CheckpointError(f"{name}: packed weights without scales and g_idx")
    return (tensors["scales"][1][1], tensors["g_idx"][1][0])


def _module_row(name: str, config: QuantConfig, shape, meta: dict, source: TensorSource, fmt: str) -> dict:
    tensors = {k.removeprefix(f"{name}."): v for k, v in meta.items() if k.startswith(f"{name}.")}
    shape = shape or _stored_shape(name, tensors, source, fmt == ct.FORMAT)
    if fmt == ct.FORMAT:
        _check_stored_ct(name, config, shape, tensors)
        counted = [t for t in ct.COUNTED if t in tensors]
    else:
        _check_stored(name, config, shape, tensors)
        counted = [t for t in config.counted_tensors if t in tensors]
    row = {"name": name, "format": config.kind, "config": config.name, "bits": config.bits,
           "shape": list(shape), "params": shape[0] * shape[1],
           "bytes": sum(_nbytes(*v) for v in tensors.values()),
           "counted_bits": 8 * sum(_nbytes(*tensors[t]) for t in counted)}
    row.update({key: value for key, value in asdict(config).items() if key != "bits"})
    return row


def inspect_checkpoint(path: Path, verify: bool = True) -> dict:
    refuse_adapter(Path(path))
    source = TensorSource(Path(path))
    meta = _tensor_meta(source)
    layout = read_layout(path, verify=verify, tensor_names=list(meta))
    rows = [_module_row(name, config, shape, meta, source, layout.format)
            for name, (config, shape) in sorted(layout.modules.items())]
    owned = {k for r in rows for k in meta if k.startswith(r["name"] + ".")}
    dense = [{"name": k, "format": "dense", "dtype": v[0], "shape": list(v[1]), "params": math.prod(v[1]),
              "bytes": _nbytes(*v)} for k, v in sorted(meta.items()) if k not in owned]
    quantized_params = sum(r["params"] for r in rows)
    params = quantized_params + sum(d["params"] for d in dense)
    total_bytes = sum(_nbytes(*v) for v in meta.values())
    from compress.kernels import select_backend

    backend, reason = select_backend()
    return {
        "path": str(path), "format": layout.format, "bytes": total_bytes, "params": params,
        "quantized_params": quantized_params,
        "bits_per_param": (sum(r["counted_bits"] for r in rows) / quantized_params) if rows
        else _dense_linear_bits(dense),
        "bits_per_param_total": 8 * total_bytes / params if params else 0.0,
        "kernel": backend, "kernel_reason": reason, "modules": rows + dense,
        "engines": engine_verdicts(layout.format, rows),
    }

