"""The loram stage on tiny-llama: the recovered adapter is zero on removed neurons, loads with plain
PEFT on the original base, and the large model with it beats the large model without it on the
training distribution (a learnable synthetic task); the memory report; bad recipes."""

import json
import re

import pytest
import torch

import compress
from compress.lowrank import LoRALinear
from compress.prune import layer_units
from compress.prune.recover import kept_positions
from conftest import logits, run_cli, tiny_recipe

TRAIN = "{steps: 30, lr: 3.0e-3, batch_size: 4, grad_accum: 1, seq_len: 32, samples: 16, data: {path: %s}}"
PRUNE = "{method: %s, ratio: 0.5, steps: 6, every: 2, batch_size: 2, seq_len: 32, samples: 4, data: {path: %s}}"


def pattern_file(tmp_path):
    """A learnable synthetic distribution: one short sentence repeated with a counter."""
    path = tmp_path / "task.txt"
    path.write_text(" ".join(f"alpha beta gamma delta {i % 7}." for i in range(3000)))
    return path


def task_recipe(tmp_path, method: str, extra: str = "", export: str = "hf"):
    data = pattern_file(tmp_path)
    stages = (f"  - loram: {{prune: {PRUNE % (method, data)}, train: {TRAIN % data}{extra}}}\n"
              f"  - eval: {{}}\n  - export: {{format: {export}}}")
    text = tiny_recipe(tmp_path, stages).read_text().replace(
        "eval:        {source: stdlib, split: eval,  samples: 4, seq_len: 64}",
        f"eval: {{path: {data}, samples: 4, seq_len: 64}}")
    (tmp_path / "recipe.yaml").write_text(text)
    return tmp_path / "recipe.yaml"


@pytest.mark.slow
def test_loram_recovers_a_useful_adapter_for_the_large_model(tmp_path, tiny_pair, probe_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = compress.load_recipe(task_recipe(tmp_path, "loraprune", ", quantize_small: nf4"))
    result = compress.run_recipe(recipe)
    metrics = result.reports[1].metrics
    assert metrics["recovered_layers"] == 28 and metrics["small_params"] < metrics["large_params"]
    assert metrics["storage_reduction_16bit"] > 1.0
    assert metrics["storage_reduction_4bit_formula"] == pytest.approx(4 * metrics["large_params"] / metrics["small_params"])
    state = json.loads((tmp_path / "out" / ".stages" / "00-loram" / "state.json").read_text())
    removed = state["structure"]["loram"]["layers"]
    model = compress.load(tmp_path / "out" / ".stages" / "00-loram" / "model")
    units = {u.prefix: u for u in layer_units(model)}
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)):
        unit, leaf = units[name.rsplit(".", 2)[0]], name.rsplit(".", 1)[1]
        kept = kept_positions(unit, leaf, removed[str(unit.index)])
        update = layer.delta_weight().detach()
        axis_len = update.shape[1] if leaf in ("o_proj", "down_proj") else update.shape[0]
        gone = torch.ones(axis_len, dtype=torch.bool)
        gone[kept] = False
        lost = update[:, gone] if leaf in ("o_proj", "down_proj") else update[gone]
        assert bool(gone.any()) and torch.count_nonzero(lost) == 0, name  # exactly zero on removed neurons
    # the adapter loads with plain PEFT on the original (unpruned) base
    original = tmp_path / "original"
    tiny_pair[0].save_pretrained(original)
    base = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "out" / "checkpoint-adapter"))
    torch.testing.assert_close(logits(peft_model, probe_ids), logits(model, probe_ids), atol=1e-4, rtol=0)
    before, after = result.reports[0].metrics["perplexity"], result.reports[2].metrics["perplexity"]
    assert after < 0.7 * before, (before, after)  # the large model learned the task from the small one


@pytest.mark.slow
@pytest.mark.parametrize("method", ["semi", "unstructured"])
def test_non_structured_loram_keeps_shapes(tmp_path, method):
    extra = ", output: merged, align_steps: 2, align_data: {source: stdlib, split: train}"
    recipe = compress.load_recipe(task_recipe(tmp_path, method, extra, export="native"))
    result = compress.run_recipe(recipe)
    metrics = result.reports[1].metrics
    assert metrics["small_params"] == metrics["large_params"] and metrics["recovered_layers"] == 28
    model = compress.load(tmp_path / "out" / "checkpoint")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # merged
    assert result.reports[2].metrics["perplexity"] < result.reports[0].metrics["perplexity"]


@pytest.mark.parametrize("stages, message", [
    ("  - loram: {prune: {method: taylor}}", r"stages\[0\]\.loram\.prune\.method"),
    ("  - loram: {output: merged}\n  - export: {format: gptq}", r"stages\[0\]\.loram: cannot be exported as gptq \(stages\[1\]\.export\): the model has no "
     r"quantized layers"),
    ("  - loram: {train: {data: {path: nowhere.txt}}}", r"stages\[0\]\.loram\.train\.data\.path: nowhere\.txt"),
    ("  - quantize: {}\n  - loram: {}", r"pruning must come before quantizing"),
])
def test_bad_loram_recipes_fail_before_loading(tmp_path, stages, message):
    result = run_cli("validate", tiny_recipe(tmp_path, stages))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
