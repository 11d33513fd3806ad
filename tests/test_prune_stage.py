"""The prune stage on tiny-llama: uniform pruning writes a standard config that plain transformers
loads, non-uniform widths round-trip through native, the removed indices travel in config.json,
pruning composes with lq_lora -> finetune -> export, and bad recipes fail before loading."""

import json
import re

import pytest
import torch

import compress
from compress.lowrank import LoRALinear
from conftest import logits, run_cli, tiny_recipe

PRUNE = ("  - prune: {{method: {method}, ratio: 0.5, steps: 6, every: 2, batch_size: 2, seq_len: 32, samples: 4, "
         "lr: 1.0e-3, uniform: {uniform}, save_every: 2}}")


@pytest.mark.slow
def test_uniform_prune_exports_a_standard_checkpoint(tmp_path, tiny_pair, probe_ids):
    from transformers import AutoModelForCausalLM

    stages = PRUNE.format(method="loraprune", uniform="true") + "\n  - export: {format: hf}"
    result = compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages)))
    metrics = result.reports[1].metrics
    assert metrics["uniform_config"] and metrics["params_after"] < metrics["params_before"]
    config = json.loads((tmp_path / "out" / "checkpoint" / "config.json").read_text())
    original = tiny_pair[0].config
    assert config["num_key_value_heads"] == original.num_key_value_heads // 2
    assert config["num_attention_heads"] == original.num_attention_heads // 2  # whole KV groups go
    assert config["intermediate_size"] % 32 == 0 and config["intermediate_size"] <= original.intermediate_size // 2 + 31
    removed = config["compress_pruning"]["layers"]
    assert len(removed) == original.num_hidden_layers
    assert all(len(v["kv_groups"]) == 1 and len(v["channels"]) == v["channels_before"] - config["intermediate_size"]
               for v in removed.values())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoint", dtype=torch.float32)
    ours = compress.load(tmp_path / "out" / "checkpoint")
    assert torch.equal(logits(plain, probe_ids), logits(ours, probe_ids))
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())  # adapters merged


@pytest.mark.slow
def test_non_uniform_widths_round_trip_through_native(tmp_path, probe_ids):
    stages = PRUNE.format(method="magnitude", uniform="false") + "\n  - export: {format: native}"
    result = compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages)))
    assert result.reports[-1].metrics["reload_max_abs_logit_diff"] == 0.0
    model = compress.load(tmp_path / "out" / "checkpoint")
    widths = [m.mlp.gate_proj.out_features for m in model.model.layers]
    # 4 layers: floor(0.1 * 4) = 0 leading layers kept whole, and the last one
    assert widths[-1] == model.config.intermediate_size and widths[:-1] == [384] * 3
    assert not result.reports[1].metrics["uniform_config"]


@pytest.mark.slow
def test_dropping_the_lora_keeps_the_original_weights_at_kept_positions(tmp_path, tiny_pair):
    stages = PRUNE.format(method="loraprune", uniform="true").replace("save_every: 2", "save_every: 2, merge_lora: false")
    compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages + "\n  - export: {format: hf}")))
    pruned = compress.load(tmp_path / "out" / "checkpoint")
    removed = pruned.config.compress_pruning["layers"]
    for index, layer in enumerate(pruned.model.layers):
        original = tiny_pair[0].model.layers[index].mlp
        gone = set(removed[str(index)]["channels"])
        kept = [c for c in range(original.gate_proj.out_features) if c not in gone]
        assert torch.equal(layer.mlp.gate_proj.weight, original.gate_proj.weight[kept])
        assert torch.equal(layer.mlp.down_proj.weight, original.down_proj.weight[:, kept])


@pytest.mark.slow
def test_prune_then_lq_lora_then_finetune_then_export(tmp_path, probe_ids):
    stages = PRUNE.format(method="loraprune", uniform="true") + """
  - lq_lora: {rank: 4, budget_bits: 4.0, iterations: 2}
  - finetune: {steps: 2, lr: 1.0e-3, batch_size: 2, grad_accum: 1, seq_len: 32, samples: 4}
  - eval: {baseline: false}
  - export: {format: gptq}"""
    result = compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages)))
    assert result.reports[-1].metrics["reload_max_abs_logit_diff"] == 0.0
    base = compress.load(tmp_path / "out" / "checkpoint")
    assert base.config.compress_pruning["method"] == "loraprune"
    model = compress.load_adapter(base, tmp_path / "out" / "checkpoint-adapter")
    assert torch.isfinite(logits(model, probe_ids)).all()


@pytest.mark.parametrize("stages, message", [
    (PRUNE.format(method="loraprune", uniform="false") + "\n  - export: {format: gptq}",
     r"stages\[0\]\.prune: cannot be exported as gptq \(stages\[1\]\.export\): decoder layers of different widths"),
    ("  - quantize: {}\n" + PRUNE.format(method="random", uniform="true"), r"pruning must come before quantizing"),
    (PRUNE.format(method="taylor", uniform="true"), r"method"),
    ("  - prune: {ratio: 1.5}", r"ratio"),
])
def test_bad_prune_recipes_fail_before_loading(tmp_path, stages, message):
    result = run_cli("validate", tiny_recipe(tmp_path, stages))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr


@pytest.mark.slow
def test_killed_pruning_resumes_to_the_same_model(tmp_path, probe_ids):
    import subprocess
    import sys

    from conftest import ROOT

    stages = PRUNE.format(method="loraprune", uniform="true") + "\n  - export: {format: native, verify: false}"
    straight = tmp_path / "straight"
    straight.mkdir()
    compress.run_recipe(compress.load_recipe(tiny_recipe(straight, stages)))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    recipe = tiny_recipe(crashed, stages)
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "crash_after_saves.py"), "2", "run",
                             str(recipe)], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]  # after step 4: masks from the events at 2 and 4
    resumed = run_cli("run", recipe, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = compress.load(straight / "out" / "checkpoint").state_dict()
    got = compress.load(crashed / "out" / "checkpoint").state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
