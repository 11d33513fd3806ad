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
import triton.language as tl

from .layout import KernelWeight, nf_row_scales
from .triton_dequant import dequant_kernel
from .triton_gemm import gemm_configs, gemm_kernel, prune_gemm_configs
from .triton_gemv import MAX_M, gemv_configs, gemv_kernel, prune_gemv_configs

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

WEIGHT_KEY = ["N", "K", "FORMAT", "BITS", "FOLDED", "USE_GIDX", "GROUP", "DQ"]
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
    what = f"{weight.label} [{out_features}x{in_features}]"
    if x.dtype not in ACTIVATION_DTYPES:
        raise UnsupportedLayerError(f"{what}: activations are {x.dtype}; supported: fp16, bf16, fp32")
    if x.shape[-1] != in_features:
        raise UnsupportedLayerError(f"{what}: input has {x.shape[-1]} features, the weight expects {in_features}")
    if x.device != weight.device:
        raise UnsupportedLayerError(f"{what}: input on {x.device}, weight on {weight.device}")
    if x.device.type != "cuda" and not interpreting():
        raise UnsupportedLayerError(f"{what}: Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); "
                                    f"got {x.device}")
    if not weight.codebook and weight.bits not in (2, 3, 4, 8):
        raise UnsupportedLayerError(f"{what}: {weight.bits}-bit uniform codes are not supported")


def tile_args(weight: KernelWeight, dtype: torch.dtype) -> tuple[list, dict]:
    """Tensor/int arguments and constexprs of the GEMV and GEMM kernels (``triton_weights``) for
    activations of ``dtype``. fp32 activations read NF block scales in fp32, computed for the call (the
    cached fp16 ones would cost them 2^-11), which makes the rare fp32 NF call a little slower."""
    dummy = weight.codes
    hi = weight.codes_hi if weight.codes_hi is not None else dummy
    if not weight.codebook:
        folded = weight.zero_folded is not None
        gidx = weight.g_idx if weight.g_idx is not None else dummy
        args = [weight.codes, hi, weight.scales, weight.zero_folded if folded else dummy, gidx, dummy,
                weight.group_size or 1]
        meta = dict(FORMAT=0, BITS=weight.bits, FOLDED=folded, USE_GIDX=weight.g_idx is not None)
    else:
        scales = nf_row_scales(weight, torch.float32)[1] if dtype == torch.float32 else weight.nf_scales
        args = [weight.codes, hi, scales, dummy, dummy, weight.lut, weight.nf_group]
        meta = dict(FORMAT=1, BITS=weight.bits, FOLDED=False, USE_GIDX=False)
    return args, meta


def exact_args(weight: KernelWeight) -> tuple[list, dict]:
    """Arguments of the fp32 bit-exact tile kernel (``triton_dequant``: the oracle's operations)."""
    dummy = weight.codes
    hi = weight.codes_hi if weight.codes_hi is not None else dummy
    if not weight.codebook:
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


def dequant_dtype(x: torch.Tensor):
    """The dtype tiles are dequantized in: x's, except bf16 under the interpreter (its bf16 math is wrong)."""
    return tl.float32 if interpreting() and x.dtype == torch.bfloat16 else TL_DTYPES[x.dtype]


def interpreter_config(configs, prune, named: dict, **meta) -> dict:
    """Under the interpreter: the largest tile the pruner keeps (fewest programs to interpret)."""
    kept = prune(configs, named, **meta)
    best = max(kept, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] * c.kwargs.get("BLOCK_M", 1))
    return dict(best.kwargs)


def gemv_block_m(m: int) -> int:
    """Rows per GEMV program: 1, 2 or 4 on CUDA cores; 16 (one tensor-core tile) up to MAX_M."""
    return 1 if m == 1 else 2 if m == 2 else 4 if m <= 4 else 16


def _gemv(x: torch.Tensor, weight: KernelWeight, config: dict | None) -> torch.Tensor:
    (m, k), n = x.shape, weight.shape[0]
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    args, meta = tile_args(weight, x.dtype)
    meta.update(BLOCK_M=gemv_block_m(m), DQ=dequant_dtype(x), DOT_FP32=interpreting(), enable_fp_fusion=True)
    if config is None and interpreting():
        config = interpreter_config(gemv_configs(), prune_gemv_configs, dict(N=n, K=k, GROUP=args[-1]), **meta)
    if config is None:
        grid = lambda c: (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(k, c["BLOCK_K"]))  # noqa: E731
        gemv_tuned[grid](x, out, m, n, k, x.stride(0), out.stride(0), *args, **meta)
    else:
        grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(k, config["BLOCK_K"]))
        gemv_kernel[grid](x, out, m, n, k, x.stride(0), out.stride(0), *args, **meta, **config)
    return out


def _gemm(x: torch.Tensor, weight: KernelWeight, config: dict | None) -> torch.Tensor:
    (m, k), n = x.shape, weight.shape[0]
    # the interpreter's fp32 -> bf16 cast truncates: it stores fp32 and torch rounds afterwards
    out = torch.empty(m, n, dtype=torch.float32 if interpreting() else x.dtype, device=x.device)
    args, meta = tile_args(weight, x.dtype)
    meta.update(DQ=dequant_dtype(x), DOT_FP32=interpreting(), enable_fp_fusion=True)
    bucket = triton.next_power_of_2(m)
    if config is None and interpreting():
        config = interpreter_config(gemm_configs(), prune_gemm_configs, dict(M=m, N=n, K=k, GROUP=args[-1], x_ptr=x),
                                    **meta)
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
    args, meta = exact_args(weight)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        # no multiply-add contraction: the tiles must reproduce the torch oracle bit for bit
        dequant_kernel[grid](out, n, k, *args, **meta, BLOCK_K=block_k, BLOCK_N=block_n, enable_fp_fusion=False)
    return out


def _uniform_weight(in_features, codes, codes_hi, scales, zeros, zero_folded, g_idx, bits, group_size, zero_mode,
                    out_features) -> KernelWeight:
    return KernelWeight(bits=bits, shape=(out_features, in_features), codes=codes,
                        codes_hi=codes_hi, scales=scales, qzeros=zeros if zero_mode == 1 else None,
                        zeros=zeros if zero_mode in (2, 3) else None, zero_mode=zero_mode,
                        group_size=group_size, g_idx=g_idx, zero_folded=zero_folded)


def _nf_weight(in_features, codes, codes_hi, lut, scale_codes, scale_scales, scale_offset, nf_scales, bits, block,
               scale_block, scale_levels, nf_group, out_features) -> KernelWeight:
    return KernelWeight(bits=bits, shape=(out_features, in_features), codes=codes, codes_hi=codes_hi,
                        lut=lut, scale_codes=scale_codes, scale_scales=scale_scales, scale_offset=scale_offset,
                        block=block, scale_block=scale_block, scale_levels=scale_levels, nf_scales=nf_scales,
                        nf_group=nf_group)


@torch.library.custom_op("compress::dequant_matmul_uniform", mutates_args=())
def dequant_matmul_uniform(x: torch.Tensor, codes: torch.Tensor, codes_hi: torch.Tensor | None,
                           scales: torch.Tensor, zeros: torch.Tensor | None, zero_folded: torch.Tensor | None,
                           g_idx: torch.Tensor | None, bits: int, group_size: int, zero_mode: int,
                           out_features: int) -> torch.Tensor:
    """x @ W^T for a uniform (GPTQ-layout) weight; ``zeros`` is qzeros (zero_mode 1), unpacked (2) or float (3),
    ``zero_folded`` their -z * s (``layout.prepare``)."""
    weight = _uniform_weight(x.shape[-1], codes, codes_hi, scales, zeros, zero_folded, g_idx, bits, group_size,
                             zero_mode, out_features)
    return triton_dequant_matmul(x, weight)


@dequant_matmul_uniform.register_fake
def _(x, codes, codes_hi, scales, zeros, zero_folded, g_idx, bits, group_size, zero_mode, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("compress::dequant_matmul_nf", mutates_args=())
def dequant_matmul_nf(x: torch.Tensor, codes: torch.Tensor, codes_hi: torch.Tensor | None, lut: torch.Tensor,
                      scale_codes: torch.Tensor, scale_scales: torch.Tensor, scale_offset: torch.Tensor,
                      nf_scales: torch.Tensor, bits: int, block: int, scale_block: int, scale_levels: int,
                      nf_group: int, out_features: int) -> torch.Tensor:
    """x @ W^T for an NF-codebook weight with double-quantized block scales (``nf_scales``: undone)."""
    weight = _nf_weight(x.shape[-1], codes, codes_hi, lut, scale_codes, scale_scales, scale_offset, nf_scales, bits,
                        block, scale_block, scale_levels, nf_group, out_features)
    return triton_dequant_matmul(x, weight)


@dequant_matmul_nf.register_fake
def _(x, codes, codes_hi, lut, scale_codes, scale_scales, scale_offset, nf_scales, bits, block, scale_block,
      scale_levels, nf_group, out_features):
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
    if not weight.codebook:
        zeros = {0: None, 1: weight.qzeros, 2: weight.zeros, 3: weight.zeros}[weight.zero_mode]
        return torch.ops.compress.dequant_matmul_uniform(
            x, weight.codes, weight.codes_hi, weight.scales, zeros, weight.zero_folded, weight.g_idx, weight.bits,
            weight.group_size, weight.zero_mode, weight.shape[0])
    return torch.ops.compress.dequant_matmul_nf(
        x, weight.codes, weight.codes_hi, weight.lut, weight.scale_codes, weight.scale_scales,
        weight.scale_offset, weight.nf_scales, weight.bits, weight.block, weight.scale_block, weight.scale_levels,
        weight.nf_group, weight.shape[0])
