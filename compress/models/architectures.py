"""The decoder architectures compress supports, and what each method needs of their structure.

Supported (``model_type`` of the transformers config): ``llama`` (SmolLM2, tiny-llama), ``mistral``,
``qwen2`` (biases on q/k/v), ``qwen3`` (RMSNorm on each head's q and k), ``gemma3_text`` (Gemma-3's text
decoder: q/k norms, sandwich norms, scaled embedding, sliding-window layers) and ``phi3`` (q/k/v fused
into ``qkv_proj``, gate/up into ``gate_up_proj``: quantized and exported fused, the way vLLM and
GPTQModel read Phi-3; structured pruning, which removes heads and channels from separate projections,
refuses it at validate). tests/test_architectures.py runs a tiny random model of each through GPTQ
(both packed exports, reloaded), LQ-LoRA + finetune, prune, L4Q and LoRAM. A model of any other type
is refused by ``compress validate`` with one line: it may run, but nothing here has tested it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ModelError


@dataclass(frozen=True)
class Architecture:
    """What the methods need to know about one decoder family."""

    model_type: str
    label: str
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fused leaf -> projections, in row order


PHI3_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SUPPORTED = {arch.model_type: arch for arch in (
    Architecture("llama", "Llama"), Architecture("mistral", "Mistral"), Architecture("qwen2", "Qwen2"),
    Architecture("qwen3", "Qwen3"), Architecture("gemma3_text", "Gemma-3 (text)"),
    Architecture("phi3", "Phi-3", PHI3_FUSED))}
HINTS = {"gemma3": "load the text decoder (Gemma3ForCausalLM, model_type gemma3_text): the multimodal "
                   "Gemma3ForConditionalGeneration is not supported"}


def architecture_of(config, where: str = "model") -> Architecture:
    """The supported architecture of a transformers config, or one line saying it is not."""
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED:
        return SUPPORTED[model_type]
    classes = ", ".join(getattr(config, "architectures", None) or []) or "no architectures entry"
    hint = HINTS.get(model_type, "")
    raise ModelError(f"{where}: model_type {model_type!r} ({classes}) is not supported; supported: "
                     f"{', '.join(SUPPORTED)}" + (f" ({hint})" if hint else ""))


def pruning_problem(config) -> str | None:
    """Why structured pruning (heads and MLP channels) cannot run on this architecture, or None."""
    arch = architecture_of(config)
    if arch.fused:
        fused = "; ".join(f"{', '.join(parts)} into {leaf}" for leaf, parts in arch.fused.items())
        return (f"{arch.label} fuses {fused}; structured pruning removes heads and channels from separate "
                "projections, so it does not run on this model (quantize, lq_lora, l4q and finetune do)")
    return None


def structure_notes(config) -> list[str]:
    """One line for each structure a method handles in its own way on this model."""
    notes = []
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if kv_heads == 1:
        notes.append(f"attention: one KV head shared by {heads} query heads: pruning keeps every head (removing "
                     "the one KV group would remove attention) and prunes MLP channels only")
    if getattr(config, "tie_word_embeddings", False):
        notes.append(f"embedding tied to lm_head ({config.vocab_size:,} x {config.hidden_size}): "
                     "left dense by the recipes' ignore: [lm_head]; quantizing lm_head unties it (the embedding stays "
                     "dense)")
    if config.model_type in ("qwen3", "gemma3_text"):
        notes.append("q/k RMSNorm per head: kept dense; pruning removes whole heads, so their norms are unchanged")
    arch = architecture_of(config)
    if arch.fused:
        notes.append(pruning_problem(config))
    return notes
