"""Checkpoints of models that carry LoRA adapters (the state LQ-LoRA and finetune stages leave)."""

import pytest
import torch
from safetensors import safe_open

import compress
from compress.checkpoint import write_gptq, write_hf, write_native
from compress.errors import CheckpointError
from compress.lowrank import LoRALinear, init_default
from compress.quant import QuantConfig, QuantLinear
from compress.targets import set_module
from conftest import logits, micro_llama, quantize_model

IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(9))  # micro_llama's vocab is 512
WRAPPED = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]


def model_with_adapters():
    model = quantize_model(micro_llama(), lambda name: None if name.endswith("o_proj") else QuantConfig.nf(4))
    generator = torch.Generator().manual_seed(5)
    for name in WRAPPED:  # two packed bases and one dense (o_proj stays dense)
        layer = LoRALinear(model.get_submodule(name), rank=4, alpha=8)
        init_default(layer, generator)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05, generator=generator)
        set_module(model, name, layer)
    return model.eval()


def test_native_round_trip_keeps_adapters_and_base_names(tmp_path):
    model = model_with_adapters()
    write_native(model, tmp_path / "ckpt")
    reloaded = compress.load(tmp_path / "ckpt")
    torch.testing.assert_close(logits(reloaded, IDS), logits(model, IDS), rtol=0, atol=0)
    for name in WRAPPED:
        layer = reloaded.get_submodule(name)
        assert isinstance(layer, LoRALinear) and (layer.rank, layer.alpha) == (4, 8.0)
        assert isinstance(layer.base_layer, QuantLinear) == (not name.endswith("o_proj"))
        assert not any(p.requires_grad for p in layer.base_layer.parameters())
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.self_attn.q_proj.codes" in keys and "model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not any("base_layer" in key for key in keys)


def test_gptq_refuses_adapters_and_hf_merges_them(tmp_path):
    model = quantize_model(micro_llama(), lambda name: QuantConfig.uniform(4, 32))
    name = "model.layers.0.mlp.up_proj"
    layer = LoRALinear(model.get_submodule(name), rank=2, alpha=4)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    set_module(model, name, layer)
    with pytest.raises(CheckpointError, match=r"1 layers carry LoRA adapters \(e\.g\. model\.layers\.0\.mlp\.up_proj\)"):
        write_gptq(model, tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()
    write_hf(model, tmp_path / "hf")
    dense = compress.load(tmp_path / "hf")
    assert not any(isinstance(m, (LoRALinear, QuantLinear)) for m in dense.modules())
    torch.testing.assert_close(logits(dense, IDS), logits(model.eval(), IDS), rtol=1e-4, atol=1e-4)
