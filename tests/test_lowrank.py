"""lowrank: the LoRA wrapper (PEFT's properties) and the LQ-LoRA decomposition."""

import pytest
import torch
from torch import nn

from compress.lowrank.decompose import fisher_weights, low_rank_factors, lq_decompose
from compress.lowrank.init import init_default, init_from_factors
from compress.lowrank.lora import LoRALinear
from compress.quant import QuantConfig, QuantLinear
from compress.quant.qweight import QuantizedWeight

GEN = torch.Generator().manual_seed(0)


def dense_base():
    return nn.Linear(96, 64, bias=True)


def packed_base():
    return QuantLinear.quantize(nn.Linear(96, 64, bias=True), QuantConfig.uniform(4, 32))


BASES = {"dense": dense_base, "packed": packed_base}


@pytest.mark.parametrize("kind", BASES)
def test_zero_b_equals_base_and_delta_follows_peft(kind):
    base = BASES[kind]()
    layer = LoRALinear(base, rank=8, alpha=16)
    init_default(layer, torch.Generator().manual_seed(1))
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    nn.init.normal_(layer.lora_B.weight)
    expected = base(x) + x @ (2.0 * layer.lora_B.weight @ layer.lora_A.weight).t()  # alpha / rank = 2
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B.weight @ layer.lora_A.weight)


@pytest.mark.parametrize("kind", BASES)
def test_merge_gives_the_same_outputs(kind):
    layer = LoRALinear(BASES[kind](), rank=4, alpha=8)
    init_default(layer)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(5, 96)
    unmerged = layer(x)
    torch.testing.assert_close(layer.merged_linear()(x), unmerged, rtol=1e-5, atol=1e-5)
    if kind == "packed":
        with pytest.raises(TypeError, match="cannot merge into a QuantLinear in place"):
            layer.merge()
        return
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.merge()  # idempotent
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", BASES)
def test_only_adapter_parameters_are_updated(kind):
    layer = LoRALinear(BASES[kind](), rank=4, alpha=8)
    init_default(layer)
    frozen = {k: v.detach().clone() for k, v in layer.base_layer.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}
    before_b = layer.lora_B.weight.detach().clone()
    layer(torch.randn(4, 96)).pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(layer.lora_B.weight, before_b)
    for name, value in layer.base_layer.state_dict().items():
        assert torch.equal(value, frozen[name]), name


def test_factors_map_onto_the_adapter():
    layer = LoRALinear(dense_base(), rank=6, alpha=3)  # s = 0.5
    left, right = torch.randn(64, 6, generator=GEN), torch.randn(6, 96, generator=GEN)
    init_from_factors(layer, left, right)
    torch.testing.assert_close(layer.delta_weight(), left @ right, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"factors \[64, 5\] x \[6, 96\] do not fit a rank-6 adapter"):
        init_from_factors(layer, left[:, :5], right)


def low_rank_plus_noise(out=128, inp=192, rank=8, noise=0.02):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(out, rank, generator=gen) @ torch.randn(rank, inp, generator=gen) / 4 + \
        noise * torch.randn(out, inp, generator=gen)


def test_decomposition_beats_plain_quantization_and_keeps_the_best_iterate():
    weight = low_rank_plus_noise()
    config = QuantConfig.nf(3, block=64)
    result = lq_decompose(weight, rank=8, config=config, iterations=10)
    plain = float(torch.linalg.norm(weight - QuantizedWeight.quantize(weight, config).dequantize()))
    reconstructed = result.quantized.dequantize() + result.low_rank()
    assert result.error == pytest.approx(float(torch.linalg.norm(weight - reconstructed)), rel=1e-5)
    assert result.error < 0.5 * plain  # the low-rank part absorbs what 3 bits cannot hold
    assert result.error == min(result.errors) and result.errors[result.best_iteration] == result.error
    rises = [b > a for a, b in zip(result.errors, result.errors[1:])]
    assert not any(rises[:-1])  # it stops at the first rise (if any), which can only be the last step
    assert len(result.errors) <= 10


def test_decomposition_is_seeded_and_leaves_the_global_rng_alone():
    weight = low_rank_plus_noise()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = lq_decompose(weight, rank=4, config=QuantConfig.uniform(2, 64), iterations=3, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    second = lq_decompose(weight, rank=4, config=QuantConfig.uniform(2, 64), iterations=3, seed=7)
    assert torch.equal(first.left, second.left) and first.errors == second.errors


def test_weighted_factors_minimize_the_weighted_error():
    """Two-sided weights: the weighted SVD beats the plain SVD on the weighted objective."""
    matrix = torch.randn(64, 80, generator=GEN)
    rows = torch.rand(64, generator=GEN) * 3 + 0.1
    cols = torch.rand(80, generator=GEN) * 3 + 0.1
    scale = rows.view(-1, 1) * cols.view(1, -1)

    def weighted(left, right):
        return float(torch.linalg.norm(scale * (matrix - left @ right)))

    plain = weighted(*low_rank_factors(matrix, 8, oversampling=72))
    fitted = weighted(*low_rank_factors(matrix, 8, oversampling=72, rows=rows, cols=cols))
    exact = torch.linalg.svdvals(scale * matrix)[8:].pow(2).sum().sqrt()  # Eckart-Young optimum
    assert fitted < plain
    assert fitted == pytest.approx(float(exact), rel=1e-4)


def test_fisher_weights_are_finite_for_dead_rows_and_columns():
    fisher = torch.rand(32, 48, generator=GEN)
    fisher[3] = 0
    fisher[:, 7] = 0
    rows, cols = fisher_weights(fisher)
    assert bool(torch.isfinite(rows).all() and (rows > 0).all() and (cols > 0).all())
    result = lq_decompose(torch.randn(32, 48, generator=GEN), rank=4, config=QuantConfig.uniform(4, 16),
                          iterations=3, fisher=fisher)
    assert torch.isfinite(result.left).all() and torch.isfinite(result.right).all()
