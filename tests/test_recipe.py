"""Recipe parsing: valid recipes (and every stage's docstring sample) parse; bad ones fail before any
weight loads with one line that names the place."""

import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli, tiny_recipe

from compress.errors import CompressError, RecipeError
from compress.run.recipe import load_recipe, parse_recipe
from compress.run.validate import check_recipe
from compress.stages import STAGES


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.S)


def test_quickstart_parses_and_validates():
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert [e.name for e in recipe.stages] == ["quantize", "eval", "export"]
    quantize = recipe.stages[0].config
    assert quantize.config.to_config().name == "int4-g64-sym"
    assert quantize.config_for("model.layers.3.mlp.down_proj", None).bits == 8
    check_recipe(recipe)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    check_recipe(recipe)  # the model's structure from its config: group sizes, selectors, budgets
    assert recipe.stages[-1].name == "export"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_docstring_samples_parse(name):
    import importlib

    module = importlib.import_module(STAGES[name].run.__module__)
    samples = yaml_blocks(module.__doc__)
    assert samples, f"stage {name} has no sample YAML in its docstring"
    for sample in samples:
        stages = yaml.safe_load(sample)
        recipe = parse_recipe({"model": "tiny-llama", "stages": stages + ([{"export": {}}] if name == "quantize" else []),
                               "output": "out/x"})
        assert recipe.stages[0].name == name


def test_recipe_module_sample_parses():
    import compress.run.recipe

    (sample,) = yaml_blocks(compress.run.recipe.__doc__)
    assert parse_recipe(yaml.safe_load(sample)).spec.model == "smollm2-135m"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_resolved_recipe_round_trips(path):
    recipe = load_recipe(path)
    again = parse_recipe(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()
    assert again.fingerprint(1) == recipe.fingerprint(1) != recipe.fingerprint(2)


QUANT = "  - quantize: {config: {bits: 4, group_size: 64}}\n  - export: {format: gptq}"
BAD = {
    "unknown_top_key": ("modle: x\n", "unknown key 'modle'; allowed: model, dtype, data, stages, output, seed"),
    "bits_3_5": ("  - quantize: {config: {bits: 3.5}}",
                 "stages[0].quantize.config.bits: 3.5 is not one of 2, 3, 4, 8"),
    "typo_in_stage": ("  - quantize: {config: {group_sise: 64}}",
                      "stages[0].quantize.config: unknown key 'group_sise'; allowed: type, bits, group_size"),
    "unknown_stage": ("  - prune_it: {}", "stages[0]: unknown stage 'prune_it'; available: prune, loram, quantize, lq_lora, l4q, finetune, eval, export"),
    "not_a_mapping": ("  - quantize", "stages[0]: each stage is a one-key mapping"),
    "export_not_last": ("  - export: {}\n  - quantize: {}", "stages[1].quantize: must come before stages[0].export"),
    "duplicate_export": ("  - quantize: {}\n  - export: {}\n  - export: {format: native}",
                         "stages[2].export.path: 'checkpoint' is the same directory as stages[1].export.path"),
    "group_too_big": ("  - quantize: {config: {group_size: 1024}}",
                      "stages[0].quantize: group_size 1024 is larger than in_features=256"),
    "group_not_dividing_for_gptq": ("  - quantize: {config: {group_size: 48}}\n  - export: {format: gptq}",
                                    "stages[0].quantize: cannot be exported as gptq (stages[1].export): "
                                    "model.layers.0.self_attn.q_proj: group_size 48 does not divide in_features=256"),
    "nf_to_gptq": ("  - quantize: {config: {type: nf, bits: 4}}\n  - export: {format: gptq}", "NormalFloat config"),
    "nf_field_on_uniform": ("  - quantize: {config: {bits: 4, block: 32}}", "block: only for type nf"),
    "bad_regex": ("  - quantize: {overrides: {'re:(': {bits: 8}}}", "selector 're:(': invalid regular expression"),
    "bad_override": ("  - quantize: {overrides: {'re:.*': {bits: 5}}}",
                     "overrides['re:.*'].bits: 5 is not one of 2, 3, 4, 8"),
    "targets_select_nothing": ("  - quantize: {targets: ['re:nothing']}", "stages[0].quantize.targets: selects no linear"),
    "bad_dtype": ("dtype: float64\n", "dtype: 'float64' is not one of 'float32', 'bfloat16', 'float16'"),
    "bad_samples_type": ("data: {calibration: {source: stdlib, samples: many}}\n",
                         "data.calibration.samples: input should be a valid integer"),
    "missing_model": ("model: /nonexistent/model.gguf\n", "model: GGUF file /nonexistent/model.gguf does not exist"),
    "missing_data_file": ("data: {calibration: {path: /nonexistent/train.jsonl}}\n",
                          "data.calibration.path: /nonexistent/train.jsonl does not exist"),
    "two_sources": ("data: {eval: {source: stdlib, path: x.txt}}\n", "give exactly one of source"),
    "empty_stages": ("stages: []\n", "stages: list should have at least 1 item"),
}


def bad_recipe(tmp_path: Path, case: str) -> Path:
    snippet, _ = BAD[case]
    if snippet.startswith("  -"):
        return tiny_recipe(tmp_path, snippet)
    base = yaml.safe_load(tiny_recipe(tmp_path, QUANT, name="base.yaml").read_text())
    override = yaml.safe_load(snippet)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = dict(base[key], **value)
        else:
            base[key] = value
    if "modle" in override:
        base.pop("model")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_message(tmp_path, case):
    path = bad_recipe(tmp_path, case)
    with pytest.raises(CompressError) as caught:
        check_recipe(load_recipe(path))
    assert BAD[case][1] in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("case", ["bits_3_5", "typo_in_stage", "export_not_last", "missing_model"])
def test_cli_bad_recipe_exit_2_one_line(tmp_path, case):
    path = bad_recipe(tmp_path, case)
    for command in ("validate", "run"):
        result = run_cli(command, path)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and BAD[case][1] in lines[-1]
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists(), "a bad recipe must not write anything"


def test_cli_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: tiny-llama\nstages: [\n")
    result = run_cli("validate", broken)
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("validate", tmp_path / "missing.yaml")
    assert result.returncode == 2 and "recipe file does not exist" in result.stderr


def test_recipe_error_is_a_compress_error():
    assert issubclass(RecipeError, CompressError) and RecipeError.exit_code == 2
