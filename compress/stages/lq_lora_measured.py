"""lq_lora's ``measured_windows``: the ILP's costs rescaled, per group of matrices and bit width, by
the loss change that group's quantization really causes against the one its costs predict.

The ``output`` objective's costs are second-order estimates of each matrix's loss change made from
that layer's own inputs; they do not see how an error grows through the layers after it, and on
Gemma-3-270M they under-rate the late layers 5-10x against the measured loss (BENCHMARKS.md,
``benchmarks/lqlora_sensitivity.py``), so the ILP puts its 2-bit matrices there. With
``measured_windows: N``, for each probe group (``measured_probe: group``, the default: the
engine-fused q/k/v and gate/up, which the ILP ties, and every other matrix alone; ``layer``: all
the selected matrices of a decoder layer at once) and each bit width of the grid below 8:

- during the cost walk each matrix is quantized with the stage's own quantizer (GPTQ on the float
  model's Hessian with ``quantizer: gptq``, else RTN) at that width's cheapest config that fits it
  (the reference), and the reference's cost is computed by the cost table's formula (rank 0: the
  error of Q alone; the layer's Hessian and Fisher) (``References``; the references are kept on
  disk, not in memory);
- a probe puts the group's references into the float model and measures the mean KL divergence of
  its next-token distributions from the float model's over the first N calibration windows (the
  model runs one layer at a time on the run's device, ``compress.execution.evaluate.hidden_by_units``; the
  weights are restored after it);
- every cost of the group's matrices at that width is multiplied by measured / predicted. Widths
  without a probe (8 bits: a change below what a few windows resolve) take the factor of the
  widest probed width.

So the ILP still ranks group sizes within a width by their own errors, and compares groups by what
their errors do to the model's output. A probe costs a forward pass of N windows and a second head
pass for the float distribution: groups x widths probes (Gemma-3-270M: 18 x 4 x 3 by group, 18 x 3
by layer; 3-6 s each on 2 CPU cores at N = 2). References and probe results are cached under
``OUTPUT/.cache/lq_lora_measured/`` (keyed by weight, Fisher, Hessian and settings; by the references
and the windows), so a resumed run redoes only what is missing. The probe swaps weights in the model
held in memory: not in a streaming recipe. With torchrun rank 0 quantizes the references and
probes, every rank reads the factors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from compress.lowrank import GRIDS
from compress.lowrank.costs import probe_factors, rescaled_costs
from compress.lowrank.decompose import output_error, output_row_weights
from compress.quant import QuantConfig, QuantizedWeight
from compress.quant.gptq import gptq_quantize

from ..checkpoint.atomic import atomic_write_text
from ..checkpoint.tensors import read_safetensors, write_safetensors
from ..execution.evaluate import hidden_by_units
from ..models.chunked_loss import kl_sum
from ..targets import fused_members
from .lq_lora_costs import cache_key, gptq_settings

PROBED_BELOW = 8  # bit widths probed: those of the grid below this


def references(configs: list[QuantConfig], shape: tuple[int, int]) -> dict[int, QuantConfig]:
    """{bits: the cheapest config of that width among ``configs``} for the probed widths."""
    widths = sorted({c.bits for c in configs if c.bits < PROBED_BELOW})
    return {bits: min((c for c in configs if c.bits == bits), key=lambda c: c.storage_bits(shape)) for bits in widths}


def probe_groups(names: list[str], by: str, unit_of) -> dict[str, tuple[str, ...]]:
    """{matrix: its probe group}: ``group``, the engine-fused q/k/v and gate/up together and every
    other matrix alone; ``layer``, every selected matrix of its decoder layer (``unit_of``) together."""
    if by == "layer":
        layers: dict[str, list[str]] = {}
        for name in names:
            layers.setdefault(unit_of(name), []).append(name)
        return {name: tuple(layers[unit_of(name)]) for name in names}
    groups = {name: (name,) for name in names}
    for _, members in fused_members(names):
        groups.update({member: tuple(members) for member in members})
    return groups


class References:
    """Each matrix's reference quantizations (on disk) and their predicted costs, from the cost walk
    (``add`` per input group; rank 0 only)."""

    def __init__(self, ctx, config, grid_for):
        self.config, self.grid_for, self.main = config, grid_for, ctx.ranks.main
        self.directory = ctx.out_dir / ".cache" / "lq_lora_measured" / "references"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.predicted: dict[str, dict[int, float]] = {}
        self.files: dict[str, Path] = {}
        self.configs: dict[str, dict[int, QuantConfig]] = {}

    def _quantize(self, weight: torch.Tensor, config: QuantConfig, hessian: torch.Tensor) -> QuantizedWeight:
        if self.config.quantizer == "gptq":
            return gptq_quantize(weight, hessian, config, gptq_settings(self.config)).quantized
        return QuantizedWeight.quantize(weight, config)

    def add(self, members: dict, hessians: dict, fisher: dict) -> None:
        for name, module in members.items() if self.main else ():
            weight, hessian = module.weight.detach().float(), hessians[name]
            chosen = references(self.grid_for(self.config, tuple(weight.shape)), tuple(weight.shape))
            settings = ["reference", self.config.quantizer, self.config.damp, self.config.refine_rounds]
            key = cache_key(weight, fisher.get(name), list(chosen.values()), settings, hessian)
            path = self.directory / f"{key}.safetensors"
            if path.is_file():
                quantized = read_references(path, chosen, tuple(weight.shape))
            else:
                quantized = {bits: self._quantize(weight, c, hessian) for bits, c in chosen.items()}
                write_references(path, quantized)
            error = output_error(hessian, output_row_weights(hessian, fisher.get(name)))
            self.predicted[name] = {bits: error(weight - q.dequantize()) ** 2 for bits, q in quantized.items()}
            self.files[name], self.configs[name] = path, chosen


def write_references(path: Path, quantized: dict[int, QuantizedWeight]) -> None:
    partial = path.with_name(f"{path.name}.partial")
    write_safetensors(partial, {f"{bits}.{k}": t.contiguous().cpu() for bits, q in quantized.items()
                                for k, t in q.tensors.items()}, metadata={})
    os.replace(partial, path)


def read_references(path: Path, configs: dict[int, QuantConfig], shape: tuple[int, int]) -> dict[int, QuantizedWeight]:
    tensors = read_safetensors(path)
    return {bits: QuantizedWeight(config, shape, {k.partition(".")[2]: t for k, t in tensors.items()
                                                  if k.partition(".")[0] == str(bits)})
            for bits, config in configs.items()}


@contextmanager
def swapped(model, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The named linears' weights replaced by ``weights`` inside the block, restored after."""
    kept = {}
    try:
        for name, weight in weights.items():
            parameter = model.get_submodule(name).weight
            kept[name] = parameter.data
            parameter.data = weight.to(parameter.dtype)
        yield
    finally:
        for name, data in kept.items():
            model.get_submodule(name).weight.data = data


@torch.no_grad()
def mean_kl(units, windows: torch.Tensor, float_states: list[torch.Tensor]) -> float:
    """Mean KL(float || model) per position over ``windows``, one window at a time."""
    total = 0.0
    for window, states in zip(windows, float_states):
        total += hidden_by_units(units, window[None], lambda model, hidden, s=states: kl_sum(model, hidden, s))
    return total / windows.numel()


def _probe_key(files: list[Path], bits: int, windows: torch.Tensor) -> str:
    digest = hashlib.sha256(json.dumps([bits] + [f.stem for f in files]).encode())
    digest.update(windows.cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def measure(ctx, seen: References, count: int, by: str) -> dict[str, dict[int, float]]:
    """{group: {bits: mean KL with the group's references in the model}} (cached per probe)."""
    windows = ctx.windows("calibration")[:count]
    cache = seen.directory.parent
    float_states = [hidden_by_units(ctx.units, window[None], lambda model, hidden: hidden) for window in windows]
    groups = sorted(set(probe_groups(list(seen.files), by, ctx.units.unit_of).values()),
                    key=lambda g: list(seen.files).index(g[0]))
    widths = {group: sorted(set.intersection(*(set(seen.configs[n]) for n in group))) for group in groups}
    probes = [(group, bits) for group in groups for bits in widths[group]]
    measured: dict[str, dict[int, float]] = {}
    for group, bits in ctx.track(probes, "lq_lora measured probes"):
        path = cache / f"{_probe_key([seen.files[n] for n in group], bits, windows)}.json"
        if path.is_file():
            value = json.loads(path.read_text())["kl"]
        else:
            weights = {n: read_references(seen.files[n], {bits: seen.configs[n][bits]}, tuple(
                ctx.model.get_submodule(n).weight.shape))[bits].dequantize() for n in group}
            with swapped(ctx.model, weights):
                value = mean_kl(ctx.units, windows, float_states)
            atomic_write_text(path, json.dumps({"group": list(group), "bits": bits, "kl": value}))
        measured.setdefault("+".join(group), {})[bits] = value
    return measured


def measured_table(ctx, config, table: dict, seen: References, report) -> dict:
    """``table`` rescaled by the measured / predicted factors of each matrix's group and width; the
    factors and the probes' values go to the report (rank 0 measures, every rank rescales)."""
    bits = {c.name: c.bits for c in GRIDS[config.grid]()}
    factors = None
    if ctx.ranks.main:
        measured = measure(ctx, seen, config.measured_windows, config.measured_probe)
        groups = probe_groups(list(seen.files), config.measured_probe, ctx.units.unit_of)
        predicted = {"+".join(g): {b: sum(seen.predicted[n][b] for n in g) for b in measured["+".join(g)]}
                     for g in set(groups.values())}
        factors = {"by_group": probe_factors(measured, predicted, sorted(set(bits.values()))),
                   "group": {n: "+".join(g) for n, g in groups.items()}, "measured": measured}
    factors = ctx.ranks.broadcast(factors)
    report.metrics.update(measured_kl=factors["measured"], measured_factors=factors["by_group"])
    by_group, group = factors["by_group"], factors["group"]
    return rescaled_costs(table, lambda matrix, name: by_group[group[matrix]][bits[name]])
