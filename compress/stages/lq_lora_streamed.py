"""``lq_lora`` in a streaming recipe (``streaming: true``): one decoder layer in memory at a time.

Three walks over the model's units (``compress.streaming``), each reading one unit from the stream's
source: the Fisher, when asked for (``compress.streamed_fisher``: forward, then backward, one file
per layer); the cost table, unit by unit (the same per-matrix entries and on-disk cache as in
memory); then, after the ILP, the decomposition, each unit written as one shard of the stage's
checkpoint (native format; LoRA adapters are stored in it and come back wrapped). With
``quantizer: gptq`` the calibration activations flow from layer to layer as in ``quantize``.
The Fisher files (fp32, the size of the selected matrices) are removed when the stage ends. The
result equals the in-memory stage's, tensor for tensor.
"""

from __future__ import annotations

import shutil
import time

from ..layerwise import calibrate_layer, first_layer_inputs
from ..streamed_fisher import load_layer_fisher, streamed_fisher
from ..streaming import rewrite_units
from .lq_lora import cost_table, dense_selection, installer, report_sizes, solve


def run_streamed(ctx, config, report) -> None:
    stream = ctx.stream
    shapes = {n: (m.out_features, m.in_features) for n, m in dense_selection(ctx, config, report).items()}
    start = time.perf_counter()
    fisher_dir = streamed_fisher(ctx, list(shapes), ctx.out_dir / ".cache" / "lq_lora_fisher") if config.fisher else None
    report.metrics["fisher_seconds"] = time.perf_counter() - start
    units = [p for p in stream.units if any(stream.owns(p, n) for n in shapes)]
    start = time.perf_counter()
    table = {}
    for prefix in ctx.track(units, "lq_lora costs (streaming)"):
        with stream.unit(prefix):
            table.update(cost_table(ctx, config, _modules(ctx, prefix, shapes), load_layer_fisher(fisher_dir, prefix)))
    report.metrics["cost_table_seconds"] = time.perf_counter() - start
    result = solve(ctx, config, {n: table[n] for n in shapes}, {n: o * i for n, (o, i) in shapes.items()}, report)
    _decompose_streamed(ctx, config, shapes, fisher_dir, result.choice, report)
    report_sizes(config, result, shapes, report)
    ctx.ranks.barrier()
    if fisher_dir is not None and ctx.ranks.main:  # as large as the model's linears in fp32
        shutil.rmtree(fisher_dir)


def _modules(ctx, prefix: str, shapes: dict) -> dict:
    return {n: ctx.model.get_submodule(n) for n in shapes if ctx.stream.owns(prefix, n)}


def _decompose_streamed(ctx, config, shapes: dict, fisher_dir, choice: dict, report) -> None:
    """Unit by unit: decompose the unit's matrices (GPTQ's Hessians from the activations that
    reach it) and write it as one shard of the stage's checkpoint."""
    stream, outer = ctx.stream, []

    def decompose_unit(prefix: str, unit, inputs):
        modules = _modules(ctx, prefix, shapes)
        install = installer(ctx, config, modules, load_layer_fisher(fisher_dir, prefix), choice, report)
        if config.quantizer == "gptq" and prefix == stream.embeddings:
            inputs = first_layer_inputs(ctx.model, ctx.windows("calibration"))
        if config.quantizer == "gptq" and prefix in stream.layer_prefixes:
            return calibrate_layer(unit, modules, lambda group, hessians: install(list(group), hessians), inputs)
        outer.extend(modules if config.quantizer == "gptq" else [])
        install(list(modules))
        return inputs

    rewrite_units(ctx, "lq_lora decompose (streaming)", decompose_unit)
    if outer:
        report.notes.append(f"outside the decoder layers, quantized with RTN: {', '.join(outer)}")
