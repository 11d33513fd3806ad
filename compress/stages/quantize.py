"""quantize: replace linear layers by packed low-bit ``QuantLinear`` layers, no training.

```yaml
- quantize: {method: rtn, config: {type: uniform, bits: 4, group_size: 64, sym: false},
             overrides: {"re:.*down_proj$": {bits: 8}}, ignore: [lm_head]}
- quantize: {method: gptq, config: {bits: 3, group_size: 128}, damp: 0.05, damp_increment: 0.01, block: 128,
             order: group_aware, mse_norm: 0.0, refine_rounds: 1}
```

Both walk the model unit by unit on the run's device (``compress.walker``). ``method: rtn`` rounds
each weight to its group's grid. ``method: gptq`` (uniform configs only) carries
``data.calibration``'s activations through the decoder layer by layer (``compress.layerwise``): each group of
linears reading one input gets its input Hessian and is quantized by GPTQ (``quant.gptq``: ``damp``
fraction of mean diag(H), raised by ``damp_increment`` while H is not positive definite, lazy
``block`` columns, ``order`` natural / activation (act order, static groups) / group_aware
(GPTQModel's group-aware reordering), ``mse_norm`` > 0 for the per-group scale search,
``refine_rounds`` of code and scale refinement after the column loop, ``quant.gptq_refine``); the layer's
outputs with its quantized linears feed the next layer; linears that read one input and share a
config (q/k/v, gate/up) share one Hessian and run as one stacked GPTQ. The defaults (damp 0.05,
group_aware, no scale search) are GPTQModel's and were chosen on held-out text (python-doc,
SmolLM2-135M, int4 g64 sym, 32 x 512 calibration windows): perplexity 12.369 against 13.901 with
the former natural order and damp 0.01, and 12.773 for GPTQModel 7.6.0 at its defaults; the scale
search (mse_norm 2.4) gave 12.482. One refinement round is the default, measured the same way
(rounds 0 → 1): int3 g64 sym 24.82 → 19.34 (stdlib, out of domain: 17.64 → 13.66), int3 g128 asym
22.24 → 18.39 (13.99 → 12.48), int4 g128 sym 12.81 → 12.56 (8.04 → 8.25, the one loss out of
domain); a second round gave int3 g64 sym 19.48. ``benchmarks/heldout.py`` measures the whole grid
(BENCHMARKS.md). Selected linears outside the decoder layers (an lm_head that is not ignored) are
rounded with RTN, and the report says so.

With ``torchrun`` the matrices (of each GPTQ input group) are shared out over the ranks
(``compress.distributed``). ``config`` is the default for every selected layer (``targets`` minus ``ignore``: class names, exact
module names, or ``re:`` regexes). ``overrides`` maps a selector to fields that replace the
default's; every matching override applies, in order. ``type: nf`` selects NormalFloat codes with
double-quantized block scales (``bits, block, scale_bits, scale_block, scale_dtype``); ``uniform``
selects group-wise affine integers (``bits, group_size, sym``). When the recipe later exports GPTQ,
q/k/v and gate/up of a layer are given one config (the most precise of theirs), as engines fuse them;
every such change is listed in the report.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError, model_serializer, model_validator

from compress.quant import QuantConfig, QuantLinear
from compress.quant.gptq import ORDERS, GPTQSettings, gptq_quantize, gptq_quantize_stacked

from ..checkpoint.compressed_tensors import ct_problems
from ..checkpoint.gptq import gptq_problems
from ..checkpoint.write import INTEGER_FORMATS
from ..config_errors import format_validation_error
from ..errors import RecipeError, StageError
from ..layerwise import calibration_step
from ..stage import STRICT, Stage, StageConfig
from ..walker import HOST, rewrite_units
from ..targets import check_selector, fused_members, matches, select_linears, set_module

NF_ONLY = ("block", "scale_bits", "scale_block", "scale_dtype")
UNIFORM_ONLY = ("group_size", "sym")


class QuantSpec(BaseModel):
    """The recipe form of a ``QuantConfig``."""

    model_config = STRICT
    type: Literal["uniform", "nf"] = "uniform"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 128
    sym: bool = False
    block: int = Field(64, ge=1)
    scale_bits: Literal[2, 3, 4, 8] = 8
    scale_block: int = Field(256, ge=1)
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float32"

    @model_validator(mode="after")
    def _fields_of_type(self) -> "QuantSpec":
        foreign = NF_ONLY if self.type == "uniform" else UNIFORM_ONLY
        wrong = [k for k in foreign if k in self.model_fields_set]
        if wrong:
            other = "nf" if self.type == "uniform" else "uniform"
            raise ValueError(f"{', '.join(wrong)}: only for type {other} (this config is type {self.type})")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size} must be -1 (per output channel) or positive")
        return self

    @model_serializer(mode="wrap")
    def _only_fields_of_type(self, handler):
        data = handler(self)
        for key in NF_ONLY if self.type == "uniform" else UNIFORM_ONLY:
            data.pop(key, None)
        return data

    def to_config(self) -> QuantConfig:
        if self.type == "uniform":
            return QuantConfig.uniform(self.bits, self.group_size, self.sym)
        return QuantConfig.nf(self.bits, self.block, self.scale_bits, self.scale_block, self.scale_dtype)


GPTQ_ONLY = ("damp", "damp_increment", "block", "order", "mse_norm", "refine_rounds")


class QuantizeConfig(StageConfig):
    method: Literal["rtn", "gptq"] = "rtn"
    config: QuantSpec = QuantSpec()
    damp: float = Field(0.05, gt=0, lt=1)
    damp_increment: float = Field(0.01, ge=0, lt=1)
    block: int = Field(128, ge=1)
    order: Literal[ORDERS] = "group_aware"
    mse_norm: float = Field(0.0, ge=0)
    refine_rounds: int = Field(1, ge=0, le=16)
    overrides: dict[str, dict[str, Any]] = {}
    targets: list[str] = ["Linear"]
    ignore: list[str] = ["lm_head"]

    @model_validator(mode="after")
    def _valid_selectors_and_overrides(self) -> "QuantizeConfig":
        wrong = [key for key in GPTQ_ONLY if key in self.model_fields_set and self.method != "gptq"]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: only for method gptq (this stage is method {self.method})")
        for key in list(self.targets) + list(self.ignore) + list(self.overrides):
            problem = check_selector(key)
            if problem:
                raise ValueError(f"selector {key!r}: {problem}")
        for key in self.overrides:
            self.override_spec(key)
        return self

    @model_serializer(mode="wrap")
    def _gptq_fields_only_for_gptq(self, handler):
        data = handler(self)
        if self.method != "gptq":
            for key in GPTQ_ONLY:
                data.pop(key, None)
        return data

    def gptq_settings(self) -> GPTQSettings:
        return GPTQSettings(self.damp, self.damp_increment, self.block, self.order, self.mse_norm, self.refine_rounds)

    def override_spec(self, key: str) -> QuantSpec:
        merged = dict(self.config.model_dump(exclude_unset=True), **self.overrides[key])
        try:
            return QuantSpec.model_validate(merged)
        except ValidationError as err:
            raise ValueError(format_validation_error(err, f"overrides[{key!r}]", QuantSpec)) from None

    def config_for(self, name: str, module) -> QuantConfig:
        fields = self.config.model_dump(exclude_unset=True)
        for key, override in self.overrides.items():
            if matches(key, name, module):
                fields.update(override)
        return QuantSpec.model_validate(fields).to_config()


def _tie_fused(plan: dict[str, QuantConfig]) -> list[tuple[str, str]]:
    """Give each engine-fused group (q/k/v, gate/up) its most precise member's config."""
    changes = []
    for group, members in fused_members(list(plan)):
        best = max((plan[m] for m in members), key=lambda c: (c.bits_per_param, c.bits))
        for member in members:
            if plan[member] != best:
                changes.append((member, f"{plan[member].name} -> {best.name}: engines fuse "
                                        f"{'/'.join(group)} and need one config"))
                plan[member] = best
    return changes


def plan_modules(model, config: QuantizeConfig, tie_fused: bool) -> tuple[dict, list, dict]:
    """(module -> QuantConfig, tie changes, module -> shape) for the selected layers."""
    selected = select_linears(model, config.targets, config.ignore)
    plan = {name: config.config_for(name, module) for name, module in selected}
    shapes = {name: (module.out_features, module.in_features) for name, module in selected}
    changes = _tie_fused(plan) if tie_fused else []
    return plan, changes, shapes


def _exports_gptq(recipe, entry) -> bool:
    """Whether a later export writes packed integers for engines (gptq, compressed-tensors): they
    fuse q/k/v and gate/up, so those share one config."""
    return any(e.config.format in INTEGER_FORMATS for e in recipe.later(entry.index, "export"))


def _integer_exports(recipe, entry) -> list:
    return [e for e in recipe.later(entry.index, "export") if e.config.format in INTEGER_FORMATS]


def check(recipe, entry, model) -> None:
    config: QuantizeConfig = entry.config
    plan, _, shapes = plan_modules(model, config, _exports_gptq(recipe, entry))
    if not plan:
        raise RecipeError(f"{entry.where}.targets: selects no linear layer (targets {config.targets}, "
                          f"ignore {config.ignore})")
    for name, qconfig in plan.items():
        if qconfig.kind == "uniform" and qconfig.group_size > shapes[name][1]:
            raise RecipeError(f"{entry.where}: group_size {qconfig.group_size} is larger than in_features="
                              f"{shapes[name][1]} of {name} (use -1 for one group per output channel)")
    if config.method == "gptq":
        _check_gptq(recipe, entry, plan)
    for export in _integer_exports(recipe, entry):
        fmt = export.config.format
        problems = (gptq_problems if fmt == "gptq" else ct_problems)(plan, shapes)
        if problems:
            raise RecipeError(f"{entry.where}: cannot be exported as {fmt} ({export.where}): {problems[0]}")


def _check_gptq(recipe, entry, plan: dict[str, QuantConfig]) -> None:
    for name, qconfig in plan.items():
        if qconfig.kind != "uniform":
            raise RecipeError(f"{entry.where}: gptq quantizes to uniform configs; {name} would get {qconfig.name}")


def _dense_modules(ctx, plan: dict, report) -> dict[str, torch.nn.Module]:
    modules = {}
    for name in plan:
        module = ctx.model.get_submodule(name)
        if isinstance(module, QuantLinear):
            report.skip(name, f"already quantized ({module.config.name})")
            continue
        if not torch.isfinite(module.weight).all():
            raise StageError(f"{ctx.entry.where}: {name} has non-finite weights; cannot quantize")
        modules[name] = module
    return modules


def _install(ctx, report, name: str, module, layer: QuantLinear, seconds: float, **extra) -> None:
    weight = module.weight.detach()
    error = layer.quantized_weight().squared_error(weight) ** 0.5 / max(float(weight.float().norm()), 1e-30)
    set_module(ctx.model, name, layer)
    ctx.units.drop(module)  # streaming: the replaced dense weight goes now, not with its unit
    ctx.plan[name] = layer.config
    report.modules.append({"module": name, "config": layer.config.name, "rel_error": float(error),
                           "seconds": seconds, **extra})


def _install_shared(ctx, report, modules: dict, work) -> None:
    """Run ``work(name, module) -> (layer, report extras)`` on this rank's share of ``modules``,
    gather every rank's layers (through the host) and install them all, in ``modules`` order."""
    if not ctx.ranks.distributed:  # install each layer as it is made: its dense weight goes at once
        for name, module in modules.items():
            start = time.perf_counter()
            layer, extra = work(name, module)
            _install(ctx, report, name, module, layer, time.perf_counter() - start, **extra)
        return
    local = {}
    for name in ctx.ranks.share(list(modules)):
        start = time.perf_counter()
        layer, extra = work(name, modules[name])
        local[name] = (layer.to(HOST), time.perf_counter() - start, extra)
    done = ctx.ranks.gather(local)
    for name, module in modules.items():
        layer, seconds, extra = done[name]
        _install(ctx, report, name, module, layer.to(ctx.device), seconds, **extra)


def _quantize_rtn(ctx, modules: dict, plan: dict, report) -> None:
    _install_shared(ctx, report, modules, lambda name, module: (QuantLinear.quantize(module, plan[name]), {}))


def _stacks(group: dict, hessians: dict, plan: dict) -> list[list[str]]:
    """``group``'s names bucketed by (shared Hessian, config): each bucket is one stacked GPTQ."""
    stacks: dict[tuple[int, QuantConfig], list[str]] = {}
    for name in group:
        stacks.setdefault((id(hessians[name]), plan[name]), []).append(name)
    return list(stacks.values())


def _gptq_replace(ctx, config: QuantizeConfig, plan: dict, report):
    """The ``layerwise.ReplaceGroup`` of GPTQ. On one process the linears sharing a Hessian and a
    config (q/k/v, gate/up) run as one stacked GPTQ (``gptq_quantize_stacked``: one column loop);
    with ranks each matrix is a unit of work of its own, shared out."""
    settings = config.gptq_settings()

    def work(name: str, module, hessians: dict):
        result = gptq_quantize(module.weight, hessians[name].hessian, plan[name], settings)
        return QuantLinear.from_weight(result.quantized, module.bias), {"gptq_loss": result.loss}

    def replace(group: dict, hessians: dict) -> None:
        if ctx.ranks.distributed:
            _install_shared(ctx, report, group, lambda name, module: work(name, module, hessians))
            return
        for names in _stacks(group, hessians, plan):
            start = time.perf_counter()
            results = gptq_quantize_stacked([group[n].weight for n in names], hessians[names[0]].hessian,
                                            plan[names[0]], settings)
            seconds = (time.perf_counter() - start) / len(names)
            for name, result in zip(names, results):
                layer = QuantLinear.from_weight(result.quantized, group[name].bias)
                _install(ctx, report, name, group[name], layer, seconds, gptq_loss=result.loss)
    return replace


def _quantize_units(ctx, config: QuantizeConfig, plan: dict, report) -> dict[str, tuple[int, int]]:
    """Unit by unit on the compute device (``compress.walker``): the modules outside the layers
    first (selected linears there by RTN; GPTQ's first-layer inputs computed while the embeddings
    are placed), then each decoder layer (GPTQ: ``layerwise.calibrate_layer``, its outputs the next
    layer's inputs). Returns the quantized shapes."""
    units, shapes, outer, gptq = ctx.units, {}, [], config.method == "gptq"
    replace = _gptq_replace(ctx, config, plan, report)

    def quantize_unit(prefix: str, unit, inputs):
        """One unit's selected linears; returns the next layer's inputs (GPTQ). Its locals (the
        replaced dense linears) are gone when it returns."""
        modules = _dense_modules(ctx, {n: c for n, c in plan.items() if units.owns(prefix, n)}, report)
        shapes.update({n: (m.out_features, m.in_features) for n, m in modules.items()})
        if gptq:  # a layer is calibrated; the embeddings start the activations; others pass them on
            inputs = calibration_step(units, prefix, unit, inputs, modules, replace, ctx.windows("calibration"))
            if prefix in units.layer_prefixes:
                return inputs
        outer.extend(modules if gptq else [])
        _quantize_rtn(ctx, modules, plan, report)
        return inputs

    start = time.perf_counter()
    rewrite_units(ctx, "gptq units" if gptq else "quantize units", quantize_unit)
    if gptq:
        report.metrics["gptq_seconds"] = time.perf_counter() - start
    if outer:
        report.notes.append(f"outside the decoder layers, rounded with RTN: {', '.join(outer)}")
    return shapes


def run(ctx, config: QuantizeConfig, report) -> None:
    plan, changes, _ = plan_modules(ctx.model, config, _exports_gptq(ctx.recipe, ctx.entry))
    for name, reason in changes:
        report.notes.append(f"{name}: {reason}")
    shapes = _quantize_units(ctx, config, plan, report)
    params = sum(o * i for o, i in shapes.values())
    bits = sum(plan[name].storage_bits(shape) for name, shape in shapes.items())
    label = config.config.to_config().name
    report.metrics.update(quantized_params=params, label=label if config.method == "rtn" else f"gptq {label}",
                          bits_per_param=bits / params if params else None)


STAGE = Stage(name="quantize", config=QuantizeConfig, run=run, modifies_model=True, quantizes=True,
              check=check, streaming=lambda config: None)
