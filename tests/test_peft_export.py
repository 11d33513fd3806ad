"""Adapters as a standard PEFT adapter: written unchanged (PEFT names, rank/alpha patterns), read back
by PeftModel.from_pretrained over our packed base with identical logits, over a dense transformers
base without any help from us, and written by the export stage beside a GPTQ or native base."""

import json
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import compress
from compress.checkpoint import write_hf
from compress.checkpoint.write import adapter_modules
from compress.checkpoint.peft import adapters_detached, load_peft_adapter, write_peft_adapter
from compress.lowrank import LoRALinear
from compress.quant import QuantConfig, QuantLinear
from compress.targets import select_linears, set_module
from conftest import logits, micro_llama, run_cli, tiny_recipe


def adapted_model(ranks=(4, 8)):
    """micro_llama with packed bases (4-bit g64) and random adapters; down_proj gets the second rank."""
    model = micro_llama()
    generator = torch.Generator().manual_seed(1)
    for name, linear in select_linears(model, ["Linear"], ["lm_head"]):
        rank = ranks[1] if name.endswith("down_proj") else ranks[0]
        layer = LoRALinear(QuantLinear.quantize(linear, QuantConfig.uniform(4, 64)), rank, 2.0 * rank)
        with torch.no_grad():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=generator) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.1)
        set_module(model, name, layer)
    return model


def test_adapter_files_follow_peft(tmp_path, probe_ids):
    model = adapted_model()
    layers = adapter_modules(model)
    write_peft_adapter(layers, tmp_path / "adapter", base_model="base-dir")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["rank_pattern"] == {n: 8 for n in layers if n.endswith("down_proj")}
    assert sorted(config["target_modules"]) == sorted(layers) and config["base_model_name_or_path"] == "base-dir"
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(layers)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], layers[name].lora_A.weight)
    assert tensors[f"base_model.model.{name}.lora_B.weight"].shape == (128, 8)


def test_peft_over_our_packed_base_reproduces_our_logits(tmp_path, probe_ids):
    model = adapted_model()
    ids = probe_ids % 512
    expected = logits(model, ids)
    with adapters_detached(model) as layers:
        base_only = logits(model, ids)
        write_peft_adapter(layers, tmp_path / "adapter")
        peft_model = load_peft_adapter(model, tmp_path / "adapter")
        assert torch.equal(logits(peft_model, ids), expected)  # the same ops in the same order
        peft_model.unload()
    assert float((expected - base_only).abs().max()) > 1e-3
    assert torch.equal(logits(model, ids), expected)  # the adapters are back


def test_plain_peft_loads_it_over_a_dense_transformers_base(tmp_path, probe_ids):
    from transformers import AutoModelForCausalLM

    model = adapted_model()
    ids = probe_ids % 512
    with adapters_detached(model) as layers:
        write_hf(model, tmp_path / "dense")
        write_peft_adapter(layers, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    theirs = logits(PeftModel.from_pretrained(base, str(tmp_path / "adapter")), ids)
    torch.testing.assert_close(theirs, logits(model, ids), rtol=0, atol=1e-4)


LQ_LORA_GPTQ = """  - lq_lora: {rank: 4, budget_bits: 4.0, grid: gptq, iterations: 2}
  - finetune: {steps: 2, lr: 1.0e-3, batch_size: 2, grad_accum: 1, seq_len: 32, samples: 4}
  - export: {format: gptq}"""
QLORA_NF4_NATIVE = """  - quantize: {method: rtn, config: {type: nf, bits: 4, block: 64}}
  - finetune: {steps: 2, lr: 1.0e-3, batch_size: 2, grad_accum: 1, seq_len: 32, samples: 4, lora: {rank: 4}}
  - export: {format: native}"""


@pytest.mark.slow
@pytest.mark.parametrize("stages", [LQ_LORA_GPTQ, QLORA_NF4_NATIVE], ids=["lq_lora-gptq", "qlora-nf4-native"])
def test_export_writes_base_and_peft_adapter(tmp_path, probe_ids, stages):
    result = compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages)))
    metrics = result.reports[3].metrics
    out = tmp_path / "out"
    assert metrics["reload_max_abs_logit_diff"] == 0.0 and metrics["adapter_path"] == str(out / "checkpoint-adapter")
    assert metrics["bits_per_param"] <= 4.13 < metrics["bits_per_param_with_adapters_nf8"] \
        < metrics["bits_per_param_with_adapters_16bit"]
    base = compress.load(out / "checkpoint")
    assert not any(isinstance(m, LoRALinear) for m in base.modules())  # the base alone
    trained = compress.load(out / ".stages" / "01-finetune" / "model")  # adapters embedded (native state)
    peft_model = compress.load_adapter(base, out / "checkpoint-adapter")
    assert isinstance(peft_model, PeftModel)
    assert torch.equal(logits(peft_model, probe_ids), logits(trained, probe_ids))


def test_missing_adapter_directory_is_a_clear_error(tmp_path):
    with pytest.raises(compress.errors.CheckpointError, match=re.escape(str(tmp_path)) + ".*not a PEFT adapter"):
        load_peft_adapter(micro_llama(), tmp_path)


def test_bad_adapter_modes_fail_validation(tmp_path):
    result = run_cli("validate", tiny_recipe(tmp_path, "  - export: {format: native, adapters: merge}"))
    assert result.returncode == 2 and "adapters: merge needs format hf" in result.stderr
