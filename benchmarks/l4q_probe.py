"""One L4Q run on SmolLM2-135M with chosen settings (issue 8 probes: quant_lr, start, integer zeros).

    .venv/bin/python benchmarks/l4q_probe.py [--bits 3] [--group 64] [--quant-lr 0.01]
        [--integer-zero-from 0.75] [--start rtn-grid|rtn-stage]

Same data, steps (24), LoRA and eval as ``l4q_bits.py``. ``rtn-grid`` is the l4q default (the float
W0, step/offset on RTN's grid of it); ``rtn-stage`` runs an RTN quantize stage first (W0 is then
RTN's dequantized weight). ``--quant-lr`` is relative to each layer's mean initial step (since
commit 0db69e3; before it, an absolute rate: the probes of BENCHMARKS.md say which). Prints the
packed (integer zero) and the fake-quantized perplexity.
"""

from __future__ import annotations

import argparse
import logging
import os

from l4q_bits import DATA, LORA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--quant-lr", type=float, default=0.01)
    parser.add_argument("--integer-zero-from", type=float, default=0.75)
    parser.add_argument("--start", choices=("rtn-grid", "rtn-stage"), default="rtn-grid")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from compress import run_recipe
    from compress.run.recipe import parse_recipe

    quant = {"type": "uniform", "bits": args.bits, "group_size": args.group}
    rtn = [{"quantize": {"method": "rtn", "config": quant}}]
    l4q = {"l4q": {"steps": 24, "lr": 2.0e-4, "batch_size": 4, "grad_accum": 1, "seq_len": 256, "save_every": 0,
                   "bits": args.bits, "group_size": args.group, "quant_lr": args.quant_lr, "lora": LORA,
                   "integer_zero_from": args.integer_zero_from}}
    stages = (rtn if args.start == "rtn-stage" else []) + [l4q, {"eval": {"baseline": False}}]
    name = f"int{args.bits}-g{args.group}-{args.quant_lr:g}-{args.integer_zero_from:g}-{args.start}"
    recipe = parse_recipe({"model": "smollm2-135m", "dtype": "float32", "data": DATA, "seed": 0, "stages": stages,
                           "output": f"out/bench/l4q_probe/{name}"})
    reports = run_recipe(recipe, overwrite=True).reports
    fake = reports[-2].metrics["perplexity_float_offset"]
    print(f"{name}: perplexity {reports[-1].metrics['perplexity']:.3f} (fake-quantized {fake:.3f})")


if __name__ == "__main__":
    main()
