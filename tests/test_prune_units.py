"""LoRAPrune's parts on small models: units under GQA and MHA, per-unit score sums, the LoRA gradient
estimate, the cubic schedule, kept counts, and masked == shrunk."""

import pytest
import torch

from compress.lowrank import LoRALinear
from compress.prune import (OutputMasks, PruningHooks, cubic_ratio, kept_count, layer_units, layer_widths,
                            lora_weight_gradient, prunable_layers, prune_events, shrink_layer, update_config,
                            weight_importance)
from compress.prune.units import attention_unit_scores, mlp_unit_scores
from compress.targets import select_linears, set_module
from conftest import logits, micro_llama


def gqa_model(kv_heads: int = 2):
    model = micro_llama(hidden=128, layers=3)  # 4 query heads of 32
    if kv_heads != 2:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**dict(model.config.to_dict(), num_key_value_heads=kv_heads))
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    return model


def test_units_follow_the_query_to_kv_grouping():
    gqa, mha = layer_units(gqa_model(2))[0], layer_units(gqa_model(4))[0]
    assert (gqa.kv_groups, gqa.group_heads, gqa.head_dim, gqa.channels) == (2, 2, 32, 256)
    assert (mha.kv_groups, mha.group_heads) == (4, 1)
    group = torch.tensor([1])
    assert gqa.q_rows(group).tolist() == list(range(64, 128))  # query heads 2 and 3 read KV head 1
    assert gqa.kv_rows(group).tolist() == list(range(32, 64))
    assert mha.q_rows(group).tolist() == list(range(32, 64)) == mha.kv_rows(group).tolist()


def test_unit_scores_sum_rows_and_columns_then_normalize_per_module():
    unit = layer_units(gqa_model(2))[0]
    q = torch.zeros(128, 128)
    q[64:128] = 1.0  # only group 1's query rows
    o = torch.zeros(128, 128)
    o[:, :64] = 3.0  # only group 0's o_proj columns
    scores = attention_unit_scores(unit, {"q_proj": q, "o_proj": o})
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-6, rtol=0)
    gate, down = torch.rand(256, 128), torch.rand(128, 256)
    expected = gate.sum(1).double() / gate.sum(1).double().norm() + down.sum(0).double() / down.sum(0).double().norm()
    torch.testing.assert_close(mlp_unit_scores(unit, {"gate_proj": gate, "down_proj": down}), expected, atol=1e-6, rtol=0)


def test_lora_gradient_estimate_is_one_step_of_both_factors():
    generator = torch.Generator().manual_seed(0)
    a, b, ga, gb = (torch.randn(shape, generator=generator, dtype=torch.float64)
                    for shape in ((4, 16), (8, 4), (4, 16), (8, 4)))
    estimate = lora_weight_gradient(a, b, ga, gb).double()
    torch.testing.assert_close(estimate, b @ a - (b - gb) @ (a - ga), atol=1e-5, rtol=1e-5)


def test_loraprune_importance_uses_only_lora_gradients():
    layer = LoRALinear(torch.nn.Linear(16, 8), 4, 8)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16)
    layer(x).pow(2).sum().backward()
    assert layer.base_layer.weight.grad is None  # W0 never needed a gradient
    importance = weight_importance(layer, "loraprune")
    estimate = lora_weight_gradient(layer.lora_A.weight, layer.lora_B.weight, layer.lora_A.weight.grad,
                                    layer.lora_B.weight.grad)
    merged = layer.base_layer.weight + layer.delta_weight()
    torch.testing.assert_close(importance, (estimate * merged).abs().detach())
    with pytest.raises(ValueError, match="base weight has no gradient"):
        weight_importance(layer, "gradient")


def test_cubic_schedule_ramps_and_lands_on_the_target():
    values = [cubic_ratio(t, 100, 0.5) for t in range(101)]
    assert values[:11] == [0.0] * 11 and values[91:] == [0.5] * 10
    assert all(a <= b for a, b in zip(values, values[1:]))
    events = prune_events(100, 10, 0.5)
    assert list(events) == [20, 30, 40, 50, 60, 70, 80, 90] and events[90] == 0.5
    assert all(r < 0.5 for s, r in events.items() if s < 90)
    assert prune_events(5, 10, 0.3) == {5: 0.3}  # fewer steps than `every`: one final event


def test_kept_counts_round_up_to_whole_multiples():
    assert kept_count(1536, 0.5, 1, 32) == 768 and kept_count(1000, 0.3, 1, 32) == 704
    assert kept_count(4, 0.99, 64, 32) == 1  # at least one unit
    assert kept_count(100, 0.3, 1, 1) == 70
    assert prunable_layers(32) == list(range(3, 31)) and prunable_layers(4) == [0, 1, 2]


def _with_adapters(model):
    generator = torch.Generator().manual_seed(2)
    for name, module in select_linears(model, ["Linear"], ["lm_head"]):
        layer = LoRALinear(module, 4, 8)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05, generator=generator)
        set_module(model, name, layer)
    return model


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_masked_and_shrunk_models_agree(kv_heads, probe_ids):
    model = _with_adapters(gqa_model(kv_heads))
    units = layer_units(model)
    masks = OutputMasks(model, units)
    generator = torch.Generator().manual_seed(1)
    kept = {}
    for unit in units[1:]:  # layer 0 stays whole: non-uniform widths
        groups = torch.zeros(unit.kv_groups, dtype=torch.bool)
        groups[torch.randperm(unit.kv_groups, generator=generator)[: unit.kv_groups // 2]] = True
        kept[unit.index] = (groups, torch.rand(unit.channels, generator=generator) > 0.5)
        masks.set(unit.index, *kept[unit.index])
    ids = probe_ids % 512
    masked = logits(model, ids)
    masks.remove()
    for unit in units[1:]:
        original_q = (model.get_submodule(unit.module("q_proj")).merged_linear().weight.detach())
        shrink_layer(model, unit, *kept[unit.index])
        kept_q_rows = unit.q_rows(torch.nonzero(kept[unit.index][0]).flatten())
        assert torch.equal(model.get_submodule(unit.module("q_proj")).weight, original_q[kept_q_rows])
    torch.testing.assert_close(logits(model, ids), masked, atol=1e-5, rtol=0)
    assert not update_config(model)  # widths differ between layers
    assert set(layer_widths(model)) == {1, 2}


def test_pruning_hooks_mask_the_lowest_units_and_keep_them_masked():
    model = _with_adapters(gqa_model(2))
    units = layer_units(model)
    hooks = PruningHooks(model, units, "magnitude", {1: 0.25, 2: 0.5}, round_to=32)
    hooks.after_backward(1)
    hooks.after_step(1)
    first = {i: (g.clone(), c.clone()) for i, (g, c) in hooks.masks.kept.items()}
    assert all(int(c.sum()) == 192 and int(g.sum()) == 2 for g, c in first.values())  # 0.25 of 2 groups: 0
    hooks.after_backward(2)
    hooks.after_step(2)
    for index, (groups, channels) in hooks.masks.kept.items():
        assert int(groups.sum()) == 1 and int(channels.sum()) == 128
        assert not bool((channels & ~first[index][1]).any())  # a masked channel never comes back


def test_pruning_hooks_without_columns_ignore_o_and_down_proj():
    """score_columns=False (loraprune's default) scores units from q/k/v and gate/up rows only: large
    o_proj/down_proj columns change nothing, while with columns they decide the kept channels."""
    model = _with_adapters(gqa_model(2))
    unit = layer_units(model)[1]
    with torch.no_grad():
        down = model.get_submodule(unit.module("down_proj")).base_layer.weight
        down[:, :128] *= 1000.0  # channels 0..127 look important to the down_proj columns only
    kept = {}
    for score_columns in (False, True):
        hooks = PruningHooks(model, [unit], "magnitude", {1: 0.5}, round_to=32, score_columns=score_columns)
        assert ("down_proj" in hooks.scored) == ("o_proj" in hooks.scored) == score_columns
        hooks.after_backward(1)
        hooks.after_step(1)
        kept[score_columns] = hooks.masks.kept[unit.index][1].clone()
        hooks.masks.remove()
    assert bool(kept[True][:128].all())
    assert int(kept[False][:128].sum()) < 100  # rows alone: about half of them, not all


def test_prune_stage_scores_columns_except_for_loraprune():
    from compress.stages.prune import PruneConfig, _score_columns

    assert not _score_columns(PruneConfig(method="loraprune"))
    assert _score_columns(PruneConfig(method="loraprune", score_columns=True))
    assert _score_columns(PruneConfig(method="gradient")) and _score_columns(PruneConfig(method="magnitude"))


def test_gradient_and_magnitude_criteria_match_float64_autograd():
    """|dL/dW0 ⊙ W0| and |W0 + s B A| against a float64 reference computed without our code."""
    layer = LoRALinear(torch.nn.Linear(16, 8, bias=False), 4, 8)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16)
    layer.base_layer.weight.requires_grad_(True)
    layer(x).pow(2).sum().backward()
    w0 = layer.base_layer.weight.detach().double().requires_grad_(True)
    a, b = layer.lora_A.weight.detach().double(), layer.lora_B.weight.detach().double()
    (x.double() @ (w0 + layer.scaling * b @ a).T).pow(2).sum().backward()
    torch.testing.assert_close(weight_importance(layer, "gradient").double(), (w0.grad * w0).abs().detach(),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(weight_importance(layer, "magnitude").double(),
                               (w0 + layer.scaling * b @ a).abs().detach(), atol=1e-5, rtol=1e-5)


def test_importance_average_is_an_ema_that_skips_non_finite_updates():
    from compress.prune.importance import ImportanceAverage

    average = ImportanceAverage(0.9)
    assert average.update("k", torch.tensor([1.0, 2.0]))
    assert average.update("k", torch.tensor([11.0, 2.0]))
    torch.testing.assert_close(average.values["k"], torch.tensor([2.0, 2.0]))  # 0.9 * 1 + 0.1 * 11
    assert not average.update("k", torch.tensor([float("nan"), 1.0]))
    torch.testing.assert_close(average.values["k"], torch.tensor([2.0, 2.0]))
    restored = ImportanceAverage()
    restored.load_state_dict(average.state_dict())
    assert restored.decay == 0.9 and torch.equal(restored.values["k"], average.values["k"])


def test_random_criterion_is_seeded():
    layer = torch.nn.Linear(16, 8)
    draws = [weight_importance(layer, "random", torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (8, 16)
    assert not torch.equal(draws[0], weight_importance(layer, "random", torch.Generator().manual_seed(4)))
