"""ILP allocation time on a synthetic Llama-70B-shaped problem (560 matrices), per grid and solver.

    python benchmarks/ilp_speed.py [--bits 3.0] [--json out.json]

80 layers x 7 projections with Llama-3-70B shapes; for each matrix and config the storage is exact
(``QuantConfig.storage_bits``) and the cost a synthetic error that halves per extra bit, scaled by a
random per-layer sensitivity (the solver's work depends on the table's structure, not on where the
numbers came from). Grids: ``gptq`` (uniform bits {2,3,4,8} x groups {32,64,128}, q/k/v and gate/up
tied) and ``nf`` (LQ-LoRA's 432 NF configs, untied). Wall seconds include building the PuLP model.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time

from compress.lowrank.allocate import allocate, budget_bits_for
from compress.quant import QuantConfig

SHAPES = {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192), "o_proj": (8192, 8192),
          "gate_proj": (28672, 8192), "up_proj": (28672, 8192), "down_proj": (8192, 28672)}


def grid(kind: str) -> list[QuantConfig]:
    if kind == "gptq":
        return [QuantConfig.uniform(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128)]
    return [QuantConfig.nf(b, block=b0, scale_bits=sb, scale_block=b1, scale_dtype=dt)
            for b in (2, 3, 4, 8) for sb in (2, 3, 4, 8) for dt in ("bfloat16", "float16", "float32")
            for b0 in (16, 32, 64) for b1 in (16, 64, 256)]


def problem(kind: str, layers: int = 80, seed: int = 0):
    rng = random.Random(seed)
    configs = grid(kind)
    cost, bits, numel, ties = {}, {}, {}, []
    for layer in range(layers):
        sensitivity = rng.uniform(0.5, 2.0)
        for name, shape in SHAPES.items():
            matrix = f"model.layers.{layer}.{name}"
            numel[matrix] = shape[0] * shape[1]
            bits[matrix] = {c.name: c.storage_bits(shape) for c in configs}
            cost[matrix] = {c.name: sensitivity * rng.uniform(0.9, 1.1) * numel[matrix]
                            * 2.0 ** (-2 * bits[matrix][c.name] / numel[matrix]) for c in configs}
        if kind == "gptq":
            prefix = f"model.layers.{layer}."
            ties += [[prefix + n for n in ("q_proj", "k_proj", "v_proj")], [prefix + n for n in ("gate_proj", "up_proj")]]
    return cost, bits, numel, ties


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for kind in ("gptq", "nf"):
        cost, bits, numel, ties = problem(kind)
        budget = budget_bits_for(numel, bits_per_param=args.bits)
        for solver in ("HiGHS", "PULP_CBC_CMD"):
            start = time.perf_counter()
            result = allocate(cost, bits, numel, budget, ties=ties, solver=solver)
            rows.append({"grid": kind, "configs": len(next(iter(bits.values()))), "matrices": len(numel),
                         "solver": solver, "seconds": time.perf_counter() - start,
                         "bits_per_param": result.bits / sum(numel.values()), "cost": result.cost})
    lines = ["| grid | configs | matrices | solver | seconds | bits/param | cost |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['grid']} | {r['configs']} | {r['matrices']} | {r['solver']} | {r['seconds']:.1f} | "
              f"{r['bits_per_param']:.4f} | {r['cost']:.6g} |" for r in rows]
    print("\n".join(lines))  # noqa: T201 - the table is the script's output
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
