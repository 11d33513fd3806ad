"""lq_lora: every selected linear becomes a quantized base Q plus a LoRA adapter initialized to L1 @ L2.

```yaml
- lq_lora: {rank: 64, budget_bits: 3.0, grid: gptq, fisher: true, iterations: 20, ignore: [lm_head]}
- lq_lora: {rank: 0, budget_bits: 3.0, quantizer: gptq, damp: 0.05, refine_rounds: 1, objective: output}
- lq_lora: {rank: 0, budget_bits: 3.25, quantizer: gptq, objective: output, fisher: outputs}
- lq_lora: {rank: 0, budget_bits: 3.25, quantizer: gptq, measured_windows: 2, measured_probe: layer}
- lq_lora: {rank: 0, budget_bits: 3.25, quantizer: gptq, measured_windows: 2, group_sizes: [128]}
```

LQ-LoRA (Guo et al. 2024): for each matrix and each config of the grid (``gptq``: 12 uniform configs;
``nf``: the paper's 432 NF configs) the alternating decomposition W = Q + L1 L2 gives an error; an ILP
picks one config per matrix minimizing the total error within the budget (``budget_bits`` per
parameter over the selected matrices, or ``budget_gib`` in total); each matrix is then decomposed
with its config. For the ``gptq`` grid, q/k/v and gate/up of a layer are tied to one config
(engines fuse them). Cost entries are cached per matrix under ``OUTPUT/.cache/lq_lora/``
(``lq_lora_costs``), so a resumed run does not recompute them; ``workers: N`` computes weight-objective
entries in N processes. With ``torchrun`` the cost table, the Fisher windows and the decompositions
are shared out over the ranks and rank 0 solves the ILP (``compress.execution.distributed``). With
``streaming: true`` the stage holds one decoder layer at a time (last paragraph). ``alpha`` sets the
adapter scaling alpha / rank (LQ-LoRA: 16 at rank 64). ``group_sizes`` restricts the grid to those
groups (NF: blocks). ``rank: 0`` is mixed-precision quantization by the same ILP with no low-rank
part and no adapters (its result exports as GPTQ on the gptq grid).

What is minimized (``objective``, default ``output`` when the recipe gives ``data.calibration`` and
every selected linear is inside a decoder layer, else ``weight``):

- ``output``: each matrix's layer-output error sqrt(tr(R H Rᵀ) / 2) of its residual R = W - Q - L1 L2,
  H the input Hessian from ``data.calibration``, in the ILP's costs (the Hessians of the unquantized
  model), in the low-rank step (H-whitened SVD, ``lowrank.decompose``) and in the stopping rule;
  with the Fisher its row weights weight the output rows (the loss change to second order, so that
  costs compare across layers). The decomposition walks the layers with the calibration
  activations as ``quantize`` does (each layer's Hessians from the layers before, already replaced).
- ``weight``: the (Fisher-weighted) Frobenius error of the RTN decomposition in the ILP (the paper's
  objective); the low-rank step weighted by the Fisher's row and column weights.

``fisher`` (default: on under the same condition) computes the diagonal empirical Fisher from
``data.calibration``: ``true``, of the weights (the paper's; under ``output`` its row means weight
the rows); ``outputs`` (``output`` objective only), of each matrix's outputs, per position (BRECQ's
weights of output errors; ``lowrank.decompose``). Neither ranks Gemma-3-270M's matrices well against
their measured loss (BENCHMARKS.md, ``lqlora_sensitivity.py``); ``outputs`` is an option, not the default.

``measured_windows: N`` (``output`` objective; default 0, off) rescales the costs of each group of
matrices (fused q/k/v, fused gate/up, every other alone) and bit width by measured / predicted loss
change: the group quantized at that width by the stage's quantizer (a reference config), the KL
divergence from the float model's next-token distributions on N calibration windows against the
sum of the same quantizations' costs (``lq_lora_measured``: groups x widths forward passes, cached
per probe; not in a streaming recipe). ``measured_probe: layer`` probes a decoder layer's matrices
together instead. Only each width's cheapest config is probed: other group sizes keep their predicted
ratio to it, by which on Gemma-3-270M the ILP spent its bits on int3 g64 (44 of 126 matrices) more
than on int4; with ``group_sizes`` cut to the probed one (``[128]``) every cost the ILP compares is
measured (0.965x the uniform GPTQ curve at 3.25 bits there, against 1.035x over the whole grid:
BENCHMARKS.md).

``quantizer: gptq`` (gptq grid) quantizes Q with GPTQ instead of round-to-nearest, on the layer's
input Hessian (``damp``); its ILP costs are GPTQ's output errors under ``objective: output`` and RTN's
Frobenius errors under ``weight`` (where the alternation still keeps the iterate of least output error).
At rank 0 (no alternation: one GPTQ per matrix and config) GPTQ runs with ``refine_rounds`` (default
1, as ``quantize``) rounds of code and scale refinement, in the ILP's costs and in the final
quantization alike, so the ILP compares the errors of what it installs; at rank > 0 GPTQ runs once
per iteration and config, unrefined (``refine_rounds`` is refused there).

The stage makes three walks over the model's units on the run's device (``compress.execution.walker``):
the Fisher, when asked for (``compress.training.fisher_by_layer``: forward, then backward, one file per
layer, for linears inside the decoder layers); the cost table, unit by unit (per-matrix entries and
the on-disk cache; under ``objective: output`` a calibration walk over the unquantized model); then,
after the ILP, the decomposition. With ``quantizer: gptq`` or ``objective: output`` the calibration
activations flow from layer to layer as in ``quantize``. The Fisher files (fp32, the
size of the selected matrices) are removed when the stage ends. In a streaming recipe each unit is
read from the stream's source and written as one shard of the stage's checkpoint (its own layout;
LoRA adapters are stored in it and come back wrapped): the result equals the resident model's,
tensor for tensor.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace

import torch

from compress.lowrank import GRIDS, NF8_BITS

from ..errors import StageError
from ..model_state import ModelState, ModuleQuant, selected_quant
from ..planning.plan import GIB
from ..planning.plan_training import layer_shape_list
from ..planning.stage_memory import PlanState, calibration, held
from ..stage import Stage
from ..targets import select_linears
from ..training.fisher_by_layer import fisher_by_layer
from .lq_lora_costs import output_cost_table, solve, weight_cost_table
from .lq_lora_decompose import decompose_units
from .lq_lora_measured import References, measured_table
from .lq_lora_spec import LQLoRAConfig, check, grid_for, resolved

__all__ = ["STAGE", "LQLoRAConfig", "grid_for", "resolved"]


def effect(entry, model, state: ModelState) -> ModelState:
    """Every selected linear quantized with a config of its grid's family, picked by the ILP at run time."""
    config: LQLoRAConfig = entry.config
    family = type(GRIDS[config.grid]()[0])
    return state.quantized(selected_quant(model, config.targets, config.ignore,
                                          lambda module: ModuleQuant(None, family, by=entry.where)))


def dense_selection(ctx, config: LQLoRAConfig, report) -> dict:
    """{name: module} of the selected dense linears (others are reported as skipped); none is an error."""
    modules = {}
    for name, module in select_linears(ctx.model, config.targets, config.ignore):
        if isinstance(module, torch.nn.Linear):
            modules[name] = module
        else:
            report.skip(name, f"not a dense linear ({type(module).__name__})")
    if not modules:
        raise StageError(f"{ctx.entry.where}: no dense linear layer to decompose among those selected "
                         f"({len(report.skipped)} already quantized); lq_lora starts from dense weights")
    return modules


def report_sizes(config: LQLoRAConfig, result, shapes: dict[str, tuple[int, int]], report) -> None:
    params = sum(o * i for o, i in shapes.values())
    adapters = sum(config.rank * (o + i) for o, i in shapes.values())
    report.metrics.update(bits_per_param=result.bits / params, quantized_params=params, rank=config.rank,
                          bits_per_param_with_adapters_16bit=(result.bits + 16 * adapters) / params,
                          bits_per_param_with_adapters_nf8=(result.bits + NF8_BITS * adapters) / params,
                          label=f"lq-lora r{config.rank} {config.grid} {result.bits / params:.2f}b")


def run(ctx, config: LQLoRAConfig, report) -> None:
    """Three walks over the model's units on the run's device (``compress.execution.walker``): the Fisher when
    asked for, the cost table, then after the ILP the decomposition."""
    shapes = {n: (m.out_features, m.in_features) for n, m in dense_selection(ctx, config, report).items()}
    config = resolved(config, ctx.recipe, ctx.model, list(shapes))
    report.metrics.update(objective=config.objective, fisher=config.fisher)
    start = time.perf_counter()
    fisher_cache = ctx.out_dir / ".cache" / "lq_lora_fisher"
    of = "outputs" if config.fisher == "outputs" else "weights"
    fisher_dir = fisher_by_layer(ctx, list(shapes), fisher_cache, of) if config.fisher else None
    report.metrics["fisher_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    seen = References(ctx, config, grid_for) if config.measured_windows else None
    if config.objective == "output":
        table = output_cost_table(ctx, config, grid_for, shapes, fisher_dir, seen)
    else:
        table = weight_cost_table(ctx, config, grid_for, shapes, fisher_dir)
    report.metrics["cost_table_seconds"] = time.perf_counter() - start  # near 0 when every entry was cached
    if seen is not None:
        start = time.perf_counter()
        table = measured_table(ctx, config, table, seen, report)
        report.metrics["measured_seconds"] = time.perf_counter() - start
    result = solve(ctx, config, table, {n: o * i for n, (o, i) in shapes.items()}, report)
    decompose_units(ctx, config, shapes, fisher_dir, result.choice, report)
    report_sizes(config, result, shapes, report)
    ctx.ranks.barrier()
    if fisher_dir is not None and ctx.ranks.main:  # as large as the model's linears in fp32
        shutil.rmtree(fisher_dir)


def _streaming(config: LQLoRAConfig) -> str | None:
    if config.measured_windows:
        return "measured_windows probes the whole model with weights swapped in memory (set it to 0)"
    return None


def memory(arch, config: LQLoRAConfig, state: PlanState) -> list[tuple[str, dict]]:
    """The model it reads (a GPTQ walk's activations with quantizer: gptq); the base is then
    ``budget_bits`` (or ``budget_gib`` over the possibly pruned matrices) with rank-``rank`` adapters."""
    before, bits = held(arch, state), config.budget_bits
    if bits is None:
        numel = sum(o * i for shapes in layer_shape_list(arch, state.setup) for o, i in shapes.values())
        bits = config.budget_gib * GIB * 8 / numel
    state.setup = replace(state.setup, base=None, base_bits=bits)
    state.base_label, state.rank = f"LQ-LoRA {bits:.2f} bits", config.rank
    return [("lq_lora", {**before, **calibration(arch, state)} if config.quantizer == "gptq" else before)]


STAGE = Stage(name="lq_lora", config=LQLoRAConfig, run=run, modifies_model=True, quantizes=True, check=check, effect=effect,
              memory=memory,
              leaves_adapters=lambda config: config.rank > 0, streaming=_streaming,
              low_rank=lambda config: [("rank", config.rank, config.targets, config.ignore)])
