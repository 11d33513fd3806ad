"""Dequant-matmul kernels and the dispatcher that picks one.

``dequant_matmul(x, weight, bias)`` computes ``x @ W^T + bias`` for a ``QuantizedWeight``.
Today every call runs the pure-torch reference (``kernels.reference``); the Triton kernels plug in
behind ``select_backend``, which returns the backend's name and why it was chosen, so stage reports
and ``compress inspect`` can say which one ran.
"""

from __future__ import annotations

import torch

from compress.quant.qweight import QuantizedWeight

from . import reference


def select_backend(x: torch.Tensor | None = None) -> tuple[str, str]:
    """(backend name, reason) for activations like ``x``."""
    return "reference", "pure-torch dequantize + matmul (Triton kernels not built yet)"


def dequant_matmul(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return reference.dequant_matmul(x, weight, bias)


__all__ = ["dequant_matmul", "select_backend"]
