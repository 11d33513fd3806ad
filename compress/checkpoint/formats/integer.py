"""What the packed-integer formats (GPTQ v1, compressed-tensors) share: the modules they cannot hold,
the refusal of a model they cannot write, the ``re:`` patterns that name modules by layer role in
their ``quantization_config``, and the front of vLLM's verdict (NF layers, fused groups that differ).

A role in every layer gets ``\\d+``, otherwise an explicit alternation of layer indices. q/k/v and
gate/up must share one config (engines fuse them).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import ClassVar

from torch import nn

from compress.quant import QuantConfig, QuantLinear, UniformConfig

from ...errors import CheckpointError
from ...model_state import ModelState, Problem
from ...targets import FUSED_GROUPS
from ..engines import Layer, Verdict, engine_layers
from ..write import adapter_modules, quantized_modules, refuse_pruned_widths
from .base import UNEVEN, Format

LAYER_NAME = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.(?P<suffix>.+)$")


def integer_problems(configs: dict[str, QuantConfig], shapes: dict[str, tuple[int, int]], fmt: str,
                     pending: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """(module, why) for each reason a format of packed uniform integers (GPTQ, compressed-tensors)
    cannot hold these modules: NF or float-zero configs, partial groups, fused q/k/v or gate/up that
    differ. ``pending``: modules whose uniform config a stage picks at run time, fused alike."""
    problems = []
    for name, config in configs.items():
        if not isinstance(config, UniformConfig):
            problems.append((name, f"{name}: {config.name} is a NormalFloat config; {fmt} holds uniform integers "
                                   "only (quantize it with a uniform config, or export native, which keeps it)"))
        elif config.float_zero:
            problems.append((name, f"{name}: {config.name} has float zero points; {fmt} stores integer zeros only "
                                   "(export format native keeps them)"))
        elif config.group_size != -1 and shapes[name][1] % config.group_size:
            problems.append((name, f"{name}: group_size {config.group_size} does not divide in_features="
                                   f"{shapes[name][1]} ({fmt} engines need whole groups; export native keeps a "
                                   "partial one)"))
    for name in [*configs, *pending]:
        prefix, _, leaf = name.rpartition(".")
        for group in FUSED_GROUPS:
            members = [f"{prefix}.{m}" for m in group]
            if leaf != group[0] or any(m in pending for m in members):
                continue
            names = {m: (configs[m].name if m in configs else "not quantized") for m in members}
            if len(set(names.values())) > 1:
                problems.append((name, f"{prefix}.{{{','.join(group)}}}: engines fuse these and need one config, "
                                       f"got {', '.join(f'{m.rpartition(chr(46))[2]}={v}' for m, v in names.items())}"))
    return problems


def _role(name: str) -> tuple[str, str, str] | None:
    """(layers prefix, layer index, suffix with fused leaves merged) of a module inside a layer."""
    found = LAYER_NAME.match(name)
    if found is None:
        return None
    suffix = found["suffix"]
    parent, _, leaf = suffix.rpartition(".")
    for group, fused_name in FUSED_GROUPS.items():
        if leaf in group:
            stems = [m.removesuffix("_proj") for m in group] + [fused_name.removesuffix("_proj")]
            fused = "|".join(stems)
            suffix = f"{re.escape(parent)}\\.(?:{fused})_proj" if parent else f"(?:{fused})_proj"
            return found["prefix"], found["index"], suffix
    return found["prefix"], found["index"], re.escape(suffix)


def layer_patterns(names: list[str], num_layers: int) -> list[str]:
    """Regular expressions covering exactly the given layer modules (grouped by role)."""
    by_role: dict[tuple[str, str], set[int]] = defaultdict(set)
    for name in names:
        role = _role(name)
        if role is None:
            by_role[(re.escape(name), "")].add(-1)
            continue
        prefix, index, suffix = role
        by_role[(re.escape(prefix), suffix)].add(int(index))
    patterns = []
    for (prefix, suffix), indices in sorted(by_role.items()):
        if indices == {-1}:
            patterns.append(f"^{prefix}$")
            continue
        if len(indices) == num_layers:
            layers = r"\d+"
        elif len(indices) == 1:
            layers = str(next(iter(indices)))
        else:
            layers = "(?:" + "|".join(map(str, sorted(indices))) + ")"
        patterns.append(f"^{prefix}\\.{layers}\\.{suffix}$")
    return patterns


def packed_layers(engine: str, rows: list[dict]) -> Verdict | list[Layer]:
    """The engine layers of a packed checkpoint's ``inspect`` rows, or the verdict that stops vLLM
    first: an NF layer (no vLLM format), or a fused group whose members differ (vLLM applies one
    scheme to a fused layer: compressed_tensors/utils.py should_ignore_layer, gptq_utils
    get_dynamic_override on the fused prefix)."""
    nf = next((r for r in rows if r.get("format") == "nf"), None)
    if nf is not None:
        return Verdict(engine, False, stops_at=nf["name"], reason="NormalFloat layers have no vLLM format")
    layers, fused = engine_layers(rows)
    if fused:
        return Verdict(engine, False, stops_at=fused.split(":")[0], reason=f"{fused.split(': ', 1)[1]}: vLLM "
                       "fuses them into one layer with one scheme")
    return layers


class IntegerFormat(Format):
    """A format of packed uniform integers, the quantized base alone, engines fusing q/k/v and gate/up."""

    fuses_projections: ClassVar[bool] = True
    label: ClassVar[str]  # the name its problems give it

    def module_problems(self, configs: dict[str, QuantConfig], shapes: dict[str, tuple[int, int]],
                        pending: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
        return integer_problems(configs, shapes, self.label, pending)

    def problems(self, state: ModelState) -> list[Problem]:
        if not state.known:
            return []
        found = [Problem(UNEVEN, state.uneven_widths_by)] if state.uneven_widths_by else []
        if not state.quant:
            return found + [Problem("the model has no quantized layers (add a quantize stage before export)",
                                    state.dense_by)]
        exact = {name: q.config for name, q in state.quant.items() if q.config is not None}
        pending = {name: q for name, q in state.quant.items() if q.config is None}
        found += [Problem(f"{name}: {q.family.kind} configs (picked at run time); {self.label} holds uniform "
                          "integers only (pick from a uniform grid, or export native)", q.by)
                  for name, q in pending.items() if q.family is not UniformConfig]
        shapes = {name: state.shapes[name] for name in state.quant}
        uniform = frozenset(name for name, q in pending.items() if q.family is UniformConfig)
        found += [Problem(text, state.quant[name].by)
                  for name, text in self.module_problems(exact, shapes, uniform)]
        return found

    def modules_to_write(self, model: nn.Module) -> dict[str, QuantLinear]:
        """The quantized layers the checkpoint must hold; CheckpointError naming the first that it cannot."""
        modules = quantized_modules(model)
        if not modules:
            raise CheckpointError(f"export format {self.name}: the model has no quantized layers "
                                  "(add a quantize stage before export)")
        adapters = adapter_modules(model)
        if adapters:
            raise CheckpointError(f"export format {self.name}: {len(adapters)} layers carry LoRA adapters "
                                  f"(e.g. {next(iter(adapters))}); {self.name} holds the quantized base only: export "
                                  "native, or hf to merge them")
        refuse_pruned_widths(model, self.name)
        problems = self.module_problems({name: m.config for name, m in modules.items()},
                                        {name: m.shape for name, m in modules.items()})
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointError(f"export format {self.name}: {problems[0][1]}{more}")
        return modules


def layer_linears(model: nn.Module) -> list[str]:
    """Names of dense Linear layers inside decoder layers (GPTQ loaders would expect them quantized)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{name}"]


def dense_linears(model: nn.Module) -> list[str]:
    """Every dense Linear, the head included (compressed-tensors lists what it does not quantize)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
