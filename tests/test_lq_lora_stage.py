"""The lq_lora stage on tiny-llama: ILP allocation under the budget, adapters that hold L1 @ L2,
checkpoints that reload them, a cost cache that a rerun reuses, and early errors for bad budgets."""

import json
import os
import re

import pytest
import torch

import compress
from compress.lowrank import LoRALinear
from compress.quant import QuantizedWeight, QuantLinear
from conftest import run_cli, tiny_recipe

STAGES = """  - lq_lora: {rank: 8, budget_bits: 3.0, grid: gptq, fisher: true, iterations: 2}
  - eval: {batch_size: 2}
  - export: {format: native, adapters: embed}"""


@pytest.mark.slow
def test_lq_lora_end_to_end(tmp_path, tiny_pair):
    recipe = compress.load_recipe(tiny_recipe(tmp_path, STAGES))
    result = compress.run_recipe(recipe)
    report = result.reports[1]
    assert report.name == "lq_lora" and report.metrics["bits_per_param"] <= 3.0
    assert report.metrics["bits_per_param_with_adapters_16bit"] > report.metrics["bits_per_param"]
    model = compress.load(tmp_path / "out" / "checkpoint")
    original = dict(tiny_pair[0].named_modules())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) == 4 * 7
    for name, layer in layers.items():
        assert isinstance(layer.base_layer, QuantLinear)
        weight = original[name].weight.detach().float()
        with torch.no_grad():
            lq = layer.base_layer.dequantize() + layer.delta_weight()
        plain = QuantizedWeight.quantize(weight, layer.base_layer.config).dequantize()
        assert torch.linalg.norm(weight - lq) < torch.linalg.norm(weight - plain), name  # L1 L2 helps
    for prefix in {n.rsplit(".", 1)[0] for n in layers}:  # gptq grid: engines fuse q/k/v and gate/up
        if prefix.endswith("self_attn"):
            assert len({layers[f"{prefix}.{p}"].base_layer.config for p in ("q_proj", "k_proj", "v_proj")}) == 1
        else:
            assert len({layers[f"{prefix}.{p}"].base_layer.config for p in ("gate_proj", "up_proj")}) == 1
    cached = list((tmp_path / "out" / ".cache" / "lq_lora").glob("*.json"))
    assert len(cached) == 28
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    again = compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, STAGES)), overwrite=True)
    assert again.reports[1].metrics["bits_per_param"] == report.metrics["bits_per_param"]
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps  # costs came from the cache


@pytest.mark.parametrize("stages, message", [
    ("  - lq_lora: {rank: 8, budget_bits: 1.5}",
     r"stages\[0\]\.lq_lora: budget 1\.5000 bits/param .* smallest feasible budget is 2\.\d+ bits/param"),
    ("  - lq_lora: {rank: 8, budget_bits: 3.0, budget_gib: 1.0}", "exactly one of budget_bits and budget_gib"),
    ("  - lq_lora: {rank: 8, budget_bits: 3.0, grid: nf}\n  - export: {format: gptq}", r"stages\[0\]\.lq_lora: cannot be exported as gptq \(stages\[1\]\.export\): \S+: nf configs \(picked at run time\)"),
    ("  - lq_lora: {rank: 8, budget_bits: 3.0}\n  - export: {format: gptq, adapters: merge}", r"adapters: merge needs format hf"),
    ("  - lq_lora: {rank: 8, budget_bits: 3.0, grid: nf, quantizer: gptq}", r"quantizer: gptq needs grid: gptq"),
    ("  - lq_lora: {rank: 8, budget_bits: 3.0, damp: 0.1}", r"damp: only for quantizer: gptq"),
    ("  - lq_lora: {rank: 0, budget_bits: 3.0, refine_rounds: 1}", r"refine_rounds: only for quantizer: gptq"),
    ("  - lq_lora: {rank: 8, budget_bits: 3.0, quantizer: gptq, refine_rounds: 2}", r"refine_rounds: only at rank 0"),
])
def test_bad_lq_lora_recipes_fail_before_loading(tmp_path, stages, message):
    result = run_cli("validate", tiny_recipe(tmp_path, stages))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr


@pytest.mark.slow
def test_rank_zero_is_mixed_precision_that_exports_as_gptq(tmp_path):
    stages = """  - lq_lora: {rank: 0, budget_bits: 3.5, grid: gptq, group_sizes: [64]}
  - export: {format: gptq}"""
    result = compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages)))
    metrics = result.reports[1].metrics
    assert metrics["bits_per_param"] <= 3.5 and metrics["bits_per_param_with_adapters_16bit"] == metrics["bits_per_param"]
    model = compress.load(tmp_path / "out" / "checkpoint")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 28 and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert {m.config.group_size for m in layers} == {64} and len({m.config.bits for m in layers}) > 1


@pytest.mark.slow
def test_cost_table_in_two_processes_matches_one(tmp_path):
    """Each of the 2 worker processes gets half the cores' threads; the single process runs with as
    many, since products split over a different number of threads round differently (by 1.7e-4
    relative after LQ-LoRA's iterations, measured). Then the tables are equal exactly."""
    tables, threads = [], torch.get_num_threads()
    for workers in (1, 2):
        stages = f"  - lq_lora: {{rank: 4, budget_bits: 3.0, iterations: 2, group_sizes: [64, 128], workers: {workers}}}"
        out = tmp_path / f"w{workers}"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # what parallel_map gives each of 2 workers
        try:
            compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages, output=out)))
        finally:
            torch.set_num_threads(threads)
        tables.append({p.name: json.loads(p.read_text()) for p in (out / ".cache" / "lq_lora").glob("*.json")})
    assert tables[0].keys() == tables[1].keys() and len(tables[0]) == 28
    for key, entries in tables[0].items():
        assert entries.keys() == tables[1][key].keys() and all(re.search(r"-g(64|128)-", c) for c in entries)
        assert tables[1][key] == entries


@pytest.mark.slow
def test_gptq_quantizer_lowers_the_output_error_of_the_same_allocation(tmp_path, tiny_pair):
    """Under objective: weight, quantizer: gptq keeps the ILP's choice (same RTN cost table) and
    gives logits nearer the float model's on held-out text than round-to-nearest; rank 0 + gptq
    exports as GPTQ."""
    from test_gptq_stage import held_out_text
    from conftest import logits

    text = held_out_text(tiny_pair[1])
    reference = logits(tiny_pair[0], text)
    errors, plans = {}, {}
    for quantizer in ("rtn", "gptq"):
        stages = (f"  - lq_lora: {{rank: 0, budget_bits: 3.5, grid: gptq, group_sizes: [64], quantizer: {quantizer}, "
                  "objective: weight}\n"
                  "  - export: {format: gptq}")
        (tmp_path / quantizer).mkdir()
        path = tiny_recipe(tmp_path / quantizer, stages)
        path.write_text(path.read_text().replace("samples: 4, seq_len: 64}", "samples: 32, seq_len: 64}", 1))
        result = compress.run_recipe(compress.load_recipe(path))
        report = result.reports[1]
        assert {m["quantizer"] for m in report.modules} == {quantizer}
        plans[quantizer] = {m["module"]: m["config"] for m in report.modules}
        model = compress.load(result.out_dir / "checkpoint", dtype="float32")
        errors[quantizer] = float((logits(model, text) - reference).norm())
    assert plans["gptq"] == plans["rtn"]
    assert errors["gptq"] < 0.85 * errors["rtn"], errors


def test_lq_decompose_with_gptq_has_less_output_error_than_with_rtn():
    from compress.lowrank import lq_decompose
    from compress.lowrank.decompose import hessian_error
    from compress.quant import QuantConfig
    from compress.quant.gptq import gptq_quantize
    from test_gptq import correlated_inputs, hessian_of, weight_of

    x, w = correlated_inputs(1024, 128, 0).float(), weight_of(64, 128, 1).float()
    hessian = hessian_of(x.double()).float()
    config, error = QuantConfig.uniform(3, 32), hessian_error(hessian)
    rtn = lq_decompose(w, 8, config, iterations=4, error=error)
    gptq = lq_decompose(w, 8, config, iterations=4, error=error,
                        quantize=lambda matrix, c: gptq_quantize(matrix, hessian, c).quantized)
    assert gptq.error < 0.8 * rtn.error, (gptq.error, rtn.error)
    residual = w - gptq.quantized.dequantize() - gptq.low_rank()
    output_error = float(torch.linalg.norm(x @ residual.t())) / x.shape[0] ** 0.5  # H = 2 XᵀX / n
    assert abs(error(residual) - output_error) < 1e-3 * output_error


def test_refined_gptq_costs_are_never_above_plain_gptq():
    """Rank 0's cost entries with GPTQ refinement: per config no larger than plain GPTQ's (the
    refinement starts from GPTQ's codes and keeps only what lowers the same error), smaller at 2-3
    bits, same storage; the stage refines at rank 0 only and shows refine_rounds only there."""
    from compress.lowrank.costs import gptq_grid, matrix_costs
    from compress.quant.gptq import GPTQSettings
    from compress.stages.lq_lora import LQLoRAConfig
    from compress.stages.lq_lora_costs import gptq_settings
    from test_gptq import correlated_inputs, hessian_of, weight_of

    x, w = correlated_inputs(512, 128, 0).float(), weight_of(48, 128, 1).float()
    hessian = hessian_of(x.double()).float()
    configs = gptq_grid()
    plain, refined = (matrix_costs(w, configs, 0, hessian=hessian, gptq=GPTQSettings(refine_rounds=rounds))
                      for rounds in (0, 1))
    for name, (error, bits) in plain.items():
        assert refined[name][1] == bits and refined[name][0] <= error * (1 + 1e-6), name
    assert all(refined[c.name][0] < 0.99 * plain[c.name][0] for c in configs if c.bits <= 3)
    zero = LQLoRAConfig(rank=0, budget_bits=3.0, quantizer="gptq")
    assert gptq_settings(zero).refine_rounds == 1
    assert gptq_settings(LQLoRAConfig(rank=8, budget_bits=3.0, quantizer="gptq")).refine_rounds == 0
    assert "refine_rounds" not in LQLoRAConfig(rank=8, budget_bits=3.0, quantizer="gptq").model_dump()
    assert "refine_rounds" not in LQLoRAConfig(rank=0, budget_bits=3.0).model_dump()
