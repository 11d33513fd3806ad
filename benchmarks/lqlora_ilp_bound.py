"""What LQ-LoRA's own cost model says a budget can reach, against what the held-out run measured.

    .venv/bin/python benchmarks/lqlora_ilp_bound.py [--cache DIR] [--rows FILE] [--budgets 2.5 3.0 3.5]

Reads the cost table a ``heldout.py`` LQ-LoRA rank-0 point cached (``DIR``: its
``.cache/lq_lora``, one JSON per matrix: {config: [Fisher-weighted output cost, storage bits]})
and solves the allocation ILP (``compress.lowrank.allocate``) at each budget with no ties between
matrices. The stage ties q/k/v and gate/up to one config each, so an untied solve's cost is a lower
bound on the stage's own optimum: no allocation of this grid, tied or not, has a lower predicted
cost. Each budget's line gives that bound against the same model's cost of uniform int3 g64 (every
matrix at ``int3-g64-asym``), the share of parameters at each bit width, and, where the rows file
has an LQ-LoRA rank-0 row at that budget, the measured in-domain change in nats against uniform
int3 g64 GPTQ (log of the perplexity ratio). Also the model against the measured uniform points:
predicted cost differences of all-int2 / all-int3 / all-int4 g64 next to the measured nats.
Writes ``benchmarks/results/lqlora_ilp_bound.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from compress.lowrank import allocate
from compress.quant import QuantConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "lqlora_ilp_bound.json"
UNIFORM = {bits: f"int{bits}-g64-asym" for bits in (2, 3, 4)}
GPTQ_ROWS = {bits: f"gptq-int{bits}-g64-asym" for bits in (2, 3, 4)}


def read_table(cache: Path) -> tuple[dict, dict, dict]:
    """(cost, bits, numel) by matrix (the cache's file names: the matrices' keys)."""
    cost, bits, numel = {}, {}, {}
    reference = QuantConfig.uniform(8, 32)
    for path in sorted(cache.glob("*.json")):
        entries = json.loads(path.read_text())
        stored = entries[reference.name][1]
        count = round(stored / reference.bits_per_param)
        if count * reference.bits_per_param != stored:
            raise SystemExit(f"{path}: {reference.name} stores {stored} bits, not a whole number of parameters")
        cost[path.stem] = {c: e[0] for c, e in entries.items()}
        bits[path.stem] = {c: e[1] for c, e in entries.items()}
        numel[path.stem] = count
    if not cost:
        raise SystemExit(f"{cache}: no cost entries (run an LQ-LoRA point of heldout.py first)")
    return cost, bits, numel


def bound(cost: dict, bits: dict, numel: dict, budget: float) -> dict:
    params = sum(numel.values())
    found = allocate(cost, bits, numel, budget * params)
    shares: dict[str, float] = {}
    for matrix, config in found.choice.items():
        width = config.split("-")[0]
        shares[width] = shares.get(width, 0.0) + numel[matrix] / params
    return {"budget": budget, "predicted_cost": found.cost, "bits_per_param": found.bits / params, "shares": shares}


def measured_nats(rows: dict[str, dict], name: str, against: str = GPTQ_ROWS[3]) -> float | None:
    if name not in rows or against not in rows:
        return None
    return math.log(rows[name]["ppl"] / rows[against]["ppl"])


def report(cost: dict, bits: dict, numel: dict, budgets: list[float], rows: dict[str, dict]) -> dict:
    params = sum(numel.values())
    uniform = {b: sum(c[name] for c in cost.values()) for b, name in UNIFORM.items()}
    result = {"matrices": len(cost), "params": params, "uniform_cost": uniform,
              "uniform_int3_bits": sum(b[UNIFORM[3]] for b in bits.values()) / params, "budgets": []}
    for budget in budgets:
        line = bound(cost, bits, numel, budget)
        line["predicted_vs_uniform_int3"] = line["predicted_cost"] - uniform[3]
        line["measured_vs_uniform_int3"] = measured_nats(rows, f"lqlora-r0-{budget:g}")
        result["budgets"].append(line)
    result["uniform_steps"] = {"int2 - int3": (uniform[2] - uniform[3], measured_nats(rows, GPTQ_ROWS[2])),
                               "int4 - int3": (uniform[4] - uniform[3], measured_nats(rows, GPTQ_ROWS[4]))}
    return result


def table(result: dict) -> list[str]:
    def nats(value):
        return "-" if value is None else f"{value:+.3f}"

    lines = [f"{result['matrices']} matrices; uniform int3 g64 at {result['uniform_int3_bits']:.3f} bits "
             f"(budget count) has predicted cost {result['uniform_cost'][3]:.4f}", "",
             "| budget | lowest predicted cost, untied | vs uniform int3 g64, predicted | measured (nats) | "
             "int2 / int3 / int4 / int8 shares |", "|---:|---:|---:|---:|---|"]
    for line in result["budgets"]:
        shares = " / ".join(f"{line['shares'].get(w, 0.0):.2f}" for w in ("int2", "int3", "int4", "int8"))
        lines.append(f"| {line['budget']:g} | {line['predicted_cost']:.4f} | {nats(line['predicted_vs_uniform_int3'])} | "
                     f"{nats(line['measured_vs_uniform_int3'])} | {shares} |")
    lines += ["", "| uniform g64 step | predicted | measured (nats) |", "|---|---:|---:|"]
    lines += [f"| {step} | {nats(p)} | {nats(m)} |" for step, (p, m) in result["uniform_steps"].items()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("out/bench/heldout/points/lqlora-r0-3.5/.cache/lq_lora"))
    parser.add_argument("--rows", type=Path, default=HERE / "results" / "heldout.jsonl")
    parser.add_argument("--budgets", type=float, nargs="*", default=[2.5, 3.0, 3.1, 3.2, 3.29, 3.5])
    args = parser.parse_args()
    rows = {}
    if args.rows.is_file():
        rows = {r["name"]: r for r in map(json.loads, args.rows.read_text().splitlines())}
    result = report(*read_table(args.cache), args.budgets, rows)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(table(result)))  # noqa: T201 - the table is the script's output


if __name__ == "__main__":
    main()
