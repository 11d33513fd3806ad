"""quantize: replace linear layers by packed low-bit ``QuantLinear`` layers, no training.

```yaml
- quantize: {method: rtn, config: {type: uniform, bits: 4, group_size: 64, sym: false},
             overrides: {"re:.*down_proj$": {bits: 8}}, ignore: [lm_head]}
```

``config`` is the default for every selected layer (``targets`` minus ``ignore``: class names, exact
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from compress.quant import QuantConfig, QuantLinear

from ..checkpoint.gptq import gptq_problems
from ..config_errors import format_validation_error
from ..errors import RecipeError, StageError
from ..stage import Stage, StageConfig
from ..targets import check_selector, fused_members, matches, select_linears, set_module

NF_ONLY = ("block", "scale_bits", "scale_block", "scale_dtype")
UNIFORM_ONLY = ("group_size", "sym")


class QuantSpec(BaseModel):
    """The recipe form of a ``QuantConfig``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
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


class QuantizeConfig(StageConfig):
    method: Literal["rtn"] = "rtn"
    config: QuantSpec = QuantSpec()
    overrides: dict[str, dict[str, Any]] = {}
    targets: list[str] = ["Linear"]
    ignore: list[str] = ["lm_head"]

    @model_validator(mode="after")
    def _valid_selectors_and_overrides(self) -> "QuantizeConfig":
        for key in list(self.targets) + list(self.ignore) + list(self.overrides):
            problem = check_selector(key)
            if problem:
                raise ValueError(f"selector {key!r}: {problem}")
        for key in self.overrides:
            self.override_spec(key)
        return self

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
    return any(e.config.format == "gptq" for e in recipe.later(entry.index, "export"))


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
    if _exports_gptq(recipe, entry):
        problems = gptq_problems(plan, shapes)
        if problems:
            raise RecipeError(f"{entry.where}: cannot be exported as gptq: {problems[0]}")


def run(ctx, config: QuantizeConfig, report) -> None:
    plan, changes, _ = plan_modules(ctx.model, config, _exports_gptq(ctx.recipe, ctx.entry))
    for name, reason in changes:
        report.notes.append(f"{name}: {reason}")
    bits = params = 0
    for name in ctx.track(list(plan), "quantize"):
        module, qconfig = ctx.model.get_submodule(name), plan[name]
        if isinstance(module, QuantLinear):
            report.skip(name, f"already quantized ({module.config.name})")
            continue
        weight = module.weight.detach()
        if not torch.isfinite(weight).all():
            raise StageError(f"{ctx.entry.where}: {name} has non-finite weights; cannot quantize")
        start = time.perf_counter()
        layer = QuantLinear.quantize(module, qconfig)
        error = (layer.dequantize() - weight.float()).norm() / weight.float().norm().clamp(min=1e-30)
        set_module(ctx.model, name, layer)
        ctx.plan[name] = qconfig
        bits += qconfig.storage_bits(layer.shape)
        params += layer.shape[0] * layer.shape[1]
        report.modules.append({"module": name, "config": qconfig.name, "rel_error": float(error),
                               "seconds": time.perf_counter() - start})
    report.metrics.update(quantized_params=params, label=config.config.to_config().name,
                          bits_per_param=bits / params if params else None)


STAGE = Stage(name="quantize", config=QuantizeConfig, run=run, modifies_model=True, quantizes=True,
              check=check)
