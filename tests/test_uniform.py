"""Uniform affine RTN against an independent float64 reference written from the stated rules."""

import pytest
import torch

from compress.quant import QuantConfig, QuantizedWeight
from compress.quant.uniform import choose_qparams, from_gptq_tensors


def reference_rtn(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Float64, one group at a time: GPTQ's range rule, zero >= 1 (v1), fp16 scales."""
    w = weight.double()
    maxq = 2**config.bits - 1
    group = weight.shape[1] if config.group_size == -1 else config.group_size
    out = torch.empty_like(w)
    for n in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            g = w[n, start:start + group]
            low, high = min(float(g.min()), 0.0), max(float(g.max()), 0.0)
            if config.sym:
                zero = 2 ** (config.bits - 1)
                scale = max(-low / zero, high / (maxq - zero))
            else:
                scale = (high - low) / maxq
                zero = round(-low / max(scale, 2**-24))
                if zero < 1:
                    zero, scale = 1, high / (maxq - 1)
            scale = float(torch.tensor(max(scale, 2**-24)).half())
            codes = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
            out[n, start:start + group] = (codes - zero) * scale
    return out


CONFIGS = [QuantConfig.uniform(b, g, s) for b in (2, 3, 4, 8) for g, s in ((32, False), (64, True), (-1, False))]
CONFIGS += [QuantConfig.uniform(4, 48, False), QuantConfig.uniform(3, 40, True)]  # partial last group of 100


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_matches_float64_reference(config):
    weight = torch.randn(24, 100, generator=torch.Generator().manual_seed(config.bits)) * 0.05
    ours = QuantizedWeight.quantize(weight, config).dequantize().double()
    expected = reference_rtn(weight, config)
    differ = (ours - expected).abs() > 1e-6 * weight.abs().max()
    # a value exactly halfway between two levels may round either way in fp32 vs fp64: allow a few
    assert differ.float().mean() < 2e-3, f"{int(differ.sum())} elements differ"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_error_within_one_step(config):
    weight = torch.randn(16, 100, generator=torch.Generator().manual_seed(1))
    quantized = QuantizedWeight.quantize(weight, config)
    codes, scale, zero = from_gptq_tensors(quantized.tensors, config.bits, weight.shape)
    assert int(zero.min()) >= 1, "GPTQ v1 cannot store zero = 0"
    group = 100 if config.group_size == -1 else config.group_size
    step = scale.float().repeat_interleave(group, dim=1)[:, :100]
    error = (quantized.dequantize() - weight).abs()
    bound = 0.5 if config.sym else 1.0  # asym: the rounded zero may clip the extreme by half a step
    assert bool((error <= step * (bound + 1e-2)).all())


def test_sym_never_clips_and_asym_zero_shift():
    positive = torch.rand(4, 64, generator=torch.Generator().manual_seed(2)) + 0.5  # every group >= 0.5
    config = QuantConfig.uniform(4, 32, sym=False)
    scale, zero = choose_qparams(positive, config)
    assert bool((zero == 1).all()), "an all-positive group gets zero = 1 (v1 stores zero - 1)"
    error = (QuantizedWeight.quantize(positive, config).dequantize() - positive).abs()
    assert float(error.max()) <= 0.5 * float(scale.float().max()) * 1.01


def test_zero_group_and_more_bits_less_error():
    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(4))
    weight[:, :32] = 0
    errors = []
    for bits in (2, 3, 4, 8):
        restored = QuantizedWeight.quantize(weight, QuantConfig.uniform(bits, 32)).dequantize()
        assert torch.equal(restored[:, :32], torch.zeros(8, 32))
        errors.append(float((restored - weight).norm()))
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_float_zero_rtn_matches_float64_reference(bits):
    """float_zero: each group's own [min, max] onto [0, maxq], fp16 scale and unrounded fp16 zero,
    code = round(w / scale + zero); against a float64 loop, and never worse than integer zeros."""
    weight = torch.randn(12, 128, generator=torch.Generator().manual_seed(bits)) * 0.05 + 0.02
    config = QuantConfig.uniform(bits, 32, float_zero=True)
    ours = QuantizedWeight.quantize(weight, config)
    assert set(ours.tensors) == {"qweight", "zeros", "scales", "g_idx"} and ours.tensors["zeros"].dtype == torch.float16
    maxq, expected = 2**bits - 1, torch.empty(12, 128, dtype=torch.float64)
    for n in range(12):
        for start in range(0, 128, 32):
            g = weight[n, start:start + 32].double()
            scale = float(torch.tensor((float(g.max()) - float(g.min())) / maxq).half())
            zero = float(torch.tensor(-float(g.min()) / scale).half())
            codes = torch.clamp(torch.round(g / scale + zero), 0, maxq)
            expected[n, start:start + 32] = (codes - zero) * scale
    differ = (ours.dequantize().double() - expected).abs() > 1e-6 * weight.abs().max()
    assert differ.float().mean() < 2e-3, f"{int(differ.sum())} elements differ"
    integer = QuantizedWeight.quantize(weight, QuantConfig.uniform(bits, 32)).dequantize()
    assert (ours.dequantize() - weight).pow(2).mean() <= (integer - weight).pow(2).mean()


def gptqmodel_v1_words(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Python-int reference for the qzeros GPTQModel writes: the zeros laid out as one little-endian
    bit stream per group row (field i at bits [b*i, b*i + b)), cut into int32 words; 2/4/8 bits then
    subtract a 1 from every field of each whole word (borrows cross fields), 3 bits subtract 1 from
    each field modulo 8."""
    rows = []
    for row in zeros.tolist():
        if bits == 3:
            row = [(z - 1) % 8 for z in row]
        stream = sum(z << (bits * i) for i, z in enumerate(row))
        words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(-(-len(row) // 32) * bits)]
        if bits != 3:
            ones = sum(1 << (bits * i) for i in range(32 // bits))
            words = [(w - ones) % 2**32 for w in words]
        rows.append([w - 2**32 if w >= 2**31 else w for w in words])
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reads_gptqmodel_qzeros_with_zero_points_of_zero(bits):
    """GPTQModel's asym checkpoints may hold zero = 0 (stored as a borrow from the next field): the
    reader recovers every zero exactly, where a per-field ``+ 1`` would read 2^b and miss a borrow."""
    from compress.quant.packing import unpack_codes
    from compress.quant.uniform import gptq_v1_zeros

    generator = torch.Generator().manual_seed(bits)
    zeros = torch.randint(0, 2**bits, (5, 96), generator=generator)
    zeros[:, :4] = torch.tensor([0, 2**bits - 1, 0, 1])
    words = gptqmodel_v1_words(zeros, bits)
    assert torch.equal(gptq_v1_zeros(words, bits, 96), zeros)
    assert not torch.equal(unpack_codes(words, bits, 96, dim=1) + 1, zeros)  # the old per-field reading
    ours = gptqmodel_v1_words(zeros.clamp(min=1), bits)  # zeros >= 1: no borrow, plain per-field
    assert torch.equal(gptq_v1_zeros(ours, bits, 96), zeros.clamp(min=1))
    assert torch.equal(unpack_codes(ours, bits, 96, dim=1) + 1, zeros.clamp(min=1))


@pytest.mark.parametrize("config", [QuantConfig.uniform(b, 32, sym) for b in (2, 3, 4, 8) for sym in (False, True)]
                         + [QuantConfig.uniform(3, 32, float_zero=True)], ids=lambda c: c.name)
def test_row_blocks_change_nothing(config):
    """Uniform quantize/dequantize/error run ROW_BLOCK rows at a time: the same tensors as one pass
    over the matrix (2100 rows: two full blocks and a partial one that is not a multiple of 32), the
    same dequantized weight, and the error equals a float64 sum."""
    from compress.quant.config import ROW_BLOCK
    from compress.quant.uniform import dequantize_gptq, quantize_rtn

    weight = torch.randn(2 * ROW_BLOCK + 52, 64, generator=torch.Generator().manual_seed(config.bits))
    blocked = QuantizedWeight.quantize(weight, config)
    whole = quantize_rtn(weight, config)
    assert sorted(blocked.tensors) == sorted(whole) and all(torch.equal(blocked.tensors[k], whole[k]) for k in whole)
    dense = dequantize_gptq(whole, config.bits, tuple(weight.shape))
    assert torch.equal(blocked.dequantize(), dense)
    assert torch.equal(blocked.rows(ROW_BLOCK, 2 * ROW_BLOCK + 52).dequantize(), dense[ROW_BLOCK:])
    assert blocked.squared_error(weight) == pytest.approx(float((dense.double() - weight.double()).square().sum()), rel=1e-12)
