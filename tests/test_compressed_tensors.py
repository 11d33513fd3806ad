"""compressed-tensors ``pack-quantized`` export and reading (compress.checkpoint.formats.compressed_tensors).

- Golden words: codes packed as the library's ``pack_to_int32`` does (its docstring's 8-bit example,
  4-bit nibbles, 3-bit codes straddling words), computed here with Python integers.
- Every module's weight rebuilt from the written tensors by an independent float64 reading of the
  format (bit stream, ``(q - zp) * scale``) equals our dequantized weight; a mixed 2/3/4/8-bit, sym and
  asym, g32/64/128/channel model reloads with equal logits.
- ``quantization_config``: one group per scheme, q/k/v and gate/up in one group, targets that match
  exactly their modules, dense linears in ``ignore``.
- Refusals: NF and float-zero layers and partial groups at validate, one line naming the module.
- The streamed export writes the resident export's tensors; LoRA adapters go beside the base as PEFT.
"""

import json
import re

import pytest
import torch
from conftest import logits, micro_llama, quantize_model, run_cli, tiny_recipe

from compress.checkpoint import inspect_checkpoint, load_checkpoint, write_gptq
from compress.checkpoint import write_compressed_tensors
from compress.checkpoint.formats import compressed_tensors as ct
from compress.checkpoint.tensors import load_tensors
from compress.quant import QuantConfig, QuantLinear
from compress.quant.packing import pack_codes

SCHEMES = {"self_attn": QuantConfig.uniform(2, 32), "mlp.gate_proj": QuantConfig.uniform(3, 64, True),
           "mlp.up_proj": QuantConfig.uniform(3, 64, True), "down_proj": QuantConfig.uniform(8, 128)}


def mixed(name):
    if ".1." in name:
        return QuantConfig.uniform(4, -1, True) if "self_attn" in name else QuantConfig.uniform(4, 64)
    return next(config for key, config in SCHEMES.items() if key in name)


def _stream(words: torch.Tensor) -> int:
    """One row of int32 words as the little-endian integer they spell."""
    return sum((int(w) & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words.tolist()))


def _codes(words: torch.Tensor, bits: int, count: int) -> list[int]:
    value = _stream(words)
    return [(value >> (bits * i)) & ((1 << bits) - 1) for i in range(count)]


STREAM = sum(c << (3 * i) for i, c in enumerate(list(range(8)) * 2))


@pytest.mark.parametrize("bits, codes, expected", [
    (8, [129, 130, 0, 0], [33409]),  # the library's pack_to_int32 docstring
    (4, [0, 1, 2, 3, 4, 5, 6, 7], [0x76543210]),
    (3, list(range(8)) * 2, [(STREAM >> (32 * w)) & 0xFFFFFFFF for w in range(2)]),  # 48 bits: two words
    (3, [7] * 11, [0xFFFFFFFF, 1]),  # 33 one bits: the 11th code straddles two words
])
def test_golden_words(bits, codes, expected):
    packed = ct._cut(pack_codes(torch.tensor([codes], dtype=torch.int32), bits, dim=1), len(codes), bits, 1)
    assert [w & 0xFFFFFFFF for w in packed[0].tolist()] == [e & 0xFFFFFFFF for e in expected]
    assert _codes(packed[0], bits, len(codes)) == codes


def _reference_weight(tensors: dict, name: str, bits: int, sym: bool) -> torch.Tensor:
    """float64 W from the written tensors, read from the format's description alone."""
    out_features, in_features = tensors[f"{name}.weight_shape"].tolist()
    scale = tensors[f"{name}.weight_scale"].double()
    group = in_features // scale.shape[1]
    offset = 2 ** (bits - 1)
    rows = [_codes(tensors[f"{name}.weight_packed"][r], bits, in_features) for r in range(out_features)]
    q = torch.tensor(rows, dtype=torch.float64) - offset
    if sym:
        zp = torch.zeros_like(scale)
    else:
        packed = tensors[f"{name}.weight_zero_point"]
        zp = torch.tensor([_codes(packed[:, g], bits, out_features) for g in range(scale.shape[1])],
                          dtype=torch.float64).t() - offset
    columns = torch.arange(in_features) // group
    return (q - zp[:, columns]) * scale[:, columns]


def test_mixed_checkpoint_holds_our_weights_and_reloads_exactly(tmp_path):
    model = quantize_model(micro_llama(), mixed)
    write_compressed_tensors(model, tmp_path / "ct")
    tensors = load_tensors(tmp_path / "ct")
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            config = module.config
            got = _reference_weight(tensors, name, config.bits, config.sym)
            assert torch.equal(got, module.dequantize(torch.float64)), name
            assert (f"{name}.weight_zero_point" in tensors) == (not config.sym)
            assert tensors[f"{name}.weight_packed"].shape[1] == -(-module.in_features * config.bits // 32)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    reloaded = load_checkpoint(tmp_path / "ct")
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    info = inspect_checkpoint(tmp_path / "ct")
    write_gptq(quantize_model(micro_llama(), lambda n: QuantConfig.uniform(4, 64)), tmp_path / "g")
    assert info["format"] == "compressed-tensors" and info["quantized_params"] == inspect_checkpoint(
        tmp_path / "g")["quantized_params"]


def test_config_groups_name_their_modules(tmp_path):
    model = quantize_model(micro_llama(), lambda n: None if n.endswith("1.mlp.down_proj") else mixed(n))
    write_compressed_tensors(model, tmp_path / "ct")
    quant = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    quantized = {n: m.config for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for group in quant["config_groups"].values():
        config = ct.config_from_args(group["weights"], "test")
        matched = {n for n in quantized if any(re.match(t[3:], n) for t in group["targets"])}
        assert matched == {n for n, c in quantized.items() if c == config}
    assert len(quant["config_groups"]) == len(set(quantized.values()))
    ignored = [t[3:] for t in quant["ignore"]]
    assert {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and any(re.match(p, n) for p in ignored)} == {"model.layers.1.mlp.down_proj", "lm_head"}
    assert ct.module_schemes(quant, list(quantized), "test") == quantized


@pytest.mark.parametrize("config, message", [
    ("{bits: 4, group_size: 32, zero_point: float}", None),
    ("{bits: 4, group_size: 96}", r"group_size 96 does not divide in_features=256"),
])
def test_what_compressed_tensors_cannot_hold_is_refused_at_validate(tmp_path, config, message):
    if message is None:  # quantize has no float zeros: L4Q's zero_point: float is refused at the export's check
        stages = ("  - l4q: {bits: 4, group_size: 32, zero_point: float, steps: 1, lora: {rank: 2}}\n"
                  "  - export: {format: compressed-tensors}")
        message = r"stages\[0\]\.l4q: .* has float zero points; compressed-tensors stores integer zeros only"
    else:
        stages = f"  - quantize: {{config: {config}}}\n  - export: {{format: compressed-tensors}}"
    result = run_cli("validate", tiny_recipe(tmp_path, stages))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-1500:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr


def test_nf_layers_are_refused_naming_the_module(tmp_path):
    stages = "  - quantize: {config: {type: nf, bits: 4}}\n  - export: {format: compressed-tensors}"
    result = run_cli("validate", tiny_recipe(tmp_path, stages))
    assert result.returncode == 2, result.stderr[-1500:]
    assert re.search(r"model\.layers\.0\.\S+: nf4\S* is a NormalFloat config; compressed-tensors .* export native",
                     result.stderr), result.stderr


def test_streamed_export_writes_the_resident_tensors(tmp_path, sharded_tiny):
    stages = "  - quantize: {config: {bits: 4, group_size: 32, sym: true}}\n  - export: {format: compressed-tensors}"
    tensors = {}
    for streaming in (False, True):
        out = tmp_path / f"out-{streaming}"
        recipe = tiny_recipe(tmp_path, stages, output=out, name=f"r{streaming}.yaml")
        text = recipe.read_text().replace("model: tiny-llama", f"model: {sharded_tiny}")
        recipe.write_text(text + ("streaming: true\n" if streaming else ""))
        result = run_cli("run", recipe, "--quiet")
        assert result.returncode == 0, result.stderr[-2000:]
        tensors[streaming] = load_tensors(out / "checkpoint")
    assert sorted(tensors[False]) == sorted(tensors[True])
    assert all(torch.equal(tensors[False][k], tensors[True][k]) for k in tensors[False])


def test_adapters_go_beside_a_compressed_tensors_base_as_peft(tmp_path):
    """LoRA adapters from fine-tuning: the base as compressed-tensors, the adapters as a PEFT adapter
    beside it; the export's own check reloads both from disk and needs the in-memory logits exactly."""
    stages = ("  - quantize: {config: {bits: 4, group_size: 32, sym: true}}\n"
              "  - finetune: {steps: 2, batch_size: 2, seq_len: 32, lora: {rank: 4}}\n"
              "  - export: {format: compressed-tensors}")
    result = run_cli("run", tiny_recipe(tmp_path, stages), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "out"
    assert (out / "checkpoint-adapter" / "adapter_model.safetensors").is_file()
    assert not any(k.endswith(("lora_A.weight", "lora_B.weight")) for k in load_tensors(out / "checkpoint"))
    export = json.loads((out / "report.json").read_text())["stages"][-1]
    assert export["metrics"]["reload_max_abs_logit_diff"] == 0.0
