"""compressed-tensors ``pack-quantized`` checkpoints: llm-compressor's format, which vLLM serves at 2-8
bits (Marlin/Machete at 4 and 8, Humming at the other widths) and transformers reads through the
``compressed-tensors`` library.

Per quantized linear ``X`` (weight [N, K], b bits, G groups), as the library's
``PackedQuantizationCompressor`` writes them:

===================  =====  ======================  ==============================================
tensor               dtype  shape                   content
===================  =====  ======================  ==============================================
X.weight_packed      int32  [N, ceil(K*b/32)]       codes ``q + 2^(b-1)`` (q in [-2^(b-1), 2^(b-1)-1]),
                                                    packed along K, little-endian bit stream
X.weight_scale       float  [N, G] ([N, 1]: chan.)  the group's scale
X.weight_zero_point  int32  [ceil(N*b/32), G]       asymmetric only: ``zp + 2^(b-1)`` packed along N
X.weight_shape       int64  [2]                     [N, K]
X.weight_g_idx       int32  [K]                     act order ``group`` only: the group of each column
===================  =====  ======================  ==============================================

The value is ``(q - zp) * scale``. Our uniform codes are ``c`` in [0, 2^b - 1] read as
``scale * (c - zero)``, so ``c = q + 2^(b-1)`` and ``zero = zp + 2^(b-1)``: the stored words are our
codes and zeros themselves, in the library's bit stream (element i at bit i*b, the same stream as
``quant.packing``, cut to ceil(L*b/32) words instead of padded to whole runs of 32). A symmetric
config has zero 2^(b-1), i.e. zp = 0, and stores none. Scales stay fp16 (the loaders cast them to the
model's dtype: exact for fp32, as in GPTQ checkpoints otherwise).

``quantization_config`` holds one config group per distinct scheme (bits, group size, symmetry) whose
``targets`` are ``re:`` patterns naming its modules (q/k/v and gate/up always share one group: vLLM
fuses them and applies the first shard's scheme to all; see ``engines.py``), and the dense linears in
``ignore``. NormalFloat and float-zero layers have no such scheme: ``CompressedTensors.problems``
names them before anything is written (unlike GPTQ v1, any shape fits).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from compress import __version__
from compress.quant import QuantConfig
from compress.quant.packing import packed_length, pack_codes, unpack_codes
from compress.quant.uniform import default_g_idx, from_gptq_tensors, to_gptq_tensors
from compress.targets import matches

from ...dtypes import FLOAT_CODES
from ...errors import CheckpointError
from ..atomic import atomic_directory
from ..engines import Layer, Verdict, compress_verdict, vllm_cpu_layers, vllm_kernel, with_kernels
from ..manifest import write_manifest
from ..tensors import DEFAULT_SHARD_BYTES, TensorSource
from ..write import config_dict, describe_modules, write_common
from .base import TensorMeta
from .integer import IntegerFormat, dense_linears, layer_patterns, packed_layers

FORMAT = "compressed-tensors"
PACKED = "pack-quantized"
LIBRARY_VERSION = "0.20.1"  # the compressed-tensors release whose layout this writes (tests/test_ct_interop.py)
OURS = ("qweight", "qzeros", "scales", "g_idx")


def weight_args(config: QuantConfig) -> dict:
    """The ``weights`` args of a config group, with the keys the library 0.20.1 writes (its
    defaults left out, as its own ``ModelCompressor.update_config`` does)."""
    args = {"dynamic": False, "num_bits": config.bits, "strategy": "channel" if config.group_size == -1 else "group",
            "symmetric": config.sym, "type": "int"}
    if config.group_size != -1:
        args["group_size"] = config.group_size
    return args


def config_from_args(args: dict, where: str) -> QuantConfig:
    """Our uniform config for a group's ``weights`` args; CheckpointError for what we cannot hold."""
    supported = (args.get("type") == "int" and args.get("strategy") in ("group", "channel")
                 and not args.get("dynamic") and args.get("num_bits") in (2, 3, 4, 8))
    if not supported:
        raise CheckpointError(f"{where}: weights {args}: compress reads int group/channel weights of 2, 3, 4 "
                              "or 8 bits only")
    group = -1 if args["strategy"] == "channel" else int(args["group_size"])
    return QuantConfig.uniform(int(args["num_bits"]), group, bool(args.get("symmetric", True)))


def quantization_config(configs: dict[str, QuantConfig], dense_linears: list[str], num_layers: int) -> dict:
    """``quantization_config`` of a checkpoint holding ``configs`` (uniform, integer zeros)."""
    by_scheme: dict[QuantConfig, list[str]] = defaultdict(list)
    for name, config in configs.items():
        by_scheme[config].append(name)
    ordered = sorted(by_scheme, key=lambda c: (-len(by_scheme[c]), c.bits, c.group_size, c.sym))
    groups = {f"group_{i}": {"format": PACKED, "input_activations": None, "output_activations": None,
                             "targets": [f"re:{p}" for p in layer_patterns(by_scheme[c], num_layers)],
                             "weights": weight_args(c)} for i, c in enumerate(ordered)}
    return {"config_groups": groups, "format": PACKED, "global_compression_ratio": None,
            "ignore": [f"re:{p}" for p in layer_patterns(dense_linears, num_layers)], "kv_cache_scheme": None,
            "moe_sparsity_config": None, "quant_method": FORMAT, "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": LIBRARY_VERSION}


def _cut(packed: torch.Tensor, length: int, bits: int, dim: int) -> torch.Tensor:
    """Our whole runs of 32 codes cut to the library's ceil(length*b/32) words along ``dim``."""
    return packed.narrow(dim, 0, -(-length * bits // 32)).contiguous()


def _padded(packed: torch.Tensor, length: int, bits: int, dim: int) -> torch.Tensor:
    """The library's words padded with zero words to our whole runs (``packed_length``)."""
    missing = packed_length(length, bits) - packed.shape[dim]
    if missing < 0:
        raise CheckpointError(f"packed tensor of {packed.shape[dim]} words is longer than {length} {bits}-bit codes")
    shape = list(packed.shape)
    shape[dim] = missing
    return torch.cat([packed, packed.new_zeros(shape)], dim=dim)


def to_ct_tensors(tensors: dict[str, torch.Tensor], config: QuantConfig, shape: tuple[int, int]) -> dict:
    """One module's GPTQ v1 tensors (ours: qweight, qzeros, scales, g_idx) as pack-quantized tensors."""
    out_features, in_features = shape
    codes, scale, zero = from_gptq_tensors(tensors, config.bits, shape)
    result = {"weight_packed": _cut(pack_codes(codes, config.bits, dim=1), in_features, config.bits, 1),
              "weight_scale": scale.contiguous(),
              "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64)}
    if not config.sym:
        result["weight_zero_point"] = _cut(pack_codes(zero, config.bits, dim=0), out_features, config.bits, 0)
    if not torch.equal(tensors["g_idx"], default_g_idx(in_features, config, tensors["g_idx"].device)):
        result["weight_g_idx"] = tensors["g_idx"].to(torch.int32)
    return result


def from_ct_tensors(tensors: dict[str, torch.Tensor], config: QuantConfig, where: str) -> dict:
    """One module's pack-quantized tensors as our GPTQ v1 tensors (scales rounded to fp16)."""
    try:
        out_features, in_features = (int(v) for v in tensors["weight_shape"].tolist())
        codes = unpack_codes(_padded(tensors["weight_packed"], in_features, config.bits, 1), config.bits,
                             in_features, dim=1)
        scale = tensors["weight_scale"].reshape(out_features, -1).to(torch.float16)
        if config.sym:
            zero = torch.full_like(scale, 2 ** (config.bits - 1), dtype=torch.int32)
        else:
            zero = unpack_codes(_padded(tensors["weight_zero_point"], out_features, config.bits, 0), config.bits,
                                out_features, dim=0)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{where}: not a pack-quantized {config.name} module: {err}") from None
    if not config.sym and int(zero.min()) < 1:  # our packed layers keep zero >= 1 (GPTQ v1's rule)
        raise CheckpointError(f"{where}: a zero point of {-2 ** (config.bits - 1)} (the grid's lowest code) is "
                              "outside what compress holds")
    result = to_gptq_tensors(codes, scale, zero, config)
    if "weight_g_idx" in tensors and int(tensors["weight_g_idx"].min()) >= 0:
        result["g_idx"] = tensors["weight_g_idx"].to(torch.int32)
    return result


def _convert_modules(state: dict[str, torch.Tensor], modules, leaves: tuple[str, ...], head: str, convert) -> dict:
    """``state`` with each module's ``leaves`` replaced by ``convert(module, {leaf: tensor})``, called
    once per module (at its ``head`` leaf); every other tensor kept as it is."""
    converted = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if module not in modules or leaf not in leaves:
            converted[name] = tensor
        elif leaf == head:
            parts = {k: state[f"{module}.{k}"] for k in leaves if f"{module}.{k}" in state}
            converted.update({f"{module}.{k}": v for k, v in convert(module, parts).items()})
    return converted


def convert_state(state: dict[str, torch.Tensor], modules: dict[str, tuple[QuantConfig, tuple[int, int]]]) -> dict:
    """A state dict (or one unit's part of it) with every module's v1 tensors as pack-quantized ones."""
    return _convert_modules(state, modules, OURS, "qweight",
                            lambda module, parts: to_ct_tensors(parts, *modules[module]))


def module_schemes(quant: dict, names: list[str], where: str) -> dict[str, QuantConfig]:
    """{module: our config} for the modules whose ``weight_packed`` the checkpoint holds, matched
    against the config groups' targets (a ``re:`` pattern, an exact name, or ``Linear``)."""
    if quant.get("format") not in (PACKED, "mixed-precision"):
        raise CheckpointError(f"{where}: compressed-tensors format {quant.get('format')!r}: compress reads "
                              f"{PACKED} only")
    groups = quant.get("config_groups") or {}
    schemes = {}
    for name in names:
        found = [key for key, group in groups.items() if _targeted(name, group.get("targets", []))]
        if len(found) != 1:
            raise CheckpointError(f"{where}: {name}: matched by {len(found)} config groups ({', '.join(found) or 'none'})")
        group = groups[found[0]]
        if group.get("format", PACKED) != PACKED or group.get("input_activations"):
            raise CheckpointError(f"{where}: {found[0]}: compress reads weight-only {PACKED} groups only")
        schemes[name] = config_from_args(group.get("weights") or {}, f"{where}: {found[0]}")
    return schemes


def _targeted(name: str, targets: list[str]) -> bool:
    """Whether a group's targets name this packed module; every packed module is a linear, so the
    class target ``Linear`` takes it without the module at hand."""
    return any(target == "Linear" or matches(target, name) for target in targets)


CT_LEAVES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def state_from_ct(state: dict[str, torch.Tensor], configs: dict[str, QuantConfig], where: str) -> dict:
    """A pack-quantized state dict with every module in ``configs`` as our GPTQ v1 tensors."""
    return _convert_modules(state, configs, CT_LEAVES, "weight_packed",
                            lambda module, parts: from_ct_tensors(parts, configs[module], f"{where}: {module}"))


def stored_specs(config: QuantConfig, shape: tuple[int, int]) -> dict[str, tuple[str | None, tuple[int, ...]]]:
    """leaf -> (safetensors dtype, None for any float; shape) of what a module stores (``weight_g_idx``,
    optional, left out)."""
    out_features, in_features = shape
    groups = 1 if config.group_size == -1 else in_features // config.group_size
    specs = {"weight_packed": ("I32", (out_features, -(-in_features * config.bits // 32))),
             "weight_scale": (None, (out_features, groups)), "weight_shape": ("I64", (2,))}
    if not config.sym:
        specs["weight_zero_point"] = ("I32", (-(-out_features * config.bits // 32), groups))
    return specs


COUNTED = ("weight_packed", "weight_scale", "weight_zero_point")


def _vllm_layers(layers: list[Layer]) -> Verdict:
    picked = []
    for layer in layers:
        # compressed_tensors/schemes/compressed_tensors_wNa16.py: WNA16_ZP_SUPPORTED_TYPES_MAP {4, 8}
        if not layer.sym and layer.bits not in (4, 8):
            return Verdict("vllm", False, stops_at=layer.name,
                           reason=f"{layer.bits}-bit asymmetric: vLLM's WNA16 scheme takes zero points at 4 and 8 "
                                  "bits only (compressed_tensors_wNa16.py); quantize it symmetric")
        if layer.bits in (4, 8):
            picked.append((layer, vllm_kernel(layer, zero_points=not layer.sym)))
        else:  # WNA16_SUPPORTED_TYPES_MAP uint2b2/uint3b4: only kernels/linear/mixed_precision/humming.py takes them
            picked.append((layer, ("Humming", "")))
    return with_kernels("vllm", picked)


def _vllm_cpu_loader(layer: Layer) -> str | None:
    if not layer.sym and layer.bits not in (4, 8):  # compressed_tensors_wNa16.py
        return (f"{layer.bits}-bit asymmetric: vLLM's WNA16 scheme takes zero points at 4 and 8 bits only "
                "(compressed_tensors_wNa16.py)")
    return None


def _transformers(rows: list[dict]) -> Verdict:
    # compressed-tensors 0.20.1 compressors/pack_quantized/base.py compress(): on meta weights (transformers'
    # loading) it packs no zero point, so the slot stays [out, groups] int8 and the load report refuses ours
    asym = next((r for r in rows if r.get("format") == "uniform" and not r["sym"]), None)
    if asym is not None:
        return Verdict("transformers", False, stops_at=asym["name"],
                       reason="asymmetric: compressed-tensors builds the weight_zero_point slot unpacked when "
                              "transformers loads (pack_quantized/base.py), so the packed zero points mismatch")
    return Verdict("transformers", True, kernel="compressed-tensors decompression (dense on first forward)")


class CompressedTensors(IntegerFormat):
    name = label = quant_method = FORMAT
    stream_source_refusal = "this one is compressed-tensors (run without streaming: true, or export it native first)"

    def write(self, model: nn.Module, directory: Path, tokenizer=None, recipe: dict | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, shards=None, adapter_dtype: str | None = None) -> dict:
        """``pack-quantized``: the packed tensors converted module by module as they are written;
        fails before writing if a module does not fit. ``shards`` as for native."""
        modules = self.modules_to_write(model)
        layout = {name: (m.config, m.shape) for name, m in modules.items()}
        quant = quantization_config({name: m.config for name, m in modules.items()}, dense_linears(model),
                                    getattr(model.config, "num_hidden_layers", 0))
        config = dict(config_dict(model), quantization_config=quant)
        with atomic_directory(directory) as staging:
            write_common(model, staging, config, tokenizer, max_shard_bytes, shards,
                         convert=lambda tensors: convert_state(tensors, layout))
            return write_manifest(staging, {"format": FORMAT, "compress_version": __version__,
                                            "modules": describe_modules(model), "recipe": recipe})

    def read_modules(self, quant: dict, names, path: Path) -> dict:
        packed = [n.removesuffix(".weight_packed") for n in names() if n.endswith(".weight_packed")]
        return {name: (c, None) for name, c in module_schemes(quant, packed, str(path)).items()}

    def to_ours(self, tensors: dict[str, torch.Tensor], configs: dict[str, QuantConfig], where: str) -> dict:
        return state_from_ct(tensors, configs, where)

    def stored_shape(self, name: str, tensors: TensorMeta, source: TensorSource) -> tuple[int, int]:
        if "weight_shape" not in tensors:
            raise CheckpointError(f"{name}: packed weights without weight_shape")
        values = source.read([f"{name}.weight_shape"])[f"{name}.weight_shape"]
        return tuple(int(v) for v in values.tolist())

    def check_stored(self, name: str, config: QuantConfig, shape, tensors: TensorMeta) -> None:
        """As ``Format.check_stored``, in this layout (its scales may be any float dtype)."""
        for leaf, (dtype, expected) in stored_specs(config, shape).items():
            got = tensors.get(leaf)
            if got is None:
                raise CheckpointError(f"{name}: missing tensor {leaf} for {config.name} {list(shape)}")
            if (dtype or got[0]) != got[0] or got[1] != expected or (dtype is None and got[0] not in FLOAT_CODES):
                raise CheckpointError(f"{name}.{leaf} is {got[0]} {list(got[1])}, but {config.name} {list(shape)} "
                                      f"stores {dtype or 'a float'} {list(expected)}: the tensors do not hold what "
                                      "the checkpoint's config says")

    def counted(self, config: QuantConfig, tensors: TensorMeta) -> list[str]:
        return [leaf for leaf in COUNTED if leaf in tensors]

    def verdicts(self, rows: list[dict]) -> list[Verdict]:
        vllm, cpu = (packed_layers(engine, rows) for engine in ("vllm", "vllm-cpu"))
        return [vllm if isinstance(vllm, Verdict) else _vllm_layers(vllm),
                cpu if isinstance(cpu, Verdict) else vllm_cpu_layers(cpu, _vllm_cpu_loader),
                Verdict("gptqmodel", False, reason=f"GPTQModel 7.6.0 has no {FORMAT} loader (models/auto.py)"),
                _transformers(rows), compress_verdict(rows)]
