"""GPTQ's code and scale refinement (quant.gptq_refine) against float64 references written out
column by column and row by row, and its promise: never a larger output error than GPTQ's."""

import pytest
import torch

from compress.quant import QuantConfig
from compress.quant.gptq import GPTQSettings, gptq_quantize
from compress.quant.gptq_refine import fitted_scales, refine_codes, row_errors
from compress.quant.uniform import choose_qparams, quantize_codes

from test_gptq import correlated_inputs, hessian_of, weight_of


def rtn_start(w: torch.Tensor, config: QuantConfig, group: int):
    """RTN codes with per-group scale/zero [N, G] (float64) as a starting point."""
    scales, zeros = [], []
    for start in range(0, w.shape[1], group):
        scale, zero = choose_qparams(w[:, start:start + group], config)
        scales.append(scale.double())
        zeros.append(zero.double())
    scale, zero = torch.cat(scales, dim=1), torch.cat(zeros, dim=1)
    codes = quantize_codes(w, scale, zero, config).double()
    return codes, scale, zero


def reference_pass(w, h, codes, scale, zero, config, group):
    """One coordinate-descent pass the slow way: for each column j, R H recomputed in full, the
    target q_j + (R H)_j / H_jj, and of every code 0..2^b-1 the one whose value is nearest."""
    codes = codes.clone()
    columns = torch.arange(w.shape[1]) // group
    values = torch.arange(2**config.bits, dtype=torch.float64)
    for j in range(w.shape[1]):
        quantized = (codes - zero[:, columns]) * scale[:, columns]
        target = quantized[:, j] + ((w - quantized) @ h)[:, j] / h[j, j]
        grid = (values.unsqueeze(0) - zero[:, columns[j]].unsqueeze(1)) * scale[:, columns[j]].unsqueeze(1)
        codes[:, j] = (grid - target.unsqueeze(1)).abs().argmin(dim=1).double()
    return codes


@pytest.mark.parametrize("bits,group,sym", [(2, 16, False), (3, 16, True), (4, 24, False)])
def test_one_pass_matches_the_column_by_column_reference(bits, group, sym):
    w, h = weight_of(12, 48, 1), hessian_of(correlated_inputs(400, 48, 2))
    config = QuantConfig.uniform(bits, group, sym)
    codes, scale, zero = rtn_start(w, config, group)
    fast = refine_codes(w, h, codes, scale, zero, config, group, passes=1, block=20)  # blocks across groups
    slow = reference_pass(w, h, codes, scale, zero, config, group)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("width,group", [(48, 16), (40, 16)])  # 40: a partial last group
def test_fitted_scales_solve_each_rows_least_squares(width, group):
    w, h = weight_of(6, width, 3), hessian_of(correlated_inputs(300, width, 4))
    config = QuantConfig.uniform(3, group, False)
    codes, scale, zero = rtn_start(w, config, group)
    fitted = fitted_scales(w, h, codes, scale, zero, group, ridge=0.0)
    columns = torch.arange(width) // group
    for n in range(w.shape[0]):
        basis = torch.zeros(width, scale.shape[1], dtype=torch.float64)
        basis[torch.arange(width), columns] = codes[n] - zero[n, columns]
        root = torch.linalg.cholesky(h).t()  # ‖r‖_H = ‖root · r‖
        expected = torch.linalg.lstsq(root @ basis, root @ w[n]).solution
        torch.testing.assert_close(fitted[n], expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bits,group,sym", [(2, 16, False), (3, 32, True), (4, 16, False), (3, 40, False)])
def test_refinement_never_raises_the_error_and_lowers_it_here(bits, group, sym):
    w, x = weight_of(32, 96, 5), correlated_inputs(800, 96, 6)
    h = hessian_of(x)
    config = QuantConfig.uniform(bits, group, sym)
    plain = gptq_quantize(w, h, config, GPTQSettings(damp=0.05, refine_rounds=0), dtype=torch.float64)
    refined = gptq_quantize(w, h, config, GPTQSettings(damp=0.05, refine_rounds=2), dtype=torch.float64)
    damped = h + 0.05 * h.diagonal().mean() * torch.eye(96, dtype=torch.float64)
    before = row_errors(w, plain.quantized.dequantize(torch.float64), damped)
    after = row_errors(w, refined.quantized.dequantize(torch.float64), damped)
    assert (after <= before * (1 + 1e-6)).all()
    assert after.sum() < 0.97 * before.sum()
    undamped = lambda q: float(((w - q) @ h * (w - q)).sum())  # noqa: E731
    assert undamped(refined.quantized.dequantize(torch.float64)) < undamped(plain.quantized.dequantize(torch.float64))
    assert refined.loss == pytest.approx(float(after.sum()) / 2, rel=1e-6)
    assert refined.quantized.tensors.keys() == plain.quantized.tensors.keys()


def test_refinement_keeps_the_zeros_and_the_stored_scales_fp16():
    w, h = weight_of(16, 64, 7), hessian_of(correlated_inputs(500, 64, 8))
    config = QuantConfig.uniform(3, 32, False)
    plain = gptq_quantize(w, h, config, GPTQSettings(refine_rounds=0))
    refined = gptq_quantize(w, h, config, GPTQSettings(refine_rounds=1))
    assert torch.equal(plain.quantized.tensors["qzeros"], refined.quantized.tensors["qzeros"])
    assert refined.quantized.tensors["scales"].dtype == torch.float16
    assert (refined.quantized.tensors["scales"] > 0).all()


def test_fitted_scales_are_the_same_in_row_chunks():
    w, h = weight_of(10, 48, 9), hessian_of(correlated_inputs(300, 48, 10))
    config = QuantConfig.uniform(4, 16, True)
    codes, scale, zero = rtn_start(w, config, 16)
    whole = fitted_scales(w, h, codes, scale, zero, 16)
    chunked = fitted_scales(w, h, codes, scale, zero, 16, chunk_bytes=3 * 8 * 3 * 48)  # 3 rows at a time
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
