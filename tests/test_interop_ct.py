"""Interop with the third-party compressed-tensors reader: the ``compressed-tensors`` library
(0.20.1, in the interop side venv) and transformers 5.24 loading through it.

- Writing direction: a mixed 2/3/4/8-bit checkpoint of tiny-llama written by us (sym and asym; group
  32, 64, 128 and per channel): the library's ``PackedQuantizationCompressor.decompress`` gives
  every module exactly our dequantized weight (torch.equal, fp32: the product (q - zp) * scale is
  exact there). transformers' ``from_pretrained`` on its symmetric twin (the same bits and groups)
  gives logits within 1e-4 (max abs) of ``compress.load``'s; the asymmetric one it refuses (a size
  mismatch on ``weight_zero_point``: compressed-tensors' rule, below), as the engine verdict says.
- Reading direction: the fixture written by the library's own compressor
  (tests/data/ct-library-tiny, made by tests/interop/ct_side.py write_fixture) loads in
  ``compress.load`` with logits within 1e-4 of the library's reference logits.

The side venv comes from `make interop-venv`; `make test` sets COMPRESS_REQUIRE_INTEROP=1, so a
missing venv fails instead of skipping.
"""

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import INTEROP_MARKS, INTEROP_PYTHON, ROOT, logits, quantize_model, require_interop
from safetensors.torch import load_file, save_file

import compress
from compress.checkpoint import write_compressed_tensors
from compress.quant import QuantConfig, QuantLinear

FIXTURE = ROOT / "tests" / "data" / "ct-library-tiny"
pytestmark = INTEROP_MARKS


SCHEMES = (  # (module name part, config): the first that the name contains
    (".0.self_attn.", QuantConfig.uniform(2, 32, sym=True)),
    (".1.mlp.gate_proj", QuantConfig.uniform(3, 64, sym=False)), (".1.mlp.up_proj", QuantConfig.uniform(3, 64, sym=False)),
    ("down_proj", QuantConfig.uniform(8, 128, sym=False)),
    (".2.self_attn.", QuantConfig.uniform(4, -1, sym=True)),
    ("o_proj", QuantConfig.uniform(4, 64, sym=True)),
    ("", QuantConfig.uniform(4, 64, sym=False)),
)


def mixed(name: str) -> QuantConfig:
    return next(config for part, config in SCHEMES if part in name)


def side(jobs: list[dict], work: Path) -> None:
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([str(INTEROP_PYTHON), str(ROOT / "tests" / "interop" / "ct_side.py"), str(work / "jobs.json")],
                            cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def interop(tiny_pair, tmp_path_factory):
    require_interop()
    base, tokenizer = tiny_pair
    work = tmp_path_factory.mktemp("ct-interop")
    models = {"mixed": quantize_model(copy.deepcopy(base), mixed),
              "mixed-sym": quantize_model(copy.deepcopy(base), lambda n: symmetric(mixed(n)))}
    for name, model in models.items():
        write_compressed_tensors(model, work / name, tokenizer=tokenizer)
    ids = torch.randint(0, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    save_file({"input_ids": ids}, str(work / "ids.safetensors"))
    side([{"action": "decompress", "path": str(work / "mixed"), "output": str(work / "weights.safetensors")}]
         + [{"action": "transformers", "path": str(work / name), "input_ids": str(work / "ids.safetensors"),
             "output": str(work / f"{name}-logits.safetensors")} for name in models], work)
    return {"work": work, "models": models, "ids": ids}


def symmetric(config: QuantConfig) -> QuantConfig:
    return QuantConfig.uniform(config.bits, config.group_size, sym=True)


def test_the_library_decompresses_our_modules_to_our_weights(interop):
    theirs = load_file(str(interop["work"] / "weights.safetensors"))
    ours = {n: m for n, m in interop["models"]["mixed"].named_modules() if isinstance(m, QuantLinear)}
    assert sorted(theirs) == sorted(f"{n}.weight" for n in ours)
    assert {(m.config.bits, m.config.sym) for m in ours.values()} >= {(2, True), (3, False), (4, True), (4, False),
                                                                     (8, False)}
    assert {m.config.group_size for m in ours.values()} == {32, 64, 128, -1}
    for name, module in ours.items():
        assert torch.equal(theirs[f"{name}.weight"], module.dequantize(torch.float32)), name


def test_transformers_logits_match_compress_load(interop):
    """Symmetric schemes at 2/3/4/8 bits load in transformers with compress.load's logits."""
    sidecar = json.loads((interop["work"] / "mixed-sym-logits.safetensors.json").read_text())
    assert "error" not in sidecar, sidecar.get("trace", sidecar)
    theirs = load_file(str(interop["work"] / "mixed-sym-logits.safetensors"))["logits"]
    ours = logits(compress.load(interop["work"] / "mixed-sym", dtype="float32"), interop["ids"])
    assert torch.equal(ours, logits(interop["models"]["mixed-sym"], interop["ids"]))
    assert float((ours - theirs).abs().max()) <= 1e-4


def test_transformers_refuses_asymmetric_zero_points_as_the_verdict_says(interop):
    """compressed-tensors 0.20.1 builds the weight_zero_point slot unpacked when transformers loads
    on the meta device (compressors/pack_quantized/base.py: compress() skips the zero point for meta
    weights), so transformers' load report refuses the packed tensor, ours and the library's own
    fixture's alike (tests/data/ct-library-tiny/transformers.safetensors.json)."""
    refused = json.loads((interop["work"] / "mixed-logits.safetensors.json").read_text())
    assert "ignore_mismatched_sizes" in refused["error"]
    fixture = json.loads((FIXTURE / "transformers.safetensors.json").read_text())
    assert "ignore_mismatched_sizes" in fixture["error"]
    verdict = compress.inspect(interop["work"] / "mixed")["engines"]["transformers"]
    assert not verdict["loads"] and "weight_zero_point" in verdict["reason"]
    assert compress.inspect(interop["work"] / "mixed-sym")["engines"]["transformers"]["loads"]


def test_the_librarys_own_checkpoint_loads_in_compress():
    reference = load_file(str(FIXTURE / "reference_logits.safetensors"))
    model = compress.load(FIXTURE / "quantized", dtype="float32")
    layers = {n: m.config for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert {(c.bits, c.group_size, c.sym) for c in layers.values()} == {(4, 32, True), (3, 64, True), (4, 64, False)}
    ours = logits(model, reference["input_ids"])
    assert float((ours - reference["logits"]).abs().max()) <= 1e-4
