"""Dequant-matmul kernels: the tiled torch path and the Triton kernels against independent oracles.

Oracles: ``QuantizedWeight.dequantize`` (quant/, the packing/quantizer code, not the kernels' layout)
for bit-exact dequantization, and float64 ``x @ W^T`` of that dequantized weight for products, with
the Marlin bar: mean |y - y_ref| / mean |y_ref| < 1e-3. Without a GPU the Triton kernels run in
Triton's interpreter (TRITON_INTERPRET=1, set in conftest before triton is imported) on CPU tensors;
with one, the same tests run the compiled kernels on CUDA.
"""

import itertools

import pytest
import torch

from compress.kernels import layout, reference
from compress.quant import kernel_layout
from compress.quant.config import QuantConfig, UniformConfig
from compress.quant.packing import unpack_codes
from compress.quant.qweight import QuantizedWeight

triton_launch = pytest.importorskip("compress.kernels.triton_launch", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(96, 200), (40, 96), (64, 384)]  # (N, K): K and N not powers of two; 200 % 64 = 8 (partial group)
# explicit launch configs with 32-row K tiles: every tile inside one group/block (GROUP_ALIGNED path)
ALIGNED = {"gemv": {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 2},
           "gemm": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}}
UNIFORM = [QuantConfig.uniform(b, g, sym) for b in (2, 3, 4, 8) for g in (32, 64, 128, -1) for sym in (False, True)] + [
    QuantConfig.uniform(b, g, float_zero=True) for b in (2, 3, 4, 8) for g in (64, -1)]  # fp16 zeros (L4Q float)
NF = [QuantConfig.nf(b, block=block) for b in (2, 3, 4, 8) for block in (32, 64)] + [
    QuantConfig.nf(4, block=64, scale_bits=3, scale_block=16, scale_dtype="bfloat16")]
CONFIGS = UNIFORM + NF
# Half-precision tolerances for the Triton kernels. The interpreter computes the dot in fp32, so only
# the output's rounding remains. On a GPU the dequantized weight is rounded to the activation dtype
# for the tensor-core dot (as a dense half-precision model's weight is): fp16 keeps 11 significant
# bits (the Marlin bar of 1e-3 holds), bf16 only 8, i.e. 2^-9 = 2e-3 relative rounding per weight.
HALF_TOLERANCE = {("cpu", torch.float16): 1e-3, ("cpu", torch.bfloat16): 1e-3,
                  ("cuda", torch.float16): 1e-3, ("cuda", torch.bfloat16): 4e-3}


def packed(shape, config, seed=0, act_order=False):
    """(QuantizedWeight, its fp32 oracle dequantization) for a random weight of ``shape``."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    qweight = QuantizedWeight.quantize(weight, config)
    if act_order:  # scatter the groups over K, as desc_act checkpoints do
        g_idx = qweight.tensors["g_idx"]
        qweight.tensors["g_idx"] = g_idx[torch.randperm(g_idx.numel(), generator=torch.Generator().manual_seed(seed))]
    return qweight, qweight.dequantize()


def on_device(weight: layout.KernelWeight) -> layout.KernelWeight:
    for name, value in vars(weight).items():
        if isinstance(value, torch.Tensor):
            setattr(weight, name, value.to(DEVICE))
    return weight


def relative_error(y, reference_out):
    return ((y.double() - reference_out).abs().mean() / reference_out.abs().mean()).item()


def float64_reference(x, dense):
    return x.double() @ dense.double().t().to(x.device)


# --- layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_unpack_rows_matches_bit_stream_unpacker(bits):
    codes = torch.randint(0, 2**bits, (75, 33), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    if bits == 1:
        plane = kernel_layout.pack_bit_plane(codes)
        rows = reference.unpack_plane_rows(plane, 1, 32, 75)
        assert torch.equal(rows.int(), codes[32:])
        return
    lo, hi = kernel_layout.code_planes(codes, bits)
    weight = layout.KernelWeight(bits=bits, shape=(33, 75), codes=lo, codes_hi=hi)
    assert torch.equal(reference.unpack_rows(weight, 0, 75).int(), codes)
    assert torch.equal(reference.unpack_rows(weight, 64, 75).int(), codes[64:])
    if bits != 3:
        assert torch.equal(unpack_codes(lo, bits, 75), codes)


def test_two_and_four_and_eight_bit_layout_is_the_checkpoint_qweight():
    qweight, _ = packed((64, 128), QuantConfig.uniform(4, 64))
    prepared = qweight.kernel_weight()
    assert prepared.codes is qweight.tensors["qweight"] and prepared.codes_hi is None
    assert prepared.zero_mode == 1 and prepared.qzeros is qweight.tensors["qzeros"]
    sym = packed((64, 128), QuantConfig.uniform(4, 64, sym=True))[0].kernel_weight()
    three = packed((64, 128), QuantConfig.uniform(3, 64))[0].kernel_weight()
    assert sym.zero_mode == 0 and three.zero_mode == 2 and three.codes_hi.shape == (4, 64)


# --- tiled torch path -------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_reference_dequantize_is_bit_exact(config, monkeypatch):
    monkeypatch.setattr(reference, "TILE_ELEMENTS", 1024)  # several tiles even for small shapes
    for shape, act_order in [((96, 200), False), ((40, 96), False), ((64, 384), isinstance(config, UniformConfig))]:
        qweight, oracle = packed(shape, config, act_order=act_order)
        prepared = qweight.kernel_weight()
        assert len(reference.tile_bounds(prepared)) > 1
        assert torch.equal(reference.dequantize(prepared), oracle), (shape, act_order)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_reference_matmul_error(config, monkeypatch):
    monkeypatch.setattr(reference, "TILE_ELEMENTS", 1024)
    for shape, batch in itertools.product(SHAPES, (1, 3, 16, 33)):
        qweight, oracle = packed(shape, config, seed=batch)
        x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(batch))
        bias = torch.randn(shape[0])
        y = reference.dequant_matmul(x, qweight.kernel_weight(), bias)
        assert y.dtype == torch.float32
        assert relative_error(y, float64_reference(x, oracle) + bias.double()) < 1e-5, (shape, batch)


@pytest.mark.parametrize("config", [QuantConfig.uniform(b, 64) for b in (2, 3, 4, 8)] + [QuantConfig.nf(b) for b in (2, 4, 8)],
                         ids=lambda c: c.name)
def test_lookup_table_sums_equal_unpacked_products(config):
    """lut_gemv: per-segment sums of x * code value, against codes unpacked by quant/ in float64."""
    from compress.kernels import lut_gemv

    qweight, _ = packed((40, 384), config)
    prepared = qweight.kernel_weight()
    x = torch.randn(384, generator=torch.Generator().manual_seed(3))
    if isinstance(config, UniformConfig):
        values = unpack_codes(qweight.tensors["qweight"], config.bits, 384, dim=0).double()  # [K, N]
    else:
        flat = unpack_codes(qweight.tensors["codes"], config.bits, 40 * 384)
        values = prepared.lut.double()[flat.long()].view(40, 384).t()
    expected = (x.double().view(-1, 1) * values)[64:320].view(4, 64, 40).sum(dim=1)
    got = lut_gemv.segment_sums(prepared, x[64:320], 64, 320, 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_activations(dtype):
    qweight, oracle = packed((96, 256), QuantConfig.uniform(4, 64))
    for batch in (1, 40):  # scale-after-product path and dequantized-tile path
        x = torch.randn(2, batch, 256).to(dtype)
        y = reference.dequant_matmul(x, qweight.kernel_weight())
        assert y.dtype == dtype and y.shape == (2, batch, 96)
        expected = float64_reference(x.reshape(-1, 256), oracle).to(dtype).double()
        assert relative_error(y.reshape(-1, 96), expected) < 1e-3


# --- Triton kernels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_triton_dequant_tile_is_bit_exact(config):
    for shape, act_order in [((96, 200), False), ((64, 384), isinstance(config, UniformConfig))]:
        qweight, oracle = packed(shape, config, act_order=act_order)
        prepared = on_device(qweight.kernel_weight())
        for block_k, block_n in ((32, 32), (64, 128), (256, 64)):  # aligned, aligned, unaligned
            tiles = triton_launch.triton_dequantize(prepared, block_k, block_n)
            if DEVICE == "cpu":
                assert torch.equal(tiles.t(), oracle), (shape, block_k, block_n)
            else:  # compiled code may contract multiply-adds: within one fp32 rounding
                torch.testing.assert_close(tiles.t().cpu(), oracle, rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_triton_matmul_error(config):
    for shape, batch in itertools.product(SHAPES, (1, 3, 16, 33)):
        qweight, oracle = packed(shape, config, seed=batch)
        x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(batch)).to(DEVICE)
        prepared = on_device(qweight.kernel_weight())
        expected = float64_reference(x, oracle)
        y = triton_launch.triton_dequant_matmul(x, prepared)  # default (unaligned) large tiles
        assert y.shape == (batch, shape[0]) and y.dtype == torch.float32
        assert relative_error(y, expected) < 1e-3, (shape, batch)
        if shape == (64, 384) and batch in (3, 33):  # the aligned path, once per kernel family
            path = "gemv" if batch <= 16 else "gemm"
            aligned = triton_launch.triton_dequant_matmul(x, prepared, config=ALIGNED[path], path=path)
            assert relative_error(aligned, expected) < 1e-3, (shape, batch, "aligned")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [QuantConfig.uniform(4, 64), QuantConfig.uniform(3, 128, sym=True),
                                    QuantConfig.nf(4)], ids=lambda c: c.name)
def test_triton_half_activations(config, dtype):
    qweight, oracle = packed((96, 200), config)
    prepared = on_device(qweight.kernel_weight())
    for batch in (1, 16, 33):
        x = torch.randn(batch, 200).to(dtype).to(DEVICE)
        y = triton_launch.triton_dequant_matmul(x, prepared)
        assert y.dtype == dtype
        expected = float64_reference(x, oracle).to(dtype).double()  # the output dtype's own rounding
        assert relative_error(y, expected) < HALF_TOLERANCE[(DEVICE, dtype)], batch


def test_group_aligned_heuristic():
    from compress.kernels.triton_dequant import group_aligned

    uniform = {"FORMAT": 0, "USE_GIDX": False, "GROUP": 128, "K": 4096, "NF_BLOCK": 1}
    assert group_aligned({**uniform, "BLOCK_K": 64}) and not group_aligned({**uniform, "BLOCK_K": 256})
    assert not group_aligned({**uniform, "BLOCK_K": 64, "USE_GIDX": True})
    nf = {"FORMAT": 1, "USE_GIDX": False, "GROUP": 1, "NF_BLOCK": 64}
    assert group_aligned({**nf, "K": 384, "BLOCK_K": 32}) and not group_aligned({**nf, "K": 200, "BLOCK_K": 32})


@pytest.mark.parametrize("split_k", [2, 3])
def test_triton_split_k_and_forced_paths(split_k):
    qweight, oracle = packed((80, 416), QuantConfig.uniform(4, 32))
    prepared = on_device(qweight.kernel_weight())
    x = torch.randn(5, 416).to(DEVICE)
    expected = float64_reference(x, oracle)
    split = triton_launch.triton_dequant_matmul(x, prepared, config={"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": split_k},
                                                path="gemv")
    assert relative_error(split, expected) < 1e-5
    gemm = triton_launch.triton_dequant_matmul(x, prepared, path="gemm")  # M padded to a 16-row dot
    assert relative_error(gemm, expected) < 1e-5


def test_triton_launcher_says_what_is_unsupported(monkeypatch):
    prepared = on_device(packed((64, 128), QuantConfig.uniform(4, 64))[0].kernel_weight())
    with pytest.raises(triton_launch.UnsupportedLayerError, match=r"input has 96 features, the weight expects 128"):
        triton_launch.triton_dequant_matmul(torch.randn(2, 96, device=DEVICE), prepared)
    with pytest.raises(triton_launch.UnsupportedLayerError, match=r"torch.float64; supported: fp16, bf16, fp32"):
        triton_launch.triton_dequant_matmul(torch.randn(2, 128, dtype=torch.float64, device=DEVICE), prepared)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(triton_launch.UnsupportedLayerError, match=r"Triton needs CUDA tensors"):
            triton_launch.triton_dequant_matmul(torch.randn(2, 128), prepared)


def test_empty_batch():
    prepared = on_device(packed((64, 128), QuantConfig.uniform(4, 64))[0].kernel_weight())
    x = torch.randn(0, 128, device=DEVICE)
    assert triton_launch.triton_dequant_matmul(x, prepared).shape == (0, 64)
    assert reference.dequant_matmul(x.cpu(), packed((64, 128), QuantConfig.uniform(4, 64))[0].kernel_weight()).shape == (0, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: autotuned compiled kernels at Llama shapes")
@pytest.mark.parametrize("config", [QuantConfig.uniform(4, 128), QuantConfig.uniform(3, 128), QuantConfig.uniform(2, 64, sym=True),
                                    QuantConfig.uniform(8, 128), QuantConfig.nf(4)], ids=lambda c: c.name)
def test_cuda_autotuned_llama_shapes(config):
    """The autotuned path (every config the pruner keeps) at a real shape, fp16 activations."""
    qweight, oracle = packed((4096, 4096), config)
    prepared = on_device(qweight.kernel_weight())
    for batch in (1, 16, 64):
        x = (torch.randn(batch, 4096) / 10).to(torch.float16).to(DEVICE)
        y = triton_launch.triton_dequant_matmul(x, prepared)
        expected = float64_reference(x, oracle).to(torch.float16).double()
        assert relative_error(y, expected) < 1e-3, batch


def test_autotune_pruners_keep_fitting_configs():
    from compress.kernels.triton_gemm import gemm_configs, prune_gemm_configs
    from compress.kernels.triton_gemv import MAX_LIVE, gemv_configs, prune_gemv_configs

    kept = prune_gemv_configs(gemv_configs(), {"N": 96, "K": 200, "GROUP": 64}, BITS=4, BLOCK_M=16)
    assert kept and all(c.kwargs["BLOCK_N"] <= 128 and 64 % c.kwargs["BLOCK_K"] == 0 for c in kept)
    three = prune_gemv_configs(gemv_configs(), {"N": 4096, "K": 4096, "GROUP": 128}, BITS=3, BLOCK_M=1)
    assert three and all(c.kwargs["BLOCK_K"] % 32 == 0 for c in three)  # whole words of the 1-bit plane
    small = prune_gemv_configs(gemv_configs(), {"N": 4096, "K": 4096, "GROUP": 128}, BITS=4, BLOCK_M=4)
    assert all(4 * c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] <= MAX_LIVE * 32 * c.num_warps for c in small)
    channel = prune_gemv_configs(gemv_configs(), {"N": 4096, "K": 4096, "GROUP": 4096}, BITS=8, BLOCK_M=1)
    assert {c.kwargs["BLOCK_K"] for c in channel} == {16, 32, 64, 128}  # one group: any whole-word tile
    odd = prune_gemv_configs(gemv_configs(), {"N": 4096, "K": 4096, "GROUP": 8}, BITS=3, BLOCK_M=1)
    assert odd and all(c.kwargs["BLOCK_K"] % 32 == 0 for c in odd)  # no tile divides the group: per-row scales
    gemm = prune_gemm_configs(gemm_configs(), {"M": 33, "N": 96, "K": 200, "GROUP": 32}, BITS=4)
    assert gemm and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 128 and c.kwargs["BLOCK_K"] == 32
                        for c in gemm)
    assert len(gemm) < len(gemm_configs())


def test_the_quick_autotuning_space_is_a_subset_of_the_full_one():
    from compress.kernels.triton_gemv import gemv_configs

    def key(config):
        return tuple(sorted(config.kwargs.items())) + (config.num_warps, config.num_stages)

    full, quick = {key(c) for c in gemv_configs("full")}, [key(c) for c in gemv_configs("quick")]
    assert len(full) == 48 and len(quick) == 6 and set(quick) <= full
    with pytest.raises(ValueError, match="COMPRESS_TRITON_TUNE is full or quick"):
        gemv_configs("fast")


def test_kernels_compile_for_h100_and_a100_without_a_gpu():
    """The interpreter accepts code the compiler rejects: lower representative variants to cubins
    for sm_90 and sm_80 with Triton's compiler and bundled ptxas (tests/gpu_compile_check.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("gpu_compile_check.py")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


@pytest.mark.parametrize("config", [QuantConfig.uniform(4, 64), QuantConfig.uniform(3, 32, sym=True), QuantConfig.nf(4)],
                         ids=lambda c: c.name)
def test_reference_backward_recomputes_tiles(config, monkeypatch):
    """Gradients wrt activations (LoRA training over a packed base) equal dense float64 autograd; the
    graph keeps no dequantized tile (only the input and the packed weight)."""
    monkeypatch.setattr(reference, "TILE_ELEMENTS", 1024)
    qweight, oracle = packed((64, 384), config)
    prepared = qweight.kernel_weight()
    bias = torch.randn(64, requires_grad=True)
    x = torch.randn(2, 5, 384, requires_grad=True)
    y = reference.dequant_matmul(x, prepared, bias)
    assert type(y.grad_fn).__name__ != "AddmmBackward0"
    y.pow(2).sum().backward()
    x64, bias64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    torch.nn.functional.linear(x64, oracle.double(), bias64).pow(2).sum().backward()
    assert relative_error(x.grad, x64.grad) < 1e-6  # fp32 accumulation vs float64
    assert relative_error(bias.grad, bias64.grad) < 1e-6


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_borrowed_gptqmodel_qzeros_read_unpacked(bits):
    """qzeros where GPTQModel wrote a zero of 0 (a borrow across fields) are not per-field zero - 1:
    the layout reads the unpacked zeros (mode 2), and the tiled and Triton dequantizations equal
    scale * (q - zero) computed in float64 from the true zeros."""
    from test_uniform import gptqmodel_v1_words

    qweight, _ = packed((64, 128), QuantConfig.uniform(bits, 64))
    zeros = torch.randint(0, 2**bits, (2, 64), generator=torch.Generator().manual_seed(bits))
    zeros[:, 0] = 0
    qweight.tensors["qzeros"] = gptqmodel_v1_words(zeros, bits)
    codes = unpack_codes(qweight.tensors["qweight"], bits, 128, dim=0)  # [K, N]
    scales = qweight.tensors["scales"].double().repeat_interleave(64, dim=0)
    expected = ((codes - zeros.repeat_interleave(64, dim=0)).double() * scales).t().float()
    prepared = qweight.kernel_weight()
    assert prepared.zero_mode == 2
    assert torch.equal(qweight.dequantize(), expected)
    assert torch.equal(reference.dequantize(prepared), expected)
    tiles = triton_launch.triton_dequantize(on_device(prepared), 32, 32)
    torch.testing.assert_close(tiles.t().cpu(), expected, rtol=0 if DEVICE == "cpu" else 2e-7, atol=0 if DEVICE == "cpu" else 1e-7)


def test_static_check_counts_loads_per_word_for_sm90(tmp_path):
    """benchmarks/kernel_static.py on one format: the new kernels load each packed word once (vector
    loads: < 1 instruction per word), read one scale and one zero per group and column, and do not
    spill; the old kernels (benchmarks/legacy_kernels.py) loaded words more than once. Runs the
    compiler only (no GPU), without TRITON_INTERPRET."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "static.json"
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_static.py"), "--formats", "int4 asym,nf3",
                             "--dtypes", "fp16", "--json", str(out)], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 8  # 2 formats x (GEMV M = 1, 4, 16 and GEMM)
    for row in rows:
        new, old = row["new"], row["old"]
        assert new["loads_per_word"] <= 0.5 < old["loads_per_word"], row  # the goal: <= 1 (<= 2 at 3 bits)
        assert new["scales_per_group_column"] == 1 and new["zeros_per_group_column"] == (1 if row["format"] == "int4 asym" else 0)
        assert new["spills"] == 0 and new["i2f_per_weight"] == 0
