"""replace_layers: the one walk that swaps selected linears for new layers (quantize, lq_lora).

Unit by unit over the model's source (``walker.rewrite_units``: resident or streamed, on the run's
device), each unit's selected linears are handed to ``make(group, stats)``, which returns one
``Replacement`` per name; the walk installs them (the dense weight goes at once), records each
module's config in ``ctx.state`` and its report row. ``needs`` says what ``make`` is given:

- ``nothing``: every unit's linears in one call, ``stats`` None;
- ``hessians``: the walk carries ``data.calibration``'s activations through the decoder
  (``layerwise.calibration_step``) and calls ``make`` once per group of linears that read one input,
  with their ``HessianAccumulator`` s, the layer's outputs then computed with the new layers; linears
  outside the decoder layers get ``stats`` None and are returned so that the stage can say so.

A ``prepare(layer, groups)`` transform (AWQ's scales) makes the walk carry the activations whatever
``make`` needs: it first changes each float decoder layer from every input group's statistics and
producer (``layerwise.InputGroup``); then ``make`` is called group by group, with Hessians only when
it needs them.

With ``torchrun`` each call's names are shared out over the ranks and the layers gathered through
the host before they are installed, in the group's order, on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..model_state import ModuleQuant
from ..targets import set_module
from .layerwise import PrepareLayer, calibration_step
from .walker import HOST, rewrite_units

NEEDS = ("nothing", "hessians")


@dataclass
class Replacement:
    """A new layer, the quantization config it stores, and its row in the stage report."""

    layer: nn.Module
    config: object
    row: dict


Make = Callable[[dict[str, nn.Module], dict | None], dict[str, Replacement]]


def _install(ctx, report, group: dict[str, nn.Module], made: dict[str, Replacement]) -> None:
    for name, module in group.items():
        done = made[name]
        set_module(ctx.model, name, done.layer.to(ctx.device))
        ctx.units.drop(module)  # streaming: the replaced dense weight goes now, not with its unit
        report.modules.append({"module": name, **done.row})
    ctx.state = ctx.state.quantized({name: ModuleQuant(made[name].config, by=ctx.entry.where) for name in group})


def _replace_group(ctx, report, make: Make, group: dict[str, nn.Module], stats: dict | None) -> None:
    """``make`` on this rank's share of ``group``; every rank installs every layer."""
    if not ctx.ranks.distributed:
        _install(ctx, report, group, make(group, stats))
        return
    mine = {name: group[name] for name in ctx.ranks.share(list(group))}
    local = {name: Replacement(r.layer.to(HOST), r.config, r.row) for name, r in make(mine, stats).items()}
    _install(ctx, report, group, ctx.ranks.gather(local))


def replace_layers(ctx, report, names: list[str], make: Make, needs: str, description: str,
                   pick: Callable[[dict[str, nn.Module]], dict[str, nn.Module]] | None = None,
                   prepare: PrepareLayer | None = None) -> list[str]:
    """Replace the linears ``names`` unit by unit (module docstring); ``pick`` filters each unit's
    modules before anything runs (e.g. skipping layers already quantized). Returns the names that
    ``make`` got without statistics in a calibrated walk: those outside the decoder layers."""
    if needs not in NEEDS:
        raise ValueError(f"needs: {needs!r} is not one of {', '.join(NEEDS)}")
    units, outer = ctx.units, []

    def unit_step(prefix: str, unit: nn.Module, inputs):
        modules = {name: ctx.model.get_submodule(name) for name in names if units.owns(prefix, name)}
        modules = pick(modules) if pick else modules
        if needs != "nothing" or prepare is not None:
            replace = lambda group, hessians: _replace_group(ctx, report, make, group, hessians)  # noqa: E731
            inputs = calibration_step(units, prefix, unit, inputs, modules, replace, ctx.windows("calibration"),
                                      prepare=prepare, hessians=needs == "hessians")
            if prefix in units.layer_prefixes:
                return inputs
            outer.extend(modules)
        if modules:
            _replace_group(ctx, report, make, modules, None)
        return inputs

    rewrite_units(ctx, description, unit_step)
    return outer
