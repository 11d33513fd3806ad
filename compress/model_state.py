"""What a recipe will have made of the model at each point, known before anything runs: each linear's
shape and quantization (its exact config, or the config family a stage picks from at run time), the
stage that set it, and whole-model facts (layers left with different widths, what pruning removed).

``compress validate`` starts it from the meta skeleton and steps it through each stage's ``effect``;
at an export, the format says what in it it cannot hold (``Format.problems(state)``), naming the
stage that caused it. Stages describe what they do to the model and never look at export formats.

A run carries one too (``Context.state``): it starts from the loaded model, each stage records what
it did (the configs it chose, what it pruned), ``state.json`` saves it for ``--resume``, and export
has its format judge it, with the run's exact configs, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from torch import nn

from compress.quant import QuantConfig, QuantLinear

from .targets import LINEAR_CLASSES, layer_name, select_linears


@dataclass(frozen=True)
class ModuleQuant:
    """How one linear is quantized: ``config``, or (None) a config of ``family`` picked at run time."""

    config: QuantConfig | None
    family: type[QuantConfig] | None = None
    by: str | None = None  # the recipe entry that set it (None: the source checkpoint)


@dataclass(frozen=True)
class Problem:
    """Something a format cannot hold, and the recipe entry that made it so (None: no single one)."""

    text: str
    by: str | None = None


@dataclass(frozen=True)
class ModelState:
    """The model as the recipe leaves it at one point (module docstring). ``known`` is False when
    validate has no skeleton to start from (a GPTQ source): nothing can be said about its modules."""

    shapes: Mapping[str, tuple[int, int]] = field(default_factory=lambda: MappingProxyType({}))
    quant: Mapping[str, ModuleQuant] = field(default_factory=lambda: MappingProxyType({}))
    uneven_widths_by: str | None = None  # the stage that left decoder layers of different widths
    dense_by: str | None = None  # the stage that left every linear dense (a merge)
    fuse_ties: bool = False  # the recipe exports for engines that fuse q/k/v and gate/up: one config each
    known: bool = True
    structure: Mapping[str, dict] = field(default_factory=lambda: MappingProxyType({}))  # per pruning stage: what it removed

    @classmethod
    def of_skeleton(cls, model: nn.Module | None, fuse_ties: bool = False) -> ModelState:
        """Every linear of ``model`` (meta weights) with the quantization it already has."""
        if model is None:
            return cls(fuse_ties=fuse_ties, known=False)
        quant = {layer_name(name): ModuleQuant(m.config) for name, m in model.named_modules()
                 if isinstance(m, QuantLinear)}
        return cls(MappingProxyType(_linear_shapes(model)), MappingProxyType(quant), fuse_ties=fuse_ties)

    def quantized(self, plan: Mapping[str, ModuleQuant]) -> ModelState:
        """The state with ``plan``'s modules quantized as it says."""
        return replace(self, quant=MappingProxyType({**self.quant, **plan}))

    def dequantized(self, by: str) -> ModelState:
        """The state with every linear dense (``by`` merged the model)."""
        return replace(self, quant=MappingProxyType({}), dense_by=by)

    def with_uneven_widths(self, by: str) -> ModelState:
        return replace(self, uneven_widths_by=by)

    def pruned(self, stage: str, removed: dict) -> ModelState:
        """The state with what pruning stage ``stage`` removed (kept/removed units per layer)."""
        return replace(self, structure=MappingProxyType({**self.structure, stage: removed}))

    def reshaped(self, model: nn.Module) -> ModelState:
        """The state with ``model``'s linear shapes (a run's state after its stages changed them)."""
        return replace(self, shapes=MappingProxyType(_linear_shapes(model)))

    def saved(self) -> dict:
        """The run's part, JSON-able (``state.json``: ``plan``, the configs its stages chose;
        ``quantized_by``, which stage chose each; ``structure``)."""
        ours = {name: q for name, q in self.quant.items() if q.by is not None and q.config is not None}
        return {"plan": {name: q.config.to_dict() for name, q in ours.items()},
                "quantized_by": {name: q.by for name, q in ours.items()}, "structure": dict(self.structure)}

    def restored(self, saved: dict) -> ModelState:
        """This state (of the reloaded model) with a saved run's part (``saved()``; states written
        before ``quantized_by`` existed name no stage)."""
        by = saved.get("quantized_by", {})
        plan = {name: ModuleQuant(QuantConfig.from_dict(c), by=by.get(name, "an earlier stage"))
                for name, c in saved["plan"].items()}
        return replace(self.quantized(plan), structure=MappingProxyType(dict(saved["structure"])))


def _linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {layer_name(name): (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, LINEAR_CLASSES)}


def selected_quant(model: nn.Module, targets, ignore, make) -> dict[str, ModuleQuant]:
    """{name: make(module)} over the linears that ``targets`` minus ``ignore`` select."""
    return {name: make(module) for name, module in select_linears(model, targets, ignore)}
