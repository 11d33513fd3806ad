"""LQ-LoRA's output-aware mode (issue 23): the H-whitened low-rank step and the output error against
float64 references built another way (symmetric square root of H by eigendecomposition, full SVD),
the cost entries, and the stage's default objective with calibration data."""

import json

import pytest
import torch

import compress
from compress.lowrank.costs import matrix_costs
from compress.lowrank.decompose import (hessian_error, low_rank_factors, lq_decompose, output_error,
                                        output_row_weights, whitening)
from compress.quant import QuantConfig, QuantizedWeight
from compress.quant.gptq import GPTQSettings, gptq_quantize
from conftest import run_cli, tiny_recipe, walk_context

GEN = torch.Generator().manual_seed(23)


def anisotropic_hessian(features: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """H = 2/n XᵀX of inputs with a few loud channels and correlated ones, as LLM activations have."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.ones(features)
    scales[torch.randperm(features, generator=generator)[: features // 16]] = 12.0
    mix = torch.eye(features) + 0.3 * torch.randn(features, features, generator=generator) / features**0.5
    x = torch.randn(tokens, features, generator=generator) * scales @ mix
    return 2 * x.T @ x / tokens


def reference_root(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The symmetric square root of the dampened H in float64 (eigendecomposition)."""
    h = hessian.double()
    h = h + damp * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=torch.float64)
    values, vectors = torch.linalg.eigh(h)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


@pytest.mark.parametrize("weighted_rows", [False, True])
def test_whitened_low_rank_step_is_the_float64_optimum(weighted_rows):
    """min ||D (A - B) H^½||_F over rank-r B is the tail of the singular values of D A H^½; the
    whitened factors (Cholesky S, randomized SVD with full oversampling) reach it and give its B."""
    a, hessian, rank = torch.randn(48, 40, generator=GEN), anisotropic_hessian(40), 6
    rows = torch.rand(48, generator=GEN) + 0.5 if weighted_rows else None
    left, right = low_rank_factors(a, rank, oversampling=34, seed=1, rows=rows, whiten=whitening(hessian, 0.01))
    root = reference_root(hessian, 0.01)
    d = torch.diag(rows.double() if weighted_rows else torch.ones(48, dtype=torch.float64))
    u, s, vh = torch.linalg.svd(d @ a.double() @ root)
    best = torch.linalg.solve(d, u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]) @ torch.linalg.inv(root)
    ours = torch.linalg.norm(d @ (a.double() - (left @ right).double()) @ root)
    assert abs(float(ours) - float(s[rank:].square().sum().sqrt())) < 1e-4 * float(ours)
    assert torch.allclose((left @ right).double(), best, atol=2e-4 * float(best.abs().max()))


def test_output_error_is_the_float64_trace():
    residual, hessian = torch.randn(24, 32, generator=GEN), anisotropic_hessian(32, seed=1)
    rows = torch.rand(24, generator=GEN) + 0.1
    r, h = residual.double(), hessian.double()
    assert output_error(hessian)(residual) == pytest.approx(float(torch.trace(r @ h @ r.T) / 2) ** 0.5, rel=1e-5)
    weighted = float(torch.trace(torch.diag(rows.double() ** 2) @ r @ h @ r.T) / 2) ** 0.5
    assert output_error(hessian, rows)(residual) == pytest.approx(weighted, rel=1e-5)
    assert hessian_error(hessian)(residual) == output_error(hessian)(residual)


def test_fisher_row_weights_are_the_kronecker_output_factor():
    """F_ij = d_i c_j (a Kronecker-factored Fisher) with H_jj = 2 c_j: the row weights² are d_i."""
    d, c = torch.rand(16, generator=GEN) + 0.1, torch.rand(20, generator=GEN) + 0.1
    hessian = torch.diag(2 * c)
    rows = output_row_weights(hessian, torch.outer(d, c))
    assert torch.allclose(rows.square(), d, rtol=1e-5)


def test_whitened_decomposition_lowers_the_output_error_at_int2():
    """The H-whitened step against the unweighted SVD, both judged and stopped by the output error
    (random 128 x 256 weight, int2 g64, rank 8): measured 0.74x."""
    weight, hessian = torch.randn(128, 256, generator=GEN) * 0.02, anisotropic_hessian(256, seed=2)
    config = QuantConfig.uniform(2, 64)
    plain = lq_decompose(weight, 8, config, iterations=5, error=hessian_error(hessian))
    whitened = lq_decompose(weight, 8, config, iterations=5, hessian=hessian)
    assert whitened.error < 0.85 * plain.error, (whitened.error, plain.error)


def test_output_cost_entries_are_the_decompositions_output_errors():
    weight, hessian = torch.randn(32, 64, generator=GEN), anisotropic_hessian(64, seed=3)
    configs = [QuantConfig.uniform(2, 32), QuantConfig.uniform(4, 64)]
    entries = matrix_costs(weight, configs, 0, hessian=hessian, gptq=GPTQSettings())
    rtn_entries = matrix_costs(weight, configs, 0, hessian=hessian)
    for config in configs:
        gptq = gptq_quantize(weight, hessian, config).quantized.dequantize()
        rtn = QuantizedWeight.quantize(weight, config).dequantize()
        assert entries[config.name][0] == pytest.approx(output_error(hessian)(weight - gptq) ** 2, rel=1e-6)
        assert rtn_entries[config.name][0] == pytest.approx(output_error(hessian)(weight - rtn) ** 2, rel=1e-6)
        assert entries[config.name][0] < rtn_entries[config.name][0]  # GPTQ's own objective
    ranked = matrix_costs(weight, configs, 4, iterations=2, hessian=hessian, gptq=GPTQSettings())
    assert all(ranked[c.name][0] < entries[c.name][0] for c in configs)


def layer0_input_hessian(model, windows) -> torch.Tensor:
    """H of layer 0's q_proj input on the float model, by a hook (independent of the stage's walk)."""
    rows = []
    projection = model.model.layers[0].self_attn.q_proj
    handle = projection.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for batch in torch.split(windows, 8):
            model(input_ids=batch)
    handle.remove()
    x = torch.cat(rows).double()
    return (2 * x.T @ x / x.shape[0]).float()


def test_stage_costs_are_output_errors_on_the_float_models_hessians(tmp_path, tiny_pair):
    """With data.calibration (and fisher: false) the ILP's entries for layer 0's q_proj are the
    output errors of RTN on the float model's Hessian, recomputed here from a forward hook."""
    from compress.models.data import token_windows
    from compress.stages.lq_lora import grid_for

    stages = "  - lq_lora: {rank: 0, budget_bits: 3.0, fisher: false}"
    recipe = compress.load_recipe(tiny_recipe(tmp_path, stages))
    result = compress.run_recipe(recipe)
    assert result.reports[1].metrics["objective"] == "output"
    model, tokenizer = tiny_pair
    spec = recipe.spec.data.calibration
    windows = token_windows(tokenizer, spec.text_source("calibration"), spec.samples, spec.seq_len)
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().float()
    configs = grid_for(recipe.stages[0].config, tuple(weight.shape))
    expected = matrix_costs(weight, configs, 0, hessian=layer0_input_hessian(model, windows))
    cached = [json.loads(p.read_text()) for p in (result.out_dir / ".cache" / "lq_lora").glob("*.json")]
    close = [entries for entries in cached if entries.keys() == expected.keys() and all(
        entries[k][0] == pytest.approx(expected[k][0], rel=1e-3) and entries[k][1] == expected[k][1] for k in expected)]
    assert len(close) == 1


@pytest.mark.parametrize("calibration, ignore, expected", [
    (True, ["lm_head"], ("output", True)), (False, ["lm_head"], ("weight", False)), (True, [], ("weight", False))])
def test_objective_and_fisher_defaults(tmp_path, tiny_pair, calibration, ignore, expected):
    """Output-aware with the Fisher when the recipe gives data.calibration and every selected linear
    is in a decoder layer (an lm_head is not); the paper's weight objective otherwise."""
    from compress.stages.lq_lora import resolved
    from compress.targets import select_linears

    path = tiny_recipe(tmp_path, f"  - lq_lora: {{rank: 0, budget_bits: 4.0, ignore: {ignore}}}")
    if not calibration:  # the default stdlib text is there, but the recipe does not ask for it
        path.write_text("".join(line for line in path.read_text().splitlines(True) if "calibration:" not in line))
    recipe = compress.load_recipe(path)
    config = recipe.stages[0].config
    names = [name for name, _ in select_linears(tiny_pair[0], config.targets, config.ignore)]
    decided = resolved(config, recipe, tiny_pair[0], names)
    assert (decided.objective, decided.fisher) == expected


def test_an_output_fisher_gives_its_own_row_weights():
    """A Fisher of the outputs (a vector [out]) is ρ itself: the row weights are its square roots."""
    rho, hessian = torch.rand(16, generator=GEN) + 0.1, anisotropic_hessian(20, seed=4)
    assert torch.allclose(output_row_weights(hessian, rho), rho.sqrt())


def test_output_fisher_by_layer_is_the_sum_of_squared_output_gradients(tmp_path, tiny_pair):
    """``fisher_by_layer(of="outputs")`` (one layer at a time, from saved activations) against one
    backward through the whole model per sample, with the outputs' gradients taken by hooks."""
    from compress.models.data import token_windows
    from compress.training.fisher_by_layer import fisher_by_layer, load_layer_fisher
    from compress.execution.walker import ResidentModel

    model, tokenizer = tiny_pair
    spec = compress.load_recipe(tiny_recipe(tmp_path, "  - eval: {}")).spec.data.calibration
    windows = token_windows(tokenizer, spec.text_source("calibration"), spec.samples, spec.seq_len)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    expected = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in modules.items()}
    for tokens in windows:  # the reference: each sample's mean next-token loss, whole model
        outputs = {}
        handles = [m.register_forward_hook(lambda m, a, y, n=n: outputs.__setitem__(n, y)) for n, m in modules.items()]
        with torch.enable_grad():
            logits = model(input_ids=tokens.view(1, -1)).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, tokens[1:])
            grads = torch.autograd.grad(loss, [outputs[n] for n in modules])
        for handle in handles:
            handle.remove()
        for name, grad in zip(modules, grads):
            expected[name] += grad.double().square().reshape(-1, grad.shape[-1]).sum(dim=0)
    units = ResidentModel(model)
    directory = fisher_by_layer(walk_context(units, windows), list(modules), tmp_path / "fisher", of="outputs")
    got = {}
    for prefix in units.layer_prefixes:
        got.update(load_layer_fisher(directory, prefix))
    assert sorted(got) == sorted(modules)
    for name in modules:
        assert got[name].shape == (modules[name].out_features,)
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-4, atol=1e-12)
    assert all(float(got[n].min()) > 0 for n in modules)


def test_the_stage_runs_with_the_output_fisher_and_refuses_it_without_the_output_objective(tmp_path):
    stages = "  - lq_lora: {rank: 0, budget_bits: 3.0, fisher: outputs}"
    result = compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages)))
    assert (result.reports[1].metrics["fisher"], result.reports[1].metrics["objective"]) == ("outputs", "output")
    refused = run_cli("validate", tiny_recipe(tmp_path, "  - lq_lora: {rank: 0, budget_bits: 3.0, objective: weight, "
                                                        "fisher: outputs}", name="weight.yaml"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "stages[0].lq_lora.fisher: outputs weights the rows of output errors" in refused.stderr
