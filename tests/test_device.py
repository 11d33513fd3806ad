"""The compute device (issue 21): choosing it, walking units on it, whole-model placement, reports.

- ``resolve_device`` for every setting, with and without GPUs, alone and as torchrun ranks
  (LOCAL_RANK), checked against what each setting promises; ``device: cuda`` on a machine without
  CUDA fails ``compress validate`` with one line, exit 2 (runs only where CUDA is absent).
- The recipe parses ``device`` strictly and leaves it out of the resume fingerprint.
- Eval one decoder layer at a time (resident and streamed) gives the whole model's perplexity, and
  the logits export's reload check compares, bit for bit on the CPU (the same operations in the same
  order).
- GPTQ's calibration fast path: a packed layer's dense twin gives the packed forward's outputs (fp32,
  to 1e-5 relative) and the packed layers are back in place after the block.
- GPTQ's calibration activations: on the device when they fit half its free memory, else in pinned
  host memory (the rule checked on the CPU with the free bytes given; on a GPU, a GPTQ run with them
  in pinned memory writes the same tensors as one with them on the device).
- ``compress plan``'s numbers for a stage on the device and the one-line message when it does not fit.
- A run's report names the device of every stage (and the CUDA peak only on a GPU).
"""

import json

import pytest
import torch
from conftest import TINY_RECIPE, run_cli, write_recipe

import compress
from compress.errors import RecipeError
from compress.execution.device import resolve_device
from compress.quant.config import QuantConfig
from compress.run.recipe import parse_recipe

CPU, GPU0, GPU1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.mark.parametrize("setting, env, count, expected", [
    ("auto", {}, 0, CPU),
    ("auto", {"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, 0, CPU),
    ("auto", {}, 2, GPU0),
    ("auto", {"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, 2, GPU1),  # each torchrun rank its own GPU
    ("cpu", {"LOCAL_RANK": "1"}, 2, CPU),
    ("cuda", {}, 1, GPU0),
    ("cuda", {"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, 2, GPU1),
    ("cuda:1", {}, 2, GPU1),
    ("cuda:0", {"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, 2, GPU0),  # named: every rank on it
])
def test_device_settings_resolve_per_machine_and_rank(setting, env, count, expected):
    assert resolve_device(setting, env, count) == expected


@pytest.mark.parametrize("setting, env, count, message", [
    ("cuda", {}, 0, "this machine has no CUDA device"),
    ("cuda:0", {}, 0, "this machine has no CUDA device"),
    ("cuda:2", {}, 2, "this machine has 2 CUDA devices (cuda:0 to cuda:1)"),
    ("cuda", {"LOCAL_RANK": "3", "WORLD_SIZE": "4"}, 2, "(LOCAL_RANK=3): this machine has 2 CUDA devices"),
    ("auto", {"LOCAL_RANK": "x"}, 1, "LOCAL_RANK='x'"),
    ("gpu", {}, 1, "not one of auto, cpu, cuda, cuda:N"),
])
def test_impossible_devices_are_refused_with_one_line(setting, env, count, message):
    with pytest.raises(RecipeError, match=None) as caught:
        resolve_device(setting, env, count)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_recipe_parses_device_strictly_and_resume_ignores_it(tmp_path):
    base = {"model": "tiny-llama", "stages": [{"eval": {}}], "output": str(tmp_path)}
    auto, cpu = parse_recipe(base), parse_recipe(dict(base, device="cpu"))
    assert auto.spec.device == "auto" and cpu.to_dict()["device"] == "cpu"
    assert auto.fingerprint(0) == cpu.fingerprint(0)  # a run may resume on another device
    with pytest.raises(RecipeError, match="device"):
        parse_recipe(dict(base, device="tpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs where CUDA is absent: there device: cuda must be refused")
def test_device_cuda_without_cuda_fails_validate_with_one_line(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", TINY_RECIPE.format(stages="  - eval: {}", output=tmp_path / "out")
                          + "device: cuda\n")
    result = run_cli("validate", recipe)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "device: cuda: this machine has no CUDA device" in lines[0]
    assert not (tmp_path / "out").exists()


def test_eval_one_layer_at_a_time_equals_the_whole_model(tiny_pair, sharded_tiny):
    from compress.models.data import token_windows
    from compress.execution.evaluate import perplexity, perplexity_by_units
    from compress.execution.streaming import StreamedModel
    from compress.models.text_specs import SourceSpec
    from compress.execution.walker import ResidentModel

    model, tokenizer = tiny_pair
    spec = SourceSpec(source="stdlib", split="eval", samples=5, seq_len=48)
    windows = token_windows(tokenizer, spec.text_source("eval"), spec.samples, spec.seq_len)
    whole = perplexity(model, windows, batch_size=2)
    assert perplexity_by_units(ResidentModel(model), windows, batch_size=2) == whole
    assert perplexity_by_units(StreamedModel.open(sharded_tiny, "float32"), windows, batch_size=2) == whole


def test_logits_one_layer_at_a_time_equal_the_whole_models(tiny_model):
    """What export's reload check uses when a model does not fit the device."""
    from compress.models.chunked_loss import head_logits
    from compress.execution.evaluate import hidden_by_units
    from compress.execution.walker import ResidentModel

    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = tiny_model(input_ids=tokens, use_cache=False).logits
        by_units = hidden_by_units(ResidentModel(tiny_model), tokens,
                                   lambda model, states: head_logits(model, states).cpu())
    assert torch.equal(by_units, whole)


def test_a_packed_layers_dense_twin_computes_its_forward(tiny_model):
    from compress.execution.layerwise import dequantized
    from compress.quant import QuantConfig, QuantLinear

    layer = tiny_model.model.layers[0]
    packed = QuantLinear.quantize(layer.mlp.down_proj, QuantConfig.uniform(3, 32))
    layer.mlp.down_proj = packed
    x = torch.randn(3, 7, packed.in_features, generator=torch.Generator().manual_seed(0))
    expected = packed(x)
    with dequantized(layer, torch.float32):
        twin = layer.mlp.down_proj
        assert type(twin) is torch.nn.Linear and not twin.weight.requires_grad
        got = twin(x)
    assert layer.mlp.down_proj is packed
    reference = x.double() @ packed.dequantize(torch.float64).t()  # independent: float64
    assert float((got.double() - reference).norm() / reference.norm()) < 1e-6
    assert float((expected.double() - reference).norm() / reference.norm()) < 1e-6


def test_plan_numbers_for_a_stage_and_the_message_when_it_does_not_fit(tmp_path):
    from compress.execution.placement import stage_need, unfit_message

    recipe = parse_recipe({"model": "tiny-llama", "stages": [{"finetune": {"steps": 2, "batch_size": 4}}, {"eval": {}}],
                           "output": str(tmp_path)})
    need, detail = stage_need(recipe, 0, model_bytes=1 << 20)
    small, _ = stage_need(parse_recipe(dict(recipe.to_dict(), stages=[{"finetune": {"steps": 2, "batch_size": 1}}])),
                          0, model_bytes=1 << 20)
    assert need > small > 1 << 20  # activations grow with the batch, above the model's own bytes
    assert detail.startswith("finetune") and "activations" in detail
    message = unfit_message("stages[0].finetune", torch.device("cuda", 0), 3 * 2**30, 2**30, detail)
    assert message.startswith("stages[0].finetune: needs about 3.00 GiB on cuda:0 by compress plan (")
    assert "1.00 GiB free: lower batch_size, set gradient_checkpointing: true, or run with device: cpu" in message


def test_the_report_names_each_stages_device(tmp_path):
    stages = [{"quantize": {"config": {"bits": 4, "group_size": 32}}}, {"eval": {}}]
    data = {"calibration": {"source": "stdlib", "split": "train", "samples": 2, "seq_len": 32},
            "eval": {"source": "stdlib", "split": "eval", "samples": 2, "seq_len": 32}}
    result = compress.run_recipe(parse_recipe({"model": "tiny-llama", "data": data, "stages": stages,
                                               "output": str(tmp_path / "out"), "device": "cpu"}))
    report = json.loads(result.report_json.read_text())
    assert report["header"]["device"] == "cpu"
    assert [s["device"] for s in report["stages"]] == ["cpu"] * 3
    assert all(s["peak_cuda_mib"] is None for s in report["stages"])
    assert "| cpu |" in result.report_md.read_text()


def test_calibration_activations_leave_the_device_only_when_they_do_not_fit(tiny_model, monkeypatch):
    from compress.execution import placement
    from compress.execution.layerwise import ACTIVATION_SHARE, ActivationHome

    windows = torch.zeros(8, 64, dtype=torch.long)
    need = 2 * windows.numel() * tiny_model.config.hidden_size * 4  # in and out of a layer, fp32
    monkeypatch.setattr(placement, "free_bytes", lambda device: int(need / ACTIVATION_SHARE))
    assert not ActivationHome.for_windows(tiny_model, windows, GPU0).pinned
    monkeypatch.setattr(placement, "free_bytes", lambda device: int(need / ACTIVATION_SHARE) - 1)
    assert ActivationHome.for_windows(tiny_model, windows, GPU0).pinned
    assert not ActivationHome.for_windows(tiny_model, windows, CPU).pinned  # the host is the device
    home = ActivationHome(CPU)
    entry = ((torch.ones(2),), {"position_embeddings": (torch.ones(1), torch.zeros(1)), "use_cache": False})
    assert home.store(entry) is entry and home.load(entry) is entry


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pinned host memory")
def test_gptq_with_activations_in_pinned_host_memory_writes_the_same_tensors(tmp_path, monkeypatch):
    from compress.execution import layerwise
    from compress.checkpoint.tensors import load_tensors

    stages = [{"quantize": {"method": "gptq", "config": {"bits": 4, "group_size": 32}}}, {"export": {"format": "native"}}]
    data = {"calibration": {"source": "stdlib", "split": "train", "samples": 4, "seq_len": 32}}
    tensors = {}
    for share in (layerwise.ACTIVATION_SHARE, 0.0):  # 0: nothing fits, every batch is copied in and out
        monkeypatch.setattr(layerwise, "ACTIVATION_SHARE", share)
        out = tmp_path / f"share-{share}"
        compress.run_recipe(parse_recipe({"model": "tiny-llama", "data": data, "stages": stages, "output": str(out),
                                          "device": "cuda"}))
        tensors[share] = load_tensors(out / "checkpoint")
    on_device, pinned = tensors.values()
    assert sorted(on_device) == sorted(pinned)
    assert all(torch.equal(on_device[name], pinned[name]) for name in on_device)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [QuantConfig.uniform(b, 32, sym) for b in (2, 3, 4, 8) for sym in (False, True)]
                         + [QuantConfig.uniform(3, 32, float_zero=True)], ids=lambda c: getattr(c, "name", c))
def test_rtn_scales_are_correctly_rounded_divisions_on_every_device(device, config):
    """Scales are (range / maxq) correctly rounded, as float64 division rounded to fp32 gives it (exact
    for fp32 operands), on the CPU and on CUDA alike. On a GPU, dividing by a Python number is a
    multiplication by its rounded reciprocal: the first H200 run of the GPU check found RTN's codes
    different from the CPU's in 493 tensors of SmolLM2 that way."""
    from compress.quant.uniform import choose_qparams, group_view

    weight = torch.randn(2048, 4096, generator=torch.Generator().manual_seed(3)) * 0.05  # 262144 groups:
    scale, _ = choose_qparams(weight.to(device), config)  # a reciprocal's ulp moves ~20 fp16 scales
    low, high = torch.aminmax(group_view(weight, 32), dim=2)
    maxq = 2**config.bits - 1
    if config.float_zero:
        expected = ((high - low).double() / maxq).float()
    elif config.sym:
        return  # sym divides by tensors (zero and maxq - zero): true division everywhere already
    else:
        low, high = low.clamp(max=0), high.clamp(min=0)
        expected = ((high - low).double() / maxq).float()
        shifted = torch.round(-low / expected.clamp(min=2.0**-24)) < 1
        expected = torch.where(shifted, (high.double() / (maxq - 1)).float(), expected)
    assert torch.equal(scale.cpu(), expected.clamp(min=2.0**-24).to(torch.float16))


def test_the_fisher_of_a_layer_is_loaded_on_the_units_device(tmp_path):
    """LQ-LoRA's Fisher meets its weight and Hessian on the unit's device (the first H200 run of the
    GPU check stopped on a CPU Fisher against CUDA weights in the low-rank step)."""
    from compress.checkpoint.tensors import write_safetensors
    from compress.training.fisher_by_layer import fisher_file, load_layer_fisher

    write_safetensors(fisher_file(tmp_path, "model.layers.0"), {"model.layers.0.mlp.up_proj": torch.ones(4, 3)},
                      metadata={})
    fisher = load_layer_fisher(tmp_path, "model.layers.0", "meta")
    assert list(fisher) == ["model.layers.0.mlp.up_proj"] and fisher["model.layers.0.mlp.up_proj"].is_meta
    assert torch.equal(load_layer_fisher(tmp_path, "model.layers.0")["model.layers.0.mlp.up_proj"], torch.ones(4, 3))
    assert load_layer_fisher(tmp_path, "model.layers.1", "meta") == {}
