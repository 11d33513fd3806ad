"""What a recipe will have made of the model at each point, known before anything runs: each linear's
shape and quantization (its exact config, or the config family a stage picks from at run time), the
stage that set it, and whole-model facts (layers left with different widths).

``compress validate`` starts it from the meta skeleton and steps it through each stage's ``effect``;
at an export, the format says what in it it cannot hold (``Format.problems(state)``), naming the
stage that caused it. Stages describe what they do to the model and never look at export formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from torch import nn

from compress.quant import QuantConfig, QuantLinear

from .targets import select_linears


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

    @classmethod
    def of_skeleton(cls, model: nn.Module | None, fuse_ties: bool = False) -> ModelState:
        """Every linear of ``model`` (meta weights) with the quantization it already has."""
        if model is None:
            return cls(fuse_ties=fuse_ties, known=False)
        shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules()
                  if isinstance(m, (nn.Linear, QuantLinear))}
        quant = {name: ModuleQuant(m.config) for name, m in model.named_modules() if isinstance(m, QuantLinear)}
        return cls(MappingProxyType(shapes), MappingProxyType(quant), fuse_ties=fuse_ties)

    def quantized(self, plan: Mapping[str, ModuleQuant]) -> ModelState:
        """The state with ``plan``'s modules quantized as it says."""
        return replace(self, quant=MappingProxyType({**self.quant, **plan}))

    def dequantized(self, by: str) -> ModelState:
        """The state with every linear dense (``by`` merged the model)."""
        return replace(self, quant=MappingProxyType({}), dense_by=by)

    def with_uneven_widths(self, by: str) -> ModelState:
        return replace(self, uneven_widths_by=by)


def selected_quant(model: nn.Module, targets, ignore, make) -> dict[str, ModuleQuant]:
    """{name: make(module)} over the linears that ``targets`` minus ``ignore`` select."""
    return {name: make(module) for name, module in select_linears(model, targets, ignore)}
