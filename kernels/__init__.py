"""Dequant-matmul kernels and the dispatcher that picks one.

``dequant_matmul(x, weight, bias)`` computes ``x @ W^T + bias`` for a packed matrix in kernel layout
(``KernelWeight``, the one type kernels share with quant: quant builds it, ``QuantizedWeight.kernel_weight``,
and layers cache it; kernels never import quant). A ``QuantizedWeight`` is taken too, through that method:

- ``triton``: fused unpack + dequant + matmul kernels (``triton_*.py``), for CUDA tensors when Triton
  is installed (CPU tensors too under ``TRITON_INTERPRET=1``, which tests use);
- ``native``: our AVX512-BF16 / AMX CPU kernel (``cpu_native.py``), for bf16/fp16 activations on the CPU;
- ``int4pack``: torch's int4 CPU kernel (``cpu_int4pack.py``), where ``native`` cannot run (no
  AVX512-BF16, no compiler) and the grid has at most 16 levels;
- ``reference``: the pure-torch tiled path (``reference.py``): fp32 activations on the CPU (it is exact
  to fp32 summation order; the fast paths round activations to bf16), and everything else.

``COMPRESS_KERNEL`` chooses: ``auto`` (the default, as above), ``fast`` (the CPU fast paths for fp32
activations too; a recipe's ``kernel: fast`` sets it for its run, ``preferring``), or one backend by name. Forcing a backend where it cannot run is an error, never a
silent fallback. ``select_backend`` returns the name and the reason; stage reports and ``compress
inspect`` show them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from . import cpu_fast, reference
from .layout import KernelWeight

BACKENDS = ("auto", "fast", "triton", "native", "int4pack", "reference")
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels take
HALF = (torch.float16, torch.bfloat16)


class KernelUnavailableError(RuntimeError):
    """COMPRESS_KERNEL asks for a backend that cannot run here."""


def forced_backend() -> str:
    choice = os.environ.get("COMPRESS_KERNEL", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise KernelUnavailableError(f"COMPRESS_KERNEL={choice!r} is not one of {', '.join(BACKENDS)}")
    return choice


@contextlib.contextmanager
def preferring(choice: str):
    """``COMPRESS_KERNEL=choice`` for the duration (a recipe's ``kernel: fast``), unless the environment
    already names a backend, which wins; restored afterwards."""
    if choice == "auto" or forced_backend() != "auto":
        yield
        return
    before = os.environ.get("COMPRESS_KERNEL")
    os.environ["COMPRESS_KERNEL"] = choice
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("COMPRESS_KERNEL", None)
        else:
            os.environ["COMPRESS_KERNEL"] = before


@functools.lru_cache(maxsize=1)  # a fact about the installation, looked up on every forward
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_choice(choice: str, device: torch.device) -> tuple[str, str]:
    runnable = triton_installed() and (device.type == "cuda" or _interpreting())
    if choice == "triton":
        if not triton_installed():
            raise KernelUnavailableError("COMPRESS_KERNEL=triton but triton is not installed "
                                         "(pip install 'compress[triton]')")
        if not runnable:
            raise KernelUnavailableError(f"COMPRESS_KERNEL=triton but activations are on {device}: Triton "
                                         "needs a CUDA device (or TRITON_INTERPRET=1 to interpret on CPU)")
        return "triton", "COMPRESS_KERNEL=triton"
    if choice in cpu_fast.BACKENDS:
        raise KernelUnavailableError(f"COMPRESS_KERNEL={choice} is a CPU kernel; activations are on {device}")
    if triton_installed():
        return "triton", "CUDA device with Triton installed"
    return "reference", "triton is not installed"


def _cpu_choice(choice: str, dtype: torch.dtype | None, weight: KernelWeight | None) -> tuple[str, str]:
    if choice in cpu_fast.BACKENDS:
        usable, why = cpu_fast.status(choice, weight)
        if not usable:
            raise KernelUnavailableError(f"COMPRESS_KERNEL={choice} but {why}")
        return choice, f"COMPRESS_KERNEL={choice}"
    if dtype is None and choice == "auto":  # a report without activations: say what each dtype gets
        return "reference", ("cpu: bf16/fp16 activations through the CPU fast path (native, else int4pack), "
                             "fp32 through the exact tiled path")
    if dtype not in HALF and choice == "auto":
        return "reference", "fp32 activations on cpu: the exact tiled path (COMPRESS_KERNEL=fast rounds them to bf16)"
    reasons = []
    for name in cpu_fast.BACKENDS:
        usable, why = cpu_fast.status(name, weight)
        if usable:
            return name, f"cpu fast path: {why}"
        reasons.append(f"{name}: {why}")
    return "reference", "cpu, no fast path (" + "; ".join(reasons) + "): tiled pure-torch path"


def select_backend(device: torch.Tensor | torch.device | str | None = None, dtype: torch.dtype | None = None,
                   weight: KernelWeight | None = None) -> tuple[str, str]:
    """(backend, reason) for activations on ``device`` (a tensor, whose dtype then counts too; a
    device; or None: the default device, CUDA when present) of ``dtype``, times ``weight`` if given."""
    if isinstance(device, torch.Tensor):
        dtype = dtype or device.dtype
        device = device.device
    elif device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device)
    choice = forced_backend()
    if weight is not None:  # a layer's choice, made on every forward: cached with the matrix
        key = ("choice", device, dtype, choice, choice == "triton" and _interpreting())
        if key not in weight.fast:
            weight.fast[key] = _choose(choice, device, dtype, weight)
        return weight.fast[key]
    return _choose(choice, device, dtype, None)


def _choose(choice: str, device: torch.device, dtype: torch.dtype | None, weight: KernelWeight | None) -> tuple[str, str]:
    if choice == "reference":
        return "reference", "COMPRESS_KERNEL=reference"
    if device.type == "cuda" or choice == "triton":
        return _triton_choice(choice, device)
    return _cpu_choice(choice, dtype, weight)


def dequant_matmul(x: torch.Tensor, weight,
                   bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` in x's dtype, through ``backend`` (default: ``select_backend(x, weight=...)``);
    ``weight`` a ``KernelWeight`` or anything with ``kernel_weight()`` (a ``QuantizedWeight``)."""
    layout = weight if isinstance(weight, KernelWeight) else weight.kernel_weight()
    backend = backend or select_backend(x, weight=layout)[0]
    if backend == "triton" and x.dtype not in ACTIVATION_DTYPES and forced_backend() == "auto":
        backend = "reference"  # e.g. float64 activations: only the reference path computes them
    if backend == "triton":
        from .triton_launch import custom_op_call

        out = custom_op_call(x, layout)
        return out if bias is None else out + bias.to(out.dtype)
    if backend in cpu_fast.BACKENDS and x.dtype in ACTIVATION_DTYPES:
        return cpu_fast.matmul(x, layout, bias, backend)
    return reference.dequant_matmul(x, layout, bias)


__all__ = ["BACKENDS", "KernelUnavailableError", "KernelWeight", "dequant_matmul", "preferring",
           "select_backend"]
