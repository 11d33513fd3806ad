"""Checkpoints: exact round trips for every format, GPTQ config patterns, corruption detection,
and errors raised before anything is written."""

import json

import pytest
import torch
from conftest import logits, micro_llama, quantize_model

from compress.checkpoint import inspect_checkpoint, load_checkpoint, write_gptq, write_hf, write_native
from compress.checkpoint.formats.gptq import resolve_module_config
from compress.errors import CheckpointError
from compress.quant import QuantConfig, QuantLinear

MIXED = {"self_attn": QuantConfig.uniform(2, 32), "gate_proj": QuantConfig.uniform(3, 64, True),
         "up_proj": QuantConfig.uniform(3, 64, True), "down_proj": QuantConfig.uniform(8, 32)}


def mixed_config(name):
    for key, config in MIXED.items():
        if key in name:
            return config if ".0." in name or key == "down_proj" else QuantConfig.uniform(4, 64)
    return QuantConfig.uniform(4, 64)


def nf_and_odd(name):
    if "down_proj" in name:
        return QuantConfig.nf(3, 32, 4, 16, "bfloat16")
    if "o_proj" in name:
        return QuantConfig.uniform(4, 48)  # partial last group of 128 inputs
    if "v_proj" in name:
        return QuantConfig.uniform(3, 32, float_zero=True)  # fp16 zeros (L4Q zero_point: float)
    return QuantConfig.nf(4)


@pytest.fixture
def ids():
    return torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))


def test_native_round_trip_is_exact(tmp_path, ids):
    model = quantize_model(micro_llama(), nf_and_odd)
    write_native(model, tmp_path / "ckpt")
    reloaded = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert reloaded.get_submodule(name).config == module.config
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_gptq_round_trip_and_dynamic(tmp_path, ids):
    model = quantize_model(micro_llama(), mixed_config)
    write_gptq(model, tmp_path / "ckpt")
    reloaded = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "_name_or_path" not in config
    quant = config["quantization_config"]
    assert quant == json.loads((tmp_path / "ckpt" / "quantize_config.json").read_text())
    assert quant["checkpoint_format"] == "gptq" and quant["desc_act"] is False
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert resolve_module_config(quant, name) == module.config, name
            fused = name.replace("q_proj", "qkv_proj").replace("gate_proj", "gate_up_proj")
            assert resolve_module_config(quant, fused) == module.config, f"vLLM's fused name {fused}"


def test_gptq_ignored_layer_is_negated(tmp_path, ids):
    model = quantize_model(micro_llama(), lambda n: None if "layers.1.mlp.down_proj" in n else QuantConfig.uniform(4, 32))
    write_gptq(model, tmp_path / "ckpt")
    quant = json.loads((tmp_path / "ckpt" / "quantize_config.json").read_text())
    assert resolve_module_config(quant, "model.layers.1.mlp.down_proj") is None
    assert resolve_module_config(quant, "model.layers.0.mlp.down_proj") == QuantConfig.uniform(4, 32)
    assert torch.equal(logits(model, ids), logits(load_checkpoint(tmp_path / "ckpt"), ids))


def test_hf_export_is_dense_and_close(tmp_path, ids):
    from transformers import AutoModelForCausalLM

    model = quantize_model(micro_llama(), nf_and_odd)
    write_hf(model, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # any loader reads it
    assert torch.allclose(logits(model, ids), logits(plain, ids), atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint(tmp_path, ids):
    model = quantize_model(micro_llama(), mixed_config)
    write_native(model, tmp_path / "ckpt", max_shard_bytes=100_000)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))) > 2
    assert torch.equal(logits(model, ids), logits(load_checkpoint(tmp_path / "ckpt"), ids))


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("native") / "ckpt"
    write_native(quantize_model(micro_llama(), nf_and_odd), directory)
    return directory


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "compress.json", "generation_config.json"])
@pytest.mark.parametrize("where", [0.1, 0.5, 0.97])
def test_flipped_byte_names_the_file(native_dir, tmp_path, name, where):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(native_dir, copy)
    data = bytearray((copy / name).read_bytes())
    data[int(len(data) * where)] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(copy)


def test_truncated_and_missing_files(native_dir, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(native_dir, copy)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_checkpoint(copy)


def test_gptq_refuses_before_writing(tmp_path):
    odd = quantize_model(micro_llama(hidden=80, intermediate=160), lambda n: QuantConfig.uniform(4, 16))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj: shape .* in_features=80 "):
        write_gptq(odd, tmp_path / "odd")
    assert not (tmp_path / "odd").exists() and list(tmp_path.iterdir()) == []
    nf = quantize_model(micro_llama(), lambda n: QuantConfig.nf(4))
    with pytest.raises(CheckpointError, match="NormalFloat"):
        write_gptq(nf, tmp_path / "nf")
    float_zero = quantize_model(micro_llama(), lambda n: QuantConfig.uniform(4, 32, float_zero=True))
    with pytest.raises(CheckpointError, match="float zero points; GPTQ stores integer zeros only"):
        write_gptq(float_zero, tmp_path / "float_zero")
    split = quantize_model(micro_llama(), lambda n: QuantConfig.uniform(8 if "k_proj" in n else 4, 32))
    with pytest.raises(CheckpointError, match="engines fuse these"):
        write_gptq(split, tmp_path / "split")
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_atomically(tmp_path):
    target = tmp_path / "ckpt"
    write_native(quantize_model(micro_llama(), lambda n: QuantConfig.uniform(4, 32)), target)
    write_native(quantize_model(micro_llama(seed=1), lambda n: QuantConfig.uniform(8, 32)), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_checkpoint(target).model.layers[0].mlp.up_proj.config.bits == 8


def test_inspect_counts_match_config_accounting(tmp_path):
    model = quantize_model(micro_llama(), nf_and_odd)
    write_native(model, tmp_path / "ckpt")
    info = inspect_checkpoint(tmp_path / "ckpt")
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    expected = sum(m.config.storage_bits(m.shape) for m in quantized) / sum(m.shape[0] * m.shape[1] for m in quantized)
    assert info["bits_per_param"] == pytest.approx(expected, rel=1e-12)
    stored = sum(p.stat().st_size for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert stored - 8 * 1024 < info["bytes"] <= stored  # tensor bytes + a small safetensors header
