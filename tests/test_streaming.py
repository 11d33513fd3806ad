"""Streaming (``streaming: true``): stages hold one decoder layer at a time.

- On tiny-llama saved as a sharded Hugging Face directory, streamed RTN and GPTQ quantize + GPTQ
  export write exactly the tensors the in-memory run writes (torch.equal on every tensor), and the
  reloaded checkpoints give identical logits.
- Streamed LQ-LoRA (RTN and GPTQ quantizers, ranks 0/4/8, with and without Fisher) + export (PEFT
  adapter, embedded adapter, GPTQ) writes exactly the in-memory run's tensors and adapters.
- The Fisher computed layer by layer (forward with saved activations, then backward one layer at a
  time) equals ``empirical_fisher``'s backward through the whole model, bit for bit.
- A streamed run resumes from its saved stage: the export reads the quantize stage's shards.
- A streamed eval (and its baseline) scores one decoder layer at a time, to the in-memory perplexity.
- Recipes that cannot stream exit 2 with one line naming the stage.
- At scale (slow): a synthetic Llama of 1.54 B parameters (22 layers of 60.8 M, random bf16 weights in
  one shard per layer) is quantized (RTN int4 g128) and exported as GPTQ in fp32 with the process's
  peak RSS (the kernel's high-water mark, exact) above its pre-run baseline below three of its decoder layers in fp32
  (3 x 243 MB): the model itself is 6.2 GB in fp32.
"""

import json
import platform
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from conftest import ROOT, logits, run_cli, walk_context, write_recipe

import compress
from compress.checkpoint.tensors import load_tensors
from compress.models.synthetic import layer_shapes, parameter_count, write_synthetic_llama
from compress.run.recipe import parse_recipe

DATA = {"calibration": {"source": "stdlib", "split": "train", "samples": 4, "seq_len": 64},
        "eval": {"source": "stdlib", "split": "eval", "samples": 2, "seq_len": 64}}


def recipe(model_dir, out, stages, streaming=True):
    return parse_recipe({"model": str(model_dir), "data": DATA, "stages": stages, "output": str(out),
                         "streaming": streaming})


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_run_writes_the_in_memory_tensors(sharded_tiny, tmp_path, method, probe_ids):
    stages = [{"quantize": {"method": method, "config": {"bits": 4, "group_size": 64},
                            "overrides": {"re:.*down_proj$": {"bits": 8}}}}, {"export": {"format": "gptq"}}]
    in_memory = compress.run_recipe(recipe(sharded_tiny, tmp_path / "memory", stages, streaming=False))
    streamed = compress.run_recipe(recipe(sharded_tiny, tmp_path / "streamed", stages))
    expected, got = load_tensors(tmp_path / "memory" / "checkpoint"), load_tensors(tmp_path / "streamed" / "checkpoint")
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    # one shard per unit: embeddings, final norm (the tied head shares the embeddings), 4 layers
    assert len(list((tmp_path / "streamed" / "checkpoint").glob("model-*-of-00006.safetensors"))) == 6
    assert torch.equal(logits(compress.load(tmp_path / "streamed" / "checkpoint"), probe_ids),
                       logits(compress.load(tmp_path / "memory" / "checkpoint"), probe_ids))
    quantize = streamed.reports[1]
    assert quantize.metrics["bits_per_param"] == in_memory.reports[1].metrics["bits_per_param"]
    assert len(quantize.modules) == 28


@pytest.mark.parametrize("lq_lora, export", [
    ({"rank": 8, "budget_bits": 3.5, "iterations": 2}, {"format": "native"}),  # base + PEFT adapter
    ({"rank": 4, "budget_bits": 3.5, "iterations": 2, "fisher": True}, {"format": "native", "adapters": "embed"}),
    ({"rank": 0, "budget_bits": 3.0, "quantizer": "gptq"}, {"format": "gptq"}),
])
def test_streamed_lq_lora_writes_the_in_memory_tensors(sharded_tiny, tmp_path, lq_lora, export):
    stages = [{"lq_lora": lq_lora}, {"export": export}]
    in_memory = compress.run_recipe(recipe(sharded_tiny, tmp_path / "memory", stages, streaming=False))
    streamed = compress.run_recipe(recipe(sharded_tiny, tmp_path / "streamed", stages))
    expected, got = (load_tensors(tmp_path / run / "checkpoint") for run in ("memory", "streamed"))
    assert sorted(got) == sorted(expected) and all(torch.equal(got[name], expected[name]) for name in expected)
    peft = lq_lora["rank"] > 0 and export.get("adapters") != "embed"
    assert (tmp_path / "streamed" / "checkpoint-adapter").is_dir() == peft
    if peft:
        expected, got = (load_file(str(tmp_path / run / "checkpoint-adapter" / "adapter_model.safetensors"))
                         for run in ("memory", "streamed"))
        assert sorted(got) == sorted(expected) and all(torch.equal(got[name], expected[name]) for name in expected)
    for key in ("bits_per_param", "bits_per_param_with_adapters_16bit"):
        assert streamed.reports[1].metrics[key] == in_memory.reports[1].metrics[key]
    assert [m["config"] for m in streamed.reports[1].modules] == [m["config"] for m in in_memory.reports[1].modules]


def test_streamed_eval_scores_one_layer_at_a_time_as_in_memory(sharded_tiny, tmp_path):
    stages = [{"quantize": {"config": {"bits": 4, "group_size": 64}}}, {"eval": {}}]
    in_memory = compress.run_recipe(recipe(sharded_tiny, tmp_path / "memory", stages, streaming=False))
    streamed = compress.run_recipe(recipe(sharded_tiny, tmp_path / "streamed", stages))
    for index in (0, 2):  # the baseline, then the quantized model
        assert streamed.reports[index].metrics["perplexity"] == in_memory.reports[index].metrics["perplexity"]
    assert any("one decoder layer at a time" in note for note in streamed.reports[2].notes)


@pytest.mark.parametrize("source", ["streamed", "resident"])
def test_fisher_by_layer_equals_the_whole_model_backward(sharded_tiny, tmp_path, source):
    """Forward and backward one layer at a time give the Fisher of one backward through the model,
    from either source of units."""
    from compress.models.data import token_windows
    from compress.lowrank.fisher import empirical_fisher
    from compress.models.sources import load_model, resolve_model
    from compress.training.fisher_by_layer import fisher_by_layer, load_layer_fisher
    from compress.execution.streaming import StreamedModel
    from compress.execution.walker import ResidentModel

    model, tokenizer = load_model(resolve_model(str(sharded_tiny)), "float32")
    spec = recipe(sharded_tiny, tmp_path, [{"eval": {}}]).spec.data.calibration
    windows = token_windows(tokenizer, spec.text_source("calibration"), spec.samples, spec.seq_len)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    expected = empirical_fisher(model, windows, [f"{n}.weight" for n in names])
    units = StreamedModel.open(sharded_tiny, "float32") if source == "streamed" else ResidentModel(model)
    directory = fisher_by_layer(walk_context(units, windows), names, tmp_path / "fisher")
    got = {}
    for prefix in units.layer_prefixes:
        got.update(load_layer_fisher(directory, prefix))
    assert sorted(got) == sorted(names)
    assert not (directory / "activations-rank0").exists()
    for name in names:
        assert torch.equal(got[name], expected[f"{name}.weight"].float()), name  # the same operations, in the same order


def test_streamed_run_resumes_from_its_saved_stage(sharded_tiny, tmp_path):
    quantize = {"quantize": {"config": {"bits": 4, "group_size": 64}}}
    compress.run_recipe(recipe(sharded_tiny, tmp_path / "out", [quantize]))
    state = tmp_path / "out" / ".stages" / "00-quantize" / "model"
    assert (state / "model.safetensors.index.json").is_file()
    resumed = compress.run_recipe(recipe(sharded_tiny, tmp_path / "out", [quantize, {"export": {"format": "native"}}]),
                                  resume=True)
    assert resumed.resumed_after == 0 and [r.name for r in resumed.reports][-1] == "export"
    written, saved = load_tensors(tmp_path / "out" / "checkpoint"), load_tensors(state)
    assert sorted(written) == sorted(saved) and all(torch.equal(written[n], saved[n]) for n in saved)


@pytest.mark.parametrize("stages, model, message", [
    ("  - quantize: {}\n  - finetune: {steps: 1}", None,
     r"stages\[1\]\.finetune: does not run with streaming: true \(stages that stream: eval, export, lq_lora, quantize\)"),
    ("  - quantize: {}\n  - export: {format: hf}", None, r"stages\[1\]\.export: does not run with streaming: true: format hf"),
    ("  - quantize: {}", "tiny-llama", r"streaming: true reads a model's safetensors files .*'tiny-llama' is a builtin model"),
])
def test_recipes_that_cannot_stream_fail_with_one_line(sharded_tiny, tmp_path, stages, model, message):
    import re

    text = (f"model: {model or sharded_tiny}\nstreaming: true\nstages:\n{stages}\noutput: {tmp_path / 'out'}\n")
    result = run_cli("run", write_recipe(tmp_path / "recipe.yaml", text))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; elsewhere nothing is set")
def test_a_streamed_run_fixes_glibcs_mmap_threshold():
    """In a fresh process (the setting is process-wide): glibc takes the fixed threshold, so freed
    layers go back to the OS instead of fragmenting its heap."""
    code = "from compress.execution.memory import fix_mmap_threshold; print(fix_mmap_threshold())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "True", result.stderr


@pytest.mark.slow
def test_1_5b_model_streams_within_three_layers_of_memory(tmp_path):
    model_dir = tmp_path / "synthetic-1.5b"
    config = write_synthetic_llama(model_dir, "1.5b")
    params = parameter_count(config)
    assert 1.45e9 < params < 1.6e9
    layer_bytes = 4 * sum(torch.Size(shape).numel() for shape in layer_shapes(config).values())  # fp32
    text = (f"model: {model_dir}\nstreaming: true\ndtype: float32\nstages:\n"
            "  - quantize: {method: rtn, config: {bits: 4, group_size: 128}}\n"
            "  - export: {format: gptq}\n"
            f"output: {tmp_path / 'out'}\n")
    measured = tmp_path / "rss.json"
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "peak_rss.py"), str(measured), "run",
                             str(write_recipe(tmp_path / "recipe.yaml", text)), "--quiet"],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    rss = json.loads(measured.read_text())
    growth = (rss["peak_mib"] - rss["baseline_mib"]) * 2**20
    stages = json.loads((tmp_path / "out" / "report.json").read_text())["stages"]
    peaks = {s["name"]: round(s["peak_rss_mib"] - rss["baseline_mib"]) for s in stages}
    print(f"peak RSS growth {growth / 2**20:.0f} MiB (by stage {peaks}); one fp32 layer {layer_bytes / 2**20:.0f} MiB; "
          f"model {4 * params / 2**30:.1f} GiB in fp32", file=sys.stderr)
    assert growth < 3 * layer_bytes, peaks
    info = compress.inspect(tmp_path / "out" / "checkpoint")
    assert sum(row["format"] == "uniform" for row in info["modules"]) == 7 * config["num_hidden_layers"]
    assert info["bits_per_param"] == pytest.approx(4 + (16 + 4) / 128)  # codes, an fp16 scale and a 4-bit zero per group
