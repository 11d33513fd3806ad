"""``compress inspect``: what a checkpoint stores, module by module, and its bits per parameter.

``bits_per_param`` counts what the papers count over the quantized linear layers: codes, scales
and zero points (asymmetric only: a symmetric zero is a constant the format merely repeats),
and for NF the scale codes, second-level scales and offset. ``bits_per_param_total`` divides every
stored byte (embeddings, norms, g_idx, ...) by every parameter of the model. ``engines`` says which
inference engines load the checkpoint, with which kernel, and what stops the others (the format's
``verdicts``, on the rules of ``engines.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from compress.quant import QuantConfig

from ..dtypes import code_bytes
from .formats import FORMATS, Format
from .load import read_layout, refuse_adapter
from .tensors import TensorSource


def _tensor_meta(source: TensorSource) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape), read from the headers only."""
    return {name: (source.dtype_code(name), source.shape(name)) for name in source.names()}


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * code_bytes(dtype)


def _dense_linear_bits(dense: list[dict]) -> float:
    """Bits per weight of the dense linear layers inside decoder layers (a dense checkpoint)."""
    linears = [d for d in dense if ".layers." in d["name"] and d["name"].endswith(".weight")
               and len(d["shape"]) == 2]
    params = sum(d["params"] for d in linears)
    return 8 * sum(d["bytes"] for d in linears) / params if params else 0.0


def _module_row(name: str, config: QuantConfig, shape, meta: dict, source: TensorSource, fmt: Format) -> dict:
    tensors = {k.removeprefix(f"{name}."): v for k, v in meta.items() if k.startswith(f"{name}.")}
    shape = shape or fmt.stored_shape(name, tensors, source)
    fmt.check_stored(name, config, shape, tensors)
    counted = fmt.counted(config, tensors)
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
    fmt = FORMATS[layout.format]
    rows = [_module_row(name, config, shape, meta, source, fmt)
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
        "engines": fmt.engines(rows),
    }

