"""The CPU fast paths (native AVX512-BF16/AMX kernel, torch's int4pack) against float64 oracles.

Oracle: ``QuantizedWeight.dequantize`` (quant/, independent of the kernels' layouts) in float64 times
the activations rounded to bf16 (what both paths multiply). Tolerances, as mean |y - y_ref| / mean
|y_ref| over the output:
- native, uniform codes, fp32 output: 1e-5 (its table holds exact integers and its scales are the
  checkpoint's own: only fp32 summation order is left);
- native, NF codebooks: 3e-3 (codebook values rounded to bf16, 2^-9 relative);
- int4pack: 4e-3 (scales and folded zeros rounded to bf16);
- any path, bf16 output: 4e-3 more (the output's own rounding).
The native tests run where this CPU has AVX512-BF16 and a C++ compiler builds the kernel (the skip
says which is missing); batches 1-4 take its register path, larger ones its AMX path where the CPU has
AMX. int4pack runs on every CPU torch supports.
"""

import itertools

import pytest
import torch

from compress import kernels
from compress.kernels import cpu_fast, cpu_int4pack, cpu_native, layout
from compress.quant import QuantLinear
from compress.quant.config import NFConfig, QuantConfig
from compress.quant.qweight import QuantizedWeight

NATIVE_OK, NATIVE_WHY = cpu_native.availability()
needs_native = pytest.mark.skipif(not NATIVE_OK, reason=f"native CPU kernel unavailable: {NATIVE_WHY}")

UNIFORM = [QuantConfig.uniform(b, g, sym) for b in (2, 3, 4, 8) for g in (32, 64, 128, -1) for sym in (False, True)] + [
    QuantConfig.uniform(b, g, float_zero=True) for b in (2, 3, 4, 8) for g in (64, -1)]
NF = [QuantConfig.nf(b, block=block) for b in (2, 3, 4) for block in (32, 64)] + [
    QuantConfig.nf(4, block=64, scale_bits=3, scale_block=16, scale_dtype="bfloat16")]
SHAPES = [(96, 200), (40, 96), (130, 384)]  # (N, K): N not a multiple of 64, K not of the group
BATCHES = (1, 2, 3, 4, 5, 17)


def packed(shape, config, seed=0, act_order=False):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    qweight = QuantizedWeight.quantize(weight, config)
    if act_order:
        g_idx = qweight.tensors["g_idx"]
        qweight.tensors["g_idx"] = g_idx[torch.randperm(g_idx.numel(), generator=torch.Generator().manual_seed(seed))]
    return qweight, qweight.dequantize()


def relative_error(y, expected):
    return ((y.double() - expected).abs().mean() / expected.abs().mean()).item()


def oracle(x, dense):
    return x.to(torch.bfloat16).double() @ dense.double().t()


def check(config, name, tolerance, shapes=SHAPES, act_order=False):
    for (n, k), batch in itertools.product(shapes, BATCHES):
        qweight, dense = packed((n, k), config, seed=batch, act_order=act_order)
        prepared = qweight.kernel_weight()
        found = cpu_fast.layout_for(name, prepared)
        if isinstance(found, str):
            assert isinstance(config, NFConfig) and k % config.block, found  # only NF blocks that straddle rows are refused
            continue
        x = torch.randn(batch, k, generator=torch.Generator().manual_seed(batch + 1))
        expected = oracle(x, dense)
        for dtype, extra in ((torch.float32, 0.0), (torch.bfloat16, 4e-3), (torch.float16, 4e-3)):
            y = cpu_fast.matmul(x.to(dtype), prepared, None, name)
            assert y.dtype == dtype and y.shape == (batch, n)
            if dtype == torch.float16:  # fp16 activations are rounded to bf16 as well: their own oracle
                expected_half = oracle(x.half().float(), dense)
                assert relative_error(y, expected_half) < tolerance + extra, (n, k, batch, dtype)
            else:
                assert relative_error(y, expected) < tolerance + extra, (n, k, batch, dtype)


@needs_native
@pytest.mark.parametrize("config", UNIFORM, ids=lambda c: c.name)
def test_native_uniform_against_float64(config):
    check(config, "native", 1e-5)


@needs_native
@pytest.mark.parametrize("config", NF, ids=lambda c: c.name)
def test_native_nf_against_float64(config):
    check(config, "native", 3e-3)


@needs_native
@pytest.mark.parametrize("config", [QuantConfig.uniform(4, 32), QuantConfig.uniform(3, 64, sym=True), QuantConfig.uniform(8, 32)],
                         ids=lambda c: c.name)
def test_native_act_order(config):
    check(config, "native", 1e-5, shapes=[(96, 256)], act_order=True)


@pytest.mark.parametrize("config", [c for c in UNIFORM if c.bits <= 4], ids=lambda c: c.name)
def test_int4pack_against_float64(config):
    check(config, "int4pack", 4e-3)


def test_int4pack_act_order():
    check(QuantConfig.uniform(4, 32), "int4pack", 4e-3, shapes=[(96, 256)], act_order=True)


@needs_native
def test_native_bias_and_leading_dimensions():
    qweight, dense = packed((70, 128), QuantConfig.uniform(4, 64))
    prepared = qweight.kernel_weight()
    x, bias = torch.randn(2, 3, 128).to(torch.bfloat16), torch.randn(70)
    y = kernels.dequant_matmul(x, prepared, bias, backend="native")
    expected = oracle(x.reshape(-1, 128).float(), dense) + bias.double()
    assert y.shape == (2, 3, 70) and relative_error(y.reshape(-1, 70), expected) < 4e-3


def test_refusals_say_why():
    nf8 = packed((64, 128), QuantConfig.nf(8))[0].kernel_weight()
    assert cpu_native.native_layout(nf8) == "nf8: the table path takes up to 16 codebook values"
    assert "int4pack takes uniform grids" in cpu_int4pack.int4pack_layout(nf8)
    int8 = packed((64, 128), QuantConfig.uniform(8, 64))[0].kernel_weight()
    assert cpu_int4pack.int4pack_layout(int8) == "uniform8: int4pack takes uniform grids of at most 16 levels"
    straddling = packed((64, 200), QuantConfig.nf(4))[0].kernel_weight()
    assert cpu_native.native_layout(straddling) == "nf blocks of 64 do not tile rows of 200"


def test_dispatch_by_dtype_and_format(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    int4 = packed((64, 128), QuantConfig.uniform(4, 64))[0].kernel_weight()
    nf8 = packed((64, 128), QuantConfig.nf(8))[0].kernel_weight()
    fast = "native" if NATIVE_OK else "int4pack"
    assert kernels.select_backend(torch.device("cpu"), torch.bfloat16, int4)[0] == fast
    assert kernels.select_backend(torch.device("cpu"), torch.float16, int4)[0] == fast
    assert kernels.select_backend(torch.device("cpu"), torch.float32, int4) == (
        "reference", "fp32 activations on cpu: the exact tiled path (COMPRESS_KERNEL=fast rounds them to bf16)")
    backend, reason = kernels.select_backend(torch.device("cpu"), torch.bfloat16, nf8)
    assert backend == "reference" and "nf8: the table path takes up to 16 codebook values" in reason
    monkeypatch.setenv("COMPRESS_KERNEL", "fast")
    assert kernels.select_backend(torch.device("cpu"), torch.float32, int4)[0] == fast
    monkeypatch.setenv("COMPRESS_KERNEL", "int4pack")
    assert kernels.select_backend(torch.device("cpu"), torch.float32, int4)[0] == "int4pack"
    with pytest.raises(kernels.KernelUnavailableError, match="COMPRESS_KERNEL=int4pack but nf8"):
        kernels.select_backend(torch.device("cpu"), torch.bfloat16, nf8)
    with pytest.raises(kernels.KernelUnavailableError, match="int4pack is a CPU kernel; activations are on cuda"):
        kernels.select_backend(torch.device("cuda"))


def test_int4pack_when_the_native_kernel_cannot_run(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    monkeypatch.setattr(cpu_native, "availability", lambda: (False, "no C++ compiler (test)"))
    int4 = packed((64, 128), QuantConfig.uniform(4, 64))[0].kernel_weight()
    assert kernels.select_backend(torch.device("cpu"), torch.bfloat16, int4)[0] == "int4pack"
    int8 = packed((64, 128), QuantConfig.uniform(8, 64))[0].kernel_weight()
    backend, reason = kernels.select_backend(torch.device("cpu"), torch.bfloat16, int8)
    assert backend == "reference" and "native: no C++ compiler (test)" in reason


@pytest.mark.parametrize("name", [pytest.param("native", marks=needs_native), "int4pack"])
def test_fast_path_backward_matches_dense(name):
    """LoRA over a packed base in bf16: gradients wrt x through the fast path's autograd."""
    qweight, dense = packed((64, 256), QuantConfig.uniform(4, 64))
    prepared = qweight.kernel_weight()
    x = torch.randn(3, 256).to(torch.bfloat16).requires_grad_()
    cpu_fast.matmul(x, prepared, None, name).float().pow(2).sum().backward()
    x64 = x.detach().double().requires_grad_()
    torch.nn.functional.linear(x64, dense.double()).pow(2).sum().backward()
    assert relative_error(x.grad, x64.grad) < 1e-2  # bf16 activations, output and gradient


def test_quant_linear_in_bf16_runs_the_fast_path(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    layer = QuantLinear.quantize(torch.nn.Linear(256, 96, bias=True), QuantConfig.uniform(4, 64, sym=True))
    x = torch.randn(2, 256)
    reference = layer(x)
    assert layer.backend == "reference"
    fast = layer(x.to(torch.bfloat16))
    assert layer.backend == ("native" if NATIVE_OK else "int4pack")
    assert relative_error(fast, reference.double()) < 8e-3


@needs_native
def test_torch_compile_traces_the_native_op():
    prepared = packed((64, 96), QuantConfig.uniform(4, 32))[0].kernel_weight()
    bias = torch.randn(64)

    def forward(x):
        return torch.relu(kernels.dequant_matmul(x, prepared, bias, backend="native"))

    x = torch.randn(2, 5, 96).to(torch.bfloat16)
    first = torch.compile(forward, backend="aot_eager")  # a cold layout: built eagerly (one graph break)
    torch.testing.assert_close(first(x), forward(x), rtol=0, atol=0)
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)  # a warm one: fails on any graph break
    torch.testing.assert_close(compiled(x), forward(x), rtol=0, atol=0)


def test_bf16_model_logits_fast_path_against_reference(tiny_model, probe_ids, monkeypatch):
    """A bf16 model with every format of the mixed plan: the fast paths (native, or int4pack with the
    tiled path for what it cannot take) against the tiled path, whose fp32 products are the reference."""
    from conftest import logits, quantize_model
    from test_kernel_dispatch import mixed_config

    model = quantize_model(tiny_model, mixed_config).to(torch.bfloat16)
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    expected = logits(model, probe_ids).double()
    monkeypatch.delenv("COMPRESS_KERNEL")
    got = logits(model, probe_ids)
    ran = {m.backend for m in model.modules() if isinstance(m, QuantLinear)}
    assert ran == ({"native"} if NATIVE_OK else {"int4pack", "reference"})
    assert relative_error(got, expected) < 1e-2  # bf16 activations between layers: every layer's output rounding


def test_recipe_kernel_fast_sends_fp32_through_the_fast_path(tmp_path, monkeypatch):
    """``kernel: fast`` in a recipe: the eval of an fp32 model runs its packed layers through the CPU
    fast path (the report says which), the resume fingerprint ignores the key, and an explicit
    COMPRESS_KERNEL still wins; nothing of the run's preference is left in the environment."""
    import json
    import os

    from compress.run.recipe import load_recipe
    from conftest import run_cli, tiny_recipe

    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    stages = "  - quantize: {config: {bits: 4, group_size: 64, sym: true}}\n  - eval: {}"
    recipe = tiny_recipe(tmp_path, stages)
    recipe.write_text(recipe.read_text() + "kernel: fast\n")
    assert run_cli("run", recipe).returncode == 0
    evaluated = next(r for r in json.loads((tmp_path / "out" / "report.json").read_text())["stages"] if r["name"] == "eval")
    assert evaluated["metrics"]["kernel"] == ("native" if NATIVE_OK else "int4pack")
    plain = tiny_recipe(tmp_path, stages, name="plain.yaml")
    assert load_recipe(recipe).fingerprint(1) == load_recipe(plain).fingerprint(1)
    from compress.kernels import forced_backend, preferring

    with preferring("fast"):
        assert forced_backend() == "fast"
    assert "COMPRESS_KERNEL" not in os.environ
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    with preferring("fast"):
        assert forced_backend() == "reference"
