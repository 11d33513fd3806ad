"""The quantize stage's recipe vocabulary: ``QuantSpec`` (the recipe form of a quantization config)
and ``QuantizeConfig``, whose method settings come from the quantizer registry
(``quant.quantizers``): each registered quantizer's settings fields are stage fields, held to the
bounds their dataclass declares, and accepted only for that method (or the method a transform
names in ``then``).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, create_model, model_serializer, model_validator

from compress.quant import QuantConfig
from compress.quant.quantizers import QUANTIZERS, Quantizer

from ..config_errors import format_validation_error
from ..stage import STRICT, StageConfig
from ..targets import check_selector, fused_members, matches, select_linears

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


SETTINGS = {name: q.setting_names for name, q in QUANTIZERS.items()}  # each method's own recipe fields


def _settings_fields() -> dict[str, tuple]:
    """Every registered quantizer's settings as pydantic fields: type, default and bounds."""
    found = {}
    for quantizer in QUANTIZERS.values():
        if quantizer.settings is None:
            continue
        hints = typing.get_type_hints(quantizer.settings)
        for field in dataclasses.fields(quantizer.settings):
            found.setdefault(field.name, (hints[field.name], Field(field.default, **field.metadata)))
    return found


class _QuantizeFields(StageConfig):
    method: Literal[tuple(QUANTIZERS)] = "rtn"
    config: QuantSpec = QuantSpec()
    overrides: dict[str, dict[str, Any]] = {}
    targets: list[str] = ["Linear"]
    ignore: list[str] = ["lm_head"]

    def own_settings(self) -> list[str]:
        """The settings this stage's method reads: its own, and those of the quantizer it names in ``then``."""
        own = list(SETTINGS[self.method])
        return own + list(SETTINGS[self.then]) if "then" in own else own

    def foreign_settings(self) -> list[str]:
        own = self.own_settings()
        return [key for keys in SETTINGS.values() for key in keys if key not in own]

    def rounding(self) -> Quantizer:
        """The quantizer that rounds the weights: the method, or the one a transform names in ``then``."""
        return QUANTIZERS[self.then] if QUANTIZERS[self.method].prepare else QUANTIZERS[self.method]

    @model_validator(mode="after")
    def _valid_selectors_and_overrides(self) -> "QuantizeConfig":
        wrong = list(dict.fromkeys(k for k in self.foreign_settings() if k in self.model_fields_set))
        if wrong:
            owner = next(name for name, keys in SETTINGS.items() if wrong[0] in keys)
            raise ValueError(f"{', '.join(wrong)}: only for method {owner} (this stage is method {self.method})")
        for key in list(self.targets) + list(self.ignore) + list(self.overrides):
            problem = check_selector(key)
            if problem:
                raise ValueError(f"selector {key!r}: {problem}")
        for key in self.overrides:
            self.override_spec(key)
        return self

    @model_serializer(mode="wrap")
    def _settings_only_of_the_method(self, handler):
        data = handler(self)
        for key in self.foreign_settings():
            data.pop(key, None)
        return data

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


QuantizeConfig = create_model("QuantizeConfig", __base__=_QuantizeFields, __module__=__name__, **_settings_fields())


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
