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
are shared out over the ranks and rank 0 solves the ILP (``compress.distributed``). With
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

The stage makes three walks over the model's units on the run's device (``compress.walker``):
the Fisher, when asked for (``compress.fisher_by_layer``: forward, then backward, one file per
layer, for linears inside the decoder layers); the cost table, unit by unit (per-matrix entries and
the on-disk cache; under ``objective: output`` a calibration walk over the unquantized model); then,
after the ILP, the decomposition. With ``quantizer: gptq`` or ``objective: output`` the calibration
activations flow from layer to layer as in ``quantize``. The Fisher files (fp32, the
size of the selected matrices) are removed when the stage ends. In a streaming recipe each unit is
read from the stream's source and written as one shard of the stage's checkpoint (native format;
LoRA adapters are stored in it and come back wrapped): the result equals the resident model's,
tensor for tensor.
"""

from __future__ import annotations

import shutil
import time
from typing import Literal

import torch
from pydantic import Field, model_serializer, model_validator

from compress.lowrank import (GRIDS, NF8_BITS, InfeasibleBudget, LoRALinear, allocate, budget_bits_for,
                              init_from_factors, lq_decompose, minimum_bits)
from compress.lowrank.decompose import output_error, output_row_weights, weighted_error
from compress.quant import QuantizedWeight, QuantLinear
from compress.quant.gptq import gptq_quantize
from compress.quant.quantizers import QUANTIZERS

from ..checkpoint.write import INTEGER_FORMATS
from ..errors import RecipeError, StageError
from ..fisher_by_layer import fisher_by_layer, load_layer_fisher
from .lq_lora_costs import gptq_settings, output_cost_table, weight_cost_table
from .lq_lora_measured import References, measured_table
from ..stage import Stage, StageConfig
from ..replace_layers import Replacement, replace_layers
from ..walker import decoder_layers
from ..targets import check_selector, fused_members, select_linears



class LQLoRAConfig(StageConfig):
    rank: int = Field(64, ge=0)
    alpha: float = Field(16.0, gt=0)
    budget_bits: float | None = Field(None, gt=0)
    budget_gib: float | None = Field(None, gt=0)
    grid: Literal["gptq", "nf"] = "gptq"
    group_sizes: list[int] | None = None
    fisher: bool | Literal["outputs"] | None = None  # None: on when the recipe gives data.calibration (``resolved``)
    objective: Literal["output", "weight"] | None = None  # None: output under the same condition
    iterations: int = Field(20, ge=1)
    targets: list[str] = ["Linear"]
    ignore: list[str] = ["lm_head"]
    solver: Literal["HiGHS", "PULP_CBC_CMD"] | None = None
    seed: int = 0
    workers: int = Field(1, ge=1)
    quantizer: Literal["rtn", "gptq"] = "rtn"
    damp: float = Field(0.05, gt=0, lt=1)
    refine_rounds: int = Field(1, ge=0)  # GPTQ's refinement at rank 0 (``gptq_settings``)
    measured_windows: int = Field(0, ge=0)  # 0: off; N: costs rescaled by measured loss (``lq_lora_measured``)
    measured_probe: Literal["group", "layer"] = "group"  # what one probe quantizes at once

    @model_validator(mode="after")
    def _one_budget_and_valid_selectors(self) -> "LQLoRAConfig":
        if self.quantizer == "gptq" and self.grid != "gptq":
            raise ValueError(f"quantizer: gptq needs grid: gptq (GPTQ rounds to uniform grids, not {self.grid})")
        for key in ("damp", "refine_rounds"):
            if key in self.model_fields_set and self.quantizer != "gptq":
                raise ValueError(f"{key}: only for quantizer: gptq")
        if "refine_rounds" in self.model_fields_set and self.refine_rounds and self.rank > 0:
            raise ValueError("refine_rounds: only at rank 0 (at rank > 0 GPTQ runs unrefined in every iteration)")
        if "measured_probe" in self.model_fields_set and not self.measured_windows:
            raise ValueError("measured_probe: only with measured_windows > 0")
        if (self.budget_bits is None) == (self.budget_gib is None):
            raise ValueError("give exactly one of budget_bits and budget_gib")
        for key in list(self.targets) + list(self.ignore):
            problem = check_selector(key)
            if problem:
                raise ValueError(f"selector {key!r}: {problem}")
        return self

    @model_serializer(mode="wrap")
    def _gptq_options_only_where_used(self, handler):
        data = handler(self)
        if self.quantizer != "gptq":
            data.pop("damp", None)
        if self.quantizer != "gptq" or self.rank > 0:
            data.pop("refine_rounds", None)
        if not self.measured_windows:  # recipes without it serialize as before
            data.pop("measured_windows", None)
            data.pop("measured_probe", None)
        return data


def grid_for(config: LQLoRAConfig, shape: tuple[int, int]) -> list:
    """The grid's configs that fit a matrix (gptq groups must divide in_features: whole groups),
    restricted to ``group_sizes`` (group, or NF block) when given."""
    configs = [c for c in GRIDS[config.grid]() if c.divides(shape[1])]
    if config.group_sizes is not None:
        configs = [c for c in configs if c.segment in config.group_sizes]
    return configs


def check(recipe, entry, model) -> None:
    config: LQLoRAConfig = entry.config
    selected = select_linears(model, config.targets, config.ignore)
    if not selected:
        raise RecipeError(f"{entry.where}.targets: selects no linear layer (targets {config.targets}, "
                          f"ignore {config.ignore})")
    for name, module in selected:
        if not grid_for(config, (module.out_features, module.in_features)):
            raise RecipeError(f"{entry.where}: no {config.grid} config fits {name} (in_features={module.in_features})")
    _check_budget(entry, config, {name: (m.out_features, m.in_features) for name, m in selected})
    outside = _outside_layers(model, [name for name, _ in selected])
    if config.fisher and outside:
        raise RecipeError(f"{entry.where}.fisher: the Fisher is computed one decoder layer at a time and covers "
                          f"linears inside them; {outside[0]} is not (add it to ignore)")
    if config.fisher == "outputs" and resolved(config, recipe, model, [n for n, _ in selected]).objective != "output":
        raise RecipeError(f"{entry.where}.fisher: outputs weights the rows of output errors; it needs objective: "
                          "output (and data.calibration)")
    if config.measured_windows and resolved(config, recipe, model, [n for n, _ in selected]).objective != "output":
        raise RecipeError(f"{entry.where}.measured_windows: rescales the output objective's costs; it needs "
                          "objective: output (and data.calibration)")
    if config.objective == "output" and outside:
        raise RecipeError(f"{entry.where}.objective: output errors come from each decoder layer's inputs; "
                          f"{outside[0]} is outside them (add it to ignore, or objective: weight)")
    integer = [e for e in recipe.later(entry.index, "export") if e.config.format in INTEGER_FORMATS]
    if config.grid == "nf" and integer:
        raise RecipeError(f"{entry.where}.grid: nf configs cannot be written as {integer[0].config.format} "
                          f"({integer[0].where}); use grid: gptq or export native")


def _outside_layers(model, names: list[str]) -> list[str]:
    layers = [prefix for prefix, _ in decoder_layers(model)]
    return [name for name in names if not any(name.startswith(f"{p}.") for p in layers)]


def resolved(config: LQLoRAConfig, recipe, model, names: list[str]) -> LQLoRAConfig:
    """``config`` with ``fisher`` and ``objective`` decided: each on (output) when the recipe gives
    data.calibration (not only the default stdlib text) and every selected linear is inside a
    decoder layer, unless the recipe says."""
    default = "calibration" in recipe.spec.data.model_fields_set and not _outside_layers(model, names)
    fisher = default if config.fisher is None else config.fisher
    objective = config.objective or ("output" if default else "weight")
    return config.model_copy(update={"fisher": fisher, "objective": objective})


def _check_budget(entry, config: LQLoRAConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """An impossible budget fails before any weight is loaded, naming the smallest feasible one."""
    numel = {name: shape[0] * shape[1] for name, shape in shapes.items()}
    bits = {name: {c.name: c.storage_bits(shape) for c in grid_for(config, shape)} for name, shape in shapes.items()}
    budget = budget_bits_for(numel, config.budget_bits, config.budget_gib)
    minimum = minimum_bits(bits, _ties(list(shapes), config.grid))
    if minimum > budget:
        raise RecipeError(f"{entry.where}: {InfeasibleBudget(budget, minimum, sum(numel.values()))}")


def _ties(names: list[str], grid: str) -> list[list[str]]:
    return [members for _, members in fused_members(names)] if grid == "gptq" else []


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


def solve(ctx, config: LQLoRAConfig, table: dict, numel: dict, report):
    """The ILP's choice on rank 0, broadcast; an impossible budget ends the stage."""
    budget = budget_bits_for(numel, config.budget_bits, config.budget_gib)
    start = time.perf_counter()
    result = ctx.ranks.broadcast(_allocate(config, table, numel, budget, list(numel)) if ctx.ranks.main else None)
    if isinstance(result, InfeasibleBudget):
        raise StageError(f"{ctx.entry.where}: {result}")
    report.metrics.update(ilp_seconds=time.perf_counter() - start, ilp_solver=result.solver)
    return result


def report_sizes(config: LQLoRAConfig, result, shapes: dict[str, tuple[int, int]], report) -> None:
    params = sum(o * i for o, i in shapes.values())
    adapters = sum(config.rank * (o + i) for o, i in shapes.values())
    report.metrics.update(bits_per_param=result.bits / params, quantized_params=params, rank=config.rank,
                          bits_per_param_with_adapters_16bit=(result.bits + 16 * adapters) / params,
                          bits_per_param_with_adapters_nf8=(result.bits + NF8_BITS * adapters) / params,
                          label=f"lq-lora r{config.rank} {config.grid} {result.bits / params:.2f}b")


def run(ctx, config: LQLoRAConfig, report) -> None:
    """Three walks over the model's units on the run's device (``compress.walker``): the Fisher when
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
    _decompose_units(ctx, config, shapes, fisher_dir, result.choice, report)
    report_sizes(config, result, shapes, report)
    ctx.ranks.barrier()
    if fisher_dir is not None and ctx.ranks.main:  # as large as the model's linears in fp32
        shutil.rmtree(fisher_dir)


def _streaming(config: LQLoRAConfig) -> str | None:
    if config.measured_windows:
        return "measured_windows probes the whole model with weights swapped in memory (set it to 0)"
    return None


def _allocate(config: LQLoRAConfig, table: dict, numel: dict, budget: float, names: list[str]):
    """The ILP's result, or the InfeasibleBudget that says why there is none (rank 0 solves it)."""
    try:
        return allocate({n: {c: e[0] for c, e in t.items()} for n, t in table.items()},
                        {n: {c: e[1] for c, e in t.items()} for n, t in table.items()},
                        numel, budget, _ties(names, config.grid), config.solver)
    except InfeasibleBudget as err:
        return err


def _decompose(module, qconfig, config: LQLoRAConfig, fisher, hessian=None) -> tuple[torch.nn.Module, dict]:
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


def _maker(ctx, config: LQLoRAConfig, fisher_dir, choice: dict):
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


def calibrated(config: LQLoRAConfig) -> bool:
    """Whether the decomposition walk carries calibration activations (for Hessians)."""
    return config.quantizer == "gptq" or config.objective == "output"


def _decompose_units(ctx, config: LQLoRAConfig, shapes: dict, fisher_dir, choice: dict, report) -> None:
    """Unit by unit (``replace_layers``): decompose the unit's matrices in place, with the Hessians
    of the activations that reach them when the walk is calibrated; a streamed unit is written as
    it leaves."""
    needs = "hessians" if calibrated(config) else "nothing"
    description = "lq_lora calibrated units" if calibrated(config) else "lq_lora decompose units"
    outer = replace_layers(ctx, report, list(shapes), _maker(ctx, config, fisher_dir, choice), needs, description)
    if outer:
        fallback = QUANTIZERS[config.quantizer].given(None).name.upper()
        report.notes.append(f"outside the decoder layers, quantized with {fallback}: {', '.join(outer)}")


STAGE = Stage(name="lq_lora", config=LQLoRAConfig, run=run, modifies_model=True, quantizes=True, check=check,
              leaves_adapters=lambda config: config.rank > 0, streaming=_streaming,
              low_rank=lambda config: [("rank", config.rank, config.targets, config.ignore)])
