"""Launchers for the Triton dequant-matmul kernels, and their ``torch.library`` custom ops.

``triton_dequant_matmul(x, weight)`` checks the call, picks GEMV (M <= 16, split-K) or GEMM (``tl.dot``)
and launches it: autotuned on a GPU, with one fixed large-block config under ``TRITON_INTERPRET=1``
(the interpreter runs the same kernels on CPU tensors for tests), or with an explicit ``config``.

The two formats are exposed as custom ops, ``compress::dequant_matmul_uniform`` and
``compress::dequant_matmul_nf``, each with a fake implementation, so ``torch.compile`` traces
through them without looking inside.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

from .layout import KernelWeight
from .triton_dequant import dequant_kernel
from .triton_gemm import gemm_configs, gemm_kernel, prune_gemm_configs
from .triton_gemv import MAX_M, gemv_configs, gemv_kernel, prune_gemv_configs

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

WEIGHT_KEY = ["N", "K", "FORMAT", "BITS", "ZERO_MODE", "USE_GIDX", "GROUP", "NF_BLOCK"]
gemv_tuned = triton.autotune(configs=gemv_configs(), key=["BLOCK_M", *WEIGHT_KEY], cache_results=True,
                             prune_configs_by={"early_config_prune": prune_gemv_configs},
                             reset_to_zero=["out_ptr"])(gemv_kernel)
gemm_tuned = triton.autotune(configs=gemm_configs(), key=["M_BUCKET", *WEIGHT_KEY], cache_results=True,
                             prune_configs_by={"early_config_prune": prune_gemm_configs})(gemm_kernel)


class UnsupportedLayerError(ValueError):
    """The Triton kernels cannot run this call (the message says what and why)."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_call(x: torch.Tensor, weight: KernelWeight) -> None:
    """Raise UnsupportedLayerError naming the first thing the kernels cannot handle."""
    out_features, in_features = weight.shape
    what = f"{weight.kind}{weight.bits} [{out_features}x{in_features}]"
    if x.dtype not in ACTIVATION_DTYPES:
        raise UnsupportedLayerError(f"{what}: activations are {x.dtype}; supported: fp16, bf16, fp32")
    if x.shape[-1] != in_features:
        raise UnsupportedLayerError(f"{what}: input has {x.shape[-1]} features, the weight expects {in_features}")
    if x.device != weight.device:
        raise UnsupportedLayerError(f"{what}: input on {x.device}, weight on {weight.device}")
    if x.device.type != "cuda" and not interpreting():
        raise UnsupportedLayerError(f"{what}: Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); "
                                    f"got {x.device}")
    if weight.kind == "uniform" and weight.bits not in (2, 3, 4, 8):
        raise UnsupportedLayerError(f"{what}: {weight.bits}-bit uniform codes are not supported")


def weight_args(weight: KernelWeight) -> tuple[list, dict]:
    """Positional tensor/int arguments and constexprs shared by every kernel."""
    dummy = weight.codes
    hi = weight.codes_hi if weight.codes_hi is not None else dummy
    if weight.kind == "uniform":
        zeros = {0: dummy, 1: weight.qzeros, 2: weight.zeros, 3: weight.zeros}[weight.zero_mode]
        gidx = weight.g_idx if weight.g_idx is not None else dummy
        args = [weight.codes, hi, weight.scales, zeros, gidx, weight.group_size or 1, dummy, dummy, dummy, dummy]
        meta = dict(FORMAT=0, BITS=weight.bits, ZERO_MODE=weight.zero_mode, USE_GIDX=weight.g_idx is not None,
                    LEVELS=1, NF_BLOCK=1, SCALE_BLOCK=1)
    else:
        args = [weight.codes, hi, dummy, dummy, dummy, 1,
                weight.lut, weight.scale_codes, weight.scale_scales, weight.scale_offset]
        meta = dict(FORMAT=1, BITS=weight.bits, ZERO_MODE=0, USE_GIDX=False, LEVELS=weight.scale_levels,
                    NF_BLOCK=weight.block, SCALE_BLOCK=weight.scale_block)
    return args, meta


def _gemv(x: torch.Tensor, weight: KernelWeight, config: dict | None) -> torch.Tensor:
    (m, k), n = x.shape, weight.shape[0]
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    args, meta = weight_args(weight)
    meta.update(BLOCK_M=max(1, triton.next_power_of_2(m)), enable_fp_fusion=True)  # explicit: 3.10 flips the default
    if config is None and interpreting():
        config = {"BLOCK_N": min(256, max(16, triton.next_power_of_2(n))),
                  "BLOCK_K": min(256, max(32, triton.next_power_of_2(k))), "SPLIT_K": 1}
    if config is None:
        grid = lambda c: (triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])  # noqa: E731
        gemv_tuned[grid](x, out, m, n, k, x.stride(0), out.stride(0), *args, **meta)
    else:
        grid = (triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
        gemv_kernel[grid](x, out, m, n, k, x.stride(0), out.stride(0), *args, **meta, **config)
    return out


def _gemm(x: torch.Tensor, weight: KernelWeight, config: dict | None) -> torch.Tensor:
    (m, k), n = x.shape, weight.shape[0]
    # the interpreter's fp32 -> bf16 cast truncates: it stores fp32 and torch rounds afterwards
    out = torch.empty(m, n, dtype=torch.float32 if interpreting() else x.dtype, device=x.device)
    args, meta = weight_args(weight)
    meta.update(DOT_FP32=interpreting(), enable_fp_fusion=True)
    if config is None and interpreting():
        config = {"BLOCK_M": min(64, max(16, triton.next_power_of_2(m))),
                  "BLOCK_N": min(128, max(16, triton.next_power_of_2(n))),
                  "BLOCK_K": min(128, max(16, triton.next_power_of_2(k))), "GROUP_M": 8}
    bucket = triton.next_power_of_2(m)
    if config is None:
        grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)  # noqa: E731
        gemm_tuned[grid](x, out, m, n, k, x.stride(0), out.stride(0), *args, M_BUCKET=bucket, **meta)
    else:
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        gemm_kernel[grid](x, out, m, n, k, x.stride(0), out.stride(0), *args, M_BUCKET=bucket, **meta, **config)
    return out


def triton_dequant_matmul(x: torch.Tensor, weight: KernelWeight, config: dict | None = None,
                          path: str | None = None) -> torch.Tensor:
    """``x @ W^T`` (no bias) for x [..., K]; result in x's dtype. ``path`` forces "gemv" or "gemm"."""
    check_call(x, weight)
    flat = x.reshape(-1, weight.shape[1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    if flat.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], weight.shape[0])
    path = path or ("gemv" if flat.shape[0] <= MAX_M else "gemm")
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton launches on the current device
        out = _gemv(flat, weight, config) if path == "gemv" else _gemm(flat, weight, config)
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def triton_dequantize(weight: KernelWeight, block_k: int = 64, block_n: int = 64) -> torch.Tensor:
    """W^T [K, N] in fp32, dequantized tile by tile by the kernels' own tile function."""
    n, k = weight.shape
    out = torch.empty(k, n, dtype=torch.float32, device=weight.device)
    args, meta = weight_args(weight)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        # no multiply-add contraction: the tiles must reproduce the torch oracle bit for bit
        dequant_kernel[grid](out, n, k, *args, **meta, BLOCK_K=block_k, BLOCK_N=block_n, enable_fp_fusion=False)
    return out


def _uniform_weight(in_features, codes, codes_hi, scales, zeros, g_idx, bits, group_size, zero_mode,
                    out_features) -> KernelWeight:
    return KernelWeight(kind="uniform", bits=bits, shape=(out_features, in_features), codes=codes,
                        codes_hi=codes_hi, scales=scales, qzeros=zeros if zero_mode == 1 else None,
                        zeros=zeros if zero_mode in (2, 3) else None, zero_mode=zero_mode,
                        group_size=group_size, g_idx=g_idx)


def _nf_weight(in_features, codes, codes_hi, lut, scale_codes, scale_scales, scale_offset, bits, block,
               scale_block, scale_levels, out_features) -> KernelWeight:
    return KernelWeight(kind="nf", bits=bits, shape=(out_features, in_features), codes=codes, codes_hi=codes_hi,
                        lut=lut, scale_codes=scale_codes, scale_scales=scale_scales, scale_offset=scale_offset,
                        block=block, scale_block=scale_block, scale_levels=scale_levels)


@torch.library.custom_op("compress::dequant_matmul_uniform", mutates_args=())
def dequant_matmul_uniform(x: torch.Tensor, codes: torch.Tensor, codes_hi: torch.Tensor | None,
                           scales: torch.Tensor, zeros: torch.Tensor | None, g_idx: torch.Tensor | None,
                           bits: int, group_size: int, zero_mode: int, out_features: int) -> torch.Tensor:
    """x @ W^T for a uniform (GPTQ-layout) weight; ``zeros`` is qzeros (zero_mode 1), unpacked (2) or float (3)."""
    weight = _uniform_weight(x.shape[-1], codes, codes_hi, scales, zeros, g_idx, bits, group_size, zero_mode,
                             out_features)
    return triton_dequant_matmul(x, weight)


@dequant_matmul_uniform.register_fake
def _(x, codes, codes_hi, scales, zeros, g_idx, bits, group_size, zero_mode, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("compress::dequant_matmul_nf", mutates_args=())
def dequant_matmul_nf(x: torch.Tensor, codes: torch.Tensor, codes_hi: torch.Tensor | None, lut: torch.Tensor,
                      scale_codes: torch.Tensor, scale_scales: torch.Tensor, scale_offset: torch.Tensor,
                      bits: int, block: int, scale_block: int, scale_levels: int, out_features: int) -> torch.Tensor:
    """x @ W^T for an NF-codebook weight with double-quantized block scales."""
    weight = _nf_weight(x.shape[-1], codes, codes_hi, lut, scale_codes, scale_scales, scale_offset, bits, block,
                        scale_block, scale_levels, out_features)
    return triton_dequant_matmul(x, weight)


@dequant_matmul_nf.register_fake
def _(x, codes, codes_hi, lut, scale_codes, scale_scales, scale_offset, bits, block, scale_block,
      scale_levels, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def _save_weight(ctx, inputs, output) -> None:
    """Autograd context: the packed tensors and scalars (no dense weight is kept for backward)."""
    x, *rest = inputs
    ctx.in_features = x.shape[-1]
    ctx.tensor_slots = [i for i, value in enumerate(rest) if isinstance(value, torch.Tensor)]
    ctx.scalars = [None if isinstance(value, torch.Tensor) else value for value in rest]
    ctx.save_for_backward(*(rest[i] for i in ctx.tensor_slots))


def _grad_input(build):
    """Backward of ``x @ W^T`` with respect to x: ``grad @ W``, W dequantized for the duration of the call."""
    def backward(ctx, grad):
        rest = list(ctx.scalars)
        for slot, tensor in zip(ctx.tensor_slots, ctx.saved_tensors):
            rest[slot] = tensor
        dense_t = triton_dequantize(build(ctx.in_features, *rest))  # W^T [K, N], fp32
        grad_x = (grad.reshape(-1, grad.shape[-1]).float() @ dense_t.t()).to(grad.dtype)
        return (grad_x.view(*grad.shape[:-1], ctx.in_features), *([None] * len(rest)))
    return backward


dequant_matmul_uniform.register_autograd(_grad_input(_uniform_weight), setup_context=_save_weight)
dequant_matmul_nf.register_autograd(_grad_input(_nf_weight), setup_context=_save_weight)


def custom_op_call(x: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """Run ``weight`` through its custom op (what the dispatcher calls, and what torch.compile sees)."""
    if weight.kind == "uniform":
        zeros = {0: None, 1: weight.qzeros, 2: weight.zeros, 3: weight.zeros}[weight.zero_mode]
        return torch.ops.compress.dequant_matmul_uniform(
            x, weight.codes, weight.codes_hi, weight.scales, zeros, weight.g_idx, weight.bits,
            weight.group_size, weight.zero_mode, weight.shape[0])
    return torch.ops.compress.dequant_matmul_nf(
        x, weight.codes, weight.codes_hi, weight.lut, weight.scale_codes, weight.scale_scales,
        weight.scale_offset, weight.bits, weight.block, weight.scale_block, weight.scale_levels, weight.shape[0])
