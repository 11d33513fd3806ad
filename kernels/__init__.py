"""Dequant-matmul kernels and the dispatcher that picks one.

``dequant_matmul(x, weight, bias)`` computes ``x @ W^T + bias`` for a packed matrix (a
``QuantizedWeight``, or its ``KernelWeight`` layout from ``prepare``, which layers cache):

- ``triton``: fused unpack + dequant + matmul kernels (``triton_*.py``), for CUDA tensors when Triton
  is installed (CPU tensors too under ``TRITON_INTERPRET=1``, which tests use);
- ``reference``: the pure-torch tiled path (``reference.py``), everywhere else.

``COMPRESS_KERNEL=triton|reference`` forces one (``auto``, the default, chooses as above); forcing
Triton where it cannot run is an error, never a silent fallback. ``select_backend`` returns the name
and the reason; stage reports and ``compress inspect`` show them.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from compress.quant.qweight import QuantizedWeight

from . import reference
from .layout import KernelWeight, prepare

BACKENDS = ("auto", "triton", "reference")
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels take


class KernelUnavailableError(RuntimeError):
    """COMPRESS_KERNEL asks for a backend that cannot run here."""


def forced_backend() -> str:
    choice = os.environ.get("COMPRESS_KERNEL", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise KernelUnavailableError(f"COMPRESS_KERNEL={choice!r} is not one of {', '.join(BACKENDS)}")
    return choice


@functools.lru_cache(maxsize=1)  # a fact about the installation, looked up on every forward
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(device: torch.Tensor | torch.device | str | None = None) -> tuple[str, str]:
    """(backend, reason) for activations on ``device`` (a tensor, a device, or None: the default
    device this process would use, CUDA when present)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    choice = forced_backend()
    if choice == "reference":
        return "reference", "COMPRESS_KERNEL=reference"
    runnable = triton_installed() and (device.type == "cuda" or _interpreting())
    if choice == "triton":
        if not triton_installed():
            raise KernelUnavailableError("COMPRESS_KERNEL=triton but triton is not installed "
                                         "(pip install 'compress[triton]')")
        if not runnable:
            raise KernelUnavailableError(f"COMPRESS_KERNEL=triton but activations are on {device}: Triton "
                                         "needs a CUDA device (or TRITON_INTERPRET=1 to interpret on CPU)")
        return "triton", "COMPRESS_KERNEL=triton"
    if device.type == "cuda" and triton_installed():
        return "triton", "CUDA device with Triton installed"
    if device.type == "cuda":
        return "reference", "triton is not installed"
    return "reference", f"no CUDA device ({device.type}): tiled pure-torch path"


def dequant_matmul(x: torch.Tensor, weight: QuantizedWeight | KernelWeight,
                   bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` in x's dtype, through ``backend`` (default: ``select_backend(x)``)."""
    layout = weight if isinstance(weight, KernelWeight) else prepare(weight)
    backend = backend or select_backend(x)[0]
    if backend == "triton" and x.dtype not in ACTIVATION_DTYPES and forced_backend() == "auto":
        backend = "reference"  # e.g. float64 activations: only the reference path computes them
    if backend == "triton":
        from .triton_launch import custom_op_call

        out = custom_op_call(x, layout)
        return out if bias is None else out + bias.to(out.dtype)
    return reference.dequant_matmul(x, layout, bias)


__all__ = ["BACKENDS", "KernelUnavailableError", "KernelWeight", "dequant_matmul", "prepare", "select_backend"]
