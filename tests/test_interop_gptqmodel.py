"""Interop with a third-party loader: GPTQModel 7.6.0 (its own venv, BACKEND.GPTQ_TORCH) and plain
transformers + GPTQModel + optimum.

- Writing direction: a mixed 2/3/4/8-bit GPTQ checkpoint of tiny-llama written by us loads in
  GPTQModel, which assigns every module the bits we wrote, and its fp32 logits match ours within
  1e-5 (max abs; measured 1.0e-6; the dense weights are bf16-exact so GPTQModel's fp16 load loses nothing).
- Reading direction: GPTQModel's own fp32 logits for the checkpoint it wrote
  (tests/data/gptqmodel-mixed-tiny, a copy of ../shared/data/gptqmodel-mixed-tiny) match compress.load's within
  1e-5 (measured 7.7e-7).
- A LoRA adapter written by us (PEFT format) applies with PeftModel.from_pretrained over GPTQModel's
  load of our mixed checkpoint (PEFT's GPTQ LoRA layer), and matches our base + adapter within 1e-5.
- A uniform 4-bit checkpoint loads with plain transformers' from_pretrained; that path runs its own
  kernel (TorchAtenLinear) in bf16, so the tolerance is bf16's: relative error norm below 2e-2 (measured 5.6e-3).

The side venv comes from `make interop-venv` (built by `make test`, which also sets
COMPRESS_REQUIRE_INTEROP=1 so that a missing venv fails instead of skipping).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import GPTQMODEL_CKPT, INTEROP_MARKS, INTEROP_PYTHON, ROOT, logits, quantize_model, require_interop
from safetensors.torch import load_file, save_file

import compress
from compress.checkpoint import write_gptq
from compress.checkpoint.write import adapter_modules
from compress.checkpoint.peft import load_peft_adapter, write_peft_adapter
from compress.lowrank import LoRALinear
from compress.targets import select_linears, set_module
from compress.quant import QuantConfig, QuantLinear

pytestmark = INTEROP_MARKS


def mixed(name):
    if ".0.self_attn." in name:
        return QuantConfig.uniform(2, 32, sym=True)
    if ".1.mlp.gate_proj" in name or ".1.mlp.up_proj" in name:
        return QuantConfig.uniform(3, 64, sym=False)
    if "down_proj" in name:
        return QuantConfig.uniform(8, 64, sym=False)
    return QuantConfig.uniform(4, 64, sym=False)


@pytest.fixture(scope="module")
def interop(tiny_pair, tmp_path_factory):
    """Build the checkpoints, run the side venv once over all of them, return paths and results."""
    require_interop()
    import copy

    base, tokenizer = tiny_pair
    work = tmp_path_factory.mktemp("interop")
    models = {}
    for name, config_for in (("mixed", mixed), ("uniform", lambda n: QuantConfig.uniform(4, 64, sym=False))):
        model = copy.deepcopy(base)
        for param in model.parameters():  # bf16-exact dense weights: no loss in GPTQModel's fp16 load
            param.data = param.data.to(torch.bfloat16).float()
        models[name] = quantize_model(model, config_for)
        write_gptq(models[name], work / name, tokenizer=tokenizer)
    adapted = copy.deepcopy(models["mixed"])
    generator = torch.Generator().manual_seed(3)
    for name, module in select_linears(adapted, ["Linear"], ["lm_head"]):
        layer = LoRALinear(module, 4, 8)
        with torch.no_grad():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=generator) * 0.05)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)
        set_module(adapted, name, layer)
    write_peft_adapter(adapter_modules(adapted), work / "mixed-adapter")
    reference = work / "reference"
    shutil.copytree(GPTQMODEL_CKPT / "quantized", reference)
    tokenizer.save_pretrained(reference)  # GPTQModel's loader insists on a tokenizer in the folder
    ids = {"tiny": torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(5)),
           "reference": load_file(str(GPTQMODEL_CKPT / "reference_logits.safetensors"))["input_ids"]}
    for key, value in ids.items():
        save_file({"input_ids": value}, str(work / f"{key}_ids.safetensors"))
    jobs = [("mixed", "gptqmodel", "tiny"), ("reference", "gptqmodel", "reference"), ("uniform", "transformers", "tiny"),
            ("mixed", "gptqmodel+adapter", "tiny")]
    spec = [{"loader": loader.split("+")[0], "path": str(work / ckpt), "input_ids": str(work / f"{key}_ids.safetensors"),
             "output": str(work / f"{ckpt}-{loader}.safetensors"),
             "adapter": str(work / "mixed-adapter") if loader.endswith("+adapter") else None}
            for ckpt, loader, key in jobs]
    (work / "jobs.json").write_text(json.dumps(spec))
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([str(INTEROP_PYTHON), str(ROOT / "tests" / "interop" / "gptqmodel_logits.py"),
                             str(work / "jobs.json")], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    outputs = {(ckpt, loader): (load_file(job["output"])["logits"], json.loads(Path(job["output"] + ".json").read_text()))
               for (ckpt, loader, _), job in zip(jobs, spec)}
    return {"work": work, "models": models, "ids": ids, "outputs": outputs, "adapted": adapted}


def test_our_peft_adapter_over_gptqmodel(interop):
    theirs, _ = interop["outputs"][("mixed", "gptqmodel+adapter")]
    plain, _ = interop["outputs"][("mixed", "gptqmodel")]
    base = compress.load(interop["work"] / "mixed", dtype="float32")
    ours = logits(load_peft_adapter(base, interop["work"] / "mixed-adapter"), interop["ids"]["tiny"])
    torch.testing.assert_close(ours, logits(interop["adapted"], interop["ids"]["tiny"]), rtol=0, atol=0)
    assert float((ours - theirs).abs().max()) <= 1e-5
    assert float((theirs - plain).abs().max()) > 1e-2  # the adapter changed GPTQModel's output


def test_our_mixed_checkpoint_in_gptqmodel(interop):
    theirs, described = interop["outputs"][("mixed", "gptqmodel")]
    model = interop["models"]["mixed"]
    expected_bits = {name: m.config.bits for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert described["bits"] == expected_bits, "GPTQModel must resolve our dynamic overrides to our bits"
    assert {2, 3, 4, 8} == set(described["bits"].values())
    ours = logits(compress.load(interop["work"] / "mixed", dtype="float32"), interop["ids"]["tiny"])
    assert float((ours - theirs).abs().max()) <= 1e-5


def test_gptqmodel_reference_checkpoint_matches_compress_load(interop):
    theirs, described = interop["outputs"][("reference", "gptqmodel")]
    ours = logits(compress.load(GPTQMODEL_CKPT / "quantized", dtype="float32"), interop["ids"]["reference"])
    assert float((ours - theirs).abs().max()) <= 1e-5
    assert described["bits"]["model.layers.1.mlp.up_proj"] == 3


def test_uniform_checkpoint_in_plain_transformers(interop):
    theirs, described = interop["outputs"][("uniform", "transformers")]
    ours = logits(interop["models"]["uniform"], interop["ids"]["tiny"])
    relative = float((ours - theirs).norm() / ours.norm())
    assert relative < 2e-2, f"relative error {relative:.3g} (bf16 kernel {described['kernels']})"
    assert set(described["bits"].values()) == {4}
