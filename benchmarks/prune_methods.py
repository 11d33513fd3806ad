"""LoRAPrune vs magnitude vs random vs the true-gradient criterion on SmolLM2-135M (issue 6 benchmark).

    .venv/bin/python benchmarks/prune_methods.py [--out out/bench/prune_methods] [--steps 40]

Every point runs the same ``prune`` stage (LoRA rank 8, alpha 16, lr 2e-4, batch 4 x 256 tokens of
stdlib train text, a pruning event every ``steps / 10`` steps on the cubic ramp, LoRAPrune's layer
exemptions: the first 10 % and the last layer stay whole) and differs only in ``method`` (and ``score_columns`` for the upstream LoRAPrune scoring); then the
held-out perplexity (stdlib eval, 32 x 512). Peak memory is the process RSS during the stage, and its
growth over the RSS at the stage's start (the gradient criterion must keep dL/dW0 for every pruned
matrix; LoRAPrune only the LoRA gradients). Reruns skip finished points (``results.jsonl``).
Writes ``results.md`` and ``ppl_vs_ratio.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from child import child_result, run_child

RATIOS = (0.2, 0.35, 0.5)
# benchmark name -> prune stage keys; "loraprune+columns" is the upstream scoring (o/down columns summed in)
METHODS = {"loraprune": {"method": "loraprune"}, "loraprune+columns": {"method": "loraprune", "score_columns": True},
           "gradient": {"method": "gradient"}, "magnitude": {"method": "magnitude"}, "random": {"method": "random"}}
DATA = {"calibration": {"source": "stdlib", "split": "train", "samples": 16, "seq_len": 256},
        "eval": {"source": "stdlib", "split": "eval", "samples": 32, "seq_len": 512}}
log = logging.getLogger("prune_methods")


def run_point(out: Path, method: str, ratio: float, steps: int) -> dict:
    from compress import run_recipe
    from compress.run.recipe import parse_recipe

    stage = {"prune": {**METHODS[method], "ratio": ratio, "steps": steps, "every": max(1, steps // 10),
                       "batch_size": 4, "grad_accum": 1, "seq_len": 256, "lr": 2.0e-4, "uniform": False,
                       "lora": {"rank": 8, "alpha": 16}, "save_every": 0}}
    name = f"{method}-{ratio}"
    recipe = parse_recipe({"model": "smollm2-135m", "dtype": "float32", "data": DATA, "seed": 0,
                           "stages": [stage, {"eval": {"baseline": False}}], "output": str(out / "points" / name)})
    result = run_recipe(recipe, overwrite=True)
    prune, evaluation = result.reports[1], result.reports[2]
    return {"name": name, "method": method, "ratio": ratio, "steps": steps, "ppl": evaluation.metrics["perplexity"],
            "params_after": prune.metrics["params_after"], "params_before": prune.metrics["params_before"],
            "bytes_after_bf16": 2 * prune.metrics["params_after"], "seconds": prune.seconds,
            "peak_rss_mib": prune.peak_rss_mib, "rss_growth_mib": prune.metrics["rss_growth_mib"]}


def memory_point(out: Path, method: str) -> dict:
    """Peak memory of the pruning loop alone at a small batch (1 x 128 tokens, 4 steps), where the
    criterion's own state dominates: LoRAPrune keeps LoRA gradients, ``gradient`` keeps dL/dW0 for every
    pruned matrix. Run in a fresh process per method (``--memory``), with glibc's mmap threshold fixed
at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so that every large tensor is returned to the OS when freed
and RSS follows the live tensors instead of the heap's high-water mark. ``baseline_rss_mib`` is the
process after imports, before the model: peak minus baseline is what the model and the pruning loop
hold at their peak."""
    import psutil

    from compress import run_recipe
    from compress.run.recipe import parse_recipe

    baseline_mib = psutil.Process().memory_info().rss / 2**20  # libraries imported, no model yet
    stage = {"prune": {"method": method, "ratio": 0.2, "steps": 4, "every": 2, "batch_size": 1, "grad_accum": 1,
                       "seq_len": 128, "samples": 4, "uniform": False, "lora": {"rank": 8, "alpha": 16},
                       "save_every": 0}}
    recipe = parse_recipe({"model": "smollm2-135m", "dtype": "float32", "data": DATA, "seed": 0, "stages": [stage],
                           "output": str(out / "memory" / method)})
    report = run_recipe(recipe, overwrite=True).reports[1]
    return {"method": method, "peak_rss_mib": report.peak_rss_mib, "baseline_rss_mib": baseline_mib,
            "model_and_training_peak_mib": report.peak_rss_mib - baseline_mib,
            "rss_growth_mib": report.metrics["rss_growth_mib"],
            "train_peak_rss_mib": report.metrics.get("train_peak_rss_mib"),
            "train_rss_growth_mib": report.metrics.get("train_rss_growth_mib")}


def markdown(rows: list[dict]) -> str:
    lines = ["| ratio | method | perplexity | params after | removed | bf16 MiB | seconds | peak RSS MiB | RSS growth MiB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r["ratio"], list(METHODS).index(r["method"]))):
        lines.append(f"| {row['ratio']} | {row['method']} | {row['ppl']:.3f} | {row['params_after']:,} | "
                     f"{1 - row['params_after'] / row['params_before']:.1%} | {row['bytes_after_bf16'] / 2**20:.0f} | "
                     f"{row['seconds']:.0f} | {row['peak_rss_mib']:.0f} | {row['rss_growth_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for method in METHODS:
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["ratio"])
        if points:
            axis.plot([r["ratio"] for r in points], [r["ppl"] for r in points], "o-", label=method)
    axis.set_xlabel("pruning ratio per pruned layer (KV groups and channels)")
    axis.set_ylabel("perplexity (stdlib eval, 32 x 512)")
    axis.set_yscale("log")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    axis.set_title("SmolLM2-135M: structured pruning criteria")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench/prune_methods"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--memory", action="store_true", help="only the peak-memory comparison, loraprune vs gradient")
    parser.add_argument("--memory-method", help=argparse.SUPPRESS)  # internal: one method in this process
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.memory_method:
        print(child_result(memory_point(args.out, args.memory_method)))
        return
    if args.memory:
        rows = [run_child(__file__, ["--out", str(args.out), "--memory-method", method], method, fixed_mmap=True)
                for method in ("loraprune", "gradient")]
        (args.out / "memory.json").write_text(json.dumps(rows, indent=2))
        print(json.dumps(rows, indent=2))
        return
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {r["name"] for r in rows if r["steps"] == args.steps}
    for ratio in RATIOS:
        for method in METHODS:
            if f"{method}-{ratio}" in done:
                continue
            log.info("point %s-%s", method, ratio)
            rows.append(run_point(args.out, method, ratio, args.steps))
            results.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    (args.out / "results.md").write_text(markdown(rows))
    plot(rows, args.out / "ppl_vs_ratio.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
