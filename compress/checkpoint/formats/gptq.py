"""``gptq``: GPTQ v1 checkpoints with per-module ``dynamic`` bits, which GPTQModel loads at every
width, current vLLM at 4/8-bit symmetric and transformers when every module shares one config.

``quantization_config`` is the base config plus ``dynamic`` per-module overrides, written so that
GPTQModel (un-fused names) and vLLM (fused ``qkv_proj`` / ``gate_up_proj``) both match; overrides
group modules by layer role (``integer.layer_patterns``). ``GPTQ.problems`` reports any module the
format cannot hold before anything is written. Reading follows GPTQModel's rules: ``-:`` (do not
quantize) patterns first, then the others in order; the first ``re.match`` wins and its fields
override the base. The engine rules (``verdicts``) are each cited beside the engine source they
were read in.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from torch import nn

from compress import __version__
from compress.quant import QuantConfig

from ...errors import CheckpointError
from ..atomic import atomic_directory
from ..engines import MARLIN_GROUPS, Layer, Verdict, compress_verdict, gptqmodel_kernel, vllm_cpu_layers, \
    vllm_kernel, with_kernels
from ..manifest import write_manifest
from ..tensors import DEFAULT_SHARD_BYTES
from ..write import config_dict, describe_modules, write_common
from .integer import IntegerFormat, layer_linears, layer_patterns, packed_layers

# GPTQModel loads asymmetric v1 checkpoints only from writers that keep every zero point in
# [1, 2^b - 1] (old AutoGPTQ stored zero = 0 as -1, which overflows). It recognises them by a
# gptqmodel version >= 0.9.0 in meta.quantizer; our writer clamps zeros the same way, so we state
# that convention here (compress is listed first as the tool that wrote the file).
GPTQMODEL_ZERO_CONVENTION = "gptqmodel:0.9.0"


def _key(config: QuantConfig) -> tuple[int, int, bool]:
    return (config.bits, config.group_size, config.sym)


def fits_gptq(shape: tuple[int, int]) -> str | None:
    """Why an (out, in) matrix cannot be held by the GPTQ layout, or None if it can."""
    out_features, in_features = shape
    bad = [f"{name}={n} is not a multiple of 32" for name, n in
           (("in_features", in_features), ("out_features", out_features)) if n % 32]
    return "; ".join(bad) or None


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


def _vllm_layers(layers: list[Layer]) -> Verdict:
    for layer in layers:
        # vllm/model_executor/layers/quantization/auto_gptq.py: TYPE_MAP {(4, True), (8, True)}
        if (layer.bits, layer.sym) not in ((4, True), (8, True)):
            return Verdict("vllm", False, stops_at=layer.name,
                           reason=f"bits={layer.bits}, sym={layer.sym}: vLLM's GPTQ loader (auto_gptq.py) takes "
                                  "4- or 8-bit symmetric only; export compressed-tensors")
        # auto_gptq.py: verify_marlin_supported -> marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES
        if layer.group_size not in MARLIN_GROUPS:
            return Verdict("vllm", False, stops_at=layer.name,
                           reason=f"group_size {layer.group_size} is not one of {list(MARLIN_GROUPS)} (auto_gptq.py)")
    return with_kernels("vllm", [(layer, vllm_kernel(layer, zero_points=False)) for layer in layers])


def _vllm_cpu_loader(layer: Layer) -> str | None:
    # auto_gptq.py AutoGPTQLinearMethod -> marlin_utils.verify_marlin_supported: on the CPU
    # _query_cpu_marlin_supported_quant_types gives uint4b8 (4-bit symmetric) only, groups -1/32/64/128
    if (layer.bits, layer.sym) != (4, True) or layer.group_size not in MARLIN_GROUPS:
        return (f"bits={layer.bits}, sym={layer.sym}, group_size={layer.group_size}: vLLM-CPU's "
                "GPTQ loader takes 4-bit symmetric with groups -1/32/64/128 (marlin_utils.py)")
    return None


def _gptqmodel(rows: list[dict]) -> Verdict:
    nf = next((r for r in rows if r.get("format") == "nf"), None)
    if nf is not None:
        return Verdict("gptqmodel", False, stops_at=nf["name"], reason="NormalFloat layers have no GPTQ form")
    layers = [Layer(r["name"], r["bits"], r["group_size"], r["sym"], *r["shape"]) for r in rows
              if r.get("format") == "uniform"]  # per module (dynamic: make_quant picks a kernel for each)
    return Verdict("gptqmodel", True, kernel=", ".join(sorted({gptqmodel_kernel(layer) for layer in layers})))


def _transformers(rows: list[dict]) -> Verdict:
    # utils/quantization_config.py GPTQConfig drops `dynamic`; optimum builds every layer with one config
    uniform = [r for r in rows if r.get("format") == "uniform"]
    base = (uniform[0]["bits"], uniform[0]["group_size"], uniform[0]["sym"]) if uniform else None
    odd = next((r for r in uniform if (r["bits"], r["group_size"], r["sym"]) != base), None)
    if odd is not None:
        return Verdict("transformers", False, stops_at=odd["name"],
                       reason="transformers' GPTQ path (quantizer_gptq.py via optimum) builds every layer with "
                              "the base config and ignores dynamic overrides: load it with GPTQModel")
    return Verdict("transformers", True, kernel="GPTQModel kernels through optimum (gptqmodel installed)")


class GPTQ(IntegerFormat):
    name = "gptq"
    label = "GPTQ"
    quant_method = "gptq"
    validate_with_skeleton = False  # a GPTQ source's packed layers are built when it is loaded

    def module_problems(self, configs: dict[str, QuantConfig], shapes: dict[str, tuple[int, int]],
                        pending: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
        """Every reason the GPTQ layout cannot hold these modules (empty if it can)."""
        problems = super().module_problems(configs, shapes, pending)
        for name in [*configs, *pending]:
            reason = fits_gptq(shapes[name])
            if reason:
                problems.append((name, f"{name}: shape (out={shapes[name][0]}, in={shapes[name][1]}) does not fit "
                                       f"the GPTQ layout: {reason}"))
        return problems

    def write(self, model: nn.Module, directory: Path, tokenizer=None, recipe: dict | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, shards=None, adapter_dtype: str | None = None) -> dict:
        """GPTQ v1 with per-module ``dynamic`` bits; fails before writing if a module does not fit.
        ``shards`` as for native."""
        modules = self.modules_to_write(model)
        configs = {name: m.config for name, m in modules.items()}
        num_layers = getattr(model.config, "num_hidden_layers", 0)
        lm_head = any(name.endswith("lm_head") for name in modules)
        quant = quantization_config(configs, layer_linears(model), num_layers, lm_head)
        config = dict(config_dict(model), quantization_config=quant)
        with atomic_directory(directory) as staging:
            write_common(model, staging, config, tokenizer, max_shard_bytes, shards)
            (staging / "quantize_config.json").write_text(json.dumps(quant, indent=2, sort_keys=True) + "\n")
            return write_manifest(staging, {"format": "gptq", "compress_version": __version__,
                                            "modules": describe_modules(model), "recipe": recipe})

    def read_modules(self, quant: dict, names, path: Path) -> dict:
        if quant.get("checkpoint_format", quant.get("format", "gptq")) != "gptq":
            raise CheckpointError(f"{path}: checkpoint_format {quant.get('checkpoint_format')!r} is not supported "
                                  "(compress reads GPTQ v1, checkpoint_format 'gptq')")
        if quant.get("desc_act"):
            raise CheckpointError(f"{path}: desc_act (act-order) GPTQ checkpoints are not supported yet")
        modules = {}
        for name in names():
            if name.endswith(".qweight"):
                fqn = name.removesuffix(".qweight")
                config = resolve_module_config(quant, fqn)
                if config is None:
                    raise CheckpointError(f"{path}: {fqn} has packed weights but quantization_config.dynamic "
                                          "excludes it")
                modules[fqn] = (config, None)
        return modules

    def verdicts(self, rows: list[dict]) -> list[Verdict]:
        vllm, cpu = (packed_layers(engine, rows) for engine in ("vllm", "vllm-cpu"))
        return [vllm if isinstance(vllm, Verdict) else _vllm_layers(vllm),
                cpu if isinstance(cpu, Verdict) else vllm_cpu_layers(cpu, _vllm_cpu_loader),
                _gptqmodel(rows), _transformers(rows), compress_verdict(rows)]
