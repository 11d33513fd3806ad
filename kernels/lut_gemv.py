"""Batch-1 CPU matmul through per-byte lookup tables (the T-MAC idea), for the tiled torch path.

A byte of a K-major plane holds ``8 / bits`` consecutive codes of one output column. For one row of
x, the contribution of such a byte to ``x @ W^T`` depends only on the byte's value, so a table per
byte row,

    table[r, v] = sum_i x[r * 8/bits + i] * value(field_i(v)),     v = 0..255,

(one small matmul: x reshaped [R, 8/bits] times the fields of all 256 byte values) turns the tile into
a single gather of partial sums: one lookup per byte instead of unpacking, converting and multiplying
every code. Sums are then added per segment (rows that share a scale) and scaled once.

``value`` is the integer code (uniform; the 3-bit layout's two planes add as low + 4 * high) or the
codebook entry (nf with one plane: 2, 4 or 8 bits). The result equals the dequantize-then-multiply
product up to fp32 summation order.
"""

from __future__ import annotations

import torch


def field_matrix(bits: int, values: torch.Tensor) -> torch.Tensor:
    """[8/bits, 256]: the value of field i of every byte value."""
    byte = torch.arange(256, device=values.device)
    shifts = torch.arange(0, 8, bits, device=values.device).view(-1, 1)
    return values[(byte.view(1, -1) >> shifts) & ((1 << bits) - 1)]


def plane_segment_sums(x_row: torch.Tensor, plane: torch.Tensor, bits: int, start: int, stop: int,
                       values: torch.Tensor, segments: int) -> torch.Tensor:
    """[segments, N]: sum over each segment's rows of x[k] * value(code[k, n]), rows [start, stop).

    ``stop - start`` must be a multiple of 32 and of ``segments``' length; ``x_row`` holds those rows."""
    words = plane[start * bits // 32: stop * bits // 32]
    byte_rows = words.shape[0] * 4  # byte b of word w is byte row 4w + b (little-endian)
    table = x_row.view(byte_rows, 8 // bits) @ field_matrix(bits, values)  # [byte_rows, 256]
    sums = table.view(-1).index_select(0, table_index(words).view(-1))
    return sums.view(segments, -1, words.shape[1]).sum(dim=1)


def table_index(words: torch.Tensor) -> torch.Tensor:
    """int32 [W, 4, N]: the flat table position 256 * (4w + b) + byte of every byte of the words.

    Built from the int32 words with contiguous shifts (faster than reading the bytes strided)."""
    count, columns = words.shape
    index = torch.empty(count, 4, columns, dtype=torch.int32, device=words.device)
    offsets = torch.arange(count * 4, dtype=torch.int32, device=words.device).view(count, 4, 1) * 256
    for byte in range(4):
        part = index[:, byte]
        torch.bitwise_right_shift(words, 8 * byte, out=part)
        part.bitwise_and_(255).add_(offsets[:, byte])
    return index


def applicable(codebook: bool, bits: int, start: int, stop: int, segment: int) -> bool:
    """Whether a tile can go through the tables: whole words, whole bytes per segment, one plane
    per code for nf (a 3-bit codebook value does not split into planes)."""
    per_byte = 8 // (2 if bits == 3 else bits)
    return (stop - start) % 32 == 0 and segment % per_byte == 0 and not (codebook and bits == 3)


def segment_sums(weight, x_row: torch.Tensor, start: int, stop: int, segments: int) -> torch.Tensor:
    """[segments, N] unscaled sums of x * code value over each segment (uniform: integer codes)."""
    if weight.codebook:
        return plane_segment_sums(x_row, weight.codes, weight.bits, start, stop, weight.lut, segments)
    if weight.codes_hi is None:
        values = torch.arange(2**weight.bits, dtype=torch.float32, device=x_row.device)
        return plane_segment_sums(x_row, weight.codes, weight.bits, start, stop, values, segments)
    low = plane_segment_sums(x_row, weight.codes, 2, start, stop,
                             torch.arange(4, dtype=torch.float32, device=x_row.device), segments)
    high = plane_segment_sums(x_row, weight.codes_hi, 1, start, stop,
                              torch.tensor([0.0, 4.0], device=x_row.device), segments)
    return low + high
