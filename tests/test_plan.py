"""Memory accounting against published figures: NF4 with double quantization is 4.127 bits/param
(QLoRA); LoRAM's QLoRAM-Stru parameter-storage reductions 15.81x (LLaMA-3.1-70B: ratio 0.85 on layers
4-77 gives 17.85 B parameters) and 16.95x (LLaMA-2-70B); LQ-LoRA's 2.75-bit LLaMA-2-70B is about
2.85 bits with rank-64 adapters stored in NF8."""

from pathlib import Path

import pytest

from compress.lowrank import NF8_BITS
from compress.planning.plan import (PRESETS, Architecture, adapter_params, architecture_for, inference_breakdown,
                                    kv_cache_bytes, loram_pruned_params)
from compress.quant import QuantConfig, QuantizedWeight


def test_nf4_double_quant_is_4_127_bits():
    nf4 = QuantConfig.nf(4, block=64, scale_bits=8, scale_block=256, scale_dtype="float32")
    assert sum(nf4.components((4096, 4096)).values()) / 4096**2 == pytest.approx(4.127, abs=5e-4)


@pytest.mark.parametrize("config", [QuantConfig.uniform(3, 64), QuantConfig.uniform(4, 128, sym=True),
                                    QuantConfig.nf(2, block=32, scale_bits=4, scale_block=64, scale_dtype="bfloat16")],
                         ids=lambda c: c.name)
def test_components_add_up_to_the_stored_bits(config):
    import torch

    shape = (96, 200)  # in_features not a multiple of 32: the codes' padding counts
    components = sum(config.components(shape).values())
    stored = QuantizedWeight.quantize(torch.randn(shape), config).tensors
    counted = {k: v for k, v in stored.items() if k in config.counted_tensors}
    assert sum(8 * t.numel() * t.element_size() for t in counted.values()) == components  # padding to whole words included


@pytest.mark.parametrize("preset, total, pruned, reduction", [
    ("llama-3.1-70b", 70.55e9, 17.85e9, 15.81), ("llama-2-70b", 68.98e9, 16.27e9, 16.95)])
def test_loram_storage_reduction(preset, total, pruned, reduction):
    arch = Architecture.from_config(PRESETS[preset])
    small = loram_pruned_params(arch, 0.85, 4, 78)
    assert arch.total_params() == pytest.approx(total, rel=1e-3)
    assert small == pytest.approx(pruned, rel=1e-3)
    assert 4 * arch.total_params() / small == pytest.approx(reduction, abs=0.01)  # 16-bit large / 4-bit small


def test_lq_lora_70b_at_2_75_bits_with_nf8_adapters_is_about_2_85():
    arch = Architecture.from_config(PRESETS["llama-2-70b"])
    shapes = arch.linear_shapes()
    linear = sum(o * i for o, i in shapes.values())
    assert 2.75 + adapter_params(shapes, 64) * NF8_BITS / linear == pytest.approx(2.85, abs=0.005)


def test_kv_cache_of_llama_3_1_8b():
    arch = Architecture.from_config(PRESETS["llama-3.1-8b"])
    assert kv_cache_bytes(arch, batch=1, seq=4096) == 2 * 32 * 4096 * 8 * 128 * 2  # 512 MiB in fp16


def test_inference_breakdown_matches_the_stored_weights_and_fits():
    from compress.planning.plan import GIB, best_inference_fit, inference_breakdown

    arch = Architecture.from_config(PRESETS["llama-2-7b"])
    int4 = QuantConfig.uniform(4, 128)
    parts = inference_breakdown(arch, int4, batch=1, seq=4096)
    linear_bits = sum(int4.storage_bits(s) for s in arch.linear_shapes().values())
    assert parts["codes"] + parts["scales"] + parts["zeros"] == pytest.approx(linear_bits / 8)
    assert parts["kv_cache"] == 2 * 32 * 4096 * 32 * 128 * 2  # 2 GiB for LLaMA-2-7B at 4k, fp16
    fp16 = sum(inference_breakdown(arch, None, 1, 4096).values()) / GIB
    assert 14 < fp16 < 16  # 6.74 B parameters at 16 bits plus the cache
    assert best_inference_fit(arch, 24, 1, 4096) == "fp16"
    assert best_inference_fit(arch, 8, 1, 4096) == "int4-g128"  # int8 needs ~9 GiB
    assert best_inference_fit(arch, 1, 1, 4096) is None


def test_plan_command_prints_json_and_fails_cleanly(tmp_path):
    import json

    from conftest import run_cli

    result = run_cli("plan", "--model", "llama-3.1-8b", "--gpu-gib", "8", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["params"] == pytest.approx(8.03e9, rel=1e-3) and set(plan["inference"]) >= {"fp16", "nf4-dq"}
    table = run_cli("plan", "--model", "smollm2-135m")
    assert table.returncode == 0 and "int4-g128" in table.stdout
    missing = run_cli("plan", "--model", str(tmp_path / "config.json"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "config.json" in missing.stderr


def test_inference_breakdown_of_an_ilp_plan_counts_each_module_config():
    """A per-module plan (what lq_lora's ILP writes): each matrix at its own config, the rest 16-bit;
    the packed total equals the sum of storage_bits the ILP budgets with."""
    arch = architecture_for("smollm2-135m")
    shapes = arch.linear_shapes()
    plan = {name: QuantConfig.uniform(2 if "mlp" in name else 4, 64) for name in list(shapes)[:14]}
    parts = inference_breakdown(arch, plan, 1, 16)
    packed = sum(parts[k] for k in ("codes", "scales", "zeros", "second_level"))
    expected = sum(c.storage_bits(shapes[n]) for n, c in plan.items()) / 8
    expected += sum(2 * o * i for n, (o, i) in shapes.items() if n not in plan)
    assert packed == expected


def test_gptq_recipe_plan_counts_the_calibration_hidden_states():
    """recipes/gptq.yaml: 32 x 512 calibration tokens, fp32, SmolLM2 (hidden 576): the layer-by-layer
    pass holds every window's input and output hidden states, plus the largest group's Hessians."""
    from compress.planning.plan_report import recipe_plan
    from compress.run.recipe import load_recipe

    stages = recipe_plan(load_recipe(Path(__file__).parent.parent / "recipes" / "gptq.yaml"))["stages"]
    quantize = stages["0: quantize (gptq)"]
    assert quantize["activations"] == 2 * 32 * 512 * 576 * 4
    assert quantize["transient"] >= (1536**2 + 2 * 1536**2) * 4  # down_proj's H and GPTQ's two copies
    assert "transient" not in stages["2: export"] or stages["2: export"]["transient"] == 0
