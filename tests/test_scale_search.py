"""Per-group scale search (quant/scale_search.py) against a brute-force float64 reference that
writes the candidates' rules out group by group, and its guarantee over min/max."""

import pytest
import torch

from compress.quant import QuantConfig
from compress.quant.scale_search import search_qparams, shrink_factors
from compress.quant.uniform import choose_qparams, dequantize_codes, default_g_idx, quantize_codes

FP16_SMALLEST = 2.0**-24


def reference_params(values: list[float], config: QuantConfig, factor: float) -> tuple[float, float]:
    """One group's (scale, zero) from its range shrunk by ``factor``, the rules written out in floats."""
    maxq = 2**config.bits - 1
    low, high = min(min(values), 0.0) * factor, max(max(values), 0.0) * factor
    if config.sym:
        zero = 2 ** (config.bits - 1)
        scale = max(-low / zero, high / (maxq - zero))
    else:
        scale = (high - low) / maxq
        zero = round(-low / max(scale, FP16_SMALLEST))
        if zero < 1:
            zero, scale = 1, high / (maxq - 1)
    scale = float(torch.tensor(max(scale, FP16_SMALLEST), dtype=torch.float32).to(torch.float16))
    return scale, zero


def reference_search(weight: torch.Tensor, config: QuantConfig, norm: float):
    """(scale, zero) per row and group, every candidate tried in float64, the first best kept."""
    rows, width = weight.shape
    group = config.group_size
    scales = torch.zeros(rows, -(-width // group), dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    for row in range(rows):
        for g, start in enumerate(range(0, width, group)):
            values = weight[row, start:start + group].double().tolist()
            best = None
            for factor in shrink_factors():
                scale, zero = reference_params(values, config, factor)
                error = sum(abs((min(max(round(v / scale) + zero, 0), 2**config.bits - 1) - zero) * scale - v) ** norm
                            for v in values)
                if best is None or error < best[0]:
                    best = (error, scale, zero)
            scales[row, g], zeros[row, g] = best[1], best[2]
    return scales, zeros


def group_errors(weight, scale, zero, config, norm):
    codes = quantize_codes(weight, scale, zero, config)
    restored = dequantize_codes(codes, scale, zero, default_g_idx(weight.shape[1], config))
    return ((restored.double() - weight.double()).abs() ** norm).view(weight.shape[0], -1, config.group_size).sum(-1)


@pytest.mark.parametrize("bits,sym,norm", [(4, False, 2.4), (3, True, 2.0), (2, False, 2.4)])
def test_search_matches_the_brute_force_reference(bits, sym, norm):
    g = torch.Generator().manual_seed(bits)
    weight = torch.randn(6, 64, generator=g) * 0.05
    weight[:, 5] *= 6.0  # one outlier column: shrinking pays off in its groups
    config = QuantConfig.uniform(bits, 16, sym=sym)
    scale, zero = search_qparams(weight, config, norm)
    ref_scale, ref_zero = reference_search(weight, config, norm)
    # a tie between two candidates may fall either way in float32; the kept error is then equal
    same = (scale.double() == ref_scale) & (zero.double() == ref_zero)
    ours, theirs = group_errors(weight, scale, zero, config, norm), group_errors(weight, ref_scale.half(),
                                                                                  ref_zero.int(), config, norm)
    assert same.float().mean() > 0.95, f"{int((~same).sum())} of {same.numel()} groups differ"
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("config", [QuantConfig.uniform(4, 32), QuantConfig.uniform(3, 32, sym=True),
                                    QuantConfig.uniform(2, 16)])
def test_search_is_never_worse_than_min_max_and_shrinks_ranges(config):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 128, generator=g) * 0.05
    searched = search_qparams(weight, config, 2.0)
    plain = choose_qparams(weight, config)
    ours, minmax = group_errors(weight, *searched, config, 2.0), group_errors(weight, *plain, config, 2.0)
    assert torch.all(ours <= minmax * (1 + 1e-6))
    assert float((ours < minmax).float().mean()) > 0.2 and float(ours.sum()) < float(minmax.sum())
    assert torch.all(searched[0].float() <= plain[0].float() * (1 + 1e-3))


def test_search_of_a_partial_group_ignores_its_padding():
    weight = torch.randn(4, 40, generator=torch.Generator().manual_seed(5)) * 0.05
    config = QuantConfig.uniform(4, 32)
    scale, zero = search_qparams(weight, config, 2.4)
    tail_scale, tail_zero = search_qparams(weight[:, 32:], QuantConfig.uniform(4, 8), 2.4)
    assert torch.equal(scale[:, 1:], tail_scale) and torch.equal(zero[:, 1:], tail_zero)


def test_a_norm_of_zero_is_refused():
    with pytest.raises(ValueError, match="norm"):
        search_qparams(torch.zeros(2, 8), QuantConfig.uniform(4, 8), 0.0)
