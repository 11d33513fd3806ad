"""lq_lora's ``measured_windows``: the ILP's costs rescaled, per decoder layer and bit width, by the
loss change that layer's quantization really causes against the one its costs predict.

The ``output`` objective's costs are second-order estimates of each matrix's loss change made from
that layer's own inputs; they do not see how an error grows through the layers after it, and on
Gemma-3-270M they under-rate the late layers 5-10x against the measured loss (BENCHMARKS.md,
``benchmarks/lqlora_sensitivity.py``), so the ILP puts its 2-bit matrices there. With
``measured_windows: N`` the stage, for each decoder layer and each bit width of the grid below 8:

- quantizes all the layer's selected matrices at once with RTN at that width's cheapest config that
  fits each (the reference), and measures the mean KL divergence of the model's next-token
  distributions from the float model's over the first N calibration windows (a probe: the model
  runs one layer at a time on the run's device, ``compress.evaluate.hidden_by_units``; the weights
  are restored after it);
- sums the same references' costs by the cost table's own formula (the layer's Hessians and Fisher,
  taken during the cost walk: ``ReferenceCosts``);
- multiplies every cost of that layer at that width by measured / predicted. Widths without a probe
  (8 bits: a change below what a few windows resolve) take the factor of the widest probed width.

So the ILP still ranks configs within a layer and width by their own errors, and compares layers by
what their errors do to the model's output. A probe costs a forward pass of N windows (and a second
head pass for the float distribution): layers x widths probes (Gemma-3-270M: 18 x 3). Each probe's
result is cached under ``OUTPUT/.cache/lq_lora_measured/`` (keyed by the layer's weights, the width
and the windows), so a resumed run measures only what is missing. The probe swaps weights in the
model held in memory: not in a streaming recipe. With torchrun rank 0 measures, every rank reads the
factors.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from collections.abc import Iterator

import torch

from compress.lowrank import GRIDS, matrix_costs
from compress.lowrank.costs import layer_width_factors, rescaled_costs
from compress.quant import QuantConfig, QuantizedWeight

from ..checkpoint.atomic import atomic_write_text
from ..chunked_loss import kl_sum
from ..evaluate import hidden_by_units

PROBED_BELOW = 8  # bit widths probed: those of the grid below this


def references(configs: list[QuantConfig], shape: tuple[int, int]) -> dict[int, QuantConfig]:
    """{bits: the cheapest config of that width among ``configs``} for the probed widths."""
    widths = sorted({c.bits for c in configs if c.bits < PROBED_BELOW})
    return {bits: min((c for c in configs if c.bits == bits), key=lambda c: c.storage_bits(shape)) for bits in widths}


class ReferenceCosts:
    """The cost table's formula applied to each layer's reference quantizations, during the cost walk:
    ``predicted[layer][bits]`` is the sum over the layer's matrices."""

    def __init__(self, config, grid_for, units):
        self.config, self.grid_for, self.units = config, grid_for, units
        self.predicted: dict[str, dict[int, float]] = {}
        self.configs: dict[str, dict[int, QuantConfig]] = {}  # per matrix: its reference per width

    def add(self, members: dict, hessians: dict, fisher: dict) -> None:
        for name, module in members.items():
            weight = module.weight.detach().float()
            chosen = references(self.grid_for(self.config, tuple(weight.shape)), tuple(weight.shape))
            self.configs[name] = chosen
            layer = self.predicted.setdefault(self.units.unit_of(name), {})
            for bits, reference in chosen.items():
                cost = matrix_costs(weight, [reference], 0, fisher=fisher.get(name), hessian=hessians[name])
                layer[bits] = layer.get(bits, 0.0) + cost[reference.name][0]


@contextmanager
def quantized_in_place(model, configs: dict[str, QuantConfig]) -> Iterator[None]:
    """The named linears' weights replaced by their RTN dequantization inside the block, restored after."""
    kept = {}
    try:
        for name, config in configs.items():
            weight = model.get_submodule(name).weight
            kept[name] = weight.data
            weight.data = QuantizedWeight.quantize(weight.detach().float(), config).dequantize().to(weight.dtype)
        yield
    finally:
        for name, data in kept.items():
            model.get_submodule(name).weight.data = data


def _probe_key(model, names: list[str], bits: int, windows: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{bits}".encode())
    for name in names:
        digest.update(model.get_submodule(name).weight.detach().float().cpu().numpy().tobytes())
    digest.update(windows.cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def mean_kl(units, windows: torch.Tensor, float_states: list[torch.Tensor]) -> float:
    """Mean KL(float || model) per position over ``windows``, one window at a time."""
    total = 0.0
    for window, states in zip(windows, float_states):
        total += hidden_by_units(units, window[None], lambda model, hidden, s=states: kl_sum(model, hidden, s))
    return total / windows.numel()


def measure(ctx, references_by_name: dict[str, dict[int, QuantConfig]], count: int) -> dict[str, dict[int, float]]:
    """{layer: {bits: mean KL of that layer's reference quantization}} (cached per probe)."""
    windows = ctx.windows("calibration")[:count]
    cache = ctx.out_dir / ".cache" / "lq_lora_measured"
    cache.mkdir(parents=True, exist_ok=True)
    float_states = [hidden_by_units(ctx.units, window[None], lambda model, hidden: hidden) for window in windows]
    probes = [(layer, bits) for layer in ctx.units.layer_prefixes for bits in sorted(
        {b for name, refs in references_by_name.items() if ctx.units.owns(layer, name) for b in refs})]
    measured: dict[str, dict[int, float]] = {}
    for layer, bits in ctx.track(probes, "lq_lora measured probes"):
        configs = {name: refs[bits] for name, refs in references_by_name.items()
                   if ctx.units.owns(layer, name) and bits in refs}
        path = cache / f"{_probe_key(ctx.model, list(configs), bits, windows)}.json"
        if path.is_file():
            value = json.loads(path.read_text())["kl"]
        else:
            with quantized_in_place(ctx.model, configs):
                value = mean_kl(ctx.units, windows, float_states)
            atomic_write_text(path, json.dumps({"layer": layer, "bits": bits, "kl": value}))
        measured.setdefault(layer, {})[bits] = value
    return measured


def measured_table(ctx, config, table: dict, references_seen: ReferenceCosts, report) -> dict:
    """``table`` rescaled by the measured / predicted factors of each matrix's layer and width; the
    factors and the probes' values go to the report (every rank computes the same predictions in
    its cost walk; rank 0 probes)."""
    measured = ctx.ranks.broadcast(measure(ctx, references_seen.configs, config.measured_windows)
                                   if ctx.ranks.main else None)
    bits = {c.name: c.bits for c in GRIDS[config.grid]()}
    factors = layer_width_factors(measured, references_seen.predicted, sorted(set(bits.values())))
    report.metrics.update(measured_kl=measured, measured_factors=factors)
    return rescaled_costs(table, lambda matrix, name: factors[ctx.units.unit_of(matrix)][bits[name]])
