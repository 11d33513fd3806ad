"""Adapters stored as the bits they are counted at (export's ``adapter_dtype``, issue 23): packed NF8
in a native checkpoint, bf16/fp16 tensors, NF8 values dequantized in a PEFT adapter; each reloads
with the in-memory logits exactly, and the bits per parameter come from the files."""

import pytest
import torch
from safetensors import safe_open

import compress
from compress.checkpoint import write_native
from compress.checkpoint.adapter_storage import NF8, rounded
from compress.checkpoint.write import adapter_modules
from compress.errors import CheckpointError
from compress.lowrank import NF8_BITS
from conftest import logits, run_cli, tiny_recipe
from test_peft_export import adapted_model


def stored_keys(directory) -> dict[str, torch.dtype]:
    keys = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys.update({key: handle.get_tensor(key).dtype for key in handle.keys()})
    return keys


def test_nf8_rounding_is_fine_and_costs_nf8_bits():
    """NF8 on Gaussian adapter weights: SQNR above 38 dB (measured 45.3), relative to float64, and
    exactly lowrank.NF8_BITS bits per weight for whole scale blocks (+ the matrix's fp32 offset)."""
    weight = torch.randn(128, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    error = (rounded(weight, "nf8").double() - weight.double()).square().sum()
    sqnr = 10 * torch.log10(weight.double().square().sum() / error)
    assert sqnr > 38, float(sqnr)
    assert NF8.storage_bits((128, 512)) == pytest.approx(NF8_BITS * 128 * 512 + 32)  # + one fp32 offset
    assert torch.equal(rounded(weight, "bf16"), weight.to(torch.bfloat16).float())


def test_native_nf8_adapters_reload_exactly(tmp_path, probe_ids):
    model = adapted_model()
    for layer in adapter_modules(model).values():  # what export does before it writes
        for leaf in ("lora_A", "lora_B"):
            weight = getattr(layer, leaf).weight
            weight.data = rounded(weight.data, "nf8")
    write_native(model, tmp_path / "ckpt", adapter_dtype="nf8")
    keys = stored_keys(tmp_path / "ckpt")
    assert not [k for k in keys if k.endswith(("lora_A.weight", "lora_B.weight"))]
    assert any(k.endswith(".lora_A.nf8.codes") for k in keys)
    loaded = compress.load(tmp_path / "ckpt")
    ids = probe_ids % 512  # micro_llama's vocabulary
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_a_damaged_nf8_adapter_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_native(adapted_model(), tmp_path / "ckpt", adapter_dtype="nf8")
    file = next((tmp_path / "ckpt").glob("*.safetensors"))
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith(".lora_B.nf8.codes"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lora_B \(NF8 adapter\)"):
        compress.load(tmp_path / "ckpt", verify=False)


@pytest.mark.parametrize("adapters, dtype, stored", [
    ("embed", "nf8", None), ("peft", "bf16", torch.bfloat16), ("peft", "nf8", torch.float32)])
def test_export_stores_adapters_as_counted(tmp_path, adapters, dtype, stored):
    """lq_lora rank 8 then export: the reload check passes with the logits exactly, the adapter
    tensors are stored as asked, and bits_per_param_with_adapters counts those bytes."""
    fmt = "native" if adapters == "embed" else "gptq"
    stages = ("  - lq_lora: {rank: 8, budget_bits: 4.0, iterations: 2, objective: weight, fisher: false}\n"
              f"  - export: {{format: {fmt}, adapters: {adapters}, adapter_dtype: {dtype}}}")
    result = compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path, stages)))
    export = result.reports[-1].metrics
    assert export["reload_max_abs_logit_diff"] == 0.0
    directory = result.out_dir / ("checkpoint" if adapters == "embed" else "checkpoint-adapter")
    lora = {k: v for k, v in stored_keys(directory).items() if ".lora_" in k}
    if stored is None:
        assert lora and all(".nf8." in k for k in lora)
        per_weight = NF8_BITS
    else:
        assert lora and set(lora.values()) == {stored}
        per_weight = 8 * torch.tensor([], dtype=stored).element_size()
    # NF8 of these small tensors pays a partial scale block and an offset each: a few % over NF8_BITS
    assert export["adapter_bits_stored"] == pytest.approx(per_weight * export["adapter_params"], rel=0.03)
    sixteen = export["bits_per_param_with_adapters_16bit"] - export["bits_per_param"]
    ours = export["bits_per_param_with_adapters"] - export["bits_per_param"]
    assert ours / sixteen == pytest.approx(export["adapter_bits_stored"] / (16 * export["adapter_params"]), rel=1e-9)
    notes = " ".join(result.reports[-1].notes)
    assert ("NF8-rounded values in fp32" in notes) == (adapters == "peft" and dtype == "nf8")


def test_adapter_dtype_with_merge_is_refused(tmp_path):
    stages = "  - lq_lora: {rank: 8, budget_bits: 4.0}\n  - export: {format: hf, adapters: merge, adapter_dtype: nf8}"
    done = run_cli("run", str(tiny_recipe(tmp_path, stages)))
    assert done.returncode == 2 and "adapter_dtype: only for adapters peft or embed" in done.stderr
