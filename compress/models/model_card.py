"""What a model is, from its config alone (``compress inspect MODEL`` for a built-in name, a GGUF file or a
Hugging Face directory): architecture and shapes, where its parameters are (a large vocabulary's
embedding can outweigh the decoder), the caveats of its source, which GGUF types its projections were
stored at, and the structures the methods handle in their own way (``compress.models.architectures``)."""

from __future__ import annotations

from .architectures import architecture_of, structure_notes
from .sources import load_config, resolve_model


def _parameter_counts(config) -> dict[str, int]:
    """{embeddings, lm_head, decoder} parameters of the model built on the meta device (no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = bool(config.tie_word_embeddings)  # the meta-device model does not share the tensors
    total = sum(p.numel() for p in model.parameters()) - (head.numel() if tied and head is not embeddings else 0)
    return {"embeddings": embeddings.numel(), "lm_head": 0 if tied else head.numel(),
            "decoder": total - embeddings.numel() - (0 if tied else head.numel()), "total": total}


def describe_model(name: str) -> dict:
    """The model card of a recipe's ``model:`` value (nothing is loaded but the config)."""
    source = resolve_model(name)
    config = load_config(source)
    arch = architecture_of(config, f"model: {name}")
    counts = _parameter_counts(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    card = {
        "model": name, "source": source.kind, "path": str(source.path) if source.path else None,
        "architecture": arch.label, "model_type": config.model_type,
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "intermediate": config.intermediate_size,
        "heads": config.num_attention_heads, "kv_heads": getattr(config, "num_key_value_heads", None),
        "head_dim": head_dim, "vocab": config.vocab_size, "tied_embeddings": bool(config.tie_word_embeddings),
        "params": counts, "embedding_share": counts["embeddings"] / counts["total"],
        "caveats": list(source.caveats), "notes": structure_notes(config),
    }
    if source.path is not None and source.path.suffix == ".gguf":
        from .gguf_models import gguf_types, gguf_types_note

        card["gguf_types"] = {leaf: dict(counts) for leaf, counts in gguf_types(source.path).items()}
        card["notes"].insert(0, gguf_types_note(source.path))
    return card


def card_lines(card: dict) -> list[str]:
    """The card as lines of text for the terminal."""
    params = card["params"]
    lines = [f"{card['model']}: {card['architecture']} ({card['model_type']}), {card['source']}"
             + (f" from {card['path']}" if card["path"] else ""),
             f"  {card['layers']} layers, hidden {card['hidden']}, MLP {card['intermediate']}, {card['heads']} heads / "
             f"{card['kv_heads']} KV heads of {card['head_dim']}, vocabulary {card['vocab']:,}"
             + (", embedding tied to lm_head" if card["tied_embeddings"] else ""),
             f"  parameters {params['total']:,}: decoder {params['decoder']:,}, embedding {params['embeddings']:,} "
             f"({card['embedding_share']:.0%})" + (f", lm_head {params['lm_head']:,}" if params["lm_head"] else "")]
    lines += [f"  caveat: {text}" for text in card["caveats"]]
    lines += [f"  note: {text}" for text in card["notes"]]
    return lines
