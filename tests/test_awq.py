"""AWQ (quant/awq.py): the search against a float64 reference of the output error it minimizes, the
fold that leaves the float model unchanged (plain and Gemma-style (1 + w) norms, v_proj -> o_proj
without GQA, up_proj -> down_proj), the guard against scaling an input that an unselected module
also reads, and the stage: awq then rtn / gptq, exported in every integer format and reloaded (its
bad recipes are in test_gptq_stage's table)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

import compress
from compress.execution.layerwise import decoder_layers, first_layer_inputs, layer_input_groups, call_layer
from compress.quant import QuantConfig, QuantLinear
from compress.quant.awq import AWQSettings, prepare_layer, scaled_error, search_scales, weight_importance
from compress.targets import select_linears
from conftest import tiny_recipe

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
MODELS = {
    "llama-gqa": lambda: LlamaConfig(vocab_size=256, head_dim=16, num_key_value_heads=2, **COMMON),
    "llama-mha": lambda: LlamaConfig(vocab_size=256, head_dim=16, num_key_value_heads=4, **COMMON),
    "gemma3": lambda: Gemma3TextConfig(vocab_size=256, head_dim=16, num_key_value_heads=1, sliding_window=32, **COMMON),
}


def random_model(name: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MODELS[name]()).eval()
    with torch.no_grad():  # norms away from their init (ones / zeros), so that folding into them shows
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def first_layer(model, ignore=("lm_head",)):
    prefix, layer = decoder_layers(model)[0]
    modules = {n: m for n, m in select_linears(model, ["Linear"], list(ignore)) if n.startswith(prefix + ".")}
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    return layer, modules, first_layer_inputs(model, windows, batch=2)


def outlier_inputs(rows=512, columns=64, seed=0):
    """Activations with a few channels 20x larger than the rest (what AWQ is for)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    x[:, :4] *= 20
    return x


class Stats:
    def __init__(self, x):
        self.hessian = (2 / x.shape[0] * x.t() @ x).float()
        self.abs_mean = x.abs().mean(dim=0).float()


def test_scaled_error_is_the_output_error_in_float64():
    """tr(ΔW H ΔWᵀ) with H = 2/n XᵀX equals 2/n ||X ΔWᵀ||² computed directly in float64."""
    x = outlier_inputs()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    config = QuantConfig.uniform(3, 32)
    scales = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    rounded = compress.quant.QuantizedWeight.quantize(weight * scales, config).dequantize().double() / scales.double()
    direct = 2 / x.shape[0] * float((x @ (weight.double() - rounded).t()).square().sum())
    got = scaled_error([weight], [config], Stats(x).hessian, scales)
    assert got == pytest.approx(direct, rel=1e-4)


def test_weight_importance_against_a_hand_computation():
    weight = torch.randn(8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    groups = weight.abs().reshape(8, 2, 32)
    expected = (groups / (groups.amax(dim=2, keepdim=True) + 1e-6)).reshape(8, 64).mean(dim=0)
    torch.testing.assert_close(weight_importance([weight.float()], QuantConfig.uniform(4, 32)), expected.float())


@pytest.mark.parametrize("config", [QuantConfig.uniform(3, 32), QuantConfig.uniform(4, 32, sym=True), QuantConfig.nf(3)],
                         ids=lambda c: c.name)
def test_search_beats_plain_rounding_on_outlier_channels(config):
    """With a few large input channels the chosen scales cut the output error well below plain
    rounding's (the identity, which is also a candidate, so never above it)."""
    x = outlier_inputs()
    weights = [torch.randn(48, 64, generator=torch.Generator().manual_seed(seed)) for seed in (5, 6)]
    stats = Stats(x)
    scales, ratio = search_scales(weights, [config, config], stats, AWQSettings())
    plain = scaled_error(weights, [config, config], stats.hessian, torch.ones(64))
    best = scaled_error(weights, [config, config], stats.hessian, scales)
    assert ratio is not None and best < 0.8 * plain, (best, plain)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folding_leaves_the_float_layer_unchanged(name):
    """After prepare_layer the float layer computes the same outputs; which groups were scaled
    depends on the architecture (v_proj -> o_proj only without GQA)."""
    model = random_model(name)
    layer, modules, inputs = first_layer(model)
    before = [call_layer(layer, *entry) for entry in inputs]
    weights = {n: m.weight.detach().clone() for n, m in modules.items()}
    groups = layer_input_groups(layer, modules, inputs)
    configs = {n: QuantConfig.uniform(3, 32) for n in modules}
    prepare_layer(layer, groups, configs, AWQSettings(grid=8))
    after = [call_layer(layer, *entry) for entry in inputs]
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    changed = {n.rsplit(".", 1)[1] for n, m in modules.items() if not torch.equal(m.weight, weights[n])}
    assert {"q_proj", "gate_proj", "down_proj"} <= changed  # through the norms and up_proj
    assert ("o_proj" in changed) == (name == "llama-mha")


def test_an_input_read_outside_the_group_is_not_scaled():
    """With k_proj ignored, the norm's output is read by a module AWQ does not quantize: q/v stay
    unscaled and the norm unchanged (scaling it would change k_proj's input)."""
    model = random_model("llama-gqa")
    layer, modules, inputs = first_layer(model, ignore=("lm_head", "re:.*k_proj"))
    norm = layer.input_layernorm.weight.detach().clone()
    q = modules["model.layers.0.self_attn.q_proj"].weight.detach().clone()
    prepare_layer(layer, layer_input_groups(layer, modules, inputs), {n: QuantConfig.uniform(3, 32) for n in modules},
                  AWQSettings(grid=8))
    assert torch.equal(layer.input_layernorm.weight, norm)
    assert torch.equal(modules["model.layers.0.self_attn.q_proj"].weight, q)


def test_a_rounding_that_needs_nothing_gets_no_hessians():
    """``then: rtn``: the walk hands each input group to ``replace`` with no statistics, in the same
    groups and order as with Hessians, and the layer's outputs are the same; GPTQ declares RTN as
    what rounds where its Hessians are missing."""
    from compress.execution.layerwise import calibrate_layer
    from compress.quant.quantizers import QUANTIZERS

    layer, modules, inputs = first_layer(random_model("llama-gqa"))
    seen = {True: [], False: []}
    outputs = {hessians: calibrate_layer(layer, modules, lambda group, stats, h=hessians: seen[h].append(
        (list(group), stats)), inputs, hessians=hessians) for hessians in (True, False)}
    assert [g for g, _ in seen[True]] == [g for g, _ in seen[False]] and len(seen[False]) == 4
    assert all(stats is None for _, stats in seen[False]) and all(stats for _, stats in seen[True])
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(outputs[True], outputs[False]))
    assert QUANTIZERS["gptq"].given(None) is QUANTIZERS["rtn"] and QUANTIZERS["gptq"].given({}) is QUANTIZERS["gptq"]


AWQ = "  - quantize: {{method: awq, config: {{bits: 4, group_size: 32}}{extra}}}\n  - eval: {{}}\n{exports}"
EXPORTS = "\n".join(f"  - export: {{format: {fmt}, path: {fmt}}}" for fmt in ("gptq", "compressed-tensors", "native"))


@pytest.mark.parametrize("extra", ["", ", then: gptq, damp: 0.05"])
def test_awq_stage_exports_every_integer_format_and_reloads(tmp_path, extra):
    """awq then rtn / gptq on tiny-llama: every selected linear packed, the label says both, and
    each export's reload gives the in-memory model's logits (the export stage's own check)."""
    path = tiny_recipe(tmp_path, AWQ.format(extra=extra, exports=EXPORTS))
    result = compress.run_recipe(compress.load_recipe(path))
    stage = result.reports[1]
    then = "gptq" if "gptq" in extra else "rtn"
    assert stage.metrics["label"] == "awq int4-g32-asym" and "awq_seconds" in stage.metrics
    assert all(("gptq_loss" in row) == (then == "gptq") for row in stage.modules)
    for report in result.reports[-3:]:
        assert report.metrics["reload_max_abs_logit_diff"] == 0.0
    model = compress.load(result.out_dir / "gptq", dtype="float32")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * len(decoder_layers(model))


def test_streamed_awq_writes_the_in_memory_tensors(sharded_tiny, tmp_path):
    """Streaming one layer at a time writes the in-memory run's tensors, the norms AWQ folded its
    scales into among them."""
    from compress.checkpoint.tensors import load_tensors
    from compress.run.recipe import parse_recipe

    data = {"calibration": {"source": "stdlib", "split": "train", "samples": 4, "seq_len": 64},
            "eval": {"source": "stdlib", "split": "eval", "samples": 2, "seq_len": 64}}
    stages = [{"quantize": {"method": "awq", "then": "gptq", "config": {"bits": 4, "group_size": 64}}},
              {"export": {"format": "gptq"}}]
    for mode in ("memory", "streamed"):
        compress.run_recipe(parse_recipe({"model": str(sharded_tiny), "data": data, "stages": stages,
                                          "output": str(tmp_path / mode), "streaming": mode == "streamed"}))
    expected, got = (load_tensors(tmp_path / mode / "checkpoint") for mode in ("memory", "streamed"))
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    source = load_tensors(sharded_tiny)
    assert not torch.equal(got["model.layers.0.input_layernorm.weight"], source["model.layers.0.input_layernorm.weight"])
