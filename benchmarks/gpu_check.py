"""The recipes of the GPU check (issue 21), each run on the device and on the CPU, compared.

    python benchmarks/gpu_check.py --device cuda --model smollm2-135m --out $OUT/runs
    python benchmarks/gpu_check.py --device cpu --model tiny-llama --out out/gpu-dry --dry-run

Four recipes (quickstart's RTN, GPTQ, LQ-LoRA on a small grid, L4Q) run with ``device: DEVICE`` and
again with ``device: cpu`` on the same data (on a GPU machine the CPU runs go alongside, in one other
process); the check holds when RTN's packed codes are equal and
the GPTQ, LQ-LoRA and L4Q perplexities agree within 1 %. Then GPTQ of the 1.5 B synthetic Llama,
streamed, on the device: seconds and the CUDA peak next to ``compress plan``'s prediction for that
stage. ``--dry-run`` makes every step small (the tiny model, a 2-layer synthetic model) so that a test
runs the same code on a CPU-only machine. ``--part recipes`` or ``--part synthetic`` runs one half
(the GPU check runs them in two calls). Writes ``gpu_check.json`` and ``gpu_check.md`` in ``--out``
after every recipe; exits 1 when a comparison fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

log = logging.getLogger("gpu_check")
LORA = {"rank": 16, "alpha": 32}


def recipes(dry: bool) -> dict[str, tuple[list[dict], str]]:
    """name: (stages, how the device's result must match the CPU's)."""
    steps = 2 if dry else 16
    train = {"steps": steps, "batch_size": 2, "grad_accum": 1, "seq_len": 64 if dry else 256, "save_every": 0}
    return {
        "quickstart": ([{"quantize": {"method": "rtn", "config": {"bits": 4, "group_size": 32 if dry else 64},
                                      "overrides": {"re:.*down_proj$": {"bits": 8}}}}, {"eval": {}},
                        {"export": {"format": "gptq"}}], "codes"),
        "gptq": ([{"quantize": {"method": "gptq", "config": {"bits": 3, "group_size": 32 if dry else 64}}},
                  {"eval": {"baseline": False}}], "perplexity"),
        "lq_lora": ([{"lq_lora": {"rank": 16, "budget_bits": 3.5, "group_sizes": [32 if dry else 64], "iterations": 2,
                                  "fisher": True}}, {"eval": {"baseline": False}}], "perplexity"),
        "l4q": ([{"l4q": dict(train, bits=4, group_size=32 if dry else 64, lora=LORA)}, {"eval": {"baseline": False}}],
                "perplexity"),
    }


def data(dry: bool) -> dict:
    seq = 64 if dry else 256
    return {"calibration": {"source": "stdlib", "split": "train", "samples": 4 if dry else 32, "seq_len": seq},
            "eval": {"source": "stdlib", "split": "eval", "samples": 2 if dry else 16, "seq_len": seq}}


def run_one(model: str, stages: list[dict], device: str, out: Path, dry: bool, streaming: bool = False) -> dict:
    from compress import run_recipe
    from compress.run.recipe import parse_recipe

    recipe = parse_recipe({"model": model, "data": data(dry), "stages": stages, "output": str(out),
                           "device": device, "streaming": streaming, "seed": 0})
    start = time.perf_counter()
    result = run_recipe(recipe, overwrite=True)
    stages_done = [r.to_dict() for r in result.reports]
    return {"seconds": time.perf_counter() - start, "stages": stages_done,
            "stage_seconds": {f"{i}-{r['name']}": round(r["seconds"], 1) for i, r in enumerate(stages_done)},
            "perplexity": next((r["metrics"]["perplexity"] for r in reversed(stages_done)
                                if "perplexity" in r["metrics"]), None)}


def codes_equal(first: Path, second: Path) -> tuple[bool, int]:
    """Whether two checkpoints hold the same packed tensors; how many tensors differ."""
    from compress.checkpoint.tensors import load_tensors

    a, b = load_tensors(first), load_tensors(second)
    import torch

    differ = sum(1 for name in a if name not in b or not torch.equal(a[name], b[name])) + len(set(b) - set(a))
    return differ == 0, differ


def compare(name: str, rule: str, device_run: dict, cpu_run: dict, out: Path) -> dict:
    row = {"recipe": name, "rule": rule, "device_seconds": device_run["seconds"], "cpu_seconds": cpu_run["seconds"],
           "speedup": cpu_run["seconds"] / device_run["seconds"], "device_perplexity": device_run["perplexity"],
           "cpu_perplexity": cpu_run["perplexity"],
           "peak_cuda_mib": max((s["peak_cuda_mib"] or 0) for s in device_run["stages"]),
           "device_stage_seconds": device_run["stage_seconds"], "cpu_stage_seconds": cpu_run["stage_seconds"]}
    if rule == "codes":
        row["ok"], row["tensors_differing"] = codes_equal(out / "device" / name / "checkpoint",
                                                          out / "cpu" / name / "checkpoint")
    else:
        row["perplexity_ratio"] = device_run["perplexity"] / cpu_run["perplexity"]
        row["ok"] = abs(row["perplexity_ratio"] - 1) <= 0.01
    return row


def synthetic_gptq(device: str, out: Path, dry: bool) -> dict:
    """GPTQ (int4 g128, streamed) of the synthetic 1.5 B Llama (a dry run: 2 layers of the 0.1 B) on ``device``."""
    from compress.execution.placement import stage_need
    from compress.run.recipe import parse_recipe
    from compress.models.synthetic import write_synthetic_llama

    model_dir = out / "synthetic"
    if not (model_dir / "config.json").is_file():
        write_synthetic_llama(model_dir, "0.1b" if dry else "1.5b", layers=2 if dry else None)
    stages = [{"quantize": {"method": "gptq", "config": {"bits": 4, "group_size": 128}}}]
    run = run_one(str(model_dir), stages, device, out / "device" / "synthetic-gptq", dry, streaming=True)
    recipe = parse_recipe({"model": str(model_dir), "data": data(dry), "stages": stages, "output": str(out)})
    need, detail = stage_need(recipe, 0, model_bytes=0)
    quantize = run["stages"][1]
    return {"seconds": quantize["seconds"], "peak_cuda_mib": quantize["peak_cuda_mib"],
            "peak_rss_mib": quantize["peak_rss_mib"], "plan_mib": need / 2**20, "plan_detail": detail}


def markdown(rows: list[dict], synthetic: dict | None, device: str) -> str:
    lines = [f"| recipe | {device} s | cpu s | speedup | {device} ppl | cpu ppl | check | CUDA peak MiB |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        check = (f"codes equal ({r['tensors_differing']} tensors differ)" if r["rule"] == "codes"
                 else f"ppl ratio {r['perplexity_ratio']:.4f}") + (" ok" if r["ok"] else " FAILED")
        ppl = [f"{p:.3f}" if p is not None else "-" for p in (r["device_perplexity"], r["cpu_perplexity"])]
        lines.append(f"| {r['recipe']} | {r['device_seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['speedup']:.2f}x | "
                     f"{ppl[0]} | {ppl[1]} | {check} | {r['peak_cuda_mib']:.0f} |")
    if synthetic:
        lines += ["", f"Synthetic 1.5 B GPTQ int4 g128 (streamed) on {device}: {synthetic['seconds']:.1f} s, CUDA peak "
                  f"{synthetic['peak_cuda_mib'] or 0:.0f} MiB, RSS peak {synthetic['peak_rss_mib']:.0f} MiB; compress plan "
                  f"beyond the weights {synthetic['plan_mib']:.0f} MiB ({synthetic['plan_detail']})."]
    return "\n".join(lines) + "\n"


def write(out: Path, rows: list[dict], synthetic: dict | None, device: str) -> None:
    """gpu_check.json and .md as they stand (after every recipe: a step stopped at its limit keeps its rows)."""
    (out / "gpu_check.json").write_text(json.dumps({"recipes": rows, "synthetic_gptq": synthetic}, indent=2))
    (out / "gpu_check.md").write_text(markdown(rows, synthetic, device))


def set_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def compare_recipes(args, alongside: bool) -> list[dict]:
    """Each recipe on the device and on the CPU, compared. With a GPU the CPU runs go alongside the
    device runs in one other process (half the cores each: the first run gave the device side two,
    and its loading and tokenizing took as long as on a 2-core machine), so that the check fits one
    device call; on the CPU (the dry run) one after the other, so that both sides
    compute the very same operations."""
    plan = recipes(args.dry_run)
    pool, cpu_runs = None, {}
    if alongside:
        cores = os.cpu_count() or 4  # half each: the device side loads, tokenizes and launches on the host
        set_threads(max(1, cores // 2))
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=set_threads,
                                   initargs=(max(1, cores - cores // 2),))
        cpu_runs = {name: pool.submit(run_one, args.model, stages, "cpu", args.out / "cpu" / name, args.dry_run)
                    for name, (stages, _) in plan.items()}
    rows = []
    for name, (stages, rule) in plan.items():
        log.info("recipe %s on %s and on cpu", name, args.device)
        on_device = run_one(args.model, stages, args.device, args.out / "device" / name, args.dry_run)
        on_cpu = (cpu_runs[name].result() if pool else
                  run_one(args.model, stages, "cpu", args.out / "cpu" / name, args.dry_run))
        rows.append(compare(name, rule, on_device, on_cpu, args.out) | {"cpu_alongside": pool is not None})
        log.info("%s", rows[-1])
        write(args.out, rows, None, args.device)
    if pool:
        pool.shutdown()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--part", choices=("all", "recipes", "synthetic"), default="all",
                        help="the four recipes, the synthetic GPTQ, or both (the GPU check splits them over two calls)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, synthetic = [], None
    if args.part in ("all", "recipes"):
        rows = compare_recipes(args, alongside=not args.device.startswith("cpu"))
    if args.part in ("all", "synthetic"):
        synthetic = synthetic_gptq(args.device, args.out, args.dry_run)
    write(args.out, rows, synthetic, args.device)
    log.info("\n%s", markdown(rows, synthetic, args.device))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
