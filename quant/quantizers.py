"""The registry of quantizers a recipe names (``quantize: {method: ...}``): what each needs from
calibration, which configs it produces, its settings, and one call that turns weights into packed
ones. Adding a method is one file in ``quant/`` and one line in ``QUANTIZERS``.

``quantize(weights, stats, config, settings)`` takes the float weights [N, K] of linears that read
one input (q/k/v, gate/up: one stacked call) and returns one ``(QuantizedWeight, report extras)``
per weight. ``stats`` is what ``needs`` names, gathered by the caller's calibration walk:

- ``nothing``: None (``rtn``: each weight rounded to its grid);
- ``hessians``: the inputs' Hessian ``HessianAccumulator`` (``gptq``); where there are none (linears
  outside the decoder layers) its declared ``fallback`` rounds instead (``given``);
- ``activations``: a transform. ``prepare(layer, groups, configs, settings)`` changes a float
  decoder layer before anything in it is rounded, from each input group's statistics (Hessian and
  mean |x| per channel) and producer (the module whose output the group reads); the rounding is then
  the quantizer its settings name in ``then``, which gets what that one needs.

``settings`` is a frozen dataclass whose field names are the recipe's (``quantize: {method: gptq,
damp: 0.05}``) and whose field metadata holds their bounds (``{"gt": 0, "lt": 1}``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from .awq import AWQSettings, prepare_layer as awq_prepare
from .config import QuantConfig, UniformConfig
from .gptq import GPTQSettings, gptq_quantize_stacked
from .qweight import QuantizedWeight

Quantized = list[tuple[QuantizedWeight, dict]]


@dataclass(frozen=True)
class Quantizer:
    """One quantization method."""

    name: str
    needs: str  # "nothing" | "hessians" | "activations"
    configs: type[QuantConfig]  # the config family (or QuantConfig: any) it produces
    settings: type | None  # a frozen dataclass of its recipe fields, or None
    quantize: Callable[[list[torch.Tensor], object, QuantConfig, object], Quantized] | None
    prepare: Callable[[torch.nn.Module, list, dict, object], None] | None = None  # transforms only
    fallback: str | None = None  # the quantizer used where its statistics are missing (outside the layers)

    @property
    def setting_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.settings)) if self.settings else ()

    def given(self, stats) -> Quantizer:
        """This quantizer, or its declared ``fallback`` where it needs statistics and got none."""
        return self if stats is not None or self.needs == "nothing" else QUANTIZERS[self.fallback]

    def settings_from(self, source) -> object:
        """Its settings, read from the same-named attributes of ``source`` (a stage config)."""
        return self.settings(**{name: getattr(source, name) for name in self.setting_names}) if self.settings else None


def _rtn(weights: list[torch.Tensor], stats, config: QuantConfig, settings) -> Quantized:
    return [(QuantizedWeight.quantize(weight, config), {}) for weight in weights]


def _gptq(weights: list[torch.Tensor], stats, config: QuantConfig, settings: GPTQSettings) -> Quantized:
    results = gptq_quantize_stacked(weights, stats.hessian, config, settings)
    return [(result.quantized, {"gptq_loss": result.loss}) for result in results]


QUANTIZERS: dict[str, Quantizer] = {
    "rtn": Quantizer("rtn", "nothing", QuantConfig, None, _rtn),
    "gptq": Quantizer("gptq", "hessians", UniformConfig, GPTQSettings, _gptq, fallback="rtn"),
    "awq": Quantizer("awq", "activations", QuantConfig, AWQSettings, None, awq_prepare),
}
