"""NormalFloat (NF) codebooks with LQ-LoRA's double-quantized block scales.

Codebook (QLoRA's ``create_normal_map`` generalized to b bits): 2^(b-1) positive normal quantiles
on linspace(p*, 0.5) and 2^(b-1) - 1 negative ones on linspace(p*, 0.5), plus an exact 0, divided
by the largest; p* = 0.9677083. NF4 equals bitsandbytes' table.

Blocks are ``block`` consecutive weights of the row-major flattened matrix (zero-padded at the end).
Scales (LQ-LoRA, ``blockwise_absmax``):

    s1[k]  = max |w| over block k
    offset = min_k s1[k]                                   one fp32 per matrix
    s3[g]  = max (s1 - offset) over ``scale_block`` blocks, stored in ``scale_dtype``
    c[k]   = round((s1[k] - offset) * (2^scale_bits - 1) / s3[g])     unsigned scale codes
    s^[k]  = c[k] * s3[g] / (2^scale_bits - 1) + offset             the scale used

Weights are coded to the nearest codebook value of w / s^ and read back as ``codebook[code] * s^``.

Stored tensors: ``codes`` int32 (flattened codes, bit-stream packed), ``scale_codes`` int32 (packed
``c``), ``scale_scales`` (``s3`` in ``scale_dtype``), ``scale_offset`` fp32 [1].
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .packing import pack_codes, unpack_codes
from .uniform import divide

# ``config`` below is a ``quant.config.NFConfig``; it is not imported (the config classes call into this module)
NF_OFFSET = 0.9677083
SCALE_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def nf_codebook(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 2^bits NormalFloat values in [-1, 1], ascending (float32), on ``device`` (default CPU).

    Always computed on the CPU and then moved, so every device holds the same values."""
    half = 2 ** (bits - 1)
    # linspace in float32 and quantiles in float64, as bitsandbytes builds its NF4 table
    positive = torch.linspace(NF_OFFSET, 0.5, half + 1, device="cpu")[:-1].double()
    negative = torch.linspace(NF_OFFSET, 0.5, half, device="cpu")[:-1].double()
    values = torch.cat([torch.special.ndtri(positive), torch.zeros(1, dtype=torch.float64, device="cpu"),
                        -torch.special.ndtri(negative)]).float()
    values = values.sort().values
    values = values / values.max()
    return values if device is None else values.to(device)


def _blocks(flat: torch.Tensor, size: int) -> torch.Tensor:
    return F.pad(flat, (0, (-flat.numel()) % size)).view(-1, size)


def quantize_scales(absmax: torch.Tensor, config: "NFConfig") -> dict[str, torch.Tensor]:
    """Double-quantize per-block absmax scales: unsigned codes, second-level scales, offset."""
    levels = 2**config.scale_bits - 1
    offset = absmax.min().reshape(1)
    shifted = absmax - offset
    second = _blocks(shifted, config.scale_block).amax(dim=1)
    second = second.to(SCALE_TORCH_DTYPES[config.scale_dtype])
    per_block = second.float().repeat_interleave(config.scale_block)[: absmax.numel()]
    safe = torch.where(per_block > 0, per_block, torch.ones_like(per_block))
    codes = torch.round(shifted * levels / safe).clamp(0, levels).to(torch.int32)
    codes = torch.where(per_block > 0, codes, torch.zeros_like(codes))
    return {"scale_codes": codes, "scale_scales": second, "scale_offset": offset.float()}


def dequantize_scales(codes: torch.Tensor, second: torch.Tensor, offset: torch.Tensor,
                      config: "NFConfig") -> torch.Tensor:
    """Per-block scales s^ (fp32) from their codes, second-level scales and offset."""
    levels = 2**config.scale_bits - 1
    per_block = second.float().repeat_interleave(config.scale_block)[: codes.numel()]
    return codes.float() * divide(per_block, levels) + offset.float()


LOOKUP_BINS = 8192  # fine grid over [-1, 1]; every bin holds at most one codebook midpoint
CHUNK_BLOCKS = 1 << 14  # blocks per chunk in quantize_nf: keeps temporaries cache-sized


@functools.lru_cache(maxsize=None)
def _lookup_tables(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes below each bin, the one midpoint inside each bin or +inf) for ``nearest_codes``, on
    ``device`` (built on the CPU, then moved: the same tables everywhere).

    A value in bin k gets ``below[k] + (value > inside[k])``: exactly the number of midpoints
    below it, i.e. the index ``bucketize`` returns, without a binary search per element."""
    if device.type != "cpu":
        return tuple(table.to(device) for table in _lookup_tables(bits, torch.device("cpu")))
    midpoints = _midpoints(nf_codebook(bits)).double()
    edges = torch.linspace(-1, 1, LOOKUP_BINS + 1, dtype=torch.float64, device="cpu")
    slack = 1e-4 * (2 / LOOKUP_BINS)  # covers rounding of the bin index near an edge
    low, high = edges[:-1] - slack, edges[1:] + slack
    below = (midpoints.view(1, -1) < low.view(-1, 1)).sum(dim=1)
    inside = (midpoints.view(1, -1) >= low.view(-1, 1)) & (midpoints.view(1, -1) < high.view(-1, 1))
    if int(inside.sum(dim=1).max()) > 1:
        raise AssertionError("lookup bins too coarse for this codebook")
    first = inside.float().argmax(dim=1)
    mids = torch.where(inside.any(dim=1), midpoints.float()[first], torch.tensor(float("inf"), device="cpu"))
    return below.to(torch.uint8), mids


def _midpoints(codebook: torch.Tensor) -> torch.Tensor:
    return (codebook[1:] + codebook[:-1]) / 2


def nearest_codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Index of the nearest NF-``bits`` codebook entry for every value (ties go down), uint8."""
    below, inside = _lookup_tables(bits, values.device)
    flat = values.reshape(-1)
    half = LOOKUP_BINS / 2
    index = (flat * half).add_(half).clamp_(0, LOOKUP_BINS - 1).to(torch.int32)
    codes = below.index_select(0, index)
    codes += flat > inside.index_select(0, index)
    return codes.view(values.shape)


def quantize_nf(weight: torch.Tensor, config: "NFConfig") -> dict[str, torch.Tensor]:
    """NF-quantize a float weight [N, K] into packed tensors (see the module docstring)."""
    flat = weight.detach().float().reshape(-1)
    blocks = _blocks(flat, config.block)
    low, high = torch.aminmax(blocks, dim=1)
    scales = quantize_scales(torch.maximum(-low, high), config)
    scale = dequantize_scales(scales["scale_codes"], scales["scale_scales"], scales["scale_offset"], config)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    codes = torch.empty(blocks.shape, dtype=torch.uint8, device=blocks.device)
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        rows = slice(start, start + CHUNK_BLOCKS)
        codes[rows] = nearest_codes(blocks[rows] / safe[rows], config.bits)
    codes = codes.view(-1)[: flat.numel()]
    return {
        "codes": pack_codes(codes, config.bits),
        "scale_codes": pack_codes(scales["scale_codes"], config.scale_bits),
        "scale_scales": scales["scale_scales"],
        "scale_offset": scales["scale_offset"],
    }


def dequantize_nf(tensors: dict[str, torch.Tensor], config: "NFConfig",
                  shape: tuple[int, int]) -> torch.Tensor:
    """Float32 weight [N, K] from NF tensors."""
    numel = shape[0] * shape[1]
    n_blocks = -(-numel // config.block)
    scale_codes = unpack_codes(tensors["scale_codes"], config.scale_bits, n_blocks)
    scale = dequantize_scales(scale_codes, tensors["scale_scales"], tensors["scale_offset"], config)
    codes = unpack_codes(tensors["codes"], config.bits, numel)
    values = nf_codebook(config.bits, codes.device)[codes.long()]
    values = F.pad(values, (0, n_blocks * config.block - numel)).view(n_blocks, config.block)
    return (values * scale.unsqueeze(1)).reshape(-1)[:numel].view(shape)
