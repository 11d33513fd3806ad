"""Uniform affine group-wise quantization (RTN) and the GPTQ v1 tensors it packs into.

Weights are ``W[out, in]`` (the ``nn.Linear`` orientation); groups run along ``in``. With
``maxq = 2^bits - 1`` a weight is stored as a code ``q`` in [0, maxq] and read back as
``scale * (q - zero)``:

- asym: the group range [min(w, 0), max(w, 0)] maps onto [0, maxq]; ``zero`` is an integer, kept
  >= 1 because GPTQ v1 stores ``zero - 1`` (a group whose best zero is 0 gets zero = 1 and the
  scale that still reaches its maximum);
- sym: ``zero = 2^(bits-1)`` and the scale is the smallest that represents both extremes;
- float zero (``float_zero``): the group's own range [min, max] maps onto [0, maxq] with an fp16
  zero ``-min / scale`` that is not rounded; the code is ``round(w / scale + zero)``. Stored as
  ``zeros`` fp16 [G, N] in place of ``qzeros`` (``native`` only: GPTQ has no such field).

Scales are rounded to fp16 (what the checkpoint holds) before the codes are computed, so the
in-memory quantized weight and the reloaded one are identical.

GPTQ v1 tensors (K = in, N = out, G groups): ``qweight`` int32 [K*b/32, N] (codes packed along K),
``qzeros`` int32 [G, N*b/32] (``zero - 1`` packed along N), ``scales`` fp16 [G, N], ``g_idx`` int32 [K].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import pack_codes, unpack_codes

# ``config`` below is a ``quant.config.UniformConfig``; it is not imported (the config classes call into this module)
FP16_SMALLEST = 2.0**-24  # smallest fp16 subnormal: a nonzero scale never rounds to 0


def group_view(weight: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] -> [N, G, group], zero-padded (zeros never change the ranges below)."""
    out_features, in_features = weight.shape
    pad = (-in_features) % group
    if pad:
        weight = F.pad(weight, (0, pad))
    return weight.reshape(out_features, -1, group)


def divide(values: torch.Tensor, divisor: float) -> torch.Tensor:
    """``values / divisor``, correctly rounded on every device. CUDA divides by a Python number as a
    multiplication by its rounded reciprocal (one ulp off true division now and then: enough to move
    an fp16 scale across a rounding boundary, and with it the codes), the CPU divides; a 0-dim
    tensor on the values' device makes both true division."""
    return values / values.new_tensor(divisor)


def choose_qparams(weight: torch.Tensor, config: "UniformConfig") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale fp16 [N, G], zero int32 [N, G], or fp16 with ``float_zero``) for a float weight [N, K]."""
    groups = group_view(weight.float(), config.group_for(weight.shape[1]))
    low, high = torch.aminmax(groups, dim=2)
    return qparams_from_range(low, high, config)


def qparams_from_range(low: torch.Tensor, high: torch.Tensor, config: "UniformConfig") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp16, zero) of groups whose values span [low, high] (any matching shapes), by the
    rules in the module docstring."""
    maxq = 2**config.bits - 1
    if config.float_zero:
        scale = divide(high - low, maxq).clamp(min=FP16_SMALLEST).to(torch.float16)
        return scale, (-low / scale.float()).to(torch.float16)
    low, high = low.clamp(max=0), high.clamp(min=0)
    if config.sym:
        zero = torch.full_like(low, 2 ** (config.bits - 1))
        scale = torch.maximum(-low / zero, high / (maxq - zero))
    else:
        scale = divide(high - low, maxq)
        zero = torch.round(-low / scale.clamp(min=FP16_SMALLEST))
        needs_shift = zero < 1  # v1 cannot store zero = 0: use zero = 1 and stretch the scale
        zero = torch.where(needs_shift, torch.ones_like(zero), zero)
        scale = torch.where(needs_shift, divide(high, maxq - 1), scale)
    scale = scale.clamp(min=FP16_SMALLEST).to(torch.float16)
    return scale, zero.to(torch.int32)


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   config: "UniformConfig") -> torch.Tensor:
    """Integer codes [N, K] (uint8) for a weight given its per-group scale and zero."""
    group = config.group_for(weight.shape[1])
    codes = group_codes(group_view(weight.float(), group), scale, zero, config).to(torch.uint8)
    return codes.view(weight.shape[0], -1)[:, : weight.shape[1]]


def group_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, config: "UniformConfig") -> torch.Tensor:
    """Float codes [..., G, group] of grouped values given each group's scale and zero [..., G]."""
    if config.float_zero:
        codes = (groups / scale.float().unsqueeze(-1)).add_(zero.float().unsqueeze(-1)).round_()
    else:
        codes = (groups / scale.float().unsqueeze(-1)).round_().add_(zero.float().unsqueeze(-1))
    return codes.clamp_(0, 2**config.bits - 1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     g_idx: torch.Tensor) -> torch.Tensor:
    """W [N, K] fp32 from codes [N, K], per-group scale/zero [N, G] and the group of each column."""
    index = g_idx.long()
    return (codes.to(torch.int32) - zero[:, index]).float() * scale.float()[:, index]


def default_g_idx(in_features: int, config: "UniformConfig", device: torch.device | str | None = None) -> torch.Tensor:
    """The group of each input column, ``arange(K) // group`` (int32 [K], on ``device``)."""
    group = config.group_for(in_features)
    return torch.arange(in_features, dtype=torch.int32, device=device) // group


def quantize_rtn(weight: torch.Tensor, config: "UniformConfig") -> dict[str, torch.Tensor]:
    """Round-to-nearest quantization of a float weight [N, K] into GPTQ v1 tensors (or the
    float-zero tensors)."""
    scale, zero = choose_qparams(weight, config)
    codes = quantize_codes(weight, scale, zero, config)
    pack = to_float_zero_tensors if config.float_zero else to_gptq_tensors
    return pack(codes, scale, zero, config)


def to_float_zero_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                          config: "UniformConfig") -> dict[str, torch.Tensor]:
    """Codes [N, K] packed as GPTQ's qweight, fp16 scale and zero [N, G] stored as [G, N]."""
    return {
        "qweight": pack_codes(codes.t(), config.bits, dim=0),
        "zeros": zero.to(torch.float16).t().contiguous(),
        "scales": scale.t().contiguous(),
        "g_idx": default_g_idx(codes.shape[1], config, codes.device),
    }


def to_gptq_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    config: "UniformConfig") -> dict[str, torch.Tensor]:
    """Pack codes [N, K], scale [N, G] and zero [N, G] into the GPTQ v1 layout."""
    if int(zero.min()) < 1:
        raise ValueError("GPTQ v1 stores zero - 1: zero points must be >= 1")
    return {
        "qweight": pack_codes(codes.t(), config.bits, dim=0),
        "qzeros": pack_codes((zero - 1).t(), config.bits, dim=1),
        "scales": scale.t().contiguous(),
        "g_idx": default_g_idx(codes.shape[1], config, codes.device),
    }


def from_gptq_tensors(tensors: dict[str, torch.Tensor], bits: int,
                      shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K], scale fp16 [N, G], zero [N, G]: int32, fp32 for float zeros) from GPTQ v1 tensors."""
    out_features, in_features = shape
    codes = unpack_codes(tensors["qweight"], bits, in_features, dim=0).t()
    zero = unpacked_zeros(tensors, bits, out_features).t()
    return codes, tensors["scales"].t(), zero


def contiguous_group_size(g_idx: torch.Tensor, groups: int) -> int | None:
    """The group size if ``g_idx`` is the default ``arange(K) // size``, else None."""
    in_features = g_idx.numel()
    size = max(int((g_idx == 0).sum()), 1)  # rows of the first group (the last one may be partial)
    if -(-in_features // size) != groups:
        return None
    default = torch.arange(in_features, dtype=g_idx.dtype, device=g_idx.device) // size
    return size if torch.equal(g_idx, default) else None


def unpacked_zeros(tensors: dict[str, torch.Tensor], bits: int, out_features: int) -> torch.Tensor:
    """Zero points [G, N]: int32 from GPTQ v1 ``qzeros`` (stored minus one), or fp32 from ``zeros``."""
    if "zeros" in tensors:
        return tensors["zeros"].float()
    return gptq_v1_zeros(tensors["qzeros"], bits, out_features)


def gptq_v1_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Integer zero points [G, N] of GPTQ v1 ``qzeros`` [G, N*b/32], whose fields hold ``zero - 1``.

    A zero of 0 has no field value of its own. GPTQModel writes 2/4/8-bit qzeros by subtracting
    ``0x..0101`` (a 1 in every field) from each whole int32 word, so such a zero borrows from the
    field above it; the inverse adds the constant back word by word. 3-bit fields straddle words and
    GPTQModel shifts them one by one modulo 8. Writers that keep every zero >= 1 (ours) never store
    a field of 2^b - 1, and for them both rules are the plain per-field ``+ 1``."""
    if bits == 3:
        return (unpack_codes(qzeros, bits, out_features, dim=1) + 1) & 7
    ones = sum(1 << (bits * field) for field in range(32 // bits))
    words = (qzeros.to(torch.int64) + ones) & 0xFFFFFFFF
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return unpack_codes(words, bits, out_features, dim=1)


def dequantize_gptq(tensors: dict[str, torch.Tensor], bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Float32 weight [N, K] of a GPTQ v1 matrix: scales[g] * (q - (qzeros[g] + 1)); with an fp16
    ``zeros`` tensor instead (float zero), scales[g] * (q - zeros[g]) in fp32.

    Returned as the transpose of a contiguous [K, N] tensor (the layout the codes unpack into)."""
    out_features, in_features = shape
    codes = unpack_codes(tensors["qweight"], bits, in_features, dim=0)  # [K, N]
    zero = unpacked_zeros(tensors, bits, out_features)  # [G, N]
    scale = tensors["scales"].float()
    size = contiguous_group_size(tensors["g_idx"], scale.shape[0])
    if size is None:  # act-order checkpoints: gather each row's group
        index = tensors["g_idx"].long()
        return ((codes - zero[index]).float() * scale[index]).t()
    pad = (-in_features) % size
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, out_features)])
    grouped = codes.view(-1, size, out_features)
    weight = (grouped - zero.unsqueeze(1)).float().mul_(scale.unsqueeze(1))
    return weight.view(-1, out_features)[:in_features].t()
