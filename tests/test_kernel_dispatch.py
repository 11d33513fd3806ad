"""The dispatcher, the custom ops, and whole models served through each backend.

Without a GPU the Triton backend runs in Triton's interpreter (TRITON_INTERPRET=1 from conftest).
"""

import pytest
import torch

from compress import kernels
from compress.kernels import layout
from compress.quant import QuantLinear
from compress.quant.config import QuantConfig
from compress.quant.qweight import QuantizedWeight
from conftest import logits, quantize_model, run_cli

triton_launch = pytest.importorskip("compress.kernels.triton_launch", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

MIXED = {"q_proj": QuantConfig.uniform(4, 64), "k_proj": QuantConfig.uniform(3, 32, sym=True),
         "v_proj": QuantConfig.uniform(8, -1), "o_proj": QuantConfig.uniform(2, 64),
         "gate_proj": QuantConfig.nf(4), "up_proj": QuantConfig.nf(3), "down_proj": QuantConfig.uniform(4, 128, sym=True)}


def mixed_config(name):
    return MIXED[name.rsplit(".", 1)[-1]]


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    assert kernels.select_backend(torch.device("cpu")) == (
        "reference", "cpu: bf16/fp16 activations through the CPU fast path (native, else int4pack), "
                     "fp32 through the exact tiled path")
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    assert kernels.select_backend(torch.device("cuda")) == ("reference", "COMPRESS_KERNEL=reference")
    monkeypatch.setenv("COMPRESS_KERNEL", "triton")
    assert kernels.select_backend(torch.device("cpu"))[0] == "triton"  # interpreter on
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(kernels.KernelUnavailableError, match="Triton needs a CUDA device"):
        kernels.select_backend(torch.device("cpu"))
    monkeypatch.setenv("COMPRESS_KERNEL", "quick")
    with pytest.raises(kernels.KernelUnavailableError, match="'quick' is not one of auto, fast, triton, native, int4pack, reference"):
        kernels.select_backend()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the automatic choice of Triton")
def test_cuda_picks_triton(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    assert kernels.select_backend(torch.device("cuda"))[0] == "triton"


def test_bad_kernel_choice_exits_2(tmp_path):
    import os

    env = {**os.environ, "COMPRESS_KERNEL": "cuda"}
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "compress.entry.cli", "inspect", str(tmp_path)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: COMPRESS_KERNEL='cuda' is not one of auto, fast, triton, native, "
                                     "int4pack, reference")


@pytest.mark.parametrize("config", [QuantConfig.uniform(4, 64), QuantConfig.uniform(3, 32), QuantConfig.nf(4)],
                         ids=lambda c: c.name)
def test_custom_ops_pass_opcheck(config):
    qweight = QuantizedWeight.quantize(torch.randn(64, 96), config)
    prepared = qweight.kernel_weight()
    x = torch.randn(3, 96)
    if not prepared.codebook:
        zeros = {0: None, 1: prepared.qzeros, 2: prepared.zeros}[prepared.zero_mode]
        op, args = torch.ops.compress.dequant_matmul_uniform, (
            x, prepared.codes, prepared.codes_hi, prepared.scales, zeros, prepared.zero_folded, prepared.g_idx,
            prepared.bits, prepared.group_size, prepared.zero_mode, 64)
    else:
        op, args = torch.ops.compress.dequant_matmul_nf, (
            x, prepared.codes, prepared.codes_hi, prepared.lut, prepared.scale_codes, prepared.scale_scales,
            prepared.scale_offset, prepared.nf_scales, prepared.bits, prepared.block, prepared.scale_block,
            prepared.scale_levels, prepared.nf_group, 64)
    torch.library.opcheck(op, args)


def test_torch_compile_traces_the_custom_op():
    prepared = QuantizedWeight.quantize(torch.randn(64, 96), QuantConfig.uniform(4, 32)).kernel_weight()
    bias = torch.randn(64)

    def forward(x):
        return torch.relu(kernels.dequant_matmul(x, prepared, bias, backend="triton"))

    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)  # fails on any graph break
    x = torch.randn(2, 5, 96)
    torch.testing.assert_close(compiled(x), forward(x), rtol=0, atol=0)


def test_quant_linear_records_backend_and_caches_layout(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    layer = QuantLinear.quantize(torch.nn.Linear(96, 64), QuantConfig.uniform(3, 32))
    x = torch.randn(2, 96)
    reference_out = layer(x)
    assert layer.backend == "reference"
    first = layer.kernel_weight()
    assert layer.kernel_weight() is first  # cached
    monkeypatch.setenv("COMPRESS_KERNEL", "triton")
    torch.testing.assert_close(layer(x), reference_out, rtol=1e-5, atol=1e-5)
    assert layer.backend == "triton"
    layer.scales.mul_(2)  # an in-place change of a buffer rebuilds the layout
    assert layer.kernel_weight() is not first
    assert "kernel_weight" not in str(layer.state_dict().keys())


def test_model_logits_triton_equal_reference(tiny_model, probe_ids, monkeypatch):
    model = quantize_model(tiny_model, mixed_config)
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    expected = logits(model, probe_ids)
    monkeypatch.setenv("COMPRESS_KERNEL", "triton")
    got = logits(model, probe_ids)
    assert {m.backend for m in model.modules() if isinstance(m, QuantLinear)} == {"triton"}
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_checkpoint_perplexity_same_through_triton_and_reference(tmp_path):
    """A packed checkpoint scored by ``compress eval`` through each backend (separate processes)."""
    import json
    import os

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: tiny-llama
data:
  calibration: {{source: stdlib, split: train, samples: 2, seq_len: 64}}
  eval:        {{source: stdlib, split: eval,  samples: 2, seq_len: 64}}
stages:
  - quantize: {{config: {{bits: 4, group_size: 64}}, overrides: {{"re:.*k_proj$": {{bits: 3, group_size: 32}},
               "re:.*down_proj$": {{bits: 2, group_size: 64, sym: true}}}}}}
  - export: {{format: gptq, path: checkpoint, verify: false}}
output: {tmp_path / 'out'}
""")
    assert run_cli("run", recipe).returncode == 0
    scores = {}
    for backend in ("reference", "triton"):
        os.environ["COMPRESS_KERNEL"] = backend
        try:
            result = run_cli("eval", tmp_path / "out" / "checkpoint", "--samples", "2", "--seq-len", "64", "--json")
        finally:
            del os.environ["COMPRESS_KERNEL"]
        assert result.returncode == 0, result.stderr
        scores[backend] = json.loads(result.stdout)
    assert scores["triton"]["kernel"] == "triton" and scores["reference"]["kernel"] == "reference"
    assert scores["triton"]["perplexity"] == pytest.approx(scores["reference"]["perplexity"], rel=1e-5)


@pytest.mark.parametrize("config", [QuantConfig.uniform(3, 32), QuantConfig.nf(4)], ids=lambda c: c.name)
def test_custom_op_backward_matches_dense(config, monkeypatch):
    """Gradients flow to the activations through the Triton op (LoRA training over a packed base)."""
    monkeypatch.setenv("COMPRESS_KERNEL", "triton")
    layer = QuantLinear.quantize(torch.nn.Linear(96, 64), config)
    dense = layer.dequantize().double()
    x = torch.randn(2, 3, 96, requires_grad=True)
    layer(x).pow(2).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (torch.nn.functional.linear(x64, dense, layer.bias.double())).pow(2).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    assert layer.backend == "triton"


def test_cpu_path_never_imports_triton(tmp_path):
    """kernels.reference and the dispatcher's CPU choice work without importing triton at all."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from compress.quant import QuantConfig, QuantLinear\n"
        "layer = QuantLinear.quantize(torch.nn.Linear(64, 32), QuantConfig.nf(4))\n"
        "layer(torch.randn(3, 64))\n"
        "assert layer.backend == 'reference', layer.backend\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("COMPRESS_KERNEL", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
