"""GPTQ v1 ``quantization_config``: the base config plus ``dynamic`` per-module overrides, written
so that GPTQModel (un-fused names) and vLLM (fused ``qkv_proj`` / ``gate_up_proj``) both match.

Overrides group modules by layer role; a role in every layer gets ``\\d+``, otherwise an explicit
alternation of layer indices. q/k/v and gate/up must share one config (engines fuse them):
``gptq_problems`` reports any module the format cannot hold before anything is written.

Reading follows GPTQModel's rules: ``-:`` (do not quantize) patterns first, then the others in
order; the first ``re.match`` wins and its fields override the base.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from compress import __version__
from compress.quant import QuantConfig, UniformConfig

from ..targets import FUSED_GROUPS

# GPTQModel loads asymmetric v1 checkpoints only from writers that keep every zero point in
# [1, 2^b - 1] (old AutoGPTQ stored zero = 0 as -1, which overflows). It recognises them by a
# gptqmodel version >= 0.9.0 in meta.quantizer; our writer clamps zeros the same way, so we state
# that convention here (compress is listed first as the tool that wrote the file).
GPTQMODEL_ZERO_CONVENTION = "gptqmodel:0.9.0"
LAYER_NAME = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.(?P<suffix>.+)$")


def _key(config: QuantConfig) -> tuple[int, int, bool]:
    return (config.bits, config.group_size, config.sym)


def integer_problems(configs: dict[str, QuantConfig], shapes: dict[str, tuple[int, int]], fmt: str) -> list[str]:
    """Why a format of packed uniform integers (GPTQ, compressed-tensors) cannot hold these modules:
    NF or float-zero configs, partial groups, fused q/k/v or gate/up that differ."""
    problems = []
    for name, config in configs.items():
        if not isinstance(config, UniformConfig):
            problems.append(f"{name}: {config.name} is a NormalFloat config; {fmt} holds uniform integers "
                            "only (quantize it with a uniform config, or export native, which keeps it)")
        elif config.float_zero:
            problems.append(f"{name}: {config.name} has float zero points; {fmt} stores integer zeros only "
                            "(export format native keeps them)")
        elif config.group_size != -1 and shapes[name][1] % config.group_size:
            problems.append(f"{name}: group_size {config.group_size} does not divide in_features="
                            f"{shapes[name][1]} ({fmt} engines need whole groups; export native keeps a partial one)")
    for name in configs:
        prefix, _, leaf = name.rpartition(".")
        for group in FUSED_GROUPS:
            if leaf != group[0]:
                continue
            members = {f"{prefix}.{m}": configs.get(f"{prefix}.{m}") for m in group}
            names = {m: (c.name if c else "not quantized") for m, c in members.items()}
            if len(set(names.values())) > 1:
                problems.append(f"{prefix}.{{{','.join(group)}}}: engines fuse these and need one config, "
                                f"got {', '.join(f'{m.rpartition(chr(46))[2]}={v}' for m, v in names.items())}")
    return problems


def fits_gptq(shape: tuple[int, int]) -> str | None:
    """Why an (out, in) matrix cannot be held by the GPTQ layout, or None if it can."""
    out_features, in_features = shape
    bad = [f"{name}={n} is not a multiple of 32" for name, n in
           (("in_features", in_features), ("out_features", out_features)) if n % 32]
    return "; ".join(bad) or None


def gptq_problems(configs: dict[str, QuantConfig], shapes: dict[str, tuple[int, int]]) -> list[str]:
    """Every reason the GPTQ layout cannot hold these modules (empty if it can)."""
    problems = integer_problems(configs, shapes, "GPTQ")
    for name in configs:
        reason = fits_gptq(shapes[name])
        if reason:
            problems.append(f"{name}: shape (out={shapes[name][0]}, in={shapes[name][1]}) does not fit the "
                            f"GPTQ layout: {reason}")
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


def quantization_config(configs: dict[str, QuantConfig], dense_layer_linears: list[str],
                        num_layers: int, lm_head: bool) -> dict:
    """The ``quantization_config`` of a GPTQ v1 checkpoint holding ``configs`` (uniform only)."""
    counts = Counter(_key(c) for c in configs.values())
    base = min(counts, key=lambda k: (-counts[k], k))
    dynamic: dict[str, dict] = {}
    for pattern in layer_patterns(dense_layer_linears, num_layers):
        dynamic[f"-:{pattern}"] = {}
    by_config: dict[tuple, list[str]] = defaultdict(list)
    for name, config in configs.items():
        if _key(config) != base and not name.endswith("lm_head"):
            by_config[_key(config)].append(name)
    for key in sorted(by_config):
        bits, group_size, sym = key
        for pattern in layer_patterns(by_config[key], num_layers):
            dynamic[f"+:{pattern}"] = {"bits": bits, "group_size": group_size, "sym": sym}
    bits, group_size, sym = base
    result = {
        "bits": bits, "group_size": group_size, "sym": sym, "desc_act": False, "lm_head": lm_head,
        "quant_method": "gptq", "method": "gptq", "checkpoint_format": "gptq", "format": "gptq",
        "pack_dtype": "int32", "true_sequential": True, "damp_percent": 0.01,
        "meta": {"quantizer": [f"compress:{__version__}", GPTQMODEL_ZERO_CONVENTION]},
    }
    if dynamic:
        result["dynamic"] = dynamic
    return result


def resolve_module_config(quant_config: dict, name: str) -> QuantConfig | None:
    """The config GPTQ loaders give module ``name``; None when a ``-:`` pattern excludes it."""
    fields = {"bits": quant_config["bits"], "group_size": quant_config.get("group_size", -1),
              "sym": quant_config.get("sym", True)}
    dynamic = quant_config.get("dynamic") or {}
    negatives = [p for p in dynamic if p.startswith("-:")]
    positives = [p for p in dynamic if not p.startswith("-:")]
    for pattern in negatives + positives:
        if re.match(pattern.split(":", 1)[1] if pattern[:2] in ("+:", "-:") else pattern, name):
            if pattern.startswith("-:"):
                return None
            fields.update({k: v for k, v in dynamic[pattern].items() if k in fields})
            break
    return QuantConfig.uniform(int(fields["bits"]), int(fields["group_size"]), bool(fields["sym"]))
