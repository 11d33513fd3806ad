"""lq_lora's last walk: each selected matrix replaced, unit by unit (``replace_layers``), by its
chosen config's Q plus a LoRA adapter initialized to the low-rank part L1 L2 (``lowrank.lq_decompose``),
with the Hessians of the activations that reach it when the walk is calibrated."""

from __future__ import annotations

import torch

from compress.lowrank import GRIDS, LoRALinear, init_from_factors, lq_decompose
from compress.lowrank.decompose import output_error, output_row_weights, weighted_error
from compress.quant import QuantizedWeight, QuantLinear
from compress.quant.gptq import gptq_quantize
from compress.quant.quantizers import QUANTIZERS

from ..execution.replace_layers import Replacement, replace_layers
from ..training.fisher_by_layer import load_layer_fisher
from .lq_lora_costs import gptq_settings


def _decompose(module, qconfig, config, fisher, hessian=None) -> tuple[torch.nn.Module, dict]:
    """(new layer, report entry) for one matrix: Q (+ a LoRA adapter initialized to L1 L2 when rank
    > 0) by RTN or GPTQ (``quantizer``) with the input Hessian when given; the ``output`` objective
    makes the low-rank step and the error output-aware (``lowrank.decompose``)."""
    weight = module.weight.detach().float()
    quantize, error = QuantizedWeight.quantize, (lambda residual: weighted_error(residual, fisher))
    scale = max(float(torch.linalg.norm(weight)), 1e-30)
    output = config.objective == "output"
    if hessian is not None:
        if config.quantizer == "gptq":
            quantize = lambda matrix, c: gptq_quantize(matrix, hessian, c, gptq_settings(config)).quantized  # noqa: E731
        error = output_error(hessian, output_row_weights(hessian, fisher) if output else None)
        scale = max(error(weight), 1e-30)
    if config.rank == 0:
        quantized = quantize(weight, qconfig)
        layer = QuantLinear.from_weight(quantized, module.bias)
        return layer, {"iterations": 0, "rel_error": error(weight - quantized.dequantize()) / scale}
    result = lq_decompose(weight, config.rank, qconfig, config.iterations, fisher, seed=config.seed,
                          quantize=quantize, error=error, hessian=hessian if output else None)
    layer = LoRALinear(QuantLinear.from_weight(result.quantized, module.bias), config.rank, config.alpha)
    init_from_factors(layer, result.left, result.right)
    return layer, {"iterations": len(result.errors), "rel_error": result.error / scale}


def _layer_fisher(ctx, fisher_dir):
    """``fisher(name)``: the Fisher of a module's weight (or outputs), or None; read one decoder
    layer's file at a time, on the device, when its first module asks."""
    held: dict[str, dict] = {}

    def fisher(name: str):
        layer = ctx.units.unit_of(name)
        if layer not in held:
            held.clear()
            held[layer] = load_layer_fisher(fisher_dir, layer, ctx.device)
        return held[layer].get(name)
    return fisher


def _maker(ctx, config, fisher_dir, choice: dict):
    """``make(group, stats)`` for ``replace_layers``: each matrix decomposed with its chosen config
    (rank 0: just quantized, no adapter); ``rel_error`` is the residual's (Fisher-weighted) Frobenius
    norm over ||W||, or with Hessians its output error over W's."""
    by_name, fisher = {c.name: c for c in GRIDS[config.grid]()}, _layer_fisher(ctx, fisher_dir)

    def make(group: dict, stats: dict | None) -> dict[str, Replacement]:
        made = {}
        for name, module in group.items():
            qconfig = by_name[choice[name]]
            layer, row = _decompose(module, qconfig, config, fisher(name), stats[name].hessian if stats else None)
            rounding = QUANTIZERS[config.quantizer].given(stats).name
            made[name] = Replacement(layer, qconfig, {"config": choice[name], "quantizer": rounding, **row})
        return made
    return make


def calibrated(config) -> bool:
    """Whether the decomposition walk carries calibration activations (for Hessians)."""
    return config.quantizer == "gptq" or config.objective == "output"


def decompose_units(ctx, config, shapes: dict, fisher_dir, choice: dict, report) -> None:
    """Unit by unit (``replace_layers``): decompose the unit's matrices in place, with the Hessians
    of the activations that reach them when the walk is calibrated; a streamed unit is written as
    it leaves."""
    needs = "hessians" if calibrated(config) else "nothing"
    description = "lq_lora calibrated units" if calibrated(config) else "lq_lora decompose units"
    outer = replace_layers(ctx, report, list(shapes), _maker(ctx, config, fisher_dir, choice), needs, description)
    if outer:
        fallback = QUANTIZERS[config.quantizer].given(None).name.upper()
        report.notes.append(f"outside the decoder layers, quantized with {fallback}: {', '.join(outer)}")
