"""Pure-torch dequant-matmul: the oracle for every kernel and the CPU execution path.

Imports nothing from Triton. ``y = x @ W^T + bias`` where W is dequantized in fp32 from the
packed tensors (``QuantizedWeight.dequantize``) and cast to the activation dtype.
"""

from __future__ import annotations

import torch

from compress.quant.qweight import QuantizedWeight


def dequant_matmul(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    dense = weight.dequantize(torch.float32).to(x.dtype)
    return torch.nn.functional.linear(x, dense, None if bias is None else bias.to(x.dtype))
