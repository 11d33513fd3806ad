"""Config grids and the per-matrix cost entries that the allocation ILP reads.

Grids (``GRIDS``):

- ``gptq``: uniform asymmetric bits {2, 3, 4, 8} x group {32, 64, 128}; every choice exports as GPTQ.
- ``nf``: LQ-LoRA's 432 NormalFloat configs, bits {2, 3, 4, 8} x scale bits {2, 3, 4, 8} x
  second-level dtype {bf16, fp16, fp32} x block {16, 32, 64} x scale block {16, 64, 256} (native export).

``matrix_costs`` gives, for one weight and every config of a grid, the squared (Fisher-weighted)
Frobenius error of its LQ-LoRA decomposition at the given rank (rank 0: plain quantization, the
"ILP without low-rank" baseline) and its exact storage in bits. Given the layer's input Hessian the
error is the output error of the decomposition instead (``decompose``'s output-aware mode: H-whitened
low-rank step, sqrt(tr(R H Rᵀ) / 2), rows weighted by the Fisher when given), with Q from RTN or,
given ``gptq`` settings, from GPTQ on that Hessian.
"""

from __future__ import annotations

import torch

from compress.quant.config import QuantConfig
from compress.quant.qweight import QuantizedWeight

from compress.quant.gptq import GPTQSettings, gptq_quantize

from .decompose import lq_decompose, output_error, output_row_weights, weighted_error


def gptq_grid() -> list[QuantConfig]:
    return [QuantConfig.uniform(bits, group) for bits in (2, 3, 4, 8) for group in (32, 64, 128)]


def nf_grid() -> list[QuantConfig]:
    return [QuantConfig.nf(bits, block=block, scale_bits=scale_bits, scale_block=scale_block, scale_dtype=dtype)
            for bits in (2, 3, 4, 8) for scale_bits in (2, 3, 4, 8) for dtype in ("bfloat16", "float16", "float32")
            for block in (16, 32, 64) for scale_block in (16, 64, 256)]


GRIDS = {"gptq": gptq_grid, "nf": nf_grid}


def matrix_costs(weight: torch.Tensor, configs: list[QuantConfig], rank: int, iterations: int = 20,
                 fisher: torch.Tensor | None = None, seed: int = 0, hessian: torch.Tensor | None = None,
                 gptq: GPTQSettings | None = None) -> dict[str, tuple[float, int]]:
    """{config name: (squared error, storage bits)} for one weight [out, in] over ``configs``."""
    shape = tuple(weight.shape)
    quantize = QuantizedWeight.quantize
    if gptq is not None:
        if hessian is None:
            raise ValueError("GPTQ costs need the layer's input Hessian")
        quantize = lambda matrix, c: gptq_quantize(matrix, hessian, c, gptq).quantized  # noqa: E731
    if hessian is not None:
        error = output_error(hessian, output_row_weights(hessian, fisher))
    else:
        error = lambda residual: weighted_error(residual, fisher)  # noqa: E731
    entries = {}
    for config in configs:
        if rank > 0:
            value = lq_decompose(weight, rank, config, iterations, fisher=fisher, seed=seed, quantize=quantize,
                                 error=error, hessian=hessian).error
        else:
            value = error(weight.detach().float() - quantize(weight, config).dequantize())
        entries[config.name] = (value**2, config.storage_bits(shape))
    return entries


def probe_factors(measured: dict[str, dict[int, float]], predicted: dict[str, dict[int, float]],
                  widths: list[int]) -> dict[str, dict[int, float]]:
    """{probe: {bits: measured / predicted}} for every width of ``widths`` (a probe: matrices whose
    loss change was measured together): a width without a measurement takes the widest measured
    width below it (else the narrowest above); a probe whose prediction is 0 keeps its costs
    (factor 1); a measurement below 0 (rounding) counts as 0."""
    factors = {}
    for probe, values in measured.items():
        known = {bits: max(value, 0.0) / predicted[probe][bits] if predicted[probe].get(bits, 0.0) > 0 else 1.0
                 for bits, value in values.items()}
        below = lambda bits: max((b for b in known if b < bits), default=min(known))  # noqa: E731
        factors[probe] = {bits: known[bits] if bits in known else known[below(bits)] for bits in widths}
    return factors


def rescaled_costs(table: dict[str, dict[str, tuple[float, int]]], factor) -> dict[str, dict[str, tuple[float, int]]]:
    """``table`` ({matrix: {config: (error, bits)}}) with each error times ``factor(matrix, config)``."""
    return {name: {c: (error * factor(name, c), bits) for c, (error, bits) in entries.items()}
            for name, entries in table.items()}
