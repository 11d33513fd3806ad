"""Memory accounting from a model's config alone (no weights): parameters by component, packed weight
storage for any quant config or per-module plan, LoRA adapters, KV cache, and LoRAM's pruned size.

Counts follow the formats we write: uniform configs store codes, an fp16 scale per group and (when
asymmetric) a packed zero per group; NF configs store codes, integer block scales, second-level scales
and one fp32 offset. ``g_idx`` (one int32 per input row) is stored but, as in the papers, not counted
in bits per parameter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from compress.prune.units import layer_shapes
from compress.quant import QuantConfig

from ..errors import RecipeError, brief
from ..models.sources import load_config, resolve_model

# Published architectures (their config.json values that matter for memory).
PRESETS = {
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
    "llama-2-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        intermediate_size=13824, vocab_size=32000, tie_word_embeddings=False),
    "llama-2-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672, vocab_size=32000, tie_word_embeddings=False),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "llama-3.1-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _positive(config: dict, key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: {value!r} is not a positive integer")
    return value


@dataclass(frozen=True)
class Architecture:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> "Architecture":
        """From a config.json mapping; KeyError for a missing field, ValueError for a wrong one."""
        if not isinstance(config, dict):
            raise ValueError(f"expected a JSON object, got {type(config).__name__}")
        hidden, heads = _positive(config, "hidden_size"), _positive(config, "num_attention_heads")
        kv_heads = _positive(config, "num_key_value_heads") if config.get("num_key_value_heads") is not None else heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = _positive(config, "head_dim") if config.get("head_dim") is not None else hidden // heads
        return cls(hidden, _positive(config, "num_hidden_layers"), heads, kv_heads, max(head_dim, 1),
                   _positive(config, "intermediate_size"), _positive(config, "vocab_size"),
                   bool(config.get("tie_word_embeddings", False)))

    def layer_shapes(self, kv_heads: int | None = None, intermediate: int | None = None) -> dict[str, tuple[int, int]]:
        """(out, in) of the seven projections of one layer, optionally at pruned widths (the math is
        ``compress.prune.layer_shapes``, which the physical shrink uses too)."""
        return layer_shapes(self.hidden, self.head_dim, self.heads // self.kv_heads,
                            self.kv_heads if kv_heads is None else kv_heads,
                            self.intermediate if intermediate is None else intermediate)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return {f"model.layers.{i}.{'self_attn' if p in PROJECTIONS[:4] else 'mlp'}.{p}": shape
                for i in range(self.layers) for p, shape in self.layer_shapes().items()}

    def dense_params(self) -> dict[str, int]:
        """Parameters outside the decoder projections: embeddings, lm_head (0 when tied), norms."""
        return {"embeddings": self.vocab * self.hidden, "lm_head": 0 if self.tied else self.vocab * self.hidden,
                "norms": (2 * self.layers + 1) * self.hidden}

    def total_params(self) -> int:
        linear = sum(o * i for o, i in self.linear_shapes().values())
        return linear + sum(self.dense_params().values())


def adapter_params(shapes: dict[str, tuple[int, int]], rank: int) -> int:
    return sum(rank * (o + i) for o, i in shapes.values())


def kv_cache_bytes(arch: Architecture, batch: int, seq: int, bytes_per_value: int = 2) -> int:
    return 2 * arch.layers * batch * seq * arch.kv_heads * arch.head_dim * bytes_per_value


def loram_pruned_params(arch: Architecture, ratio: float, start: int, end: int) -> int:
    """Parameters after LoRAM's structured pruning of layers [start, end) at a uniform ``ratio``:
    kv heads - floor(kv * ratio) KV groups kept, intermediate - ceil(intermediate * ratio) channels."""
    kv = arch.kv_heads - math.floor(arch.kv_heads * ratio)
    inter = arch.intermediate - math.ceil(arch.intermediate * ratio)
    full = sum(o * i for o, i in arch.layer_shapes().values())
    pruned = sum(o * i for o, i in arch.layer_shapes(kv, inter).values())
    layers = end - start
    return (arch.layers - layers) * full + layers * pruned + sum(arch.dense_params().values())


INFERENCE_CANDIDATES = {
    "fp16": None,
    "int8-g128": QuantConfig.uniform(8, 128),
    "int4-g128": QuantConfig.uniform(4, 128),
    "nf4-dq": QuantConfig.nf(4, block=64, scale_bits=8, scale_block=256, scale_dtype="float32"),
    "int3-g128": QuantConfig.uniform(3, 128),
    "int2-g64": QuantConfig.uniform(2, 64),
}
GIB = 1 << 30


def inference_breakdown(arch: Architecture, config: QuantConfig | dict[str, QuantConfig] | None, batch: int = 1,
                        seq: int = 4096, adapter_rank: int = 0, adapter_bits: float = 16.0) -> dict[str, float]:
    """Bytes of each part of an inference deployment: packed weight components (one config for every
    projection, or an ILP plan {module name: config}; modules it leaves out stay 16-bit), dense
    embeddings/lm_head/norms at 16 bits, adapters, the 16-bit KV cache, and the transient activations
    of one layer plus the last token's fp32 logits."""
    parts = {"codes": 0.0, "scales": 0.0, "zeros": 0.0, "second_level": 0.0}
    for name, shape in arch.linear_shapes().items():
        module_config = config.get(name) if isinstance(config, dict) else config
        if module_config is None:
            parts["codes"] += 16 * shape[0] * shape[1]
        else:
            for key, bits in module_config.components(shape).items():
                parts[key] += bits
    result = {key: bits / 8 for key, bits in parts.items()}
    result["dense"] = 2 * sum(arch.dense_params().values())
    result["adapters"] = adapter_bits / 8 * adapter_params(arch.linear_shapes(), adapter_rank)
    result["kv_cache"] = kv_cache_bytes(arch, batch, seq)
    result["activations"] = 2 * batch * seq * (2 * arch.hidden + 2 * arch.intermediate) + 4 * batch * arch.vocab
    return result


def best_inference_fit(arch: Architecture, gpu_gib: float, batch: int, seq: int) -> str | None:
    """The most precise candidate whose total fits in ``gpu_gib`` (candidates are ordered by bits)."""
    for name, config in INFERENCE_CANDIDATES.items():
        if sum(inference_breakdown(arch, config, batch, seq).values()) <= gpu_gib * GIB:
            return name
    return None


def calibration_breakdown(arch: Architecture, samples: int, seq: int, width: int, batch: int = 8) -> dict[str, int]:
    """Bytes a layer-by-layer calibration (GPTQ) adds to the model it quantizes in place: every
    calibration window's hidden states at the current layer's input and output, and transiently the
    largest group's input Hessians (fp32) with GPTQ's two in x in working copies plus one batch of
    the layer's intermediate activations (``compress.execution.layerwise`` runs ``batch`` windows at a time)."""
    hidden_states = 2 * samples * seq * arch.hidden * width
    shapes = arch.layer_shapes()
    groups = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    hessians = max(sum(shapes[p][1] ** 2 for p in group) + 2 * shapes[group[0]][1] ** 2 for group in groups) * 4
    layer = batch * seq * (3 * arch.intermediate + 4 * arch.hidden + arch.heads * seq) * width
    return {"activations": hidden_states, "transient": hessians + layer}


def architecture_for(name: str) -> Architecture:
    """A preset name, or anything ``compress`` can load a config from (built-in name, model or
    checkpoint directory, config.json, .gguf file), without reading weights."""
    if name in PRESETS:
        return Architecture.from_config(PRESETS[name])
    path = Path(name)
    if path.name == "config.json":
        try:
            return Architecture.from_config(json.loads(path.read_text()))
        except KeyError as err:
            raise RecipeError(f"{path}: config has no {err.args[0]} (not a Llama-family model?)") from None
        except (OSError, ValueError) as err:
            raise RecipeError(f"{path}: not a usable model config ({type(err).__name__}: {brief(err)})") from None
    config = load_config(resolve_model(name)).to_dict()
    try:
        return Architecture.from_config(config)
    except KeyError as err:
        raise RecipeError(f"{name}: config has no {err.args[0]} (not a Llama-family model?)") from None
    except ValueError as err:
        raise RecipeError(f"{name}: not a usable model config: {brief(err)}") from None
