"""Issue 21: the library functions compute on the device of their inputs.

No GPU is needed: each function runs once normally on CPU inputs and once more under
``with torch.device("meta")``, which turns every tensor factory called *without* an explicit device
into a meta tensor. A factory that forgot ``device=`` then mixes meta with CPU tensors (an error), or
leaks a meta or garbage tensor into the result; with every device taken from the inputs, the second
run is the first one again: every output tensor on the CPU and bit-identical (``assert_device_generic``).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compress import kernels
from compress.kernels import reference
from compress.lowrank.costs import matrix_costs
from compress.lowrank.decompose import (fisher_weights, gaussian, hessian_error, low_rank_factors, lq_decompose,
                                        randomized_svd)
from compress.lowrank.fisher import empirical_fisher, head_gradients, layer_fisher
from compress.lowrank.init import init_default, init_from_factors
from compress.lowrank.lora import LoRALinear
from compress.quant import QuantConfig, QuantizedWeight, QuantLinear, nf_codebook, pack_codes, unpack_codes
from compress.quant import normalfloat, uniform
from compress.quant.gptq import GPTQSettings, HessianAccumulator, gptq_quantize

UNIFORM = [QuantConfig.uniform(bits, group, sym=sym) for bits in (2, 3, 4, 8) for group in (-1, 64)
           for sym in (False, True)] + [QuantConfig.uniform(4, 32, float_zero=True)]
NF = [QuantConfig.nf(4), QuantConfig.nf(3, block=32, scale_bits=4, scale_block=16, scale_dtype="bfloat16"),
      QuantConfig.nf(2, block=16, scale_bits=3, scale_block=64, scale_dtype="float16"),
      QuantConfig.nf(8, block=64, scale_bits=2, scale_block=16)]


def leaves(value, path: str = "out"):
    """(path, leaf) of every tensor or plain value inside ``value`` (containers, dataclasses, modules)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, nn.Module):
        yield from leaves(dict(value.state_dict(keep_vars=True)), path)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}[{index}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from leaves(getattr(value, item.name), f"{path}.{item.name}")
    else:
        yield path, value


def assert_same(expected, got) -> None:
    """Same structure; every tensor on the expected (CPU) device, same dtype and bit-identical."""
    want, have = dict(leaves(expected)), dict(leaves(got))
    assert want.keys() == have.keys()
    for path, value in want.items():
        other = have[path]
        if isinstance(value, torch.Tensor):
            assert other.device == value.device == torch.device("cpu"), f"{path}: on {other.device}"
            assert other.dtype == value.dtype and other.shape == value.shape, f"{path}: dtype or shape"
            assert torch.equal(other.detach(), value.detach()), f"{path}: values differ"
        else:
            assert other == value, f"{path}: {other!r} != {value!r}"


def assert_device_generic(run):
    """``run()`` normally and under the meta default device; the results must be identical."""
    expected = run()
    with torch.device("meta"):
        got = run()
    assert_same(expected, got)
    return expected


def assert_on_meta(value) -> None:
    """Every tensor in ``value`` is a meta tensor (computed from meta inputs, nothing from the CPU)."""
    for path, leaf in leaves(value):
        if isinstance(leaf, torch.Tensor):
            assert leaf.is_meta, f"{path}: on {leaf.device}"


def randn(*shape, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_meta_default_device_catches_a_missing_device():
    """Factories without a device follow the meta default; ``*_like``/``new_*`` follow their input."""
    cpu = torch.ones(3)
    with torch.device("meta"):
        assert torch.zeros(3).is_meta and torch.arange(3).is_meta and torch.tensor([1.0]).is_meta
        assert cpu.new_zeros(3).device.type == "cpu" and torch.zeros_like(cpu).device.type == "cpu"
        with pytest.raises(RuntimeError):
            torch.zeros(3) + cpu
    with pytest.raises((AssertionError, RuntimeError)):  # a forgotten device= inside a function
        assert_device_generic(lambda: cpu[torch.arange(3)] * torch.full((3,), 2.0))


@pytest.mark.parametrize("config", NF, ids=lambda c: c.name)
def test_sync_free_paths_follow_meta_inputs(config):
    """Paths without host reads (NF quantize and dequantize, packing, the NF tiled product) also run
    on meta inputs: this catches a tensor built on the CPU by default (the codebook, lookup tables)
    where the meta default device cannot, since such a default is an explicit device."""
    quantized = QuantizedWeight.quantize(randn(64, 160, seed=1).to("meta"), config)
    assert_on_meta(quantized)
    assert_on_meta(quantized.dequantize())
    assert_on_meta(unpack_codes(pack_codes(torch.zeros(70, 33, dtype=torch.int32, device="meta"), 3), 3, 70))
    assert_on_meta(normalfloat.nearest_codes(torch.zeros(10, device="meta"), config.bits))
    for batch in (1, 2, 40):
        x = torch.zeros(batch, 160, device="meta", requires_grad=True)
        out = reference.dequant_matmul(x, quantized.kernel_weight())
        out.sum().backward()
        assert_on_meta((out, x.grad))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (70, 33), generator=torch.Generator().manual_seed(bits))

    def run():
        along_k = pack_codes(codes, bits, dim=0)
        along_n = pack_codes(codes, bits, dim=1)
        return along_k, along_n, unpack_codes(along_k, bits, 70, dim=0), unpack_codes(along_n, bits, 33, dim=1)

    packed, _, unpacked, unpacked_n = assert_device_generic(run)
    assert torch.equal(unpacked, codes.to(torch.int32)) and torch.equal(unpacked_n, codes.to(torch.int32))


@pytest.mark.parametrize("config", UNIFORM + NF, ids=lambda c: c.name)
def test_quantized_weight_quantize_and_dequantize(config):
    weight = randn(64, 160, seed=1, scale=0.05)

    def run():
        quantized = QuantizedWeight.quantize(weight, config)
        return quantized, quantized.dequantize(), quantized.dequantize(torch.float16), quantized.squared_error(weight)

    assert_device_generic(run)


def test_quantized_weight_row_blocks():
    """More rows than one ``ROW_BLOCK``: the blocks are quantized and read back separately."""
    weight = randn(1056, 32, seed=2)
    config = QuantConfig.uniform(3, 16)

    def run():
        quantized = QuantizedWeight.quantize(weight, config)
        tail = quantized.rows(1024, 1056).dequantize()
        return quantized, quantized.dequantize(), tail, quantized.squared_error(weight)

    assert_device_generic(run)


@pytest.mark.parametrize("config", [QuantConfig.uniform(4, 32), QuantConfig.uniform(2, 64, sym=True),
                                    QuantConfig.uniform(3, 32, float_zero=True)], ids=lambda c: c.name)
def test_uniform_functions(config):
    weight = randn(40, 96, seed=3)

    def run():
        scale, zero = uniform.choose_qparams(weight, config)
        codes = uniform.quantize_codes(weight, scale, zero, config)
        g_idx = uniform.default_g_idx(96, config, weight.device)
        tensors = uniform.quantize_rtn(weight, config)
        back = uniform.from_gptq_tensors(tensors, config.bits, (40, 96))
        size = uniform.contiguous_group_size(tensors["g_idx"], tensors["scales"].shape[0])
        return (scale, zero, codes, uniform.dequantize_codes(codes, scale, zero, g_idx), tensors, back, size,
                uniform.dequantize_gptq(tensors, config.bits, (40, 96)))

    assert_device_generic(run)


def test_act_order_g_idx_dequantizes_by_gather():
    weight = randn(32, 96, seed=4)
    quantized = QuantizedWeight.quantize(weight, QuantConfig.uniform(4, 32))
    tensors = dict(quantized.tensors, g_idx=quantized.tensors["g_idx"][torch.randperm(96, generator=torch.Generator())])
    shuffled = QuantizedWeight(quantized.config, quantized.shape, tensors)
    assert_device_generic(lambda: (shuffled.dequantize(), shuffled.kernel_weight()))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_codebook_and_lookup_tables(bits):
    values = randn(3000, seed=bits).clamp(-1, 1)
    assert nf_codebook(bits).device.type == "cpu"

    def run():
        normalfloat._lookup_tables.cache_clear()  # built again, under the meta default device too
        return nf_codebook(bits), nf_codebook(bits, values.device), normalfloat.nearest_codes(values, bits)

    assert_device_generic(run)


def test_nf_double_quantized_scales():
    absmax = randn(1000, seed=5).abs()
    config = QuantConfig.nf(4, scale_bits=3, scale_block=64, scale_dtype="bfloat16")

    def run():
        scales = normalfloat.quantize_scales(absmax, config)
        return scales, normalfloat.dequantize_scales(scales["scale_codes"], scales["scale_scales"],
                                                     scales["scale_offset"], config)

    assert_device_generic(run)


def hessian_inputs(rows: int = 256, width: int = 96) -> torch.Tensor:
    x = randn(rows, width, seed=6) @ (torch.eye(width) + randn(width, width, seed=7) / width**0.5)
    x[:, :3] *= 8.0
    x[:, 5] = 0.0  # a dead input column: diag(H) = 0
    return x


@pytest.mark.parametrize("device", [None, "cpu"])
def test_hessian_accumulator(device):
    x = hessian_inputs()

    def run():
        accumulator = HessianAccumulator(96, device=device)  # under meta: H follows the inputs
        accumulator.add(x[:100].view(4, 25, 96))
        accumulator.add(x[100:])
        return accumulator.hessian, accumulator.rows

    assert_device_generic(run)


def test_hessian_accumulator_keeps_an_explicit_device():
    """An accumulator given a device keeps H there and brings the inputs to it."""
    x = hessian_inputs(rows=16, width=8)
    accumulator = HessianAccumulator(8, device="meta")
    accumulator.add(x)
    assert accumulator.hessian.is_meta and accumulator.rows == 16


GPTQ_CASES = [(QuantConfig.uniform(4, 32), GPTQSettings(block=128)), (QuantConfig.uniform(4, 32), GPTQSettings(block=40)),
              (QuantConfig.uniform(3, 32), GPTQSettings(block=48, order="activation")),
              (QuantConfig.uniform(2, -1, sym=True), GPTQSettings(block=128)),
              (QuantConfig.uniform(8, 32, float_zero=True), GPTQSettings(block=64, order="activation")),
              (QuantConfig.uniform(4, 64, sym=True), GPTQSettings(block=32, order="activation")),
              (QuantConfig.uniform(3, 32, sym=True), GPTQSettings(block=48, order="group_aware", mse_norm=2.4))]


@pytest.mark.parametrize("config,settings", GPTQ_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_gptq_quantize(config, settings):
    weight = randn(48, 96, seed=8, scale=0.05)
    accumulator = HessianAccumulator(96)
    accumulator.add(hessian_inputs())

    def run():
        result = gptq_quantize(weight, accumulator.hessian, config, settings)
        return result, result.quantized.dequantize()

    result, _ = assert_device_generic(run)
    assert isinstance(result.loss, float) and result.loss > 0


KERNEL_CONFIGS = [QuantConfig.uniform(4, 32), QuantConfig.uniform(3, 64), QuantConfig.uniform(2, 32, sym=True),
                  QuantConfig.uniform(8, -1), QuantConfig.uniform(4, 32, float_zero=True),
                  QuantConfig.nf(4, block=32), QuantConfig.nf(2, block=64), QuantConfig.nf(3, block=64)]


@pytest.mark.parametrize("batch", [1, 2, 40])
@pytest.mark.parametrize("config", KERNEL_CONFIGS, ids=lambda c: c.name)
def test_reference_kernel_forward_and_backward(config, batch):
    """Every path of the tiled product: lookup tables (batch 1), scale after the product, dequantized
    tiles, and the per-row gather of nf blocks that straddle rows (K = 160, block 64)."""
    weight = QuantizedWeight.quantize(randn(64, 160, seed=9, scale=0.05), config)
    layout = weight.kernel_weight()
    x, upstream, bias = randn(batch, 160, seed=10), randn(batch, 64, seed=11), randn(64, seed=12)

    def run():
        inputs = x.clone().requires_grad_(True)
        out = reference.dequant_matmul(inputs, layout, bias)
        out.backward(upstream)
        return out.detach(), inputs.grad, reference.dequantize(layout)

    assert_device_generic(run)


def test_quant_linear_forward():
    linear = nn.Linear(96, 32)
    with torch.no_grad():
        linear.weight.copy_(randn(32, 96, seed=13, scale=0.1))
    x = randn(3, 96, seed=14)

    def run():
        layer = QuantLinear.quantize(linear, QuantConfig.uniform(4, 32))
        return layer, layer(x), layer.dequantize()

    assert_device_generic(run)


def test_random_draws_match_the_seeded_global_rng():
    """``gaussian`` gives what ``torch.manual_seed(seed); torch.randn`` gives, and ``randomized_svd``
    is ``torch.svd_lowrank`` step for step (tall and wide), without touching the global RNG."""
    state = torch.get_rng_state()
    for matrix in (randn(50, 30, seed=15), randn(30, 50, seed=16)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            expected = torch.svd_lowrank(matrix, q=12)
            torch.manual_seed(4)
            draw = torch.randn(7, 5)
        assert torch.equal(gaussian(7, 5, 4, matrix), draw)
        for ours, theirs in zip(randomized_svd(matrix, 12, 4), expected):
            assert torch.equal(ours, theirs)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("config", [QuantConfig.uniform(3, 32), QuantConfig.nf(3, block=64)], ids=lambda c: c.name)
def test_lq_decompose(config, weighted):
    weight = randn(48, 96, seed=17, scale=0.05)
    fisher = randn(48, 96, seed=18).square() if weighted else None

    def run():
        result = lq_decompose(weight, 6, config, iterations=3, fisher=fisher, seed=5)
        return result, result.low_rank()

    assert_device_generic(run)


def test_lq_decompose_with_gptq_and_hessian_error():
    weight = randn(48, 96, seed=19, scale=0.05)
    accumulator = HessianAccumulator(96)
    accumulator.add(hessian_inputs())
    hessian = accumulator.hessian

    def run():
        return lq_decompose(weight, 4, QuantConfig.uniform(4, 32), iterations=2, seed=1,
                            quantize=lambda residual, config: gptq_quantize(residual, hessian, config).quantized,
                            error=hessian_error(hessian))

    assert_device_generic(run)


def test_low_rank_factors_and_fisher_weights():
    matrix, fisher = randn(40, 72, seed=20), randn(40, 72, seed=21).square()
    fisher[3] = 0.0

    def run():
        rows, cols = fisher_weights(fisher)
        return rows, cols, low_rank_factors(matrix, 5, seed=2), low_rank_factors(matrix, 5, 8, 3, rows, cols)

    assert_device_generic(run)


@pytest.mark.parametrize("rank", [0, 4])
def test_matrix_costs(rank):
    weight, fisher = randn(32, 64, seed=22, scale=0.05), randn(32, 64, seed=23).square()
    configs = [QuantConfig.uniform(4, 32), QuantConfig.nf(3, block=32)]
    assert_device_generic(lambda: (matrix_costs(weight, configs, rank, iterations=2),
                                   matrix_costs(weight, configs, rank, iterations=2, fisher=fisher)))


@pytest.mark.parametrize("base", ["dense", "packed"])
def test_lora_adapter_on_the_base_device(base):
    linear = nn.Linear(64, 32)
    x, left, right = randn(3, 64, seed=24), randn(32, 4, seed=25), randn(4, 64, seed=26)

    def run():
        torch.manual_seed(0)  # nn.Linear's own init of the adapter draws from the global RNG
        layer = LoRALinear(linear if base == "dense" else QuantLinear.quantize(linear, QuantConfig.nf(4)), 4, 8)
        init_default(layer, torch.Generator().manual_seed(3))
        drawn = layer.lora_A.weight.detach().clone()
        out = layer(x)
        init_from_factors(layer, left, right)
        return drawn, out, layer(x), layer.delta_weight(), layer.merged_linear()

    assert_device_generic(run)


class TinyLM(nn.Module):
    """Embedding, one residual block and a head: enough for per-sample next-token gradients."""

    def __init__(self, vocab: int = 20, width: int = 16):
        super().__init__()
        self.embed, self.proj, self.head = nn.Embedding(vocab, width), nn.Linear(width, width), nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        hidden = self.embed(input_ids)
        return SimpleNamespace(logits=self.head(hidden + torch.tanh(self.proj(hidden))))


class Block(nn.Module):
    """A decoder-layer stand-in: (hidden, extra kwargs) -> (output,)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, hidden: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor]:
        return (hidden + scale * self.down(nn.functional.silu(self.up(hidden))),)


def test_empirical_fisher_layer_fisher_and_head_gradients():
    torch.manual_seed(0)
    model, block, norm = TinyLM(), Block(), nn.LayerNorm(16)
    tokens = [torch.randint(0, 20, (9,), generator=torch.Generator().manual_seed(n)) for n in range(3)]
    hidden = [randn(1, 9, 16, seed=30 + n) for n in range(3)]
    upstream = [randn(1, 9, 16, seed=40 + n) for n in range(3)]
    samples = [((states,), {"scale": 0.5}) for states in hidden]

    def run():
        fisher = empirical_fisher(model, tokens, ["proj.weight", "head.weight"])
        per_layer = layer_fisher(block, samples, upstream, {"up.weight": block.up.weight})
        return fisher, per_layer, head_gradients(norm, model.head, hidden, tokens)

    assert_device_generic(run)
