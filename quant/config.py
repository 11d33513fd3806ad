"""Quantization configurations: one frozen dataclass per family, each answering for its own storage
cost, tensors, round trip and kernel layout. Code elsewhere asks a config; it never branches on
the family.

- ``UniformConfig``: group-wise affine integers along the input dimension (GPTQ layout): ``bits``
  in {2, 3, 4, 8}, ``group_size`` weights per fp16 scale (``-1`` = one group per output channel),
  ``sym`` (symmetric: the zero point is the constant 2^(bits-1) and is not counted as storage),
  ``float_zero`` (asymmetric with an fp16 zero point per group instead of a packed integer one: what
  L4Q learns; the ``native`` format only, since GPTQ stores integer zeros).
- ``NFConfig``: NormalFloat codebook (QLoRA / LQ-LoRA) over row-major blocks of ``block`` weights,
  with the per-block absmax scales themselves quantized to ``scale_bits`` unsigned integers in groups
  of ``scale_block``, whose scales are stored in ``scale_dtype`` (double quantization).

Bits per parameter, as the papers count them (codes + scales + zeros):

    uniform: bits + 16 / group + (bits / group if asym)      int4 g128 asym = 4.15625
             (16 / group for an fp16 zero instead)           int4 g128 float zero = 4.25
    nf:      bits + scale_bits / block + dtype_bits / (block * scale_block)
             NF4, 8-bit scales over 64, fp32 over 256 = 4.127

``components(shape)`` is the one storage formula: the exact bits of each stored tensor of a real
matrix, padding to whole int32 words included; ``storage_bits`` is their sum, ``compress plan`` reads
the components. ``QuantConfig.uniform(...)`` / ``.nf(...)`` / ``.from_dict(...)`` build either family.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from compress.kernels.layout import KernelWeight

from .kernel_layout import affine_layout, codebook_layout
from .normalfloat import SCALE_TORCH_DTYPES, dequantize_nf, quantize_nf
from .packing import packed_length
from .uniform import dequantize_gptq, quantize_rtn

SUPPORTED_BITS = (2, 3, 4, 8)
UNIFORM_SCALE_BITS = 16  # GPTQ stores fp16 scales
PACK_WORD_CODES = 32  # codes are bit-stream packed in runs of 32 (b int32 words per run)
ROW_BLOCK = 1024  # output rows per slice of uniform quantize/dequantize (a multiple of 32)


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class QuantConfig:
    """One matrix's quantization configuration (the base of ``UniformConfig`` and ``NFConfig``)."""

    kind: ClassVar[str]  # the recipe's and the manifest's ``type``
    row_block: ClassVar[int | None] = None  # rows per slice when rows quantize independently
    bits: int

    @staticmethod
    def uniform(bits: int, group_size: int = 128, sym: bool = False, float_zero: bool = False) -> UniformConfig:
        return UniformConfig(bits, group_size, sym, float_zero)

    @staticmethod
    def nf(bits: int, block: int = 64, scale_bits: int = 8, scale_block: int = 256,
           scale_dtype: str = "float32") -> NFConfig:
        return NFConfig(bits, block, scale_bits, scale_block, scale_dtype)

    @staticmethod
    def from_dict(d: dict) -> QuantConfig:
        d = dict(d)
        kind = d.pop("type", d.pop("kind", "uniform"))
        if kind not in FAMILIES:
            raise ValueError(f"type: {kind!r} is not one of {', '.join(FAMILIES)}")
        return FAMILIES[kind](**d)

    def replace(self, **changes) -> QuantConfig:
        return replace(self, **changes)

    def storage_bits(self, shape: tuple[int, int]) -> int:
        """Exact bits stored for an (out_features, in_features) matrix, padding included: the sum of
        ``components``; equal to the bytes of the packed tensors times 8 (zeros of symmetric grids,
        which are constants, and ``g_idx`` not counted)."""
        return sum(self.components(shape).values())

    def shape_problem(self, shape: tuple[int, int]) -> str | None:
        """Why a matrix of ``shape`` cannot take this config, or None."""
        return None

    def slice_rows(self, tensors: dict[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
        raise ValueError("rows: uniform weights, from a multiple of 32")


def _check_bits(bits: int, field: str = "bits") -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{field}: {bits} is not one of 2, 3, 4, 8")


@dataclass(frozen=True)
class UniformConfig(QuantConfig):
    """Group-wise affine integers (see the module docstring)."""

    kind: ClassVar[str] = "uniform"
    row_block: ClassVar[int | None] = ROW_BLOCK
    bits: int
    group_size: int = 128
    sym: bool = False
    float_zero: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size} must be -1 (per channel) or positive")
        if self.float_zero and self.sym:
            raise ValueError("float_zero: a symmetric config has no zero point to store")

    @property
    def name(self) -> str:
        group = "ch" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits}-{group}-{'sym' if self.sym else 'fzero' if self.float_zero else 'asym'}"

    def to_dict(self) -> dict:
        fields = {"type": "uniform", "bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        return {**fields, "float_zero": True} if self.float_zero else fields

    @property
    def segment(self) -> int:
        """Weights that share one scale (``group_size``; -1 for a whole input row)."""
        return self.group_size

    def group_for(self, in_features: int) -> int:
        """Rows per group for a matrix of ``in_features`` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    def groups(self, in_features: int) -> int:
        """Number of scale groups along the input dimension."""
        return -(-in_features // self.group_for(in_features))

    def divides(self, in_features: int) -> bool:
        """Whether the groups tile ``in_features`` exactly (no partial last group)."""
        return in_features % self.group_for(in_features) == 0

    @property
    def counted_tensors(self) -> tuple[str, ...]:
        """The stored tensors ``components`` counts (a symmetric grid's constant zeros and ``g_idx`` are not)."""
        return ("qweight", "scales") + (() if self.sym else ("zeros",) if self.float_zero else ("qzeros",))

    def shape_problem(self, shape: tuple[int, int]) -> str | None:
        if self.group_size > shape[1]:
            return (f"group_size {self.group_size} is larger than in_features={shape[1]}, "
                    "use -1 for one group per output channel")
        return None

    @property
    def bits_per_param(self) -> float:
        """Nominal bits per weight for shapes that divide evenly. Per-channel scales cost
        16 / in_features, which depends on the shape: use ``storage_bits`` for a real matrix."""
        if self.group_size == -1:
            return float(self.bits)
        zeros = 0.0 if self.sym else (UNIFORM_SCALE_BITS if self.float_zero else self.bits) / self.group_size
        return self.bits + UNIFORM_SCALE_BITS / self.group_size + zeros

    def components(self, shape: tuple[int, int]) -> dict[str, int]:
        """Bits of codes, fp16 scales, zero points (packed integers, or fp16) of an [out, in] matrix."""
        out_features, in_features = shape
        groups = self.groups(in_features)
        zeros = (0 if self.sym else groups * out_features * UNIFORM_SCALE_BITS if self.float_zero
                 else groups * _padded(out_features, PACK_WORD_CODES) * self.bits)
        return {"codes": _padded(in_features, PACK_WORD_CODES) * self.bits * out_features,
                "scales": groups * out_features * UNIFORM_SCALE_BITS, "zeros": zeros, "second_level": 0}

    def tensor_specs(self, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) of every tensor stored (see ``quant.qweight``)."""
        out_features, in_features = shape
        groups = self.groups(in_features)
        zeros = (("zeros", (torch.float16, (groups, out_features))) if self.float_zero
                 else ("qzeros", (torch.int32, (groups, packed_length(out_features, self.bits)))))
        return {"qweight": (torch.int32, (packed_length(in_features, self.bits), out_features)),
                zeros[0]: zeros[1], "scales": (torch.float16, (groups, out_features)),
                "g_idx": (torch.int32, (in_features,))}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Round-to-nearest tensors of a float weight [N, K]."""
        return quantize_rtn(weight, self)

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return dequantize_gptq(tensors, self.bits, shape)

    def slice_rows(self, tensors: dict[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
        """The tensors of output rows [start, end) (``start`` a multiple of 32: whole zero words)."""
        if start % PACK_WORD_CODES:
            raise ValueError("rows: uniform weights, from a multiple of 32")
        words = slice(start * self.bits // 32, packed_length(end, self.bits))
        return {name: (t[:, words] if name == "qzeros" else t if name == "g_idx" else t[:, start:end])
                for name, t in tensors.items()}

    def kernel_weight(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> KernelWeight:
        return affine_layout(tensors, self.bits, shape)


@dataclass(frozen=True)
class NFConfig(QuantConfig):
    """NormalFloat codes with double-quantized block scales (see the module docstring)."""

    kind: ClassVar[str] = "nf"
    bits: int
    block: int = 64
    scale_bits: int = 8
    scale_block: int = 256
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.block < 1 or self.scale_block < 1:
            raise ValueError("block and scale_block must be positive")
        _check_bits(self.scale_bits, "scale_bits")
        if self.scale_dtype not in SCALE_TORCH_DTYPES:
            raise ValueError(f"scale_dtype: {self.scale_dtype!r} is not one of {', '.join(SCALE_TORCH_DTYPES)}")

    @property
    def name(self) -> str:
        return f"nf{self.bits}-b{self.block}-s{self.scale_bits}x{self.scale_block}-{self.scale_dtype}"

    def to_dict(self) -> dict:
        return {"type": "nf", "bits": self.bits, "block": self.block, "scale_bits": self.scale_bits,
                "scale_block": self.scale_block, "scale_dtype": self.scale_dtype}

    @property
    def segment(self) -> int:
        """Weights that share one scale (``block``, along the flattened matrix)."""
        return self.block

    def divides(self, in_features: int) -> bool:
        return True  # blocks run over the flattened matrix

    @property
    def counted_tensors(self) -> tuple[str, ...]:
        return ("codes", "scale_codes", "scale_scales", "scale_offset")

    @property
    def _scale_dtype_bits(self) -> int:
        return SCALE_TORCH_DTYPES[self.scale_dtype].itemsize * 8

    @property
    def bits_per_param(self) -> float:
        return self.bits + self.scale_bits / self.block + self._scale_dtype_bits / (self.block * self.scale_block)

    def components(self, shape: tuple[int, int]) -> dict[str, int]:
        """Bits of codes, block-scale codes, and the second level (scales of scales + fp32 offset)."""
        numel = shape[0] * shape[1]
        blocks = -(-numel // self.block)
        return {"codes": _padded(numel, PACK_WORD_CODES) * self.bits,
                "scales": _padded(blocks, PACK_WORD_CODES) * self.scale_bits, "zeros": 0,
                "second_level": -(-blocks // self.scale_block) * self._scale_dtype_bits + 32}

    def tensor_specs(self, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        numel = shape[0] * shape[1]
        blocks = -(-numel // self.block)
        return {"codes": (torch.int32, (packed_length(numel, self.bits),)),
                "scale_codes": (torch.int32, (packed_length(blocks, self.scale_bits),)),
                "scale_scales": (SCALE_TORCH_DTYPES[self.scale_dtype], (-(-blocks // self.scale_block),)),
                "scale_offset": (torch.float32, (1,))}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Nearest-codebook tensors of a float weight [N, K]."""
        return quantize_nf(weight, self)

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return dequantize_nf(tensors, self, shape)

    def kernel_weight(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> KernelWeight:
        return codebook_layout(tensors, self, shape)


FAMILIES: dict[str, type[QuantConfig]] = {"uniform": UniformConfig, "nf": NFConfig}
