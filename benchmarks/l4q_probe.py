"""One L4Q run at int3 g64 on SmolLM2-135M with a chosen quant_lr and start (issue 8 probe).

    .venv/bin/python benchmarks/l4q_probe.py QUANT_LR rtn-stage|rtn-grid

Same data, steps (24), LoRA and eval as ``l4q_bits.py``; ``rtn-stage`` runs an RTN quantize stage
first (W0 is then RTN's dequantized weight, and step/offset its scales and zeros), ``rtn-grid`` is
the l4q default (the float W0, step/offset on RTN's grid of it). Prints the packed (integer zero)
and fake-quantized perplexities. (Before commit 5c37afe the default was a min-max grid; the
probes of that start in BENCHMARKS.md ran with this script's ``minmax`` option at 08de5fd.)
"""

from __future__ import annotations

import argparse
import logging
import os

from l4q_bits import DATA, LORA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quant_lr", type=float)
    parser.add_argument("start", choices=("rtn-stage", "rtn-grid"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from compress import run_recipe
    from compress.recipe import parse_recipe

    rtn = [{"quantize": {"method": "rtn", "config": {"type": "uniform", "bits": 3, "group_size": 64}}}]
    l4q = {"l4q": {"steps": 24, "lr": 2.0e-4, "batch_size": 4, "grad_accum": 1, "seq_len": 256, "save_every": 0,
                   "bits": 3, "group_size": 64, "quant_lr": args.quant_lr, "lora": LORA}}
    stages = (rtn if args.start == "rtn-stage" else []) + [l4q, {"eval": {"baseline": False}}]
    recipe = parse_recipe({"model": "smollm2-135m", "dtype": "float32", "data": DATA, "seed": 0, "stages": stages,
                           "output": f"out/bench/l4q_probe/{args.quant_lr}-{args.start}"})
    reports = run_recipe(recipe, overwrite=True).reports
    fake = reports[-2].metrics["perplexity_float_offset"]
    print(f"start {args.start}, quant_lr {args.quant_lr:g}: perplexity {reports[-1].metrics['perplexity']:.3f} "
          f"(fake-quantized {fake:.3f})")


if __name__ == "__main__":
    main()
