"""The l4q stage: trains LoRA and step/offset through the fake-quantized merge, ends with packed
integer-zero weights that export as GPTQ and carry no adapter; starting from a quantize stage's
scales reproduces that stage's model; finalizing equals the fake quantization when the zero is integer."""

import re

import pytest
import torch

import compress
from compress.lowrank import LoRALinear
from compress.lowrank.l4q import L4QLinear
from compress.quant import QuantConfig, QuantizedWeight, QuantLinear
from compress.stages.l4q import finalize
from conftest import logits, run_cli, tiny_recipe

L4Q = ("  - l4q: {{bits: 4, group_size: 32, steps: {steps}, lr: {lr}, quant_lr: {lr}, batch_size: 2, grad_accum: 1, "
       "seq_len: 32, samples: 4, lora: {{rank: 4, alpha: 8}}}}")


def test_finalize_equals_fake_quantization_with_an_integer_zero():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 16)
    rtn = QuantizedWeight.quantize(base.weight, QuantConfig.uniform(4, 32))
    layer = L4QLinear(base, rank=4, alpha=8, bits=4, group_size=32, init=rtn)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.01)  # a trained-looking update
    packed = finalize(layer)
    assert isinstance(packed, QuantLinear) and packed.config.name == "int4-g32-asym"
    torch.testing.assert_close(packed.dequantize(), layer.quantized_weight(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_l4q_ends_fully_quantized_and_exports_gptq(tmp_path, probe_ids):
    stages = L4Q.format(steps=6, lr="1.0e-3") + "\n  - eval: {}\n  - export: {format: gptq}"
    result = compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages)))
    metrics = result.reports[1].metrics
    assert metrics["layers"] == 28 and "perplexity_integer_zero" in metrics
    assert result.reports[-1].metrics["reload_max_abs_logit_diff"] == 0.0
    model = compress.load(tmp_path / "out" / "checkpoint")
    assert not any(isinstance(m, (LoRALinear, L4QLinear)) for m in model.modules())  # no adapter ships
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 28
    assert not (tmp_path / "out" / "checkpoint-adapter").exists()


@pytest.mark.slow
def test_l4q_from_a_quantize_stage_starts_at_its_model(tmp_path, probe_ids):
    quantize = "  - quantize: {method: rtn, config: {type: uniform, bits: 4, group_size: 32}}\n"
    stages = quantize + L4Q.format(steps=1, lr="1.0e-12")  # effectively no update: init + finalize only
    compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages)))
    start = compress.load(tmp_path / "out" / ".stages" / "00-quantize" / "model")
    after = compress.load(tmp_path / "out" / ".stages" / "01-l4q" / "model")
    torch.testing.assert_close(logits(after, probe_ids), logits(start, probe_ids), rtol=0, atol=1e-4)


def test_bad_l4q_recipes_fail_before_loading(tmp_path):
    result = run_cli("validate", tiny_recipe(tmp_path, "  - l4q: {group_size: 48}"))
    assert result.returncode == 2 and re.search(r"stages\[0\]\.l4q\.group_size: 48 does not divide", result.stderr)
