"""Model sources, one class per kind (``compress.models.source_kinds``): ``resolve_model`` picks the
class from a recipe's ``model:`` without reading weights, each says whether a streamed run can read
it, and a GGUF file given by path reads as the built-in made from the same file."""

import json

import pytest
import torch
from conftest import micro_llama

from compress.checkpoint import write_native
from compress.models.source_kinds import Builtin, Checkpoint, GGUFFile, HFDirectory, TinyLlama
from compress.models.sources import load_config, load_model, load_tokenizer, resolve_model


def test_each_model_names_its_source_kind(tmp_path):
    hf, ours, gptq = tmp_path / "hf", tmp_path / "ours", tmp_path / "gptq"
    micro_llama().save_pretrained(hf)
    write_native(micro_llama(), ours)
    gptq.mkdir()
    config = json.loads((hf / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    found = {name: resolve_model(str(name)) for name in ("tiny-llama", "smollm2-135m", hf, ours, gptq)}
    found["file"] = resolve_model(str(found["smollm2-135m"].path))
    kinds = {name: (type(s), s.kind, s.streams) for name, s in found.items()}
    assert kinds == {"tiny-llama": (TinyLlama, "builtin", False), "smollm2-135m": (Builtin, "builtin", False),
                     hf: (HFDirectory, "hf", True), ours: (Checkpoint, "checkpoint", True),
                     gptq: (Checkpoint, "checkpoint", True), "file": (GGUFFile, "gguf", False)}


@pytest.mark.slow
def test_a_gguf_file_reads_as_the_builtin_made_from_it():
    """The built-in's config and tokenizer were converted once into the cache; the file's are read
    from the GGUF by transformers: the same fields, the same token ids, the same weights."""
    builtin = resolve_model("smollm2-135m")
    file = resolve_model(str(builtin.path))
    a, b = load_config(builtin), load_config(file)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(a, key) == getattr(b, key), key
    text = "def quantize(weight, bits=4):\n    return torch.round(weight * 2 ** bits)"
    assert load_tokenizer(builtin)(text)["input_ids"] == load_tokenizer(file)(text)["input_ids"]
    model, _ = load_model(file)
    reference = builtin.model("float32")
    assert not model.training
    for (name, x), (_, y) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
