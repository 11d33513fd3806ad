"""Bad input found by probing as a new user: each case is one ``error:`` line and exit code 2 (never a
traceback, never a nonsense answer), and nothing already written is lost.

Covers: LoRA ranks above a layer's size; ``lq_lora`` after a quantizing stage; ``eval`` and ``plan``
numbers that make no sense; ``plan --chart`` names that cannot be written; a loss too large for
``exp``; recipes that are not UTF-8 or repeat a key; ``inf`` / ``nan`` settings; data paths that are
directories; ``--data stdlib.txt``; ``--version``; ``--overwrite`` keeps the earlier run's stages
until the new run's model has loaded.
"""

import contextlib
import io
import math

import pytest
import torch
import yaml
from conftest import run_cli, tiny_recipe

from compress.entry import cli
from compress.execution.evaluate import perplexity
from compress.models.data import parse_source_string


def run(*argv: str) -> tuple[int, str, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse's --version and usage errors
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def one_line(argv, pattern: str) -> str:
    code, _, stderr = run(*argv)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (argv, code, stderr)
    assert pattern in lines[0], (pattern, lines[0])
    return lines[0]


def recipe(tmp_path, stages: list, **top) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny-llama", "stages": stages, "output": str(tmp_path / "out"), **top}))
    return str(path)


@pytest.mark.parametrize("stage, where", [
    ({"finetune": {"lora": {"rank": 100000}}}, "stages[0].finetune.lora.rank"),
    ({"l4q": {"lora": {"rank": 65}}}, "stages[0].l4q.lora.rank"),
    ({"prune": {"lora": {"rank": 100000}}}, "stages[0].prune.lora.rank"),
    ({"loram": {"train": {"lora": {"rank": 100000}}}}, "stages[0].loram.train.lora.rank"),
    ({"lq_lora": {"rank": 100000, "budget_bits": 4}}, "stages[0].lq_lora.rank"),
])
def test_a_rank_above_the_layers_size_is_refused(tmp_path, stage, where):
    line = one_line(("validate", recipe(tmp_path, [stage])), f"{where}: ")
    assert "is above 64, the smaller side of model.layers.0.self_attn.k_proj (64 x 256)" in line


def test_a_rank_that_fits_every_layer_passes(tmp_path):
    code, _, stderr = run("validate", recipe(tmp_path, [{"finetune": {"lora": {"rank": 64}}}]))
    assert code == 0, stderr


def test_lq_lora_after_quantize_is_refused(tmp_path):
    stages = [{"quantize": {}}, {"lq_lora": {"rank": 8, "budget_bits": 4}}]
    expected = "stages[1].lq_lora: decomposes dense weights, but every layer it selects is quantized before it (by stages[0].quantize)"
    one_line(("validate", recipe(tmp_path, stages)), expected)


@pytest.mark.parametrize("args, pattern", [
    (["--samples", "0"], "--samples: 0 is below the smallest allowed, 1"),
    (["--samples", "-1"], "--samples: -1 is below"),
    (["--seq-len", "0"], "--seq-len: 0 is below the smallest allowed, 2"),
    (["--seq-len", "1"], "--seq-len: 1 is below"),
    (["--batch-size", "0"], "--batch-size: 0 is below"),
    (["--samples", "many"], "'many' is not an integer"),
])
def test_eval_numbers_that_make_no_sense(args, pattern):
    one_line(("eval", "tiny-llama", *args), pattern)


@pytest.mark.parametrize("args, pattern", [
    (["--batch", "-1"], "--batch: -1 is below"), (["--seq", "-5"], "--seq: -5 is below"),
    (["--rank", "-8"], "--rank: -8 is below"), (["--rank", "0"], "--rank: 0 is below"),
    (["--gpu-gib", "-1"], "not a positive number of GiB"), (["--gpu-gib", "0"], "not a positive number"),
    (["--gpu-gib", "nan"], "not a positive number"), (["--gpu-gib", "inf"], "not a positive number"),
])
def test_plan_numbers_that_make_no_sense(args, pattern):
    one_line(("plan", "--model", "llama-2-7b", *args), pattern)


def test_plan_chart_names_that_cannot_be_written(tmp_path):
    one_line(("plan", "--model", "llama-2-7b", "--chart", tmp_path / "missing" / "c.png"), "does not exist")
    one_line(("plan", "--model", "llama-2-7b", "--chart", tmp_path / "chart"), "does not end in .png")
    one_line(("plan", "--model", "llama-2-7b", "--chart", tmp_path / "chart.svg"), "does not end in .png")
    one_line(("plan", "--model", "llama-2-7b", "--chart", "/proc/chart.png"), "chart.png")
    code, stdout, stderr = run("plan", "--model", "llama-2-7b", "--chart", tmp_path / "chart.png")
    assert code == 0 and (tmp_path / "chart.png").is_file(), stderr
    assert f"chart: {tmp_path / 'chart.png'}" in stdout
    assert not (tmp_path / "chart.png.png").exists()


def test_a_loss_too_large_for_exp_is_infinite_perplexity(tiny_model):
    with torch.no_grad():
        tiny_model.model.norm.weight.mul_(1e6)  # logits in the millions: mean NLL far above log(max float)
    windows = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    assert perplexity(tiny_model, windows, 2) == math.inf


def test_a_recipe_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"model: tiny-llama\noutput: out\nstages: [{eval: {}}]\n# caf\xe9\n")
    for command in ("validate", "run", "plan"):
        one_line((command, path), "not UTF-8 text (byte 0xe9 at offset")


def test_a_repeated_key_is_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: tiny-llama\noutput: out\nstages:\n  - quantize: {config: {bits: 4, bits: 8}}\n")
    one_line(("validate", path), "line 4, column 34: not valid YAML: key 'bits' appears twice in one mapping")
    path.write_text("model: tiny-llama\nmodel: smollm2-135m\noutput: out\nstages: [{eval: {}}]\n")
    one_line(("validate", path), "line 2, column 1: not valid YAML: key 'model' appears twice")


@pytest.mark.parametrize("stage, where", [
    ({"finetune": {"lr": float("inf"), "lora": {"rank": 4}}}, "stages[0].finetune.lr"),
    ({"finetune": {"lr": float("nan"), "lora": {"rank": 4}}}, "stages[0].finetune.lr"),
    ({"finetune": {"lora": {"rank": 4, "alpha": float("inf")}}}, "stages[0].finetune.lora.alpha"),
    ({"lq_lora": {"budget_bits": float("inf")}}, "stages[0].lq_lora.budget_bits"),
])
def test_infinite_or_nan_settings_are_refused(tmp_path, stage, where):
    one_line(("validate", recipe(tmp_path, [stage])), f"{where}: input should be a finite number")


def test_a_data_path_that_is_a_directory_says_so(tmp_path):
    data = {"calibration": {"path": str(tmp_path)}}
    one_line(("validate", recipe(tmp_path, [{"quantize": {}}], data=data)), "is a directory, not a file")
    stage = {"finetune": {"lora": {"rank": 4}, "data": {"path": str(tmp_path)}}}
    one_line(("validate", recipe(tmp_path, [stage])), "stages[0].finetune.data.path")
    one_line(("eval", "tiny-llama", "--data", tmp_path), "is a directory, not a file")


def test_stdlib_dot_txt_is_a_file_not_the_builtin_source():
    assert parse_source_string("stdlib.txt").kind == "file"
    assert parse_source_string("stdlib").kind == parse_source_string("stdlib:train").kind == "stdlib"
    one_line(("eval", "tiny-llama", "--data", "stdlib.txt"), "stdlib.txt does not exist")


def test_version():
    code, stdout, _ = run("--version")
    assert code == 0 and stdout.startswith("compress ")


@pytest.mark.slow
def test_overwrite_keeps_the_earlier_stages_until_the_new_model_loads(tmp_path, tiny_pair):
    out = tmp_path / "out"
    assert run_cli("run", tiny_recipe(tmp_path, "  - quantize: {config: {bits: 4, group_size: 64}}"), "--quiet").returncode == 0
    saved = sorted(p.name for p in (out / ".stages").iterdir())
    broken = tmp_path / "broken-model"
    tiny_pair[0].config.save_pretrained(broken)
    tiny_pair[1].save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # not a safetensors file
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump({"model": str(broken), "stages": [{"quantize": {}}], "output": str(out)}))
    result = run_cli("run", path, "--overwrite", "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert sorted(p.name for p in (out / ".stages").iterdir()) == saved


def test_an_unhashable_key_is_one_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: tiny-llama\noutput: out\nstages: [{eval: {}}]\n[1, 2]: 3\n")
    one_line(("validate", path), "found unhashable key")


def test_lq_lora_on_layers_left_dense_passes_and_on_none_is_refused(tmp_path):
    stages = [{"quantize": {"targets": ["re:.*mlp.*"]}},
              {"lq_lora": {"rank": 4, "budget_bits": 4.5, "targets": ["re:.*self_attn.*"]}}]
    code, _, stderr = run("validate", recipe(tmp_path, stages))
    assert code == 0, stderr
    stages[1]["lq_lora"]["targets"] = ["re:.*mlp.*"]
    one_line(("validate", recipe(tmp_path, stages)), "every layer it selects is quantized before it (by stages[0]")


def test_l4q_ranks_are_checked_on_the_layers_it_trains(tmp_path):
    stage = {"l4q": {"targets": ["re:.*mlp.*"], "lora": {"rank": 200}}}  # mlp layers are 256 wide at least
    code, _, stderr = run("validate", recipe(tmp_path, [stage]))
    assert code == 0, stderr
    stage["l4q"]["lora"]["rank"] = 300
    one_line(("validate", recipe(tmp_path, [stage])), "300 is above 256, the smaller side of model.layers.0.mlp")


def test_a_peft_adapter_given_as_a_model_says_so(tmp_path):
    from conftest import micro_llama

    from compress.checkpoint.peft import write_peft_adapter
    from compress.lowrank import LoRALinear

    layer = LoRALinear(micro_llama().model.layers[0].self_attn.q_proj, 4, 8.0)
    write_peft_adapter({"model.layers.0.self_attn.q_proj": layer}, tmp_path / "adapter")
    one_line(("eval", tmp_path / "adapter"), "a PEFT adapter, not a model")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path / "adapter"), "stages": [{"quantize": {}}],
                                    "output": str(tmp_path / "out")}))
    one_line(("validate", path), "a PEFT adapter, not a model")
