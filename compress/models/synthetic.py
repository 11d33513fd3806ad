"""Synthetic Llama checkpoints of a chosen size, for testing and benchmarking at scale without a hub.

    python -m compress.models.synthetic 1.5b out/synthetic-1.5b [--layers 4]

A real Llama ``config.json`` (SmolLM2's tokenizer, vocabulary 49152, untied head) and random bf16
weights (normal, std 0.02; norms at 1), written one decoder layer per safetensors shard with the
Hugging Face index, so that writing never holds more than one layer. ``transformers`` and
``compress`` load it as any local model directory.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..checkpoint.tensors import ShardWriter

log = logging.getLogger(__name__)

VOCAB = 49152  # SmolLM2's tokenizer, written beside the weights
# name: (hidden, intermediate, layers, attention heads, key/value heads); head dim 64 throughout
PRESETS = {
    "0.1b": (512, 2048, 16, 8, 4),
    "0.5b": (1024, 4096, 24, 16, 4),
    "1.5b": (2048, 8192, 22, 32, 8),
}


def llama_config(preset: str, layers: int | None = None) -> dict:
    """The preset's config; ``layers`` overrides its depth (same width, fewer or more layers)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: one of {', '.join(PRESETS)}")
    hidden, intermediate, depth, heads, kv_heads = PRESETS[preset]
    layers = layers or depth
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": VOCAB,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "dtype": "bfloat16"}


def layer_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of one decoder layer, by its name inside the layer."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    q = config["num_attention_heads"] * config["head_dim"]
    return {"self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
            "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
            "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter), "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,)}


def parameter_count(config: dict) -> int:
    per_layer = sum(torch.Size(s).numel() for s in layer_shapes(config).values())
    return config["num_hidden_layers"] * per_layer + 2 * VOCAB * config["hidden_size"] + config["hidden_size"]


def _random(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def write_synthetic_llama(directory: Path, preset: str, seed: int = 0, layers: int | None = None) -> dict:
    """Write the model (config, tokenizer, shards); returns its config."""
    from .sources import load_tokenizer, resolve_model

    config = llama_config(preset, layers)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    hidden = config["hidden_size"]
    writer = ShardWriter(directory, config["num_hidden_layers"] + 1)
    writer.write({"model.embed_tokens.weight": _random((VOCAB, hidden), generator),
                  "model.norm.weight": _random((hidden,), generator),
                  "lm_head.weight": _random((VOCAB, hidden), generator)})
    for index in range(config["num_hidden_layers"]):
        writer.write({f"model.layers.{index}.{name}": _random(shape, generator)
                      for name, shape in layer_shapes(config).items()})
    writer.finish()
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    load_tokenizer(resolve_model("tiny-llama")).save_pretrained(directory)
    log.info("%s: synthetic Llama %s, %.3f B parameters", directory, preset, parameter_count(config) / 1e9)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_synthetic_llama(args.directory, args.preset, args.seed, args.layers)


if __name__ == "__main__":
    main()
