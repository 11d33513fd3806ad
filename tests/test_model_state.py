"""The model state the stages declare (``Stage.effect``) and the formats judge (``Format.problems``)
at ``compress validate``, and the memory rows each stage declares (``Stage.memory``) that ``compress
plan`` and placement read.

Each refusal names the stage that caused it; what the model as the recipe leaves it can be written
is accepted, whatever the stage before (a quantize after a merge, float zeros exported dense).
"""

import json
from dataclasses import replace

import pytest
from conftest import tiny_recipe

import compress
from compress.checkpoint.formats import FORMATS
from compress.errors import RecipeError
from compress.model_state import ModelState, ModuleQuant
from compress.planning.plan_report import recipe_plan, stage_rows
from compress.quant import QuantConfig, UniformConfig
from compress.run.validate import check_recipe

L4Q = "  - l4q: {bits: 4, group_size: 32, zero_point: float, steps: 1, lora: {rank: 2}}\n"


def validate(tmp_path, stages: str):
    return check_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages)))


@pytest.mark.parametrize("stages", [
    L4Q + "  - export: {format: hf}",  # float zeros dequantized into a dense checkpoint
    L4Q + "  - export: {format: native}",
    "  - loram: {output: merged, train: {steps: 1}}\n  - quantize: {}\n  - export: {format: gptq}",
])
def test_what_the_export_can_hold_is_accepted(tmp_path, stages):
    validate(tmp_path, stages)


@pytest.mark.parametrize("stages, message", [
    ("  - eval: {}\n  - export: {format: gptq}",
     r"^stages\[1\]\.export: cannot be exported as gptq \(stages\[1\]\.export\): the model has no quantized layers"),
    ("  - quantize: {config: {type: nf, bits: 4}}\n  - export: {format: compressed-tensors}",
     r"^stages\[0\]\.quantize: cannot be exported as compressed-tensors .*NormalFloat config.* \(and \d+ more\)$"),
    (L4Q + "  - export: {format: gptq}", r"^stages\[0\]\.l4q: .*float zero points; GPTQ stores integer zeros only"),
])
def test_what_the_export_cannot_hold_names_the_stage(tmp_path, stages, message):
    with pytest.raises(RecipeError, match=message):
        validate(tmp_path, stages)


def test_problems_are_attributed_to_the_stage_that_set_each_module():
    """Two stages quantize two fused q/k/v members differently: the fused group's problem goes to
    the stage of its first member; a module whose config is picked at run time from a uniform grid
    is not a mismatch, and GPTQ still checks its shape."""
    shapes = {f"model.layers.0.self_attn.{leaf}": (64, 64) for leaf in ("q_proj", "k_proj", "v_proj")}
    shapes["model.layers.0.mlp.down_proj"] = (64, 48)
    state = ModelState(shapes=shapes).quantized({
        "model.layers.0.self_attn.q_proj": ModuleQuant(QuantConfig.uniform(4, 32), by="stages[0].quantize"),
        "model.layers.0.self_attn.k_proj": ModuleQuant(QuantConfig.uniform(8, 32), by="stages[1].quantize"),
        "model.layers.0.self_attn.v_proj": ModuleQuant(QuantConfig.uniform(4, 32), by="stages[0].quantize"),
        "model.layers.0.mlp.down_proj": ModuleQuant(None, UniformConfig, by="stages[2].lq_lora")})
    problems = FORMATS["gptq"].problems(state)
    assert [(p.by, p.text.split(":")[0]) for p in problems] == [
        ("stages[0].quantize", "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"),
        ("stages[2].lq_lora", "model.layers.0.mlp.down_proj")]
    assert "in_features=48 is not a multiple of 32" in problems[1].text
    assert [p.by for p in FORMATS["compressed-tensors"].problems(state)] == ["stages[0].quantize"]
    assert FORMATS["native"].problems(state) == [] and FORMATS["hf"].problems(state) == []
    assert FORMATS["gptq"].problems(ModelState(known=False)) == []


def test_each_stage_rows_are_the_plans_rows(tmp_path):
    """Placement asks one stage for its rows (the stages before it only for what they leave); they
    are the rows ``compress plan`` shows for it. AWQ's walk is counted like GPTQ's."""
    stages = ("  - quantize: {method: awq, config: {bits: 4, group_size: 32}}\n  - finetune: {steps: 1}\n"
              "  - eval: {}\n  - export: {format: gptq}")
    recipe = compress.load_recipe(tiny_recipe(tmp_path, stages))
    plan = recipe_plan(recipe)["stages"]
    for entry in recipe.stages:
        assert {f"{entry.index}: {k}": v for k, v in stage_rows(recipe, entry.index).items()} == \
            {k: v for k, v in plan.items() if k.startswith(f"{entry.index}: ")}
    assert "transient" in plan["0: quantize (awq)"] and "1: finetune (qlora, int4-g32-asym)" in plan


def test_a_run_carries_its_state_across_resume(tmp_path):
    """A run's state (``Context.state``) records the configs each stage chose and which stage chose
    them; ``state.json`` saves it and ``--resume`` restores it on the reloaded model."""
    path = tiny_recipe(tmp_path, "  - quantize: {config: {bits: 4, group_size: 32}}\n  - export: {format: native}")
    compress.run_recipe(compress.load_recipe(path))
    saved = json.loads((tmp_path / "out" / ".stages" / "00-quantize" / "state.json").read_text())
    assert saved["plan"] and set(saved["quantized_by"]) == set(saved["plan"])
    assert set(saved["quantized_by"].values()) == {"stages[0].quantize"}
    assert {c["bits"] for c in saved["plan"].values()} == {4}
    path.write_text(path.read_text().replace("format: native", "format: gptq"))
    result = compress.run_recipe(compress.load_recipe(path), resume=True)
    assert result.resumed_after == 0
    resumed = json.loads((tmp_path / "out" / ".stages" / "01-export" / "state.json").read_text())
    assert (resumed["plan"], resumed["quantized_by"]) == (saved["plan"], saved["quantized_by"])
    old = {"plan": saved["plan"], "structure": {}}  # a state.json written before quantized_by
    model = compress.load(tmp_path / "out" / ".stages" / "00-quantize" / "model")
    restored = ModelState.of_skeleton(model).restored(old)
    assert {q.by for q in restored.quant.values()} == {"an earlier stage"}
    assert restored.saved()["plan"] == saved["plan"]


def test_export_judges_the_runs_own_configs_before_writing(tmp_path):
    """What validate could not see (here: a state whose layers are NF) stops export at run time with
    the stage named, and nothing is written."""
    from types import SimpleNamespace

    from compress.errors import StageError
    from compress.stages.report import StageReport
    from compress.stages.export import ExportConfig, run
    from conftest import micro_llama, quantize_model

    model = quantize_model(micro_llama(), lambda name: QuantConfig.nf(4, 64))
    state = ModelState.of_skeleton(model)
    state = state.quantized({name: replace(q, by="stages[0].quantize") for name, q in state.quant.items()})
    ctx = SimpleNamespace(state=state, model=model, out_dir=tmp_path / "out", entry=SimpleNamespace(where="stages[1].export"))
    with pytest.raises(StageError, match=r"^stages\[0\]\.quantize: cannot be exported as gptq \(stages\[1\]\.export\): "
                                         r".*NormalFloat config"):
        run(ctx, ExportConfig(format="gptq"), StageReport("export", 1))
    assert not (tmp_path / "out").exists()


def test_a_lora_wrapped_base_counts_under_its_layer_name():
    from compress.lowrank import LoRALinear
    from compress.targets import set_module
    from conftest import micro_llama, quantize_model

    model = quantize_model(micro_llama(), lambda name: QuantConfig.uniform(4, 32))
    name = "model.layers.0.self_attn.q_proj"
    set_module(model, name, LoRALinear(model.get_submodule(name), rank=2, alpha=4))
    state = ModelState.of_skeleton(model)
    assert state.quant[name].config == QuantConfig.uniform(4, 32) and state.shapes[name] == (128, 128)
    assert not any(key.endswith(".base_layer") for key in [*state.quant, *state.shapes])
