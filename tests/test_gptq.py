"""GPTQ core: against an independent float64 OBQ-form reference, RTN when H = I, and the layer
output error against RTN's on the same layer and data."""

import pytest
import torch

from compress.quant import QuantConfig, QuantizedWeight
from compress.quant.gptq import GPTQSettings, HessianAccumulator, column_order, gptq_quantize, gptq_quantize_stacked
from compress.quant.scale_search import search_qparams
from compress.quant.uniform import choose_qparams, from_gptq_tensors


def correlated_inputs(rows: int, width: int, seed: int) -> torch.Tensor:
    """Token rows with correlated features and a few large channels, like a transformer's inputs
    (one distribution per width; ``seed`` draws the tokens)."""
    mixing = torch.Generator().manual_seed(width)
    mix = torch.randn(width, width, generator=mixing, dtype=torch.float64) / width**0.5
    mix += torch.eye(width, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g, dtype=torch.float64) @ mix
    x[:, :3] *= 8.0
    return x


def weight_of(out: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, width, generator=g, dtype=torch.float64) * 0.05


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x.t() @ x / x.shape[0]


def reference_order(diagonal: torch.Tensor, group: int, order: str) -> list[int]:
    """The visiting order written out with Python's sort (stable): input order, decreasing diag(H),
    or group-aware (groups by decreasing largest diag, columns inside by decreasing diag, a partial
    last group left at the end)."""
    values, width = diagonal.tolist(), diagonal.numel()
    if order == "natural":
        return list(range(width))
    if order == "activation":
        return sorted(range(width), key=lambda c: -values[c])
    whole = [list(range(start, start + group)) for start in range(0, width - group + 1, group)]
    tail = list(range(len(whole) * group, width))
    whole.sort(key=lambda columns: -max(values[c] for c in columns))
    return [c for columns in whole for c in sorted(columns, key=lambda c: -values[c])] + tail


def obq_reference(weight, hessian, config: QuantConfig, damp: float, order: str, block: int, qparams=choose_qparams):
    """GPTQ written as OBQ's explicit inverse update, column by column in float64 (no Cholesky, no
    lazy updates): returns the dequantized weight. As in GPTQ's reference code, a group's parameters
    come from the weights as they stood when the ``block`` of columns holding its first visited
    column began (with act order: from the original weights, before the loop)."""
    w, h = weight.clone().double(), hessian.clone().double()
    width, maxq = w.shape[1], 2**config.bits - 1
    group = width if config.group_size == -1 else config.group_size
    h = h + damp * h.diagonal().mean() * torch.eye(width, dtype=torch.float64)
    inverse = torch.linalg.inv(h)
    visits = reference_order(hessian.diagonal(), group, order)
    static = order == "activation" or group >= width
    params = {}
    if static:
        for start in range(0, width, group):
            params[start // group] = qparams(w[:, start:start + group], config)
    remaining = list(visits)
    for position, column in enumerate(visits):
        g = column // group
        if position % block == 0:
            at_block_start = w.clone()
        if g not in params:
            params[g] = qparams(at_block_start[:, g * group:(g + 1) * group], config)
        scale, zero = params[g][0].double()[:, 0], params[g][1].double()[:, 0]
        if config.float_zero:
            code = torch.clamp(torch.round(w[:, column] / scale + zero), 0, maxq)
        else:
            code = torch.clamp(torch.round(w[:, column] / scale) + zero, 0, maxq)
        q = (code - zero) * scale
        remaining.remove(column)
        error = (w[:, column] - q) / inverse[column, column]
        w[:, remaining] -= error.unsqueeze(1) * inverse[column, remaining].unsqueeze(0)
        w[:, column] = q
        inverse = inverse - inverse[:, column:column + 1] @ inverse[column:column + 1, :] / inverse[column, column]
    return w


@pytest.mark.parametrize("bits,group,order,sym,mse_norm", [
    (4, 16, "natural", False, 0.0), (3, 16, "natural", False, 0.0), (2, 32, "natural", False, 0.0),
    (4, -1, "natural", False, 0.0), (3, 16, "activation", False, 0.0), (4, 16, "natural", True, 0.0),
    (4, 16, "group_aware", False, 0.0), (3, 16, "group_aware", True, 0.0), (3, 24, "group_aware", False, 0.0),
    (4, 16, "natural", False, 2.4), (3, 16, "group_aware", True, 2.0)])
def test_gptq_matches_the_float64_obq_reference(bits, group, order, sym, mse_norm):
    x, w = correlated_inputs(512, 64, 0), weight_of(24, 64, 1)
    config = QuantConfig.uniform(bits, group, sym=sym)
    settings = GPTQSettings(damp=0.01, block=24, order=order, mse_norm=mse_norm, refine_rounds=0)
    ours = gptq_quantize(w, hessian_of(x), config, settings, dtype=torch.float64)
    qparams = (lambda m, c: search_qparams(m, c, mse_norm)) if mse_norm else choose_qparams
    reference = obq_reference(w, hessian_of(x), config, 0.01, order, block=24, qparams=qparams)
    dequantized = ours.quantized.dequantize().double()
    # the same codes up to rare rounding ties; every dequantized weight then agrees to fp32 precision
    mismatch = (dequantized - reference).abs() > 1e-5
    assert mismatch.float().mean() < 0.002, f"{int(mismatch.sum())} of {mismatch.numel()} weights differ"


@pytest.mark.parametrize("group", [16, 24, 64])
def test_group_aware_order_keeps_every_group_one_contiguous_run(group):
    diagonal = correlated_inputs(256, 64, 13).pow(2).mean(0).float()
    order = column_order(diagonal, group, "group_aware").tolist()
    assert order == reference_order(diagonal, group, "group_aware")
    runs = [order[start:start + group] for start in range(0, 64, group)]
    assert all(len({c // group for c in run}) == 1 for run in runs)
    assert sorted(order) == list(range(64))


def test_gptq_with_identity_hessian_is_rtn_exactly():
    w = weight_of(32, 128, 2).float()
    for config in (QuantConfig.uniform(4, 32), QuantConfig.uniform(3, -1), QuantConfig.uniform(2, 64, sym=True),
                   QuantConfig.uniform(3, 32, float_zero=True)):
        ours = gptq_quantize(w, torch.eye(128), config, GPTQSettings(block=48, refine_rounds=0))
        rtn = QuantizedWeight.quantize(w, config)
        for key, tensor in rtn.tensors.items():
            assert torch.equal(ours.quantized.tensors[key], tensor), (config.name, key)


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group,order", [(32, "natural"), (32, "activation"), (32, "group_aware"), (-1, "natural")])
def test_gptq_layer_output_error_is_below_rtn(bits, group, order):
    x = correlated_inputs(1024, 128, 3)
    w = weight_of(64, 128, 4)
    config = QuantConfig.uniform(bits, group)
    held_out = correlated_inputs(256, 128, 5)  # same distribution, different tokens
    gptq = gptq_quantize(w.float(), hessian_of(x).float(), config, GPTQSettings(order=order)).quantized.dequantize()
    rtn = QuantizedWeight.quantize(w.float(), config).dequantize()
    exact = held_out @ w.t()
    gptq_error = torch.linalg.norm(held_out @ gptq.double().t() - exact)
    rtn_error = torch.linalg.norm(held_out @ rtn.double().t() - exact)
    assert gptq_error < 0.85 * rtn_error, (float(gptq_error), float(rtn_error))


@pytest.mark.parametrize("order, refine_rounds, sym", [("group_aware", 0, True), ("activation", 1, False),
                                                        ("natural", 1, True)])
def test_stacked_gptq_is_each_matrix_alone(order, refine_rounds, sym):
    """q/k/v-like weights (one Hessian, one config) stacked into one GPTQ give every matrix the codes,
    scales, zeros and loss it gets alone (float64: rows are independent in GPTQ)."""
    x = correlated_inputs(256, 64, 21).double()
    weights = [weight_of(rows, 64, 22 + rows).double() for rows in (16, 8, 8)]
    config = QuantConfig.uniform(3, 16, sym=sym)
    settings = GPTQSettings(order=order, refine_rounds=refine_rounds, block=32)
    stacked = gptq_quantize_stacked(weights, hessian_of(x), config, settings, dtype=torch.float64)
    for weight, together in zip(weights, stacked):
        alone = gptq_quantize(weight, hessian_of(x), config, settings, dtype=torch.float64)
        assert together.quantized.shape == alone.quantized.shape == tuple(weight.shape)
        for key, tensor in alone.quantized.tensors.items():
            torch.testing.assert_close(together.quantized.tensors[key], tensor, rtol=0, atol=0, msg=key)
        assert together.loss == pytest.approx(alone.loss, rel=1e-9)
    with pytest.raises(ValueError, match="one in_features"):
        gptq_quantize_stacked([weights[0], weights[1][:, :32]], hessian_of(x), config)


def test_gptq_keeps_the_grid_and_zero_range():
    x, w = correlated_inputs(256, 64, 6), weight_of(16, 64, 7).float()
    config = QuantConfig.uniform(3, 16)
    result = gptq_quantize(w, hessian_of(x).float(), config)
    codes, scale, zero = from_gptq_tensors(result.quantized.tensors, 3, (16, 64))
    assert int(codes.max()) <= 7 and int(zero.min()) >= 1 and scale.dtype == torch.float16
    assert result.loss > 0


def test_dead_input_columns_are_zeroed_and_the_rest_still_quantize():
    x, w = correlated_inputs(256, 64, 8), weight_of(16, 64, 9).float()
    x[:, 5] = 0.0
    result = gptq_quantize(w, hessian_of(x).float(), QuantConfig.uniform(4, 16))
    dequantized = result.quantized.dequantize()
    assert torch.all(dequantized[:, 5] == 0)
    assert torch.isfinite(dequantized).all()


def test_hessian_accumulator_equals_the_batch_formula():
    x = correlated_inputs(300, 32, 10).float()
    acc = HessianAccumulator(32)
    for part in (x[:100].reshape(4, 25, 32), x[100:250], x[250:]):
        acc.add(part)
    torch.testing.assert_close(acc.hessian, hessian_of(x.double()).float(), rtol=1e-5, atol=1e-5)
    assert acc.rows == 300


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="uniform"):
        gptq_quantize(torch.zeros(4, 8), torch.eye(8), QuantConfig.nf(4, 8))
    with pytest.raises(ValueError, match="hessian shape"):
        gptq_quantize(torch.zeros(4, 8), torch.eye(6), QuantConfig.uniform(4, 8))


def test_a_singular_hessian_is_retried_with_more_damping(caplog):
    """Fewer tokens than input features and a negative-definite direction added: Cholesky fails at
    damp 0.01 and GPTQ retries with damp_increment more at a time (up to 0.05 here) instead of crashing; with no
    increment it stops with the damp it tried."""
    x, w = correlated_inputs(8, 64, 11).float(), weight_of(16, 64, 12).float()
    hessian = hessian_of(x.double()).float()
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
    hessian -= 0.05 * float(hessian.diagonal().mean()) * torch.outer(direction, direction) / direction.norm() ** 2
    with caplog.at_level("WARNING"):
        result = gptq_quantize(w, hessian, QuantConfig.uniform(4, 16), GPTQSettings(damp=0.01))
    assert "not positive definite at damp 0.01; used 0.05" in caplog.text
    assert torch.isfinite(result.quantized.dequantize()).all()
    with pytest.raises(ValueError, match="not positive definite even at damp 0.01"):
        gptq_quantize(w, hessian, QuantConfig.uniform(4, 16), GPTQSettings(damp=0.01, damp_increment=0.0))
