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

from .config import QuantConfig
from .normalfloat import SCALE_TORCH_DTYPES, dequantize_nf, quantize_nf
from .packing import packed_length
from .uniform import dequantize_gptq, quantize_rtn

ROW_BLOCK = 1024  # output rows per slice of uniform quantize/dequantize (a multiple of 32)


def _concat_rows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors of row blocks (each but the last a multiple of 32 rows) joined along N."""
    return {name: parts[0][name] if name == "g_idx" else torch.cat([p[name] for p in parts], dim=1)
            for name in parts[0]}


def tensor_specs(config: QuantConfig, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor a matrix of ``shape`` stores under ``config``."""
    out_features, in_features = shape
    if config.kind == "uniform":
        groups = config.groups(in_features)
        zeros = (("zeros", (torch.float16, (groups, out_features))) if config.float_zero
                 else ("qzeros", (torch.int32, (groups, packed_length(out_features, config.bits)))))
        return {
            "qweight": (torch.int32, (packed_length(in_features, config.bits), out_features)),
            zeros[0]: zeros[1],
            "scales": (torch.float16, (groups, out_features)),
            "g_idx": (torch.int32, (in_features,)),
        }
    numel = out_features * in_features
    blocks = -(-numel // config.block)
    return {
        "codes": (torch.int32, (packed_length(numel, config.bits),)),
        "scale_codes": (torch.int32, (packed_length(blocks, config.scale_bits),)),
        "scale_scales": (SCALE_TORCH_DTYPES[config.scale_dtype], (-(-blocks // config.scale_block),)),
        "scale_offset": (torch.float32, (1,)),
    }


def check_tensors(tensors: dict[str, torch.Tensor], config: QuantConfig, shape: tuple[int, int]) -> None:
    """Raise ValueError naming the first tensor whose name, dtype or shape does not fit."""
    specs = tensor_specs(config, shape)
    missing = sorted(set(specs) - set(tensors))
    if missing:
        raise ValueError(f"missing tensor(s) {', '.join(missing)} for {config.name} {list(shape)}")
    for name, (dtype, expected) in specs.items():
        got = tensors[name]
        if got.dtype != dtype or tuple(got.shape) != expected:
            raise ValueError(f"{name} is {got.dtype} {list(got.shape)}, expected {dtype} {list(expected)} "
                             f"for {config.name} {list(shape)}")


@dataclass
class QuantizedWeight:
    """Packed tensors of one (out_features, in_features) matrix under ``config``."""

    config: QuantConfig
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def quantize(cls, weight: torch.Tensor, config: QuantConfig) -> "QuantizedWeight":
        """Round-to-nearest (uniform) or nearest-codebook (nf) quantization of a float weight.
        Uniform weights go ``ROW_BLOCK`` rows at a time (rows are independent, so the result is the
        same and the temporaries stay small)."""
        weight = weight.detach()
        if config.kind != "uniform":
            return cls(config, tuple(weight.shape), quantize_nf(weight, config))
        parts = [quantize_rtn(weight[start:start + ROW_BLOCK], config) for start in range(0, weight.shape[0], ROW_BLOCK)]
        return cls(config, tuple(weight.shape), parts[0] if len(parts) == 1 else _concat_rows(parts))

    def rows(self, start: int, end: int) -> "QuantizedWeight":
        """Output rows [start, end) of a uniform weight (``start`` a multiple of 32: whole zero words)."""
        if self.config.kind != "uniform" or start % 32:
            raise ValueError("rows: uniform weights, from a multiple of 32")
        words = slice(start * self.config.bits // 32, packed_length(end, self.config.bits))
        tensors = {name: (t[:, words] if name == "qzeros" else t if name == "g_idx" else t[:, start:end])
                   for name, t in self.tensors.items()}
        return QuantizedWeight(self.config, (end - start, self.shape[1]), tensors)

    @property
    def device(self) -> torch.device:
        """The device of the packed tensors (all on one)."""
        return next(iter(self.tensors.values())).device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in ``dtype``, on the packed tensors' device."""
        if self.config.kind != "uniform":
            return dequantize_nf(self.tensors, self.config, self.shape).to(dtype)
        out = torch.empty(self.shape, dtype=dtype, device=self.device)
        for start, block in self._row_blocks():
            out[start:start + block.shape[0]] = dequantize_gptq(block.tensors, self.config.bits, block.shape)
        return out

    def squared_error(self, weight: torch.Tensor) -> float:
        """||weight - dequantize()||² in float64, a block of rows at a time (uniform)."""
        if self.config.kind != "uniform":
            return float((self.dequantize().double() - weight.double()).square().sum())
        total = 0.0
        for start, block in self._row_blocks():
            rows = weight[start:start + block.shape[0]].double()
            total += float((dequantize_gptq(block.tensors, self.config.bits, block.shape).double() - rows).square().sum())
        return total

    def _row_blocks(self):
        for start in range(0, self.shape[0], ROW_BLOCK):
            yield start, self.rows(start, min(start + ROW_BLOCK, self.shape[0]))

    def storage_bits(self) -> int:
        return self.config.storage_bits(self.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
