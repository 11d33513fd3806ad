"""Training memory accounting: the activation count against what autograd really saves on Llama
models (saved_tensors_hooks, parameters excluded), the parts of each method, and the fit."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.lowrank import LoRALinear
from compress.planning.plan import Architecture, architecture_for
from compress.planning.plan_training import (TrainingSetup, best_training_fit, saved_activation_bytes,
                                             training_breakdown)
from compress.quant import QuantConfig
from compress.targets import select_linears, set_module
from compress.training.loop import causal_lm_loss


def measured_saved_bytes(config: LlamaConfig, rank: int, batch: int, seq: int, checkpointing: bool = False) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward with LoRA on every
    projection (fp32, train mode); with checkpointing, the peak of one layer's recomputation is not
    seen here, so the caller compares the kept part only."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, module in select_linears(model, ["Linear"], ["lm_head"]):
        set_module(model, name, LoRALinear(module, rank, 2 * rank))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        causal_lm_loss(model, ids).backward()  # the loss training uses (head over slices of positions)
    return sum(storages.values())


@pytest.mark.parametrize("hidden, inter, heads, kv, rank",
                         [(256, 768, 8, 2, 8), (192, 512, 6, 6, 4), (128, 352, 4, 1, 16)], ids=["gqa", "mha", "mqa"])
def test_activation_count_matches_autograd(hidden, inter, heads, kv, rank):
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=3, vocab_size=1000, tie_word_embeddings=True)
    arch = Architecture.from_config(config.to_dict())
    predicted = saved_activation_bytes(arch, TrainingSetup(rank=rank, batch=2, seq=64, compute_bytes=4))
    measured = measured_saved_bytes(config, rank, 2, 64)
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


def test_checkpointing_keeps_layer_inputs_and_one_recomputed_layer():
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2,
                         num_hidden_layers=3, vocab_size=1000, tie_word_embeddings=True)
    arch = Architecture.from_config(config.to_dict())
    setup = TrainingSetup(rank=8, batch=2, seq=64, compute_bytes=4, checkpointing=True)
    full = saved_activation_bytes(arch, TrainingSetup(rank=8, batch=2, seq=64, compute_bytes=4))
    per_layer = 2 * 64 * 4 * (4 * 256 + 2 * 256 + 2 * 64 + 8 + 4 * 768 + 7 * 8 + 2)
    kept = saved_activation_bytes(arch, setup) - per_layer  # the recomputed layer lives only in backward
    measured = measured_saved_bytes(config, 8, 2, 64, checkpointing=True)
    assert abs(kept - measured) / measured < 0.15, (kept, measured)
    assert saved_activation_bytes(arch, setup) < full


def test_parts_of_each_method_on_llama_2_7b():
    arch = architecture_for("llama-2-7b")
    lora = training_breakdown(arch, TrainingSetup(rank=8, seq=512))
    assert arch.total_params() == 6_738_415_616
    assert lora["trainable"] == 4 * 19_988_480  # PEFT's count for r=8 on all seven projections, fp32
    assert lora["gradients"] == lora["trainable"] and lora["optimizer"] == 2 * lora["trainable"]
    assert lora["frozen_base"] == 2 * arch.total_params()
    qlora = training_breakdown(arch, TrainingSetup(method="qlora", rank=8, seq=512,
                                                   base=QuantConfig.nf(4, 64, 8, 256, "float32")))
    linear = sum(o * i for o, i in arch.linear_shapes().values())
    dense = sum(arch.dense_params().values())
    assert qlora["frozen_base"] == pytest.approx(linear * 4.127 / 8 + 2 * dense, rel=1e-3)
    eight_bit = training_breakdown(arch, TrainingSetup(rank=8, optimizer="adamw8bit"))
    assert eight_bit["optimizer"] == lora["optimizer"] / 4
    l4q = training_breakdown(arch, TrainingSetup(method="l4q", rank=8, seq=512, l4q=QuantConfig.uniform(4, 64)))
    assert l4q["trainable"] == lora["trainable"] + 4 * 2 * linear // 64  # step and offset per group
    assert l4q["activations"] < lora["activations"]  # the Function keeps x only, no adapter outputs
    pruning = training_breakdown(arch, TrainingSetup(method="prune", rank=8, seq=512, gradient_criterion=True))
    assert pruning["gradients"] == lora["gradients"] + 2 * linear
    full = training_breakdown(arch, TrainingSetup(method="full", seq=512))
    assert full["frozen_base"] == 0 and full["trainable"] == 2 * arch.total_params()


def test_loram_trains_the_pruned_shapes():
    from compress.planning.plan import loram_pruned_params

    arch = architecture_for("llama-3.1-70b")
    setup = TrainingSetup(method="loram", prune_ratio=0.85, prune_start=4, prune_end=78, base_bytes=2)
    parts = training_breakdown(arch, setup)
    assert parts["frozen_base"] == 2 * loram_pruned_params(arch, 0.85, 4, 78)
    assert parts["trainable"] < training_breakdown(arch, TrainingSetup())["trainable"]


def test_training_fit_degrades_with_less_memory():
    arch = architecture_for("llama-2-70b")
    setup = TrainingSetup(rank=16, batch=1, seq=1024, checkpointing=True)
    choices = [best_training_fit(arch, gib, setup) for gib in (200, 80, 40, 24, 16, 4)]
    assert choices[0] == "lora" and choices[1] == "qlora" and choices[-1] is None
    order = ["lora", "qlora", "qloram-0.5", "qloram-0.65", "qloram-0.85", None]
    assert [order.index(c) for c in choices] == sorted(order.index(c) for c in choices)
    assert choices[3] is not None and choices[3].startswith("qloram")


def test_recipe_plan_walks_the_stages(tmp_path):
    """Each stage with what earlier stages left: QLoRA over LQ-LoRA's budget (budget_gib gives the same
    bytes as the ILP's accounting), pruned shapes after prune, L4Q's packed result at eval."""
    import json

    import compress
    from compress.planning.plan_report import recipe_plan
    from conftest import run_cli, tiny_recipe

    stages = """  - prune: {method: loraprune, ratio: 0.5, uniform: true, steps: 4, batch_size: 2, seq_len: 32}
  - lq_lora: {rank: 8, budget_gib: 0.0001}
  - finetune: {steps: 2, batch_size: 2, seq_len: 64, optimizer: adamw8bit}
  - eval: {}
  - l4q: {bits: 3, group_size: 32, steps: 2, batch_size: 2, seq_len: 64}
  - export: {format: gptq}"""
    recipe = compress.load_recipe(tiny_recipe(tmp_path, stages))
    plan = recipe_plan(recipe, gpu_gib=1.0)
    labels = list(plan["stages"])
    assert labels[0] == "0: prune (loraprune)" and labels[2].startswith("2: finetune (qlora, LQ-LoRA")
    arch = architecture_for(recipe.spec.model)
    dense = 4 * sum(arch.dense_params().values())  # float32 recipe
    finetune = plan["stages"][labels[2]]
    assert finetune["frozen_base"] == pytest.approx(dense + 0.0001 * 2**30, rel=1e-9)  # the budget, exactly
    assert finetune["optimizer"] == finetune["trainable"] / 2  # 8-bit AdamW: 2 bytes per fp32 parameter
    pruned = plan["stages"][labels[1]]["frozen_base"]
    assert pruned < plan["stages"][labels[0]]["frozen_base"]  # the dense model after pruning is smaller
    assert plan["peak_gib"] == max(sum(p.values()) for p in plan["stages"].values()) / 2**30 and plan["fits"]
    chart = tmp_path / "plan.png"
    result = run_cli("plan", str(tmp_path / "recipe.yaml"), "--json", "--chart", str(chart))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stages"].keys() == plan["stages"].keys()
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    both = run_cli("plan", str(tmp_path / "recipe.yaml"), "--model", "llama-2-7b")
    assert both.returncode == 2 and "one of them" in both.stderr and "Traceback" not in both.stderr
