"""The CPU fast paths behind one interface: which can run a matrix, and the product with autograd.

``native`` (``cpu_native``: our AVX512-BF16 / AMX kernel) is preferred; ``int4pack`` (``cpu_int4pack``:
torch's kernel, any x86 or ARM CPU torch vectorizes) takes uniform grids of at most 16 levels where the
native kernel cannot run. Each repacks a matrix once, on first use, and caches the result (or the reason
it cannot take the matrix) on the ``KernelWeight``. Gradients with respect to x (LoRA training over a
packed base) come from the tiled path's ``grad_input`` (fp32 tiles recomputed, nothing dense kept).
"""

from __future__ import annotations

import torch

from . import cpu_int4pack, cpu_native, reference
from .layout import KernelWeight

BACKENDS = ("native", "int4pack")  # in order of preference


def machine_status(name: str) -> tuple[bool, str]:
    """(usable, why) for a CPU fast path on this machine, whatever the matrix."""
    if name == "native":
        return cpu_native.availability()
    return True, "torch's _weight_int4pack_mm_for_cpu"


def _build(name: str, weight: KernelWeight):
    if weight.device.type != "cpu":
        return f"weights on {weight.device}"
    build = cpu_native.native_layout if name == "native" else cpu_int4pack.int4pack_layout
    weight.fast[name] = build(weight)
    return weight.fast[name]


def layout_for(name: str, weight: KernelWeight):
    """The backend's cached layout of ``weight``, or a string saying why it has none."""
    found = weight.fast.get(name)
    if found is not None:
        return found
    if torch.compiler.is_compiling():  # repack eagerly, never traced: a compiled first call breaks its graph here once
        return torch.compiler.disable(_build)(name, weight)
    return _build(name, weight)


def status(name: str, weight: KernelWeight | None) -> tuple[bool, str]:
    """(usable, why) for a CPU fast path on this machine and, when given, this matrix."""
    usable, why = machine_status(name)
    if usable and weight is not None:
        found = layout_for(name, weight)
        if isinstance(found, str):
            return False, found
    return usable, why


class _FastMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, name):
        ctx.weight = weight
        module = cpu_native if name == "native" else cpu_int4pack
        return module.matmul(x, layout_for(name, weight))

    @staticmethod
    def backward(ctx, grad):
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = reference.grad_input(flat, ctx.weight).to(grad.dtype)
        return grad_x.view(*grad.shape[:-1], ctx.weight.shape[1]), None, None


def matmul(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None, name: str) -> torch.Tensor:
    """``x @ W^T + bias`` in x's dtype through CPU fast path ``name`` (its layout must exist)."""
    if torch.is_grad_enabled() and x.requires_grad:
        out = _FastMatmul.apply(x, weight, name)
        return out if bias is None else out + bias.to(out.dtype)
    module = cpu_native if name == "native" else cpu_int4pack
    return module.matmul(x, layout_for(name, weight), bias)
