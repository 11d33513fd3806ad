"""prune/ computes on the device of its inputs (issue 21), checked without a GPU by two tricks.

- Default device ``meta``: each function runs on CPU inputs inside ``with torch.device("meta")``, so
  every tensor made from scratch without an explicit ``device=`` is a meta tensor; mixing it with a
  CPU tensor raises, and where it does not (indexing) the output is meta. The outputs must be on the
  CPU and bit-identical to a normal run (random draws included: same generator, same state after).
- Inputs on ``meta``, default CPU: a factory without ``device=`` then makes a CPU tensor next to meta
  inputs, which raises or leaves a CPU result; the outputs must be on meta, as they would be on CUDA.
  Only functions without data-dependent steps (``nonzero``, ``bool()``) can run on meta inputs.
"""

import contextlib

import pytest
import torch

from compress.lowrank import LoRALinear
from compress.prune import (CRITERIA, OutputMasks, PruningHooks, layer_units, layer_widths, lora_weight_gradient,
                            resize_layers, shrink_layer, update_config, weight_importance)
from compress.prune.importance import ImportanceAverage
from compress.prune.loraprune import highest_kept
from compress.prune.recover import COLUMN_PRUNED, ROW_PRUNED, kept_positions, recover_factors
from compress.prune.sparsity import KeepSparse, magnitude_mask, sparsify
from compress.prune.units import ATTENTION, MLP, LayerUnits, attention_unit_scores, mlp_unit_scores
from compress.targets import select_linears, set_module
from conftest import logits, micro_llama

UNIT = LayerUnits(0, "model.layers.0", kv_groups=4, group_heads=2, head_dim=8, channels=96)
REMOVED = {"kv_groups": [1, 3], "channels": list(range(0, 96, 3))}
EVENTS = {1: 0.25, 2: 0.5}


def scope(meta: bool):
    """The meta default device, or nothing."""
    return torch.device("meta") if meta else contextlib.nullcontext()


def tensors(tree) -> list[torch.Tensor]:
    """Every tensor in a nest of dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in tensors(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in tensors(value)]
    return []


def assert_identical(expected, actual, where: str = "") -> None:
    """Same structure, equal plain values, tensors of the same dtype and shape and equal bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_identical(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, b) in enumerate(zip(expected, actual)):
            assert_identical(a, b, f"{where}[{index}]")
    else:
        assert actual == expected, where


def assert_device_generic(scenario):
    """Run ``scenario(meta)`` normally and under the meta default; both on CPU and identical."""
    normal, under_meta = scenario(False), scenario(True)
    devices = {t.device.type for t in tensors(normal) + tensors(under_meta)}
    assert devices <= {"cpu"}, f"outputs on {devices}"
    assert_identical(normal, under_meta)
    return normal


def adapted_model(seed: int = 0):
    """A micro Llama (2 layers, 2 KV groups of 2 query heads of 16, 96 channels) with LoRA adapters."""
    model = micro_llama(hidden=64, layers=2, vocab=128, intermediate=96, seed=seed)
    generator = torch.Generator().manual_seed(2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in select_linears(model, ["Linear"], ["lm_head"]):
            layer = LoRALinear(module, 4, 8)
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05, generator=generator)
            set_module(model, name, layer)
    return model


def probe_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


def backward(model) -> None:
    """One forward and backward pass (outside any meta scope)."""
    model.zero_grad(set_to_none=True)
    model(input_ids=probe_ids(), use_cache=False).logits.float().pow(2).mean().backward()


def lora_layer_with_grads() -> LoRALinear:
    """A LoRA layer whose base weight and factors all hold gradients."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        layer = LoRALinear(torch.nn.Linear(16, 8), 4, 8)
        torch.nn.init.normal_(layer.lora_B.weight)
        layer.base_layer.weight.requires_grad_(True)
        layer(torch.randn(5, 16)).pow(2).sum().backward()
    return layer


def test_meta_default_catches_a_missing_device():
    cpu = torch.ones(3)
    with torch.device("meta"):
        with pytest.raises(RuntimeError):
            torch.zeros(3) + cpu
        kept = torch.zeros(3, device="cpu")
        kept[torch.tensor([0])] = 1.0  # a meta index on a CPU tensor: silently nothing (or garbage on reads)
        assert not bool(kept.any())  # hence the bit-for-bit comparison with a normal run
        assert torch.zeros(3, device=cpu.device).device.type == "cpu"
    with pytest.raises(RuntimeError):
        torch.zeros(3) + torch.ones(3, device="meta")


@pytest.mark.parametrize("criterion", CRITERIA)
def test_importance_criteria_are_device_generic(criterion):
    def scenario(meta):
        layer, generator = lora_layer_with_grads(), torch.Generator().manual_seed(3)
        with scope(meta):
            draws = [weight_importance(layer, criterion, generator) for _ in range(2)]
        return {"draws": draws, "generator": generator.get_state()}

    result = assert_device_generic(scenario)
    assert result["draws"][0].shape == (8, 16)


def test_lora_gradient_and_importance_average_are_device_generic():
    def scenario(meta):
        generator = torch.Generator().manual_seed(0)
        a, b, ga, gb = (torch.randn(shape, generator=generator) for shape in ((4, 16), (8, 4), (4, 16), (8, 4)))
        values = [torch.rand(6, generator=generator, dtype=torch.float64) for _ in range(3)]
        with scope(meta):
            average = ImportanceAverage(0.9)
            updated = [average.update("k", value) for value in values]
            skipped = average.update("k", torch.full((6,), float("nan"), dtype=torch.float64, device="cpu"))
            restored = ImportanceAverage()
            restored.load_state_dict(average.state_dict())
            restored.update("k", values[0])
            return {"estimate": lora_weight_gradient(a, b, ga, gb), "updated": updated, "skipped": skipped,
                    "state": average.state_dict(), "restored": restored.state_dict()}

    assert not assert_device_generic(scenario)["skipped"]


def test_importance_average_blends_values_loaded_on_the_host_into_device_ones(monkeypatch):
    """A resumed run loads the averages on the CPU (map_location) while new scores are on the GPU."""
    monkeypatch.setattr(torch, "isfinite", lambda value: torch.ones((), dtype=torch.bool))  # meta has no values
    average = ImportanceAverage(0.9)
    average.load_state_dict({"decay": 0.9, "values": {"k": torch.ones(4, dtype=torch.float64)}})
    assert average.update("k", torch.ones(4, dtype=torch.float64, device="meta"))
    assert average.values["k"].device.type == "meta"


def test_unit_indices_scores_and_kept_positions_are_device_generic():
    def scenario(meta):
        generator = torch.Generator().manual_seed(0)
        shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
                  "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96)}
        scores = {leaf: torch.rand(shape, generator=generator) for leaf, shape in shapes.items()}
        groups = torch.tensor([0, 2])
        with scope(meta):
            return {"q_rows": UNIT.q_rows(groups), "kv_rows": UNIT.kv_rows(groups),
                    "heads": attention_unit_scores(UNIT, scores), "channels": mlp_unit_scores(UNIT, scores),
                    "no_heads": attention_unit_scores(UNIT, {}),
                    "kept": {leaf: kept_positions(UNIT, leaf, REMOVED) for leaf in ROW_PRUNED + COLUMN_PRUNED}}

    result = assert_device_generic(scenario)
    assert result["kv_rows"].tolist() == list(range(0, 8)) + list(range(16, 24))


def test_highest_kept_is_device_generic():
    def scenario(meta):
        scores = torch.rand(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        mask = torch.arange(12) % 5 != 0
        with scope(meta):
            return [highest_kept(scores, mask, keep) for keep in (1, 6, 12)]

    assert [int(kept.sum()) for kept in assert_device_generic(scenario)] == [1, 6, 12]


def test_output_masks_are_device_generic():
    def scenario(meta):
        model = adapted_model()
        unit = layer_units(model)[1]
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
        groups, channels = torch.tensor([False, True]), torch.arange(96) % 3 != 1
        with scope(meta):
            masks = OutputMasks(model, layer_units(model))
            masks.set(unit.index, groups, channels)
            outputs = {leaf: model.get_submodule(unit.module(leaf))(x) for leaf in ROW_PRUNED}
            state = masks.state_dict()
            masks.remove()
            restored = OutputMasks(model, layer_units(model))
            restored.load_state_dict(state)
            again = {leaf: model.get_submodule(unit.module(leaf))(x) for leaf in ROW_PRUNED}
            return {"outputs": outputs, "state": state, "vectors": dict(masks._vectors), "again": again,
                    "restored": restored.state_dict(), "restored_vectors": dict(restored._vectors)}

    result = assert_device_generic(scenario)
    assert_identical(result["outputs"], result["again"])
    assert not bool(result["outputs"]["q_proj"][:, :32].any()) and bool(result["outputs"]["q_proj"][:, 32:].any())


def test_output_masks_follow_the_model_device():
    """Masks loaded on the host (a resumed checkpoint) go to the model's device, and the hooks put
    their vectors on the device of the outputs they scale."""
    model = adapted_model()
    units = layer_units(model)
    masks = OutputMasks(model, units)
    masks.set(1, torch.tensor([True, False]), torch.arange(96) % 2 == 0)
    model.to("meta")
    x = torch.ones(2, 64, device="meta")
    assert model.get_submodule(units[1].module("q_proj"))(x).device.type == "meta"  # host vectors, device model
    restored = OutputMasks(model, units)
    restored.load_state_dict({key: {"groups": value["groups"].clone(), "channels": value["channels"].clone()}
                              for key, value in masks.state_dict().items()})
    assert {t.device.type for t in tensors(restored.kept) + tensors(restored._vectors)} == {"meta"}


@pytest.mark.parametrize("criterion", CRITERIA)
def test_pruning_hooks_steps_and_state_round_trip_are_device_generic(criterion):
    def scenario(meta):
        model, fresh = adapted_model(), adapted_model(seed=1)
        units = layer_units(model)
        if criterion == "gradient":
            for unit in units:
                for leaf in ATTENTION + MLP:
                    model.get_submodule(unit.module(leaf)).base_layer.weight.requires_grad_(True)
        with scope(meta):
            hooks = PruningHooks(model, units, criterion, EVENTS, round_to=16, seed=5)
        for step in EVENTS:
            backward(model)  # the masks' forward hooks run here, outside the meta scope
            with scope(meta):
                hooks.after_backward(step)
                hooks.after_step(step)
        with scope(meta):
            state = hooks.state_dict()
            restored = PruningHooks(fresh, layer_units(fresh), criterion, EVENTS, round_to=16, seed=0)
            restored.load_state_dict(state)
            return {"state": state, "vectors": dict(hooks.masks._vectors), "restored": restored.state_dict(),
                    "restored_vectors": dict(restored.masks._vectors)}

    result = assert_device_generic(scenario)
    assert_identical(result["state"], result["restored"])
    assert all(int(kept["groups"].sum()) == 1 and int(kept["channels"].sum()) == 48
               for kept in result["state"]["masks"].values())


def test_sparsity_is_device_generic():
    def scenario(meta):
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(8, 16, generator=generator)
        layer = torch.nn.Linear(16, 8)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(8, 16, generator=generator))
        with scope(meta):
            masks = {"semi": magnitude_mask(weight, "semi"), "none": magnitude_mask(weight, "unstructured", 0.0),
                     "quarter": magnitude_mask(weight, "unstructured", 0.25)}
            kept = sparsify({"l": layer}, "unstructured", 0.5)
        with torch.no_grad():
            layer.weight.add_(1.0)  # an optimizer step moves the pruned weights
        with scope(meta):
            KeepSparse({"l": layer}, kept).after_step(1)
        return {"masks": masks, "kept": kept, "weight": layer.weight.detach()}

    result = assert_device_generic(scenario)
    assert int(torch.count_nonzero(result["weight"])) == 64 and int((~result["masks"]["quarter"]).sum()) == 32


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "per-layer"])
def test_shrink_is_device_generic(uniform):
    def scenario(meta):
        model = adapted_model()
        units = layer_units(model)
        kept = {0: (torch.tensor([False, True]), torch.arange(96) % 2 == 0),
                1: (torch.tensor([True, False]), torch.arange(96) % 3 != 0) if not uniform
                else (torch.tensor([False, True]), torch.arange(96) % 2 == 1)}
        with scope(meta):
            for unit in units:
                shrink_layer(model, unit, *kept[unit.index])
            standard, widths = update_config(model), layer_widths(model)
        return {"weights": model.state_dict(), "logits": logits(model, probe_ids()), "standard": standard,
                "widths": widths}

    result = assert_device_generic(scenario)
    assert result["standard"] == uniform and bool(result["widths"]) != uniform


def test_resize_layers_is_device_generic():
    def scenario(meta):
        model = micro_llama(hidden=64, layers=2, vocab=128, intermediate=96)
        with scope(meta):
            resize_layers(model, {1: {"kv_groups": 1, "channels": 32}})
        return {name: list(p.shape) for name, p in model.named_parameters()}

    assert assert_device_generic(scenario)["model.layers.1.mlp.down_proj.weight"] == [64, 32]


def test_recover_is_device_generic():
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96), "lm_head": (128, 64)}

    def scenario(meta):
        generator = torch.Generator().manual_seed(0)
        recovered = {}
        for leaf, (out_features, in_features) in shapes.items():
            kept = kept_positions(UNIT, leaf, REMOVED) if leaf != "lm_head" else torch.arange(out_features)
            small_in = kept.numel() if leaf in COLUMN_PRUNED else in_features
            small_out = kept.numel() if leaf in ROW_PRUNED else out_features
            a, b = torch.randn(4, small_in, generator=generator), torch.randn(small_out, 4, generator=generator)
            with scope(meta):
                recovered[leaf] = recover_factors(leaf, a, b, kept, (out_features, in_features))
        return recovered

    result = assert_device_generic(scenario)
    assert all(tuple(result[leaf][1].shape[:1] + result[leaf][0].shape[1:]) == shape for leaf, shape in shapes.items())


def test_results_follow_inputs_on_another_device():
    """Inputs on meta (standing in for CUDA) give meta results: nothing is made on the default CPU."""
    meta = torch.device("meta")
    groups = torch.tensor([0, 1], device=meta)
    scores = {leaf: torch.ones(shape, device=meta) for leaf, shape in
              {"q_proj": (64, 64), "k_proj": (32, 64), "o_proj": (64, 64), "gate_proj": (96, 64),
               "down_proj": (64, 96)}.items()}
    factors = [torch.ones(shape, device=meta) for shape in ((4, 16), (8, 4), (4, 16), (8, 4))]
    kept = kept_positions(UNIT, "q_proj", REMOVED)  # on the host, as LoRAM passes it
    layer, square = torch.nn.Linear(16, 8, device=meta), (64, 64)
    results = [UNIT.q_rows(groups), UNIT.kv_rows(groups), attention_unit_scores(UNIT, scores),
               mlp_unit_scores(UNIT, scores), lora_weight_gradient(*factors),
               *recover_factors("q_proj", torch.ones(4, 64, device=meta), torch.ones(32, 4, device=meta), kept, square),
               *recover_factors("o_proj", torch.ones(4, 32, device=meta), torch.ones(64, 4, device=meta), kept, square),
               highest_kept(torch.ones(6, device=meta), torch.ones(6, dtype=torch.bool), 3),
               magnitude_mask(torch.ones(8, 16, device=meta), "semi"),
               magnitude_mask(torch.ones(8, 16, device=meta), "unstructured", 0.5),
               weight_importance(layer, "random", torch.Generator().manual_seed(0)),
               weight_importance(layer, "magnitude"),
               kept_positions(UNIT, "k_proj", REMOVED, device=meta)]
    assert [t.device.type for t in results] == ["meta"] * len(results)
