"""The unit walker: a model as a sequence of units, each placed on the compute device for its work.

A model's units are the modules outside the decoder layers that hold tensors (embeddings, final
norm, head: one unit each), then each decoder layer in order. Units come from a source:

- ``ResidentModel`` (this file): the model is in host memory. The modules outside the layers go to
  the device for the whole walk; each layer goes there for its work and back to the host after.
- ``compress.execution.streaming.StreamedModel``: the weights stay in safetensors shards; a unit is read
  from them onto the device and, after its work, written as one shard of the stage's checkpoint.

Both answer the same calls (``units``, ``unit``, ``walk``, ``kept``, ``keep``, ``save``, ...), so
the stages that work unit by unit (quantize, lq_lora, export) and the pipeline hold one code path.
``rewrite_units`` walks every unit and changes it; ``carry`` (the GPTQ calibration activations,
the LQ-LoRA Fisher's layer inputs) flows from one unit's work to the next. On the CPU, placing a
unit is a no-op: the walk is the same operations in the same order as without a device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.quant import QuantLinear

HOST = torch.device("cpu")


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every decoder layer: the model's first ``ModuleList`` named ``layers``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            return [(f"{name}.{i}", layer) for i, layer in enumerate(module)]
    raise ValueError(f"{type(model).__name__}: no decoder layers (a ModuleList named 'layers') found")


def drop_kernel_caches(module: nn.Module) -> None:
    """QuantLinear caches its kernel layout per device: a moved module must rebuild it."""
    for sub in module.modules():
        if isinstance(sub, QuantLinear):
            sub._layout = None


def move(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` on ``device`` (parameters moved in place: tied weights stay tied)."""
    if any(t.device != device for t in [*module.parameters(), *module.buffers()]):
        drop_kernel_caches(module)
        module.to(device)
    return module


@contextmanager
def placed(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """``modules`` on ``device`` inside the block, back on the host after it."""
    try:
        for module in modules:
            move(module, device)
        yield
    finally:
        for module in modules:
            move(module, HOST)


class UnitMap:
    """Which unit each tensor or module belongs to; ``_unit_owners`` says which module names hold
    a unit's tensors (set by the source)."""

    model: nn.Module
    layer_prefixes: list[str]

    def unit_of(self, name: str) -> str:
        """The unit a tensor (or module) belongs to: its decoder layer, or the module that owns it."""
        layer = next((p for p in self.layer_prefixes if name.startswith(f"{p}.")), None)
        return layer if layer is not None else name.rpartition(".")[0]

    def owns(self, prefix: str, module_name: str) -> bool:
        """Whether a module (by full name) lies in unit ``prefix``."""
        return module_name == prefix or module_name.startswith(f"{prefix}.")

    @property
    def embeddings(self) -> str:
        """The unit of the input embeddings (where the calibration activations start)."""
        embedding = self.model.get_input_embeddings()
        return next(n for n, m in self.model.named_modules() if m is embedding)

    def outer_modules(self) -> list[nn.Module]:
        """Modules outside every decoder layer that hold tensors of their own (rotary tables too)."""
        found = []
        for name, module in self.model.named_modules():
            own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if own and self.unit_of(f"{name}.x") not in self.layer_prefixes:
                found.append(module)
        return found


class ResidentModel(UnitMap):
    """The model held in host memory, walked on ``device``."""

    holds_model = True  # the whole model can run at once (an export's reload check compares its logits)

    def __init__(self, model: nn.Module, device: torch.device = HOST):
        self.model, self.device = model, torch.device(device)

    @property
    def layer_prefixes(self) -> list[str]:
        return [prefix for prefix, _ in decoder_layers(self.model)]

    @property
    def units(self) -> list[str]:
        """The modules outside the layers that own tensors (named as in ``state_dict``), then the layers."""
        outer: list[str] = []
        layers = self.layer_prefixes
        for name in self.model.state_dict(keep_vars=True):
            unit = self.unit_of(name)
            if unit not in layers and unit not in outer:
                outer.append(unit)
        return outer + layers

    @contextmanager
    def walk(self) -> Iterator[None]:
        """The modules outside the layers on the device for the walk, back on the host after it."""
        with placed(self.outer_modules(), self.device):
            yield

    @contextmanager
    def unit(self, prefix: str) -> Iterator[nn.Module]:
        """The unit on the device inside the block (a layer goes back to the host after it)."""
        module = self.model.get_submodule(prefix)
        if prefix not in self.layer_prefixes:
            yield module  # placed by ``walk``
            return
        try:
            yield move(module, self.device)
        finally:
            move(module, HOST)

    def drop(self, module: nn.Module) -> None:
        """A module just replaced in the model: nothing to do (it goes with its last reference)."""

    def kept(self, prefix: str) -> None:
        """What leaves with a unit: nothing, the model keeps it."""
        return None

    def keep(self, ctx, kept: Iterable[Any], count: int) -> None:
        """Run the walk (each unit stays in the model)."""
        for _ in kept:
            pass

    def begin_stage(self, target: Path) -> None:
        """Nothing to prepare: the model is saved after the stage (``save``)."""

    def save(self, path: Path) -> None:
        from ..checkpoint.store import save_model

        save_model(self.model, path)

    def end_stage(self) -> None:
        """The model is already where the next stage reads it."""

    def export_shards(self, ctx, description: str, split_adapters: bool):
        """(None, {}): the writers take the resident model's state as a whole."""
        return None, {}


@contextmanager
def outer_units(source) -> Iterator[None]:
    """Every unit outside the decoder layers placed at once (the final norm and the head, to score
    the last layer's outputs)."""
    with ExitStack() as placed_units:
        for prefix in source.units:
            if prefix not in source.layer_prefixes:
                placed_units.enter_context(source.unit(prefix))
        yield


def rewrite_units(ctx, description: str, work: Callable[[str, nn.Module, Any], Any],
                  units: list[str] | None = None) -> None:
    """Walk the units in order, each on the device: ``work(prefix, unit, carried)`` changes the
    unit and returns what the next unit receives (None at the start). What the source keeps of each
    unit (a streamed checkpoint's shard) is kept as the unit leaves. Rank 0 writes; other ranks make
    the same walk (they exchange results inside ``work``)."""
    source = ctx.units
    prefixes = source.units if units is None else units

    def walked():
        carried = None
        with source.walk():
            for prefix in ctx.track(prefixes, description):
                with source.unit(prefix) as unit:
                    carried = work(prefix, unit, carried)
                    yield source.kept(prefix)

    source.keep(ctx, walked(), len(prefixes))


def visit_units(ctx, description: str, work: Callable[[str, nn.Module], None], units: list[str]) -> None:
    """Each of ``units`` on the device for ``work(prefix, unit)``, nothing written (a read-only walk)."""
    source = ctx.units
    with source.walk():
        for prefix in ctx.track(units, description):
            with source.unit(prefix) as unit:
                work(prefix, unit)
