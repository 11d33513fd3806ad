"""Pure-torch dequant-matmul: the CPU execution path and the oracle the Triton kernels are tested against.

Imports nothing from Triton. ``y = x @ W^T + bias`` is computed tile by tile over K (rows of W^T), so
at most one tile of the weight is ever dequantized (about ``TILE_ELEMENTS`` weights):

1. unpack the tile's codes to uint8 in natural row order, byte-wise: the int32 words of a K-major
   plane are viewed as bytes (little-endian: byte b of word w holds rows w*pf + b*(8/bits) + i) and
   split with shifts on uint8 — a quarter of the memory traffic of int32 shifts;
2. inside the tile, rows form *segments* that share one scale (uniform: a group; nf: a block). For
   small batches (M < segment length) the scale is applied after the product,
   ``y += sum_s scale_s * (x_s @ Q_s) - (sum x_s) * zero_s * scale_s``, so the tile is never scaled
   element-wise; for larger M the tile is dequantized and multiplied (fp32 throughout);
3. at batch 1, formats where it measured faster (``TABLE_BATCH``) skip unpacking altogether and use
   per-byte lookup tables (``lut_gemv``).

Tiles that do not split into equal segments (act-order ``g_idx``, a partial last group, nf blocks that
straddle rows) fall back to a per-row gather of the scales; results are the same, only slower.
``dequantize_rows`` reproduces ``QuantizedWeight.dequantize`` bit for bit (same operations, same order).
"""

from __future__ import annotations

import math
import sys

import torch

from . import lut_gemv
from .layout import KernelWeight, nf_block_scales

TILE_ELEMENTS = 1 << 21  # weights dequantized at once: 8 MiB in fp32, cache-sized on current CPUs
ROW_ALIGN = 32  # a tile starts on a word boundary of every plane
# Batches up to this size go through per-byte lookup tables (lut_gemv), by (codebook, bits): NF4 and
# NF2, int3 and int2; the thresholds are where tables measured faster than unpacking
# (benchmarks/kernel_speed.py).
TABLE_BATCH = {(True, 4): 1, (True, 2): 2, (False, 3): 1, (False, 2): 1}

if sys.byteorder != "little":  # the byte view of packed words assumes little-endian storage
    raise ImportError("kernels.reference needs a little-endian machine")


def unpack_plane_rows(plane: torch.Tensor, bits: int, start: int, stop: int) -> torch.Tensor:
    """uint8 codes [stop - start, N] of rows [start, stop) of a K-major plane (start % 32 == 0)."""
    columns = plane.shape[1]
    first, last = start * bits // 32, -(-stop // 32) * bits
    raw = plane[first:last].contiguous().view(torch.uint8).view(last - first, columns, 4).transpose(1, 2)
    if bits == 8:
        codes = raw.contiguous()
    else:
        mask = (1 << bits) - 1
        fields = [(raw >> (bits * i)) & mask if i else raw & mask for i in range(8 // bits)]
        codes = torch.stack(fields, dim=2)
    return codes.view(-1, columns)[: stop - start]


def unpack_rows(weight: KernelWeight, start: int, stop: int) -> torch.Tensor:
    """uint8 codes [stop - start, N] of rows [start, stop) of W^T."""
    if weight.codes_hi is None:
        return unpack_plane_rows(weight.codes, weight.bits, start, stop)
    low = unpack_plane_rows(weight.codes, 2, start, stop)
    return low | (unpack_plane_rows(weight.codes_hi, 1, start, stop) << 2)


def _zeros(weight: KernelWeight, groups: torch.Tensor | slice) -> torch.Tensor:
    """Zero points of the given groups ([G', N]): int16, or fp32 for float zeros (zero_mode 3)."""
    if weight.zero_mode == 0:
        count = weight.scales[groups].shape[0]
        return torch.full((count, weight.shape[0]), 2 ** (weight.bits - 1), dtype=torch.int16,
                          device=weight.device)
    return weight.zeros[groups].to(torch.float32 if weight.zero_mode == 3 else torch.int16)


def _segments(weight: KernelWeight, start: int, stop: int
              ) -> tuple[int, torch.Tensor, torch.Tensor | None] | None:
    """(rows per segment, scale [S, N] fp32, zero [S, N] fp32 or None for nf) when rows
    [start, stop) split into S equal segments that each share one scale; None otherwise."""
    out_features, in_features = weight.shape
    if not weight.codebook:
        size = weight.group_size
        if not size:
            return None
        first, last = start // size, (stop - 1) // size
        if first == last:
            length = stop - start
        elif start % size == 0 and stop % size == 0:
            length = size
        else:
            return None
        groups = slice(first, last + 1)
        scale = weight.scales[groups].float()
        zero = _zeros(weight, groups).float()
        return length, scale, zero
    if in_features % weight.block or start % weight.block or (stop - start) % weight.block:
        return None
    per_row = in_features // weight.block  # blocks per row of W: block (n, j) is n * per_row + j
    first, last = start // weight.block, stop // weight.block
    codes = weight.scale_codes.view(out_features, per_row)[:, first:last].t().float()  # [S, N]
    rows = torch.arange(out_features, dtype=torch.int32, device=weight.device) * per_row
    blocks = rows.view(1, -1) + torch.arange(first, last, dtype=torch.int32, device=weight.device).view(-1, 1)
    second = weight.scale_scales[torch.div(blocks, weight.scale_block, rounding_mode="floor")]
    return weight.block, codes * (second / weight.scale_levels) + weight.scale_offset, None


def _values(weight: KernelWeight, codes: torch.Tensor) -> torch.Tensor:
    """Codes as floats before scaling: integers (uniform) or codebook values (nf)."""
    if not weight.codebook:
        return codes.float()
    return weight.lut.index_select(0, codes.view(-1).to(torch.int32)).view(codes.shape)


def dequantize_rows(weight: KernelWeight, start: int, stop: int) -> torch.Tensor:
    """fp32 rows [start, stop) of W^T ([stop - start, N]), bit-identical to the quantizer's dequantize."""
    codes = unpack_rows(weight, start, stop)
    rows = torch.arange(start, stop, device=weight.device)
    if not weight.codebook:
        group = weight.g_idx[start:stop].long() if weight.g_idx is not None else rows // weight.group_size
        zero = _zeros(weight, group)
        return (codes.to(torch.int16) - zero).float() * weight.scales[group].float()
    columns = torch.arange(weight.shape[0], device=weight.device)
    blocks = (columns.view(1, -1) * weight.shape[1] + rows.view(-1, 1)) // weight.block
    return _values(weight, codes) * nf_block_scales(weight, blocks)


def dequantize(weight: KernelWeight) -> torch.Tensor:
    """The whole fp32 weight [N, K] (tests and small layers only)."""
    rows = [dequantize_rows(weight, start, stop) for start, stop in tile_bounds(weight)]
    return torch.cat(rows).t()


def tile_rows(weight: KernelWeight) -> int:
    """Rows of W^T per tile: about TILE_ELEMENTS weights, a multiple of 32 and of the segment length."""
    out_features, in_features = weight.shape
    target = max(ROW_ALIGN, TILE_ELEMENTS // max(out_features, 1) // ROW_ALIGN * ROW_ALIGN)
    segment = weight.block if weight.codebook else weight.group_size
    if not segment:
        return target
    if segment <= target:
        step = math.lcm(segment, ROW_ALIGN)
        return max(step, target // step * step)
    divisors = [r for r in range(ROW_ALIGN, target + 1, ROW_ALIGN) if segment % r == 0]
    return divisors[-1] if divisors else target


def tile_bounds(weight: KernelWeight) -> list[tuple[int, int]]:
    in_features = weight.shape[1]
    step = tile_rows(weight)
    return [(start, min(start + step, in_features)) for start in range(0, in_features, step)]


def _accumulate_tile(out: torch.Tensor, x: torch.Tensor, weight: KernelWeight, start: int, stop: int) -> None:
    """out[M, N] (fp32) += x[:, start:stop] @ W^T[start:stop]."""
    batch = x.shape[0]
    segments = _segments(weight, start, stop)
    if segments is None:
        tile = dequantize_rows(weight, start, stop)
    else:
        length, scale, zero = segments
        count = scale.shape[0]
        if batch <= TABLE_BATCH.get((weight.codebook, weight.bits), 0) and lut_gemv.applicable(
                weight.codebook, weight.bits, start, stop, length):
            for row in range(batch):
                xs = x[row, start:stop].float()
                out[row] += (lut_gemv.segment_sums(weight, xs, start, stop, count) * scale).sum(dim=0)
                if zero is not None:
                    out[row] -= xs.view(count, length).sum(dim=1) @ (zero * scale)
            return
        values = _values(weight, unpack_rows(weight, start, stop)).view(count, length, -1)
        if batch < length:  # scale after the product: the tile is never scaled element-wise
            xs = x[:, start:stop].float().view(batch, count, length).transpose(0, 1)  # [S, M, length]
            out += (torch.bmm(xs, values) * scale.unsqueeze(1)).sum(dim=0)
            if zero is not None:
                out -= xs.sum(dim=2).t() @ (zero * scale)
            return
        if zero is not None:
            values.sub_(zero.unsqueeze(1))
        tile = values.mul_(scale.unsqueeze(1)).view(stop - start, -1)
    out.addmm_(x[:, start:stop].float(), tile)


def _matmul(x: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """fp32 [M, N] = x [M, K] @ W^T, tile by tile."""
    out = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        for start, stop in tile_bounds(weight):
            _accumulate_tile(out, x, weight, start, stop)
    return out


def grad_input(grad: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """fp32 [M, K] = grad [M, N] @ W, recomputing one dequantized tile at a time."""
    grad = grad.float()
    result = torch.empty(grad.shape[0], weight.shape[1], dtype=torch.float32, device=grad.device)
    for start, stop in tile_bounds(weight):
        result[:, start:stop] = grad @ dequantize_rows(weight, start, stop).t()
    return result


class _TiledMatmul(torch.autograd.Function):
    """Autograd for the tiled product: backward recomputes tiles instead of keeping the dense weight
    (plain autograd through the tile loop would save every dequantized tile: the whole weight)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return _matmul(x, weight)

    @staticmethod
    def backward(ctx, grad):
        return grad_input(grad, ctx.weight), None


def dequant_matmul(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for x [..., K] in any float dtype; computes in fp32, returns x's dtype.

    Half-precision activations are widened, not the weight narrowed: CPU fp32 GEMMs are fast, and
    the only rounding left is the output's. Differentiable with respect to x (and bias)."""
    out_features, in_features = weight.shape
    flat = x.reshape(-1, in_features)
    if torch.is_grad_enabled() and x.requires_grad:
        out = _TiledMatmul.apply(flat, weight)
    else:
        out = _matmul(flat, weight)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], out_features)
