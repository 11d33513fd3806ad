"""How far GPTQ's perplexity moves with its calibration set: ours and GPTQModel's, side by side.

    .venv/bin/python benchmarks/gptq_spread.py [--out out/bench/gptq_spread]   # needs `make interop-venv`

GPTQ's result is sensitive to small changes of its input: a rounding decision that flips moves the
error fed to every later column, so two correct implementations, or one implementation given the
same windows in another order, land about 1 % apart at 4 bits on SmolLM2-135M. One run each cannot
settle a 1 % comparison. This script runs both tools on the peers benchmark's calibration windows
(``peers.py``: stdlib train, 512 tokens) taking the first 32, 31, 30, 29 and 28 of them, at 4 and 3 bits
(g64, asymmetric, damp 0.01, no act order), each point in its own process, and evaluates every
checkpoint with the same code on the same 32 held-out windows. Reported: each perplexity, each tool's
mean and range, and the ratio of the means. Reruns skip finished points (``results.jsonl``).
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from child import bench_args, child_result, run_child
from peers import DATA, GROUP, dense_model_dir, evaluate, gptqmodel_quantize, windows_file

COUNTS = (32, 31, 30, 29, 28)
POINTS = [(tool, bits, count) for bits in (4, 3) for count in COUNTS for tool in ("ours", "gptqmodel")]
log = logging.getLogger("gptq_spread")


def subset_windows(out: Path, count: int) -> Path:
    """The peers windows file with only the first ``count`` calibration windows."""
    from safetensors.torch import load_file, save_file

    path = out / f"windows-{count}.safetensors"
    if not path.is_file():
        windows = load_file(str(windows_file(out)))
        windows["calibration"] = windows["calibration"][:count].contiguous()
        save_file(windows, str(path))
    return path


def run_ours(out: Path, bits: int, count: int, point: Path) -> float:
    from compress import run_recipe
    from compress.run.recipe import parse_recipe

    data = {**DATA, "calibration": {**DATA["calibration"], "samples": count}}
    stages = [{"quantize": {"method": "gptq", "config": {"type": "uniform", "bits": bits, "group_size": GROUP}}},
              {"eval": {"baseline": False}}]
    recipe = parse_recipe({"model": "smollm2-135m", "dtype": "float32", "data": data, "seed": 0, "stages": stages,
                           "output": str(point)})
    reports = run_recipe(recipe, overwrite=True).reports
    return next(r for r in reports if r.name == "eval").metrics["perplexity"]


def run_gptqmodel(out: Path, bits: int, count: int, point: Path) -> float:
    from compress import load

    gptqmodel_quantize(out, point, bits, subset_windows(out, count), f"gptqmodel int{bits} on {count} windows")
    return evaluate(load(point / "checkpoint", dtype="float32"), out)


def markdown(rows: list[dict]) -> str:
    lines = ["| bits | tool | " + " | ".join(f"{c} windows" for c in COUNTS) + " | mean | range |",
             "|---:|---|" + "---:|" * (len(COUNTS) + 2)]
    for bits in (4, 3):
        means = {}
        for tool in ("ours", "gptqmodel"):
            ppl = {r["count"]: r["ppl"] for r in rows if r["bits"] == bits and r["tool"] == tool}
            if len(ppl) < len(COUNTS):
                continue
            means[tool] = statistics.mean(ppl.values())
            lines.append(f"| {bits} | {tool} | " + " | ".join(f"{ppl[c]:.3f}" for c in COUNTS) +
                         f" | {means[tool]:.3f} | {min(ppl.values()):.3f}-{max(ppl.values()):.3f} |")
        if len(means) == 2:
            lines.append(f"| {bits} | ours / gptqmodel |" + " |" * len(COUNTS) +
                         f" {means['ours'] / means['gptqmodel']:.4f} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = bench_args(__doc__.splitlines()[0], "out/bench/gptq_spread")
    out = args.out
    if args.point:  # tool,bits,count
        tool, bits, count = args.point.split(",")
        point = out / "points" / f"{tool}-{bits}-{count}"
        run = run_ours if tool == "ours" else run_gptqmodel
        print(child_result({"tool": tool, "bits": int(bits), "count": int(count),
                            "ppl": run(out, int(bits), int(count), point)}))
        return
    windows_file(out)
    dense_model_dir(out)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    for tool, bits, count in POINTS:
        if any((r["tool"], r["bits"], r["count"]) == (tool, bits, count) for r in rows):
            continue
        log.info("point %s int%d on %d windows", tool, bits, count)
        rows.append(run_child(__file__, ["--out", str(out), "--point", f"{tool},{bits},{count}"], f"{tool}-{bits}-{count}"))
        results.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    (out / "results.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
