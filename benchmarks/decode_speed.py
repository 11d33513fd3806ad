"""End-to-end decode speed: SmolLM2-135M packed against its dense self, HF ``generate``, batch 1.

    python benchmarks/decode_speed.py [--device cpu|cuda] [--dtype bfloat16] [--tokens 128] [--rounds 3]
                                      [--config int4-g64-sym] [--json out.json]

The dense model (SmolLM2 in ``--dtype``) and the packed one (every decoder linear quantized by RTN to
``--config``, lm_head kept dense as the quickstart keeps it, so both share the tied embedding) generate
``--tokens`` new tokens greedily from the same prompt (``min_new_tokens`` forces the length), one after
the other, ``--rounds`` times after one warm-up each; the median tokens per second of each and their
ratio are reported, with the kernel the packed layers ran (``native`` on an AVX512-BF16 CPU, ``triton``
on a GPU) and how many of the packed model's tokens equal the dense model's.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from compress.dtypes import DTYPES
from compress.models.sources import load_model, resolve_model
from compress.quant import QuantConfig, QuantLinear
from compress.targets import select_linears, set_module

CONFIGS = {"int4-g64-sym": QuantConfig.uniform(4, 64, sym=True), "int4-g128": QuantConfig.uniform(4, 128),
           "int8-g128": QuantConfig.uniform(8, 128), "nf4": QuantConfig.nf(4)}
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def packed_copy(model, config: QuantConfig):
    packed = copy.deepcopy(model)
    for name, module in select_linears(packed, ["Linear"], ["lm_head"]):
        set_module(packed, name, QuantLinear.quantize(module, config))
    return packed


def tokens_per_second(model, ids: torch.Tensor, tokens: int) -> tuple[float, torch.Tensor]:
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start), out


def measure(device: str, dtype: str, tokens: int, rounds: int, config: str) -> dict:
    dense, tokenizer = load_model(resolve_model("smollm2-135m"), dtype)
    packed = packed_copy(dense, CONFIGS[config])
    dense, packed = dense.to(device), packed.to(device)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(device)
    speeds = {"dense": [], "packed": []}
    outputs = {}
    with torch.no_grad():
        for name, model in (("dense", dense), ("packed", packed)):
            tokens_per_second(model, ids, tokens)  # warm-up: kernel builds, autotuning, caches
        for _ in range(rounds):
            for name, model in (("dense", dense), ("packed", packed)):
                speed, outputs[name] = tokens_per_second(model, ids, tokens)
                speeds[name].append(speed)
    backends = sorted({m.backend for m in packed.modules() if isinstance(m, QuantLinear) and m.backend})
    dense_tps, packed_tps = statistics.median(speeds["dense"]), statistics.median(speeds["packed"])
    same = (outputs["dense"][0, ids.shape[1]:] == outputs["packed"][0, ids.shape[1]:]).float().mean().item()
    return {"device": device if device == "cpu" else torch.cuda.get_device_name(), "threads": torch.get_num_threads(),
            "dtype": dtype, "config": config, "tokens": tokens, "rounds": rounds, "dense_tokens_per_s": dense_tps,
            "packed_tokens_per_s": packed_tps, "speedup": packed_tps / dense_tps, "kernel": ", ".join(backends),
            "all_dense": speeds["dense"], "all_packed": speeds["packed"], "same_tokens_fraction": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", default="int4-g64-sym", choices=tuple(CONFIGS))
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = measure(args.device, args.dtype, args.tokens, args.rounds, args.config)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))  # noqa: T201 - the result is the script's output


if __name__ == "__main__":
    main()
