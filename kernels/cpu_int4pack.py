"""The portable CPU fast path: torch's own ``_weight_int4pack_mm_for_cpu``, for CPUs without AVX512-BF16.

Every uniform grid of at most 16 levels (2, 3 and 4 bits, symmetric, integer or float zeros) is an
int4 grid with the same scales: torch's kernel computes ``(q' - 8) * scale + zero`` per weight, so codes
stored as ``q' = q + 8 - z0`` with ``z0 = 2^(b-1)`` (the grid's middle) and ``zero = (z0 - z) * s`` give
``(q - z) * s``. Centering matters: with ``q' = q`` a 2-bit grid would compute ``(q - 8) * s + (8 - z) * s``,
two terms four times larger than the weight, each rounded to bf16 (3 % error at 2 bits, measured). Repacked once per matrix (``int4pack_layout``, cached on
the ``KernelWeight``) into torch's packed int4 weight and a bf16 ``[G, N, 2]`` scale-and-zero tensor.

Numerics: torch's kernel is fast only for bf16 activations (fp16 and fp32 run through it at a
fraction of the speed), so activations are rounded to bf16, and scales and folded zeros are rounded
to bf16 (2^-9 relative, as a bf16 model's weights are); accumulation in fp32; output in x's dtype.
Group sizes torch takes: 32, 64, 128, 256; a larger group that one of them divides (per-channel
included, its K padded to whole 32-row groups) repeats its scale over sub-groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import KernelWeight, row_groups

GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class Int4PackLayout:
    packed: torch.Tensor  # torch's int4pack weight for [Np, Kp]
    scale_zeros: torch.Tensor  # bf16 [G, Np, 2]
    perm: torch.Tensor | None  # x's columns in the codes' row order (act order)
    group: int
    in_padded: int
    out_features: int


def int4pack_layout(weight: KernelWeight) -> Int4PackLayout | str:
    """torch's int4pack form of a uniform matrix of at most 4 bits, or why it cannot have one."""
    from .reference import _zeros, unpack_rows

    if weight.codebook or weight.bits > 4:
        return f"{weight.label}: int4pack takes uniform grids of at most 16 levels"
    out_features, in_features = weight.shape
    found = row_groups(weight, 32)
    if isinstance(found, str):
        return found
    size, order = found
    sub = max((s for s in GROUP_SIZES if size % s == 0), default=0)
    if not sub:
        return f"group size {size}: int4pack takes multiples of {GROUP_SIZES}"
    codes = unpack_rows(weight, 0, in_features)
    if order is not None:
        codes = codes[order]
    padded_k, padded_n = weight.groups * size, -(-out_features // 16) * 16
    middle = 2 ** (weight.bits - 1)
    codes = torch.nn.functional.pad(codes + (8 - middle), (0, padded_n - out_features, 0, padded_k - in_features))
    scales = weight.scales.float().repeat_interleave(size // sub, dim=0)
    zero_points = _zeros(weight, slice(None)).float().repeat_interleave(size // sub, dim=0)
    scale_zeros = torch.stack([scales, (middle - zero_points) * scales], dim=2).to(torch.bfloat16)
    scale_zeros = torch.nn.functional.pad(scale_zeros, (0, 0, 0, padded_n - out_features)).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous().to(torch.int32), 1)
    return Int4PackLayout(packed=packed, scale_zeros=scale_zeros, perm=order, group=sub, in_padded=padded_k,
                          out_features=out_features)


def matmul(x: torch.Tensor, layout: Int4PackLayout, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for x [..., K] in x's dtype (no autograd)."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if layout.perm is not None:
        flat = flat.index_select(1, layout.perm)
    if flat.shape[1] != layout.in_padded:
        flat = torch.nn.functional.pad(flat, (0, layout.in_padded - flat.shape[1]))
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), layout.packed, layout.group, layout.scale_zeros)
    out = out[:, : layout.out_features]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], layout.out_features)
