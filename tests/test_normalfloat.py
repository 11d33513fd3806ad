"""NormalFloat codebooks and double-quantized block scales."""

import pytest
import torch

from compress.quant import QuantConfig, QuantizedWeight, nf_codebook

BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def test_nf4_equals_bitsandbytes():
    ours = nf_codebook(4)
    assert float((ours - torch.tensor(BNB_NF4)).abs().max()) <= 1e-7
    import bitsandbytes.functional as bnb_functional

    theirs = bnb_functional.get_4bit_type("nf4", device="cpu").float()
    assert float((ours - theirs).abs().max()) <= 1e-7


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codebook_shape(bits):
    book = nf_codebook(bits)
    assert book.numel() == 2**bits
    assert bool((book[1:] > book[:-1]).all())
    assert float(book[0]) == -1.0 and float(book[-1]) == 1.0
    assert int((book == 0).sum()) == 1
    assert int((book > 0).sum()) == 2 ** (bits - 1)  # one more positive value than negative (as NF4)


def reference_nf(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Float64 from the LQ-LoRA description: absmax per block, min offset, second-level max,
    unsigned scale codes, nearest codebook value by distance."""
    flat = weight.double().reshape(-1)
    pad = (-flat.numel()) % config.block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, config.block)
    absmax = blocks.abs().amax(1)
    offset = absmax.min()
    shifted = absmax - offset
    pad2 = (-shifted.numel()) % config.scale_block
    groups = torch.cat([shifted, shifted.new_zeros(pad2)]).view(-1, config.scale_block)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[config.scale_dtype]
    second = groups.amax(1).to(dtype).double().repeat_interleave(config.scale_block)[: shifted.numel()]
    levels = 2**config.scale_bits - 1
    codes = torch.where(second > 0, torch.round(shifted * levels / second.clamp(min=1e-300)), 0).clamp(0, levels)
    scale = codes * second / levels + offset
    book = nf_codebook(config.bits).double()
    values = blocks / torch.where(scale > 0, scale, 1.0).unsqueeze(1)
    nearest = (values.unsqueeze(-1) - book).abs().argmin(-1)
    return (book[nearest] * scale.unsqueeze(1)).reshape(-1)[: flat.numel()].view(weight.shape)


CONFIGS = [QuantConfig.nf(4), QuantConfig.nf(3), QuantConfig.nf(2, 32, 4, 16, "bfloat16"),
           QuantConfig.nf(8, 16, 8, 64, "float16"), QuantConfig.nf(4, 48, 3, 5, "float32")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_matches_float64_reference(config):
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(config.bits)) * 0.03
    ours = QuantizedWeight.quantize(weight, config).dequantize().double()
    expected = reference_nf(weight, config)
    close = (ours - expected).abs() <= 1e-6 * weight.abs().max()
    assert close.float().mean() > 0.999, f"{int((~close).sum())} elements differ"


def test_double_quantization_costs_little():
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    nf4 = QuantizedWeight.quantize(weight, QuantConfig.nf(4)).dequantize()
    fp32_scales = QuantizedWeight.quantize(weight, QuantConfig.nf(4, 64, 8, 256, "float32")).dequantize()
    error = float((nf4 - weight).norm() / weight.norm())
    assert 0.05 < error < 0.12  # NF4 on Gaussian weights: about 0.09 relative (bitsandbytes gets 0.092)
    assert torch.equal(nf4, fp32_scales)
