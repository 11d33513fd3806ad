"""The finetune stage and the training loop: schedule, batch order, gradient accumulation, frozen
base bit for bit, adapters from lq_lora or new ones (QLoRA), 8-bit AdamW, crash and resume, errors."""

import json
import re
import subprocess
import sys

import pytest
import torch

import compress
from compress.lowrank import LoRALinear
from compress.training.loop import TrainHooks, TrainSettings, lr_multiplier, micro_batch, train
from conftest import ROOT, micro_llama, run_cli, tiny_recipe

QLORA = """  - quantize: {{method: rtn, config: {{type: uniform, bits: 4, group_size: 32}}}}
  - finetune: {{steps: {steps}, lr: 1.0e-2, batch_size: 2, grad_accum: 2, seq_len: 32, samples: 4,
                save_every: 2, lora: {{rank: 4, alpha: 8}}{extra}}}
  - export: {{format: native, verify: false, adapters: embed}}"""


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_schedule_warms_up_linearly_then_decays_to_zero():
    values = [lr_multiplier(s, 100, 10) for s in range(100)]
    assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert values[10] == 1.0 and all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[55] == pytest.approx(0.5) and lr_multiplier(100, 100, 10) == pytest.approx(0.0)
    assert lr_multiplier(0, 10, 0) == 1.0


def test_batches_visit_every_window_once_per_epoch():
    settings = TrainSettings(steps=6, lr=1.0, batch_size=3, grad_accum=2, seed=5)
    order = torch.cat([micro_batch(s, m, settings, 9) for s in range(6) for m in range(2)])
    for epoch in order.view(4, 9):
        assert sorted(epoch.tolist()) == list(range(9))
    assert not torch.equal(order[:9], order[9:18])  # a fresh permutation per epoch


def _adapter_model():
    model = micro_llama()
    torch.manual_seed(0)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        parent, _, leaf = name.rpartition(".")
        layer = LoRALinear(model.get_submodule(name), 4, 8)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
        setattr(model.get_submodule(parent), leaf, layer)
    return model


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def test_gradient_accumulation_equals_the_larger_batch():
    windows = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        model = _adapter_model()
        settings = TrainSettings(steps=1, lr=1e-2, batch_size=batch_size, grad_accum=accum, warmup=0,
                                 max_grad_norm=0)
        train(model, _lora_params(model), windows, settings)
        results.append(torch.cat([p.flatten() for p in _lora_params(model).values()]))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=1e-6)


class GradientNorms(TrainHooks):
    """Records the total gradient norm the optimizer sees (after clipping) at every step."""

    def __init__(self, params):
        self.params, self.norms = params, []

    def after_backward(self, step):
        self.norms.append(float(torch.linalg.norm(torch.stack([p.grad.norm() for p in self.params.values()]))))


def test_clipping_bounds_the_gradient_and_adamw8bit_trains():
    windows = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    norms = {}
    for limit in (0.0, 1e-3):
        model = _adapter_model()
        hooks = GradientNorms(_lora_params(model))
        train(model, hooks.params, windows, TrainSettings(steps=2, lr=1e-3, batch_size=2, max_grad_norm=limit),
              hooks=hooks)
        norms[limit] = hooks.norms
    assert min(norms[0.0]) > 1e-2 and max(norms[1e-3]) == pytest.approx(1e-3, rel=1e-4)
    model = _adapter_model()
    before = state_of(model)
    settings = TrainSettings(steps=3, lr=1e-2, batch_size=2, optimizer="adamw8bit", max_grad_norm=0.5)
    result = train(model, _lora_params(model), windows, settings)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    changed = {k for k, v in state_of(model).items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)


@pytest.mark.slow
def test_qlora_finetune_trains_adapters_only_and_lowers_the_loss(tmp_path):
    recipe = compress.load_recipe(tiny_recipe(tmp_path, QLORA.format(steps=8, extra="")))
    result = compress.run_recipe(recipe)
    quantized = compress.load(tmp_path / "out" / ".stages" / "00-quantize" / "model")
    tuned = compress.load(tmp_path / "out" / "checkpoint")
    metrics = result.reports[2].metrics
    assert metrics["final_loss"] < metrics["first_loss"] - 0.5  # 4 windows, lr 1e-2: it memorizes
    after = state_of(tuned)
    adapters = {k for k in after if ".lora_" in k}
    assert len(adapters) == 2 * 28 and metrics["trainable_params"] == sum(after[k].numel() for k in adapters)
    base = {k.replace(".base_layer.", "."): v for k, v in after.items() if k not in adapters}
    reference = state_of(quantized)
    assert base.keys() == reference.keys()
    for key, value in reference.items():  # codes, scales, zeros, norms, embeddings: bit for bit
        assert torch.equal(base[key], value), key
    assert all(not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters if ".lora_B." in k)


@pytest.mark.slow
def test_finetune_trains_the_lq_lora_adapters_in_place(tmp_path):
    stages = """  - lq_lora: {rank: 4, budget_bits: 4.0, iterations: 2}
  - finetune: {steps: 2, lr: 1.0e-3, batch_size: 2, grad_accum: 1, seq_len: 32, samples: 4}
  - export: {format: native, verify: false, adapters: embed}"""
    compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages)))
    before = state_of(compress.load(tmp_path / "out" / ".stages" / "00-lq_lora" / "model"))
    after = state_of(compress.load(tmp_path / "out" / "checkpoint"))
    assert before.keys() == after.keys()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {k for k in after if ".lora_" in k}


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_adapters(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    compress.run_recipe(compress.load_recipe(tiny_recipe(straight, QLORA.format(steps=6, extra=""))))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    recipe = tiny_recipe(crashed, QLORA.format(steps=6, extra=""))
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "crash_after_saves.py"), "2", "run",
                             str(recipe)], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list((crashed / "out" / ".cache" / "train").glob("*/train_state.pt"))
    resumed = run_cli("run", recipe, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    stages = json.loads((crashed / "out" / "report.json").read_text())["stages"]
    finetune = next(s for s in stages if s["name"] == "finetune")
    assert finetune["metrics"]["resumed_from_step"] == 4
    expected = state_of(compress.load(straight / "out" / "checkpoint"))
    got = state_of(compress.load(crashed / "out" / "checkpoint"))
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert not list((crashed / "out" / ".cache" / "train").glob("*/train_state.pt"))  # cleaned up


def test_nonfinite_loss_stops_with_the_step_named(tmp_path):
    stages = QLORA.format(steps=6, extra=", max_grad_norm: 0, warmup: 0").replace("lr: 1.0e-2", "lr: 1.0e+30")
    result = run_cli("run", tiny_recipe(tmp_path, stages))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(r"stages\[1\]\.finetune: training loss is (nan|inf) at step [2-6]", result.stderr), result.stderr


@pytest.mark.parametrize("stages, message", [
    ("  - lq_lora: {rank: 4, budget_bits: 4.0}\n  - finetune: {lora: {rank: 4}}",
     r"stages\[1\]\.finetune\.lora: the model already carries adapters from stages\[0\]\.lq_lora"),
    ("  - finetune: {steps: 2}", r"stages\[0\]\.finetune: the model has no LoRA adapters to train"),
    ("  - finetune: {steps: 2, lora: {rank: 4, targets: [nothing]}}", r"lora\.targets: selects no linear layer"),
    ("  - finetune: {steps: 2, optimiser: adamw, lora: {}}", r"stages\[0\]\.finetune: unknown key 'optimiser'"),
    ("  - finetune: {steps: 2, lora: {rank: 4}, data: {path: missing.txt}}", r"missing\.txt"),
])
def test_bad_finetune_recipes_fail_with_one_line(tmp_path, stages, message):
    result = run_cli("validate", tiny_recipe(tmp_path, stages))
    assert result.returncode == 2, result.stdout
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr


@pytest.mark.slow
def test_finetune_reads_its_own_text_file(tmp_path):
    (tmp_path / "domain.txt").write_text("the cat sat on the mat. " * 400)
    stages = ("  - finetune: {steps: 4, lr: 1.0e-2, batch_size: 2, grad_accum: 1, seq_len: 32, "
              f"gradient_checkpointing: true, eval_every: 2, data: {{path: {tmp_path / 'domain.txt'}}}, "
              "lora: {rank: 4, alpha: 8}}")
    result = compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages)))
    metrics = result.reports[1].metrics
    assert metrics["windows"] == 8 and metrics["final_loss"] < metrics["first_loss"]
    assert [e["step"] for e in metrics["evals"]] == [2, 4] and metrics["perplexity"] == metrics["evals"][-1]["perplexity"]
