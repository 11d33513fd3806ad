"""`compress inspect` and `compress eval`: the JSON keys scripts rely on, and errors as exit code 2."""

import json

import pytest
from conftest import micro_llama, quantize_model, run_cli

from compress.checkpoint import write_gptq, write_native
from compress.quant import QuantConfig, QuantLinear


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_pair):
    import copy

    base, tokenizer = tiny_pair
    root = tmp_path_factory.mktemp("ckpts")
    gptq = quantize_model(copy.deepcopy(base), lambda n: QuantConfig.uniform(8 if "down" in n else 4, 64))
    write_gptq(gptq, root / "gptq", tokenizer=tokenizer)
    write_native(quantize_model(micro_llama(), lambda n: QuantConfig.nf(4)), root / "native")
    return root, gptq


def test_inspect_json(checkpoints):
    root, model = checkpoints
    result = run_cli("inspect", root / "gptq", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    for key in ("bits_per_param", "bits_per_param_total", "bytes", "modules", "format", "kernel"):
        assert key in info
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    expected = sum(m.config.storage_bits(m.shape) for m in quantized) / sum(m.shape[0] * m.shape[1] for m in quantized)
    assert info["bits_per_param"] == pytest.approx(expected)
    assert info["format"] == "gptq" and info["kernel"] == "reference"
    table = run_cli("inspect", root / "native")
    assert table.returncode == 0 and "bits/param" in table.stdout and "nf4" in table.stdout


def test_eval_json(checkpoints):
    root, _ = checkpoints
    result = run_cli("eval", root / "gptq", "--samples", "2", "--seq-len", "32", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["perplexity"] > 1 and info["samples"] == 2 and info["data"] == "stdlib:eval"


def test_errors_exit_2(tmp_path, checkpoints):
    root, _ = checkpoints
    for args in (("inspect", tmp_path / "nothing"), ("eval", tmp_path / "nothing"),
                 ("eval", root / "native", "--samples", "1")):  # no tokenizer in that checkpoint
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")
