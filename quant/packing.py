"""Bit-stream packing of integer codes into int32 words (the GPTQ v1 layout).

The rule, for every bit width: along the packed axis, each run of 32 consecutive codes forms a
(32*b)-bit little-endian integer S = sum_i q_i << (b*i), stored as b int32 words
``word_w = (S >> 32*w) & 0xFFFFFFFF``. For b in {2, 4, 8} no code straddles a word
(``pf = 32 / b`` codes per word, code j of a word at shift b*j); 3-bit codes do: word A holds codes
0-9 and the low 2 bits of code 10, word B the high bit of code 10, codes 11-20 and the low bit of
code 21, word C the rest. The packed axis is padded with zero codes to a multiple of 32.

Packers are looked up by bit width in ``PACKERS`` / ``UNPACKERS`` (aligned widths use one
vectorized shift-and-sum, the straddling width a 32-step loop over code positions).
"""

from __future__ import annotations

import torch

RUN = 32  # codes per run; a run packs into `bits` int32 words


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Wrap non-negative int64 values < 2^32 into int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _runs(codes: torch.Tensor) -> torch.Tensor:
    """[L, *rest] integer codes -> [L/32 (padded), 32, prod(rest)] int64."""
    length = codes.shape[0]
    pad = (-length) % RUN
    flat = codes.reshape(length, -1).to(torch.int64)
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])])
    return flat.view(-1, RUN, flat.shape[1])


def _pack_aligned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    length = codes.shape[0]
    flat = codes.reshape(length, -1)
    if length % RUN:
        flat = torch.cat([flat, flat.new_zeros((-length) % RUN, flat.shape[1])])
    per_word = RUN // bits
    fields = flat.view(-1, per_word, flat.shape[1]).to(torch.int32)  # [words, per_word, C]
    words = fields[:, 0].clone()
    for j in range(1, per_word):  # disjoint bit fields; int32 shifts wrap into the sign bit as wanted
        words |= fields[:, j] << (bits * j)
    return words


def _unpack_aligned(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = RUN // bits
    words = packed.reshape(-1, bits, 1, packed.shape[-1])
    shifts = (torch.arange(per_word, dtype=torch.int32, device=packed.device) * bits).view(1, 1, per_word, 1)
    codes = (words >> shifts) & ((1 << bits) - 1)  # arithmetic shift; the mask drops sign bits
    return codes.reshape(-1, packed.shape[-1])


def _pack_straddling(codes: torch.Tensor, bits: int) -> torch.Tensor:
    runs = _runs(codes)
    words = runs.new_zeros(runs.shape[0], bits, runs.shape[2])
    for i in range(RUN):
        word, shift = divmod(bits * i, 32)
        code = runs[:, i]
        words[:, word] |= (code << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[:, word + 1] |= code >> (32 - shift)
    return _to_int32(words.reshape(-1, runs.shape[2]))


def _unpack_straddling(packed: torch.Tensor, bits: int) -> torch.Tensor:
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(-1, bits, packed.shape[-1])
    mask = (1 << bits) - 1
    codes = []
    for i in range(RUN):
        word, shift = divmod(bits * i, 32)
        code = words[:, word] >> shift
        if shift + bits > 32:
            code = code | (words[:, word + 1] << (32 - shift))
        codes.append(code & mask)
    return torch.stack(codes, dim=1).reshape(-1, packed.shape[-1]).to(torch.int32)


PACKERS = {2: _pack_aligned, 3: _pack_straddling, 4: _pack_aligned, 8: _pack_aligned}
UNPACKERS = {2: _unpack_aligned, 3: _unpack_straddling, 4: _unpack_aligned, 8: _unpack_aligned}


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along ``dim`` into int32 words.

    The packed dimension becomes ``ceil(L / 32) * bits`` long; other dimensions are unchanged."""
    if bits not in PACKERS:
        raise ValueError(f"bits: {bits} is not one of 2, 3, 4, 8")
    moved = codes.movedim(dim, 0).contiguous()
    packed = PACKERS[bits](moved, bits)
    return packed.view(-1, *moved.shape[1:]).movedim(0, dim).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, length: int, dim: int = 0) -> torch.Tensor:
    """Inverse of ``pack_codes``: int32 codes, ``length`` long along ``dim`` (padding dropped)."""
    if bits not in UNPACKERS:
        raise ValueError(f"bits: {bits} is not one of 2, 3, 4, 8")
    moved = packed.movedim(dim, 0)
    if moved.shape[0] % bits or moved.shape[0] < packed_length(length, bits):
        raise ValueError(f"packed length {moved.shape[0]} cannot hold {length} {bits}-bit codes")
    codes = UNPACKERS[bits](moved.reshape(moved.shape[0], -1), bits)[:length]
    return codes.view(length, *moved.shape[1:]).movedim(0, dim).contiguous()


def packed_length(length: int, bits: int) -> int:
    """Words needed to pack ``length`` codes of ``bits`` bits."""
    return -(-length // RUN) * bits
