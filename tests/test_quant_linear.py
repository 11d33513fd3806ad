"""QuantLinear: buffers named as in GPTQ checkpoints, and a forward equal to a float64 matmul of the
dequantized weight (relative error < 1e-5 in fp32; bf16/fp16 activations within their rounding)."""

import pytest
import torch
from torch import nn

from compress.quant import QuantConfig, QuantLinear


@pytest.mark.parametrize("config", [QuantConfig.uniform(4, 64), QuantConfig.uniform(3, 32, True),
                                    QuantConfig.uniform(2, -1), QuantConfig.nf(4), QuantConfig.nf(8, 32)],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_forward_matches_float64(config, dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 160, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(160, 96, generator=generator) * 0.05)
    layer = QuantLinear.quantize(linear, config)
    x = torch.randn(3, 5, 96, generator=generator)
    expected = x.double() @ layer.dequantize().double().t() + linear.bias.detach().double()
    got = layer(x.to(dtype)).double()
    assert float((got - expected).norm() / expected.norm()) < tolerance


def test_buffer_names_follow_the_formats():
    layer = QuantLinear.quantize(nn.Linear(64, 32, bias=False), QuantConfig.uniform(4, 32))
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx"}
    nf = QuantLinear.quantize(nn.Linear(64, 32, bias=True), QuantConfig.nf(4))
    assert set(nf.state_dict()) == {"codes", "scale_codes", "scale_scales", "scale_offset", "bias"}
    assert not any(p.requires_grad for p in nf.parameters())
