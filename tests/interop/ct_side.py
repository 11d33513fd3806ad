"""Run inside the interop side venv (not by pytest), where the ``compressed-tensors`` library and
transformers are installed: read compressed-tensors checkpoints with them, or write one with the
library's own compressor.

    python ct_side.py JOBS.json

Jobs:
- {"action": "decompress", "path": DIR, "output": FILE}: every pack-quantized module of the
  checkpoint decompressed by the library's ``PackedQuantizationCompressor`` with its scheme from
  config.json, scales taken in fp32 (so the product ``(q - zp) * scale`` is exact); writes
  ``{module}.weight`` fp32 to FILE.
- {"action": "transformers", "path": DIR, "input_ids": FILE, "output": FILE}: transformers'
  ``from_pretrained`` (fp32, CPU; the library decompresses on load); writes ``logits`` and a JSON
  sidecar (``output`` + ".json") with the linear classes, or ``{"error": ...}`` when it refuses.
- {"action": "write_fixture", "path": DIR, "input_ids": FILE}: a seeded tiny fp16 Llama quantized with
  the library's own ``calculate_qparams`` and saved by its ``ModelCompressor`` (3-bit and 4-bit
  symmetric groups, an asymmetric 4-bit group, pack-quantized) into DIR/quantized, and
  DIR/reference_logits.safetensors: ``input_ids`` and the fp32 logits of a plain Llama holding the
  library's decompression of every module (``decompress``); transformers' own attempt at loading it
  goes to DIR/transformers.safetensors(.json).
"""

import glob
import json
import sys
import traceback

import torch
from safetensors.torch import load_file, save_file


def schemes(path):
    from compressed_tensors.quantization import QuantizationConfig

    config = json.load(open(f"{path}/config.json"))["quantization_config"]
    return QuantizationConfig.model_validate(config)


def module_scheme(config, name):
    found = [scheme for scheme in config.config_groups.values() if any(_match(name, t) for t in scheme.targets)]
    assert len(found) == 1, (name, len(found))
    return found[0]


def _match(name, target):
    import re

    return re.match(target[3:], name) is not None if target.startswith("re:") else target in (name, "Linear")


def decompress(job):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    config = schemes(job["path"])
    tensors = {}
    for file in sorted(glob.glob(f"{job['path']}/*.safetensors")):
        tensors.update(load_file(file))
    weights = {}
    for key in tensors:
        if not key.endswith(".weight_packed"):
            continue
        name = key.removesuffix(".weight_packed")
        state = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        state["weight_scale"] = state["weight_scale"].float()
        out = PackedQuantizationCompressor.decompress(state, module_scheme(config, name))
        weights[f"{name}.weight"] = out["weight"].float().contiguous()
    save_file(weights, job["output"])


def from_transformers(job):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(job["path"], dtype=torch.float32, device_map="cpu")
        with torch.inference_mode():
            logits = model(input_ids=load_file(job["input_ids"])["input_ids"]).logits.float()
    except Exception as err:  # noqa: BLE001 - what transformers refuses is the finding
        json.dump({"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]},
                  open(job["output"] + ".json", "w"))
        return
    save_file({"logits": logits.contiguous()}, job["output"])
    classes = sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")})
    json.dump({"classes": classes}, open(job["output"] + ".json", "w"))


def write_fixture(job):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=256, vocab_size=512, head_dim=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float16).eval()
    groups = {
        "group_0": QuantizationScheme(targets=["re:.*self_attn\\.(q|k|v|o)_proj$"], weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)),
        "group_1": QuantizationScheme(targets=["re:.*mlp\\.(gate|up)_proj$"], weights=QuantizationArgs(
            num_bits=3, type="int", symmetric=True, strategy="group", group_size=64)),
        "group_2": QuantizationScheme(targets=["re:.*mlp\\.down_proj$"], weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=False, strategy="group", group_size=64)),
    }
    quant = QuantizationConfig(config_groups=groups, ignore=["lm_head"], format="pack-quantized")
    apply_quantization_config(model, quant)
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        args = scheme.weights
        grouped = module.weight.detach().float().unflatten(-1, (-1, args.group_size))
        scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    target = f"{job['path']}/quantized"
    model.save_pretrained(target)
    compressor.update_config(target)
    ids = load_file(job["input_ids"])["input_ids"]
    with torch.inference_mode():
        logits = decompressed_model(target, config)(input_ids=ids).logits.float()
    save_file({"input_ids": ids, "logits": logits.contiguous()}, f"{job['path']}/reference_logits.safetensors")
    from_transformers({"path": target, "input_ids": job["input_ids"], "output": f"{job['path']}/transformers.safetensors"})


def decompressed_model(path, config):
    """A plain fp32 Llama holding the checkpoint's dense tensors and the library's decompression of
    every packed module (``decompress``'s weights)."""
    from transformers import LlamaForCausalLM

    decompress({"path": path, "output": f"{path}/../decompressed.safetensors"})
    tensors = {}
    for file in sorted(glob.glob(f"{path}/*.safetensors")):
        tensors.update(load_file(file))
    dense = {k: v.float() for k, v in tensors.items() if not k.rpartition(".")[2].startswith("weight_")}
    dense.update(load_file(f"{path}/../decompressed.safetensors"))
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(dense, strict=False)
    assert not unexpected and all(name.endswith("rotary_emb.inv_freq") for name in missing), (missing, unexpected)
    return model


ACTIONS = {"decompress": decompress, "transformers": from_transformers, "write_fixture": write_fixture}


def main(jobs_file):
    for job in json.load(open(jobs_file)):
        ACTIONS[job["action"]](job)


if __name__ == "__main__":
    main(sys.argv[1])
