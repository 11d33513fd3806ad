"""Layer-by-layer calibration: the calibration windows go through the decoder one layer at a time.

The model runs once up to its first decoder layer (a pre-hook stops it there and keeps that layer's
inputs); from then on each decoder layer is called on its own with those inputs. Inside a layer,
the selected linears are visited in groups that read the same input tensor (for Llama: q/k/v,
then o, then gate/up, then down), each group's input Hessians are accumulated over every window
and handed to a callback that replaces those linears (GPTQ's "true sequential" order: a group
sees the inputs the already-replaced groups produce); those passes stop at the group's last
linear. The layer's outputs, computed with its replaced linears, are the next layer's inputs.
Nothing is copied: the model is held once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from compress.quant.gptq import HessianAccumulator

LayerInputs = list[tuple[tuple, dict]]


class _StopForward(Exception):
    """Raised by the first decoder layer's pre-hook: the rest of the model is not needed."""


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every decoder layer: the model's first ``ModuleList`` named ``layers``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            return [(f"{name}.{i}", layer) for i, layer in enumerate(module)]
    raise ValueError(f"{type(model).__name__}: no decoder layers (a ModuleList named 'layers') found")


def _batches(windows: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    for start in range(0, windows.shape[0], batch):
        yield windows[start:start + batch]


@torch.no_grad()
def first_layer_inputs(model: nn.Module, windows: torch.Tensor, batch: int = 8) -> LayerInputs:
    """(args, kwargs) the first decoder layer receives, one entry per batch of windows."""
    captured: LayerInputs = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = decoder_layers(model)[0][1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for tokens in _batches(windows, batch):
            try:
                model(input_ids=tokens, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def call_layer(layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer's output hidden states (the first element when it returns a tuple)."""
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def input_groups(layer: nn.Module, modules: dict[str, nn.Module], sample: tuple[tuple, dict]) -> list[list[str]]:
    """The ``modules`` (name -> linear inside ``layer``) grouped by the input tensor they read, in
    the order the layer runs them (one forward on ``sample``)."""
    order: list[tuple[str, torch.Tensor]] = []  # the tensors themselves: kept alive, their ids stay unique
    handles = [module.register_forward_pre_hook(lambda m, a, name=name: order.append((name, a[0])))
               for name, module in modules.items()]
    try:
        with torch.no_grad():
            call_layer(layer, *sample)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for name, tensor in order:
        if name not in sum(groups.values(), []):
            groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


@torch.no_grad()
def group_hessians(layer: nn.Module, modules: dict[str, nn.Module], inputs: LayerInputs) -> dict[str, HessianAccumulator]:
    """Input Hessians of ``modules`` over every batch of ``inputs``. Each forward through ``layer``
    stops as soon as the last of them has read its input (the rest of the layer is not needed)."""
    hessians = {name: HessianAccumulator(module.in_features) for name, module in modules.items()}
    seen: set[str] = set()

    def accumulate(name: str, x: torch.Tensor) -> None:
        hessians[name].add(x)
        seen.add(name)
        if len(seen) == len(modules):
            raise _StopForward

    handles = [module.register_forward_pre_hook(lambda m, a, name=name: accumulate(name, a[0]))
               for name, module in modules.items()]
    try:
        for args, kwargs in inputs:
            seen.clear()
            try:
                call_layer(layer, args, kwargs)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


ReplaceGroup = Callable[[dict[str, nn.Module], dict[str, HessianAccumulator]], None]


@torch.no_grad()
def calibrate_layer(layer: nn.Module, modules: dict[str, nn.Module], replace: ReplaceGroup,
                    inputs: LayerInputs) -> LayerInputs:
    """Call ``replace(modules, hessians)`` for each input group of ``modules`` (linears inside
    ``layer``, by full name); return the layer's outputs, computed with the replaced linears, as the
    next layer's inputs."""
    if modules:
        for group in input_groups(layer, modules, inputs[0]):
            members = {name: modules[name] for name in group}
            replace(members, group_hessians(layer, members, inputs))
    return [((call_layer(layer, args, kwargs),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]


@torch.no_grad()
def calibrate_layerwise(model: nn.Module, windows: torch.Tensor, selected: dict[str, nn.Module],
                        replace: ReplaceGroup, track=None, batch: int = 8) -> list[str]:
    """Walk the decoder layer by layer, calling ``replace(modules, hessians)`` for each input group
    of the ``selected`` linears (full names). Returns the selected names outside every decoder layer
    (left untouched). ``track`` wraps the layer iterator (a progress bar)."""
    layers = decoder_layers(model)
    inside = {name for name in selected if any(name.startswith(f"{prefix}.") for prefix, _ in layers)}
    inputs = first_layer_inputs(model, windows, batch)
    for prefix, layer in (track(layers) if track else layers):
        local = {name: module for name, module in selected.items() if name.startswith(f"{prefix}.")}
        inputs = calibrate_layer(layer, local, replace, inputs)
    return [name for name in selected if name not in inside]
