"""lq_lora's ``measured_windows`` (``compress.stages.lq_lora_measured``): the chunked KL against a
float64 one from whole logits, the factors and the rescaled table, the stage's probe and factor for a
layer recomputed here from a plain forward with hooks, and the recipes it refuses."""

import copy

import pytest
import torch

import compress
from compress.lowrank.costs import probe_factors, rescaled_costs
from compress.lowrank.decompose import output_error
from compress.models.chunked_loss import kl_sum, last_hidden
from compress.quant import QuantConfig, QuantizedWeight
from conftest import micro_llama, run_cli, tiny_recipe, write_recipe

GEN = torch.Generator().manual_seed(40)


def float64_kl(model, reference_hidden: torch.Tensor, hidden: torch.Tensor) -> float:
    """Σ over positions of KL(p_reference || p) from whole [b, s, vocab] logits in float64."""
    head = model.get_output_embeddings().weight.detach().double()
    reference = torch.log_softmax(reference_hidden.double() @ head.T, dim=-1)
    other = torch.log_softmax(hidden.double() @ head.T, dim=-1)
    return float((reference.exp() * (reference - other)).sum())


@pytest.mark.parametrize("budget", [None, 4096])  # one slice; one position per slice
def test_kl_sum_is_the_float64_kl(budget):
    model = micro_llama()
    ids = torch.randint(0, 512, (2, 12), generator=GEN)
    with torch.no_grad():
        reference = last_hidden(model, ids)
    perturbed = reference + 0.3 * torch.randn(reference.shape, generator=GEN)
    expected = float64_kl(model, reference, perturbed)
    assert expected > 0
    assert kl_sum(model, perturbed, reference, budget) == pytest.approx(expected, rel=1e-4)
    assert kl_sum(model, reference, reference, budget) == pytest.approx(0.0, abs=1e-5)


def test_factors_cover_every_width_and_rescale_only_the_errors():
    measured = {"layers.0": {2: 0.4, 3: 0.1, 4: 0.02}, "layers.1": {2: -1e-9, 3: 0.3}}
    predicted = {"layers.0": {2: 0.2, 3: 0.05, 4: 0.0}, "layers.1": {2: 0.1, 3: 0.1}}
    factors = probe_factors(measured, predicted, [2, 3, 4, 8])
    assert factors["layers.0"] == {2: 2.0, 3: 2.0, 4: 1.0, 8: 1.0}  # 0 predicted: kept; 8 takes 4's
    assert factors["layers.1"] == {2: 0.0, 3: pytest.approx(3.0), 4: pytest.approx(3.0), 8: pytest.approx(3.0)}
    table = {"layers.0.q": {"int2": (1.5, 100), "int8": (0.25, 400)}}
    rescaled = rescaled_costs(table, lambda matrix, config: {"int2": 2.0, "int8": 10.0}[config])
    assert rescaled == {"layers.0.q": {"int2": (3.0, 100), "int8": (2.5, 400)}}
    assert probe_factors({"a": {3: 1.0}}, {"a": {3: 0.5}}, [2, 3])["a"] == {2: 2.0, 3: 2.0}  # narrowest above


def layer0_hessians(model, windows) -> dict[str, torch.Tensor]:
    """H = 2/n XᵀX of each layer-0 linear's input on the float model, by hooks."""
    layer, rows = model.model.layers[0], {}
    names = {f"model.layers.0.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: rows.setdefault(n, []).append(a[0].flatten(0, 1)))
               for n, m in names.items()]
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    return {n: (2 * torch.cat(x).double().T @ torch.cat(x).double() / sum(len(p) for p in x)).float()
            for n, x in rows.items()}


def cheapest(bits: int, in_features: int) -> QuantConfig:
    return QuantConfig.uniform(bits, max(g for g in (32, 64, 128) if in_features % g == 0))


def test_stage_probe_and_factor_recomputed_for_layer_0s_qkv(tmp_path, tiny_pair):
    """measured_windows: 2 (RTN, fisher: false): the 2-bit probe of layer 0's q/k/v is the mean KL
    over the first two calibration windows of the float model against it with q, k and v at RTN int2
    (the largest whole group), from a plain forward; its factor is that over their output errors' sum."""
    from compress.models.data import token_windows

    stages = "  - lq_lora: {rank: 0, budget_bits: 3.0, fisher: false, measured_windows: 2}"
    recipe = compress.load_recipe(tiny_recipe(tmp_path, stages))
    result = compress.run_recipe(recipe)
    metrics = result.reports[1].metrics
    model, tokenizer = tiny_pair
    spec = recipe.spec.data.calibration
    windows = token_windows(tokenizer, spec.text_source("calibration"), spec.samples, spec.seq_len)
    layers = len(model.model.layers)
    assert len(metrics["measured_kl"]) == 4 * layers  # q/k/v, o, gate/up, down
    assert all(sorted(v) == [2, 3, 4] for v in metrics["measured_kl"].values())
    assert all(f[8] == f[4] for f in metrics["measured_factors"].values())
    cache = result.out_dir / ".cache" / "lq_lora_measured"
    assert len(list(cache.glob("*.json"))) == 3 * 4 * layers
    assert len(list((cache / "references").glob("*.safetensors"))) == 7 * layers

    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    hessians, probe, predicted = layer0_hessians(model, windows), copy.deepcopy(model), 0.0
    for name in qkv:
        linear = probe.get_submodule(name)
        quantized = QuantizedWeight.quantize(linear.weight.detach(), cheapest(2, linear.in_features)).dequantize()
        predicted += output_error(hessians[name])(linear.weight.detach() - quantized) ** 2
        linear.weight.data = quantized
    with torch.no_grad():
        reference, changed = last_hidden(model, windows[:2]), last_hidden(probe, windows[:2])
    expected = float64_kl(model, reference, changed) / windows[:2].numel()
    assert metrics["measured_kl"]["+".join(qkv)][2] == pytest.approx(expected, rel=1e-3)
    assert metrics["measured_factors"]["+".join(qkv)][2] == pytest.approx(expected / predicted, rel=2e-3)


def test_recipes_that_cannot_measure_fail_at_validate_with_one_line(tmp_path, sharded_tiny):
    weight = tiny_recipe(tmp_path, "  - lq_lora: {rank: 0, budget_bits: 3.0, objective: weight, measured_windows: 2}")
    refused = run_cli("validate", weight)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "stages[0].lq_lora.measured_windows: rescales the output objective's costs" in refused.stderr
    text = (f"model: {sharded_tiny}\nstreaming: true\ndata:\n  calibration: {{source: stdlib, samples: 4, seq_len: 64}}\n"
            f"stages:\n  - lq_lora: {{rank: 0, budget_bits: 3.0, measured_windows: 2}}\noutput: {tmp_path / 'out'}\n")
    streamed = run_cli("validate", write_recipe(tmp_path / "streamed.yaml", text))
    assert streamed.returncode == 2 and len(streamed.stderr.strip().splitlines()) == 1, streamed.stderr
    assert "does not run with streaming: true: measured_windows probes the whole model" in streamed.stderr
    assert not (tmp_path / "out").exists()
