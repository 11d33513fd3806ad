"""QuantizedWeight: the packed tensors of one matrix, its config and its shape.

The tensors of each family, with their exact shapes (K = in_features, N = out_features,
G = ceil(K / group), b = bits):

=========  ==============  =========  =======================================================
family     name            dtype      shape
=========  ==============  =========  =======================================================
uniform    qweight         int32      [ceil(K/32)*b, N]   GPTQ v1: codes packed along K
uniform    qzeros          int32      [G, ceil(N/32)*b]   zero - 1 packed along N
uniform    scales          float16    [G, N]
uniform    g_idx           int32      [K]                 group of each input row
float0     zeros           float16    [G, N]              in place of qzeros (``float_zero``)
nf         codes           int32      [ceil(N*K/32)*b]    row-major flattened codes
nf         scale_codes     int32      [ceil(B/32)*sb]     B = ceil(N*K/block) block scales
nf         scale_scales    scale_dt   [ceil(B/scale_block)]
nf         scale_offset    float32    [1]
=========  ==============  =========  =======================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.kernels.layout import KernelWeight

from .config import QuantConfig


def check_tensors(tensors: dict[str, torch.Tensor], config: QuantConfig, shape: tuple[int, int]) -> None:
    """Raise ValueError naming the first tensor whose name, dtype or shape does not fit."""
    specs = config.tensor_specs(shape)
    missing = sorted(set(specs) - set(tensors))
    if missing:
        raise ValueError(f"missing tensor(s) {', '.join(missing)} for {config.name} {list(shape)}")
    for name, (dtype, expected) in specs.items():
        got = tensors[name]
        if got.dtype != dtype or tuple(got.shape) != expected:
            raise ValueError(f"{name} is {got.dtype} {list(got.shape)}, expected {dtype} {list(expected)} "
                             f"for {config.name} {list(shape)}")


def _concat_rows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors of row blocks (each but the last a multiple of 32 rows) joined along N (every
    family with a ``row_block`` stores per-row tensors as [..., N] and ``g_idx`` once)."""
    return {name: parts[0][name] if name == "g_idx" else torch.cat([p[name] for p in parts], dim=1)
            for name in parts[0]}


@dataclass
class QuantizedWeight:
    """Packed tensors of one (out_features, in_features) matrix under ``config``."""

    config: QuantConfig
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def quantize(cls, weight: torch.Tensor, config: QuantConfig) -> "QuantizedWeight":
        """The config's rounding of a float weight (uniform: to the group's grid; nf: to the nearest
        codebook value). Families whose rows are independent go ``config.row_block`` rows at a time
        (the result is the same and the temporaries stay small)."""
        weight = weight.detach()
        step = config.row_block or weight.shape[0]
        parts = [config.quantize(weight[start:start + step]) for start in range(0, weight.shape[0], step)]
        return cls(config, tuple(weight.shape), parts[0] if len(parts) == 1 else _concat_rows(parts))

    def rows(self, start: int, end: int) -> "QuantizedWeight":
        """Output rows [start, end) (uniform weights, ``start`` a multiple of 32: whole zero words)."""
        return QuantizedWeight(self.config, (end - start, self.shape[1]), self.config.slice_rows(self.tensors, start, end))

    @property
    def device(self) -> torch.device:
        """The device of the packed tensors (all on one)."""
        return next(iter(self.tensors.values())).device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in ``dtype``, on the packed tensors' device."""
        if self.config.row_block is None:
            return self.config.dequantize(self.tensors, self.shape).to(dtype)
        out = torch.empty(self.shape, dtype=dtype, device=self.device)
        for start, block in self._row_blocks():
            out[start:start + block.shape[0]] = self.config.dequantize(block.tensors, block.shape)
        return out

    def squared_error(self, weight: torch.Tensor) -> float:
        """||weight - dequantize()||² in float64, a block of rows at a time where rows are independent."""
        total = 0.0
        for start, block in self._row_blocks():
            rows = weight[start:start + block.shape[0]].double()
            total += float((block.config.dequantize(block.tensors, block.shape).double() - rows).square().sum())
        return total

    def _row_blocks(self):
        if self.config.row_block is None:
            yield 0, self
            return
        for start in range(0, self.shape[0], self.config.row_block):
            yield start, self.rows(start, min(start + self.config.row_block, self.shape[0]))

    def kernel_weight(self) -> KernelWeight:
        """The kernel layout of this matrix (a one-time cost when a layer is loaded)."""
        return self.config.kernel_weight(self.tensors, self.shape)

    def storage_bits(self) -> int:
        return self.config.storage_bits(self.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
