"""lq_lora's recipe vocabulary and its checks before anything runs: the config, the grid's configs
that fit each matrix, the budget no allocation can meet, and the Fisher / objective defaults
(``resolved``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_serializer, model_validator

from compress.lowrank import GRIDS, InfeasibleBudget, budget_bits_for, minimum_bits

from ..errors import RecipeError
from ..execution.walker import decoder_layers
from ..stage import StageConfig
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
    check_budget(entry, config, {name: (m.out_features, m.in_features) for name, m in selected})
    outside = outside_layers(model, [name for name, _ in selected])
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


def outside_layers(model, names: list[str]) -> list[str]:
    layers = [prefix for prefix, _ in decoder_layers(model)]
    return [name for name in names if not any(name.startswith(f"{p}.") for p in layers)]


def resolved(config: LQLoRAConfig, recipe, model, names: list[str]) -> LQLoRAConfig:
    """``config`` with ``fisher`` and ``objective`` decided: each on (output) when the recipe gives
    data.calibration (not only the default stdlib text) and every selected linear is inside a
    decoder layer, unless the recipe says."""
    default = "calibration" in recipe.spec.data.model_fields_set and not outside_layers(model, names)
    fisher = default if config.fisher is None else config.fisher
    objective = config.objective or ("output" if default else "weight")
    return config.model_copy(update={"fisher": fisher, "objective": objective})


def check_budget(entry, config: LQLoRAConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """An impossible budget fails before any weight is loaded, naming the smallest feasible one."""
    numel = {name: shape[0] * shape[1] for name, shape in shapes.items()}
    bits = {name: {c.name: c.storage_bits(shape) for c in grid_for(config, shape)} for name, shape in shapes.items()}
    budget = budget_bits_for(numel, config.budget_bits, config.budget_gib)
    minimum = minimum_bits(bits, ties(list(shapes), config.grid))
    if minimum > budget:
        raise RecipeError(f"{entry.where}: {InfeasibleBudget(budget, minimum, sum(numel.values()))}")


def ties(names: list[str], grid: str) -> list[list[str]]:
    return [members for _, members in fused_members(names)] if grid == "gptq" else []
