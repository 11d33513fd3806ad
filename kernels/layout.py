"""Kernel layout: the packed tensors of one matrix rearranged once, at load time, for execution.

Every format ends up with its codes packed along K (= in_features) in int32 words, one column per
output feature, so a tile of rows [k0, k1) is a contiguous slice of words:

==========  =====================================  ==============================================
plane       tensor                                 code of row k, column n
==========  =====================================  ==============================================
2/4/8-bit   ``codes`` [ceil(K/32)*b, N]            (codes[k // pf, n] >> (k % pf)*b) & (2^b - 1)
3-bit       ``codes`` 2-bit plane [ceil(K/32)*2, N]  low 2 bits, pf = 16
            ``codes_hi`` 1-bit plane [ceil(K/32), N]   high bit, pf = 32
==========  =====================================  ==============================================

- uniform 2/4/8-bit: ``codes`` *is* the GPTQ ``qweight`` (no copy) and ``qzeros`` stays packed
  (v1: the stored value is zero - 1, so kernels add 1 on read); 3-bit codes are repacked into the two
  planes because the 96-bit straddling runs defeat per-word addressing. ``zeros`` [G, N] holds the
  zero points unpacked (uint8, or int16 when an 8-bit zero is 256; 3-bit kernels and the CPU path
  read it); ``zero_mode`` is 0 when every zero is
  the symmetric constant 2^(b-1) (nothing is read), 1 when kernels read ``qzeros``, 2 for ``zeros``,
  3 for float zeros (``float_zero`` configs: ``zeros`` is their fp16 [G, N] tensor, read as fp32).
- nf: the row-major flattened codes are repacked into the same K-major planes; the per-block scales
  stay double-quantized (``scale_codes`` unpacked to uint8 [B], second-level ``scale_scales`` as fp32,
  the fp32 ``scale_offset``) and are dequantized on the fly as in ``quant.normalfloat``.

Derived once here for the GPU GEMV/GEMM kernels (``triton_weights``), which read each scale and zero
once per group and column and dequantize with one FMA:

- ``zero_folded`` (uniform with zero_mode 1-3): fp32 [G, N] ``-z * s``, exact (z has at most 9
  significant bits, s 11); symmetric grids fold ``-2^(b-1) * s`` in the kernel;
- ``nf_scales`` fp16 [K / nf_group, N]: NF block scales with the double quantization undone, one row
  per ``nf_group = gcd(K, block)`` rows, so that each row of it covers rows of W^T inside one block
  of every column (``K % block == 0``: one row per block).

3-bit codes keep two planes (2-bit + 1-bit) for every kernel: each plane is whole 32-bit words per 16
or 32 rows, so a tile of 32 rows is three word loads per column with no straddling runs, and the
unpacking is the same shift-and-mask as for the 2/4/8-bit planes.

The layout is derived data, built in quant (``quant.kernel_layout``, from ``QuantizedWeight.kernel_weight``):
checkpoints keep the published formats, ``QuantLinear`` caches the layout next to its buffers, and
kernels see only this type (they never import quant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

@dataclass
class KernelWeight:
    """One matrix in kernel layout (see the module docstring)."""

    bits: int
    shape: tuple[int, int]  # (out_features N, in_features K)
    codes: torch.Tensor
    codes_hi: torch.Tensor | None = None
    # uniform
    scales: torch.Tensor | None = None  # fp16 [G, N]
    qzeros: torch.Tensor | None = None  # GPTQ v1 packed (zero - 1) [G, ceil(N/32)*b]
    zeros: torch.Tensor | None = None  # uint8 (int16 if any zero is 256; fp16 in zero_mode 3) [G, N]
    zero_mode: int = 0
    group_size: int = 0  # rows per group when groups are contiguous (partial last group allowed)
    g_idx: torch.Tensor | None = None  # int32 [K] when groups are not contiguous (act order)
    # nf
    lut: torch.Tensor | None = None  # fp32 [2^b]
    scale_codes: torch.Tensor | None = None  # uint8 [B]
    scale_scales: torch.Tensor | None = None  # fp32 [ceil(B / scale_block)]
    scale_offset: torch.Tensor | None = None  # fp32 [1]
    block: int = 0
    scale_block: int = 0
    scale_levels: int = 0
    zero_folded: torch.Tensor | None = None  # fp32 [G, N]: -z * s (uniform, zero_mode 1-3)
    nf_scales: torch.Tensor | None = None  # fp16 [K / nf_group, N]
    nf_group: int = 0
    # CPU fast paths' own layouts (or why a path cannot take this matrix), built on first use
    fast: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.codebook and self.nf_scales is None:
            self.nf_group, self.nf_scales = nf_row_scales(self)

    @property
    def codebook(self) -> bool:
        """Codes index a lookup table (NF) rather than an affine grid (uniform: (q - z) * s)."""
        return self.lut is not None

    @property
    def label(self) -> str:
        """What the matrix holds, for messages: ``nf4``, ``uniform3``."""
        return f"{'nf' if self.codebook else 'uniform'}{self.bits}"

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def groups(self) -> int:
        return 0 if self.scales is None else self.scales.shape[0]


def nf_row_scales(weight: KernelWeight, dtype: torch.dtype = torch.float16) -> tuple[int, torch.Tensor]:
    """(rows per scale row, [K / rows, N] in ``dtype``) of an NF matrix's block scales (see the docstring)."""
    out_features, in_features = weight.shape
    rows = math.gcd(in_features, weight.block)
    starts = torch.arange(0, in_features, rows, device=weight.device)
    blocks = (torch.arange(out_features, device=weight.device).view(1, -1) * in_features + starts.view(-1, 1)) // weight.block
    return rows, nf_block_scales(weight, blocks).to(dtype)


def nf_block_scales(weight: KernelWeight, blocks: torch.Tensor) -> torch.Tensor:
    """fp32 block scales for block indices of any shape (double quantization undone)."""
    codes = weight.scale_codes[blocks].float()
    second = weight.scale_scales[torch.div(blocks, weight.scale_block, rounding_mode="floor")]
    return codes * (second / weight.scale_levels) + weight.scale_offset


def row_groups(weight: KernelWeight, pad: int = 32) -> tuple[int, torch.Tensor | None] | str:
    """(rows per group, row order or None) of a uniform matrix for kernels that need contiguous,
    equal groups: act order sorted by group (x is gathered in the same order), a single group padded to
    whole multiples of ``pad`` rows; or why there is no such form (act-order groups of unequal sizes)."""
    if weight.g_idx is None:
        return (weight.group_size, None) if weight.groups > 1 else (-(-weight.shape[1] // pad) * pad, None)
    order = torch.argsort(weight.g_idx.long(), stable=True)
    counts = torch.bincount(weight.g_idx.long(), minlength=weight.groups)
    size = int(counts[0])
    if bool((counts[:-1] != size).any()) or int(counts[-1]) > size:
        return "act-order groups of unequal sizes"
    return size, order
