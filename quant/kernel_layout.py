"""The kernel layout of a packed matrix, built here from quant's tensors: kernels receive the one
declared type, ``compress.kernels.layout.KernelWeight``, and never import quant (its module
docstring describes the planes, zero modes and derived scales).

- affine (uniform configs): 2/4/8-bit codes *are* GPTQ's ``qweight`` (no copy); 3-bit codes are
  repacked into a 2-bit and a 1-bit plane; zero points unpacked once, ``zero_folded = -z * s``.
- codebook (NF configs): the row-major flattened codes repacked into the same K-major planes, the
  double-quantized block scales unpacked, the codebook as the lookup table.
"""

from __future__ import annotations

import torch

from compress.kernels.layout import KernelWeight

from .normalfloat import nf_codebook
from .packing import RUN, pack_codes, packed_length, unpack_codes
from .uniform import contiguous_group_size, gptq_v1_zeros


def pack_bit_plane(bits: torch.Tensor) -> torch.Tensor:
    """Pack 0/1 values [L, N] along L into int32 words [ceil(L/32), N] (bit j of word w = row 32w+j)."""
    length, columns = bits.shape
    padded = torch.zeros(packed_length(length, 1), RUN, columns, dtype=torch.int64, device=bits.device)
    padded.view(-1, columns)[:length] = bits.to(torch.int64)
    shifts = torch.arange(RUN, dtype=torch.int64, device=bits.device).view(1, RUN, 1)
    words = (padded << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def code_planes(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """K-major planes for integer codes [K, N]: one plane of ``bits``, or 2-bit + 1-bit for 3-bit."""
    if bits != 3:
        return pack_codes(codes, bits, dim=0), None
    return pack_codes(codes & 3, 2, dim=0), pack_bit_plane(codes >> 2)


def affine_layout(tensors: dict[str, torch.Tensor], bits: int, shape: tuple[int, int]) -> KernelWeight:
    """The layout of GPTQ v1 tensors (or the float-zero tensors: ``zeros`` in place of ``qzeros``)."""
    out_features, in_features = shape
    if bits == 3:
        codes, codes_hi = code_planes(unpack_codes(tensors["qweight"], 3, in_features, dim=0), 3)
    else:
        codes, codes_hi = tensors["qweight"], None
    scales = tensors["scales"]
    size = contiguous_group_size(tensors["g_idx"], scales.shape[0])
    grouping = {"group_size": size or 0, "g_idx": None if size else tensors["g_idx"].contiguous()}
    if "zeros" in tensors:
        return KernelWeight(bits=bits, shape=shape, codes=codes, codes_hi=codes_hi, scales=scales,
                            zeros=tensors["zeros"], zero_mode=3, **grouping,
                            zero_folded=-tensors["zeros"].float() * scales.float())
    zeros = gptq_v1_zeros(tensors["qzeros"], bits, out_features)  # [G, N]
    symmetric = bool((zeros == 2 ** (bits - 1)).all())
    per_field = torch.equal(zeros, unpack_codes(tensors["qzeros"], bits, out_features, dim=1) + 1)
    zero_mode = 0 if symmetric else (2 if bits == 3 or not per_field else 1)  # 1: the kernel adds 1 per field
    return KernelWeight(
        bits=bits, shape=shape, codes=codes, codes_hi=codes_hi, scales=scales, qzeros=tensors["qzeros"],
        zeros=zeros.to(torch.uint8 if int(zeros.max()) < 256 else torch.int16), zero_mode=zero_mode,
        **grouping, zero_folded=None if symmetric else -zeros.float() * scales.float())


def codebook_layout(tensors: dict[str, torch.Tensor], config, shape: tuple[int, int]) -> KernelWeight:
    """The layout of NF tensors under ``config`` (an ``NFConfig``)."""
    out_features, in_features = shape
    numel = out_features * in_features
    flat = unpack_codes(tensors["codes"], config.bits, numel)
    codes, codes_hi = code_planes(flat.view(out_features, in_features).t(), config.bits)
    blocks = -(-numel // config.block)
    scale_codes = unpack_codes(tensors["scale_codes"], config.scale_bits, blocks).to(torch.uint8)
    return KernelWeight(
        bits=config.bits, shape=shape, codes=codes, codes_hi=codes_hi,
        lut=nf_codebook(config.bits).to(flat.device), scale_codes=scale_codes,
        scale_scales=tensors["scale_scales"].float(), scale_offset=tensors["scale_offset"].float(),
        block=config.block, scale_block=config.scale_block, scale_levels=2**config.scale_bits - 1)
