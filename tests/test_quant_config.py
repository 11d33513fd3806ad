"""Storage accounting of QuantConfig: the published figures, and equality with the packed tensors."""

import pytest
import torch

from compress.quant import QuantConfig, QuantizedWeight, UniformConfig


def test_published_bits_per_param():
    assert QuantConfig.nf(4, 64, 8, 256, "float32").bits_per_param == pytest.approx(4.127, abs=5e-4)
    assert QuantConfig.nf(4, 64, 8, 256, "float32").bits_per_param == 4 + 8 / 64 + 32 / (64 * 256)
    assert QuantConfig.nf(3, 64, 8, 256, "float32").bits_per_param == pytest.approx(3.127, abs=5e-4)
    assert QuantConfig.uniform(4, 128, sym=False).bits_per_param == 4.15625
    assert QuantConfig.uniform(4, 128, sym=True).bits_per_param == 4.125
    assert QuantConfig.uniform(4, 128, float_zero=True).bits_per_param == 4.25  # fp16 zero per group
    assert QuantConfig.nf(2, 64, 2, 256, "bfloat16").bits_per_param == pytest.approx(2.032, abs=5e-4)


@pytest.mark.parametrize("config", [
    QuantConfig.uniform(4, 64), QuantConfig.uniform(3, 128, sym=True), QuantConfig.uniform(2, 32),
    QuantConfig.uniform(8, -1), QuantConfig.uniform(4, 100), QuantConfig.uniform(3, 64, float_zero=True),
    QuantConfig.uniform(2, -1, float_zero=True), QuantConfig.nf(4), QuantConfig.nf(3, 32, 4, 16, "bfloat16"),
    QuantConfig.nf(2, 16, 2, 64, "float16"), QuantConfig.nf(8),
], ids=lambda c: c.name)
@pytest.mark.parametrize("shape", [(64, 96), (96, 200), (33, 70)])
def test_storage_bits_equal_the_packed_tensors(config, shape):
    """storage_bits counts exactly the bytes of the tensors that carry information."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    quantized = QuantizedWeight.quantize(weight, config)
    counted = dict(quantized.tensors)
    counted.pop("g_idx", None)
    if isinstance(config, UniformConfig) and config.sym:
        counted.pop("qzeros")
    nbytes = sum(t.numel() * t.element_size() for t in counted.values())
    assert quantized.storage_bits() == 8 * nbytes


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="bits: 5"):
        QuantConfig.uniform(5)
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig.uniform(4, 0)
    with pytest.raises(ValueError, match="scale_dtype"):
        QuantConfig.nf(4, scale_dtype="float64")
    with pytest.raises(ValueError, match="float_zero"):
        QuantConfig.uniform(4, 64, sym=True, float_zero=True)


def test_round_trip_through_dict():
    for config in (QuantConfig.uniform(3, 32, True), QuantConfig.uniform(4, 64, float_zero=True),
                   QuantConfig.nf(2, 32, 4, 64, "float16")):
        assert QuantConfig.from_dict(config.to_dict()) == config
