"""Damaged models are refused, never filled with random weights (silent garbage).

- One of our checkpoints whose ``compress.json`` was deleted (its packed tensors say it is ours) is
  refused as damaged by ``eval``, ``inspect``, ``validate`` and ``compress.load``.
- A Hugging Face directory with tensors missing (every ``layers.1.*``) or an extra one: transformers
  would start the missing layers from random values; we refuse it with the first few names, at load
  (``eval``, ``run``). A tied head is not "missing".
- A GPTQ checkpoint without our manifest (another tool's, or ours that lost it) whose dense tensor has
  the wrong dtype or shape, or whose config.json says 8 bits over 4-bit tensors: one line, exit 2.
- A PEFT adapter directory given as a model: one line saying what it is.
"""

import contextlib
import io
import json

import pytest
import torch
import yaml
from conftest import logits, micro_llama, quantize_model
from safetensors.torch import load_file, save_file

import compress
from compress.checkpoint import write_gptq, write_hf, write_native
from compress.entry import cli
from compress.errors import CompressError
from compress.quant import QuantConfig


def refused(args, pattern: str) -> str:
    """The CLI, in this process (as the fuzz tests run it): exit 2 and one line naming ``pattern``."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in args])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err.getvalue()[-3000:]
    assert pattern in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_pair):
    """native (NF4), gptq (int4) and hf exports of a micro Llama, each with the tokenizer."""
    tokenizer = tiny_pair[1]
    root = tmp_path_factory.mktemp("written")
    write_native(quantize_model(micro_llama(), lambda n: QuantConfig.nf(4)), root / "native", tokenizer=tokenizer)
    write_gptq(quantize_model(micro_llama(), lambda n: QuantConfig.uniform(4, 64)), root / "gptq", tokenizer=tokenizer)
    write_hf(micro_llama(), root / "hf", tokenizer=tokenizer)
    return root


def copy_of(written, name, tmp_path):
    import shutil

    shutil.copytree(written / name, tmp_path / name)
    return tmp_path / name


def rewrite_tensors(directory, change) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def validate_recipe(tmp_path, model) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": str(model), "stages": [{"quantize": {}}], "output": str(tmp_path / "out")}))
    return str(path)


def test_a_native_checkpoint_without_its_manifest_is_damaged(written, tmp_path):
    directory = copy_of(written, "native", tmp_path)
    (directory / "compress.json").unlink()
    for args in (("eval", directory), ("inspect", directory), ("validate", validate_recipe(tmp_path, directory))):
        refused(args, "damaged: it holds compress's packed tensors (e.g. model.layers.0.mlp.down_proj.codes)")
    with pytest.raises(CompressError, match="compress.json is missing"):
        compress.load(directory)


def test_a_hf_directory_missing_a_layer_is_refused(written, tmp_path):
    directory = copy_of(written, "hf", tmp_path)
    (directory / "compress.json").unlink()  # a plain Hugging Face directory now
    rewrite_tensors(directory, lambda t: [t.pop(k) for k in [k for k in t if ".layers.1." in k]])
    line = refused(("eval", directory), "its tensors do not match its config: 9 missing (e.g. model.layers.1.")
    assert "random weights" in line
    refused(("run", validate_recipe(tmp_path, directory), "--quiet"), "9 missing")
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_a_hf_directory_with_an_extra_tensor_is_refused(written, tmp_path):
    directory = copy_of(written, "hf", tmp_path)
    (directory / "compress.json").unlink()
    rewrite_tensors(directory, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(4)}))
    refused(("eval", directory), "1 unexpected (e.g. model.layers.0.mlp.extra.weight)")


def test_a_whole_hf_directory_still_loads(written, tmp_path):
    from compress.models.sources import load_model, resolve_model

    directory = copy_of(written, "hf", tmp_path)
    (directory / "compress.json").unlink()
    model, _ = load_model(resolve_model(str(directory)))
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, ids), logits(micro_llama(), ids))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(written, tmp_path):
    """The micro model has 512 embeddings; SmolLM2's tokenizer beside it yields ids in the tens of
    thousands: an IndexError deep in the embedding before, one line now."""
    directory = copy_of(written, "hf", tmp_path)
    refused(("eval", directory, "--samples", "1", "--seq-len", "8"), "embeds only 512 (the tokenizer does not belong")


@pytest.mark.parametrize("change, pattern", [
    (lambda t: t.update({"model.norm.weight": torch.zeros(7)}), "model.norm.weight is float32 [7], the model needs"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(128, dtype=torch.int32)}), "model.norm.weight is int32 [128]"),
])
def test_a_gptq_checkpoint_without_manifest_with_a_misfit_dense_tensor(written, tmp_path, change, pattern):
    directory = copy_of(written, "gptq", tmp_path)
    (directory / "compress.json").unlink()  # read as another tool's GPTQ checkpoint
    rewrite_tensors(directory, change)
    refused(("eval", directory), pattern)
    with pytest.raises(CompressError, match=pattern.split(",")[0].replace("[", r"\[").replace("]", r"\]")):
        compress.load(directory)


def test_a_gptq_config_that_lies_about_the_bits(written, tmp_path):
    directory = copy_of(written, "gptq", tmp_path)
    (directory / "compress.json").unlink()
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    config["quantization_config"].pop("dynamic", None)
    (directory / "config.json").write_text(json.dumps(config))
    refused(("inspect", directory), "the tensors do not hold what the checkpoint's config says")
    refused(("eval", directory), "qweight is torch.int32 [32, 128], expected torch.int32 [64, 128] for int8-g64")


def test_a_peft_adapter_is_not_a_model(tmp_path, tiny_pair):
    from compress.checkpoint.peft import write_peft_adapter
    from compress.lowrank import LoRALinear

    model = micro_llama()
    layer = LoRALinear(model.model.layers[0].self_attn.q_proj, 4, 8.0)
    write_peft_adapter({"model.layers.0.self_attn.q_proj": layer}, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "compress.json").is_file()
    (tmp_path / "adapter" / "config.json").write_text("{}")  # even with a config beside it
    refused(("inspect", tmp_path / "adapter"), "a PEFT adapter, not a model")
