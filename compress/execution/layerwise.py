"""Layer-by-layer calibration: the calibration windows go through the decoder one layer at a time.

The model runs once up to its first decoder layer (a pre-hook stops it there and keeps that layer's
inputs); from then on each decoder layer is called on its own with those inputs. Inside a layer,
the selected linears are visited in groups that read the same input tensor (for Llama: q/k/v,
then o, then gate/up, then down), each group's input Hessians are accumulated over every window
and handed to a callback that replaces those linears (GPTQ's "true sequential" order: a group
sees the inputs the already-replaced groups produce); those passes stop at the group's last
linear. The layer's outputs, computed with its replaced linears, are the next layer's inputs.
Nothing is copied: the model is held once.

The already-quantized linears of the layer being calibrated run as their dequantized dense weight
(``dequantized``: one ``F.linear`` on W_q in the activations' dtype, the fake-quantized forward
GPTQModel's calibration uses) rather than through the packed kernels: the values are those of the
packed layer up to the matmul's rounding, and on a CPU the tiled reference kernel is 4-10x slower
than a dense matmul. One layer's dense weights exist at a time, only while its passes run.
``COMPRESS_GPTQ_CALIBRATION=packed`` keeps the packed kernels instead (the before of
``benchmarks/gptq_calibration_speed.py``).

The activations carried from layer to layer (the calibration windows' hidden states, in and out of
one layer: twice ``windows x seq_len x hidden`` values) stay on the compute device when they fit in
``ACTIVATION_SHARE`` of its free memory; otherwise they live in pinned host memory and each batch
goes to the device only for its call (``ActivationHome``). On the CPU both are the same place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from compress.lowrank import set_module
from compress.quant import QuantLinear
from compress.quant.gptq import HessianAccumulator

from ..errors import CompressError
from .walker import HOST, ResidentModel, decoder_layers

LayerInputs = list[tuple[tuple, dict]]
ACTIVATION_SHARE = 0.5  # of the device's free memory, leaving the rest to the layer's own work
log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the first decoder layer's pre-hook: the rest of the model is not needed."""


def _batches(windows: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    for start in range(0, windows.shape[0], batch):
        yield windows[start:start + batch]


class ActivationHome:
    """Where calibration activations live between calls: ``device`` itself, or pinned host memory
    (``pinned``) from which each batch is copied to ``device`` for its call."""

    def __init__(self, device: torch.device, pinned: bool = False):
        self.device, self.pinned = torch.device(device), pinned

    @classmethod
    def for_windows(cls, model: nn.Module, windows: torch.Tensor, device: torch.device) -> ActivationHome:
        """On the device when twice the hidden states of ``windows`` fit ``ACTIVATION_SHARE`` of its
        free memory (always, on the CPU); else pinned host memory, said once in the log."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls(device)
        from .placement import free_bytes

        dtype = model.get_input_embeddings().weight.dtype
        need = 2 * windows.numel() * model.config.hidden_size * dtype.itemsize
        free = free_bytes(device)
        if need <= ACTIVATION_SHARE * free:
            return cls(device)
        log.info("calibration activations (%.2f GiB) kept in pinned host memory: %.2f GiB free on %s",
                 need / 2**30, free / 2**30, device)
        return cls(device, pinned=True)

    def store(self, value):
        """``value`` (tensors inside tuples, lists, dicts) where activations live."""
        return _map_tensors(value, self._pin) if self.pinned else value

    def load(self, value):
        """``value`` on the compute device, for one call."""
        return _map_tensors(value, lambda t: t.to(self.device, non_blocking=True)) if self.pinned else value

    @staticmethod
    def _pin(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == HOST:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor)


def _map_tensors(value, change):
    if isinstance(value, torch.Tensor):
        return change(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, change) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, change) for k, v in value.items()}
    return value


@torch.no_grad()
def first_layer_inputs(model: nn.Module, windows: torch.Tensor, batch: int = 8,
                       home: ActivationHome | None = None) -> LayerInputs:
    """(args, kwargs) the first decoder layer receives, one entry per batch of windows (kept in
    ``home`` when given)."""
    captured: LayerInputs = []

    def grab(module, args, kwargs):
        captured.append(home.store((args, kwargs)) if home else (args, kwargs))
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


class ActivationStats(HessianAccumulator):
    """An input's Hessian and the mean of |x| per input channel (``abs_mean``), over every token row."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        super().__init__(in_features, device)
        self.abs_sum = None

    def add(self, inputs: torch.Tensor) -> None:
        super().add(inputs)
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).float().abs().sum(dim=0).to(self.hessian.device)
        self.abs_sum = rows if self.abs_sum is None else self.abs_sum + rows

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)


@dataclass
class InputGroup:
    """Linears of one decoder layer that read one input tensor: their names and modules, the
    input's ``ActivationStats``, the submodule whose output that tensor is (e.g. the norm before
    q/k/v; None when the forward code computes it: attention outputs, act(gate) * up), and every
    leaf submodule of the layer that reads it, selected or not (containers such as the MLP pass it on)."""

    modules: dict[str, nn.Module]
    stats: ActivationStats
    producer: nn.Module | None
    readers: list[nn.Module]


def _data_flow(layer: nn.Module, modules: dict[str, nn.Module], sample: tuple[tuple, dict]) -> dict[str, tuple]:
    """{linear name: (the submodule whose output it reads or None, every submodule reading that tensor)}."""
    made: list[tuple[torch.Tensor, nn.Module]] = []  # tensors kept alive: `is` holds
    read: list[tuple[torch.Tensor, nn.Module]] = []
    inner = [m for m in layer.modules() if m is not layer]
    handles = [m.register_forward_hook(lambda m, a, out: made.append((out, m))) for m in inner]
    handles += [m.register_forward_pre_hook(lambda m, a: read.append((a[0], m)) if a else None)
                for m in inner if next(m.children(), None) is None]
    try:
        call_layer(layer, *sample)
    finally:
        for handle in handles:
            handle.remove()
    flow = {}
    for name, module in modules.items():
        x = next(t for t, m in read if m is module)
        flow[name] = (next((m for out, m in made if out is x), None), [m for t, m in read if t is x])
    return flow


@torch.no_grad()
def layer_input_groups(layer: nn.Module, modules: dict[str, nn.Module], inputs: LayerInputs,
                       home: ActivationHome | None = None) -> list[InputGroup]:
    """Every input group of ``modules`` in ``layer`` with its statistics over all of ``inputs``
    and its producer, from the layer as it is (one structure pass and one statistics pass)."""
    sample = home.load(inputs[0]) if home else inputs[0]
    flow = _data_flow(layer, modules, sample)
    stats = group_hessians(layer, modules, inputs, home, ActivationStats)
    return [InputGroup({n: modules[n] for n in names}, stats[names[0]], *flow[names[0]])
            for names in input_groups(layer, modules, sample)]


@torch.no_grad()
def group_hessians(layer: nn.Module, modules: dict[str, nn.Module], inputs: LayerInputs,
                   home: ActivationHome | None = None,
                   accumulator: type[HessianAccumulator] = HessianAccumulator) -> dict[str, HessianAccumulator]:
    """Input Hessians of ``modules`` over every batch of ``inputs`` (kept in ``home``). Modules that
    read the same tensor (q/k/v, gate/up) share one accumulator, summed once per batch. Each forward
    through ``layer`` stops as soon as the last of them has read its input (the rest of the layer is
    not needed)."""
    hessians: dict[str, HessianAccumulator] = {}
    read: list[tuple[torch.Tensor, HessianAccumulator]] = []  # this forward's inputs, kept alive so `is` holds
    seen: set[str] = set()

    def accumulate(name: str, x: torch.Tensor) -> None:
        shared = [acc for tensor, acc in read if tensor is x]
        if name not in hessians:  # the first forward decides who shares whose accumulator
            hessians[name] = shared[0] if shared else accumulator(modules[name].in_features)
        if not any(acc is hessians[name] for acc in shared):
            hessians[name].add(x)
            read.append((x, hessians[name]))
        seen.add(name)
        if len(seen) == len(modules):
            raise _StopForward

    handles = [module.register_forward_pre_hook(lambda m, a, name=name: accumulate(name, a[0]))
               for name, module in modules.items()]
    try:
        for entry in inputs:
            read.clear()
            seen.clear()
            try:
                call_layer(layer, *(home.load(entry) if home else entry))
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


ReplaceGroup = Callable[[dict[str, nn.Module], dict[str, HessianAccumulator]], None]
PrepareLayer = Callable[[nn.Module, list[InputGroup]], None]


def dense_twin(layer: QuantLinear, dtype: torch.dtype) -> nn.Linear:
    """A frozen ``nn.Linear`` whose weight is ``layer``'s dequantized weight (and bias) in ``dtype``."""
    weight = layer.dequantize(dtype)
    twin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    twin.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        twin.bias = nn.Parameter(layer.bias.to(device=weight.device, dtype=dtype), requires_grad=False)
    return twin


def _dense_calibration() -> bool:
    setting = os.environ.get("COMPRESS_GPTQ_CALIBRATION", "dense")
    if setting not in ("dense", "packed"):
        raise CompressError(f"COMPRESS_GPTQ_CALIBRATION={setting!r}: expected dense (the default) or packed")
    return setting == "dense"


@contextmanager
def dequantized(layer: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Inside the block every ``QuantLinear`` of ``layer`` is replaced by its ``dense_twin``; the
    packed layers are back in place after it."""
    packed = [(name, module) for name, module in layer.named_modules() if isinstance(module, QuantLinear)]
    if not _dense_calibration():
        packed = []
    for name, module in packed:
        set_module(layer, name, dense_twin(module, dtype))
    try:
        yield
    finally:
        for name, module in packed:
            set_module(layer, name, module)


@torch.no_grad()
def calibrate_layer(layer: nn.Module, modules: dict[str, nn.Module], replace: ReplaceGroup,
                    inputs: LayerInputs, home: ActivationHome | None = None,
                    prepare: PrepareLayer | None = None, hessians: bool = True) -> LayerInputs:
    """Call ``replace(modules, hessians)`` for each input group of ``modules`` (linears inside
    ``layer``, by full name; with ``hessians`` False: ``replace(members, None)``, none accumulated);
    return the layer's outputs, computed with the replaced linears, as the next layer's inputs
    (inputs and outputs kept in ``home`` when given). ``prepare(layer, groups)``, when given, first
    changes the float layer from every group's ``InputGroup`` (AWQ's scales)."""
    home = home or ActivationHome(HOST)
    dtype = inputs[0][0][0].dtype
    if modules and prepare is not None:
        with dequantized(layer, dtype):
            prepare(layer, layer_input_groups(layer, modules, inputs, home))
    if modules:
        with dequantized(layer, dtype):
            groups = input_groups(layer, modules, home.load(inputs[0]))
        for group in groups:
            members = {name: modules[name] for name in group}
            if not hessians:
                replace(members, None)
                continue
            with dequantized(layer, dtype):
                stats = group_hessians(layer, members, inputs, home)
            replace(members, stats)
    outputs = []
    with dequantized(layer, dtype):
        for entry in inputs:
            args, kwargs = home.load(entry)
            outputs.append(home.store(((call_layer(layer, args, kwargs),) + tuple(args[1:]), kwargs)))
    return outputs


class Activations:
    """What a calibration walk carries from unit to unit: the next layer's inputs and their home."""

    def __init__(self, inputs: LayerInputs, home: ActivationHome):
        self.inputs, self.home = inputs, home


def calibration_step(units, prefix: str, unit: nn.Module, carried: Activations | None, modules: dict[str, nn.Module],
                     replace: ReplaceGroup, windows: torch.Tensor, batch: int = 8,
                     prepare: PrepareLayer | None = None, hessians: bool = True) -> Activations | None:
    """One unit of a calibration walk over a source of units (``compress.execution.walker``): at the
    embeddings the first layer's inputs are made from ``windows`` (on the device, or in pinned host
    memory when they do not fit: ``ActivationHome``); in a decoder layer its ``modules`` are replaced
    group by group (``calibrate_layer``, with or without ``hessians``) and its outputs carried on;
    any other unit passes them on."""
    if prefix == units.embeddings:
        home = ActivationHome.for_windows(units.model, windows, units.device)
        return Activations(first_layer_inputs(units.model, windows.to(units.device), batch, home), home)
    if prefix in units.layer_prefixes:
        outputs = calibrate_layer(unit, modules, replace, carried.inputs, carried.home, prepare, hessians)
        return Activations(outputs, carried.home)
    return carried


@torch.no_grad()
def calibrate_layerwise(model: nn.Module, windows: torch.Tensor, selected: dict[str, nn.Module],
                        replace: ReplaceGroup, track=None, batch: int = 8, device: torch.device = HOST) -> list[str]:
    """Walk a model held in memory unit by unit (``walker.ResidentModel``, on ``device``), calling
    ``replace(modules, hessians)`` for each input group of the ``selected`` linears (full names) in
    its decoder layers. Returns the selected names outside every decoder layer (left untouched).
    ``track`` wraps the unit iterator (a progress bar)."""
    units = ResidentModel(model, device)
    inputs = None
    with units.walk():
        for prefix in track(units.units) if track else units.units:
            with units.unit(prefix) as unit:
                local = {name: module for name, module in selected.items() if units.owns(prefix, name)}
                inputs = calibration_step(units, prefix, unit, inputs, local, replace, windows, batch)
    return [name for name in selected if units.unit_of(name) not in units.layer_prefixes]
