"""Reading direction: the mixed 2/3/4/8-bit checkpoint that GPTQModel 7.6.0 wrote itself
(tests/data/gptqmodel-mixed-tiny, a copy of ../shared/data/gptqmodel-mixed-tiny) loads through compress.load and reproduces its logits.

GPTQModel computed the reference in bfloat16 (its CPU kernel refuses fp32); our fp32 dequantize-and-
matmul must agree up to bf16 rounding: max |diff| <= 0.02 (1.5 % of the largest logit, 1.375) and mean
|diff| <= 0.004. (With the interop venv, tests/test_interop_gptqmodel.py also compares against
GPTQModel's own fp32 path at 1e-5.)"""

import json

import pytest
import torch
from conftest import GPTQMODEL_CKPT
from safetensors.torch import load_file

import compress


@pytest.fixture(scope="module")
def reference():
    return load_file(str(GPTQMODEL_CKPT / "reference_logits.safetensors"))


def test_reads_gptqmodel_mixed_checkpoint(reference):
    model = compress.load(GPTQMODEL_CKPT / "quantized", dtype="float32")
    layers = model.model.layers
    assert layers[0].self_attn.q_proj.config.bits == 2
    assert layers[1].self_attn.q_proj.config.bits == 4
    assert layers[1].mlp.up_proj.config.bits == 3 and layers[0].mlp.up_proj.config.bits == 4
    assert layers[0].mlp.down_proj.config.bits == 8 and layers[1].mlp.down_proj.config.bits == 8
    with torch.no_grad():
        ours = model(input_ids=reference["input_ids"]).logits
    diff = (ours - reference["logits"]).abs()
    assert float(diff.max()) <= 0.02 and float(diff.mean()) <= 0.004


def test_inspect_reads_bits(reference):
    info = compress.inspect(GPTQMODEL_CKPT / "quantized")
    assert info["format"] == "gptq"
    by_name = {m["name"]: m for m in info["modules"]}
    assert by_name["model.layers.1.mlp.up_proj"]["bits"] == 3
    assert by_name["model.layers.1.mlp.up_proj"]["shape"] == [768, 256]
    # sym checkpoints: codes + fp16 scales per group of 32 (zeros are the format's constant)
    expected = {2: 2.5, 3: 3.5, 4: 4.5, 8: 8.5}
    for row in info["modules"]:
        if row["format"] == "uniform":
            assert row["counted_bits"] / row["params"] == expected[row["bits"]]
    quant = json.loads((GPTQMODEL_CKPT / "quantized" / "config.json").read_text())["quantization_config"]
    assert quant["sym"] is True
