"""L4Q vs RTN, RTN + LoRA and LQ-LoRA + fine-tune on SmolLM2-135M at 4 and 3 bits (issue 8 benchmark).

    .venv/bin/python benchmarks/l4q_bits.py [--out out/bench/l4q_bits] [--steps 24]

For each uniform config (bits 4 and 3, groups 64 and 128, asymmetric), side by side with the same
data (stdlib train text, 4 x 256 tokens per step), steps and LoRA (rank 16, alpha 32, lr 2e-4):

- ``rtn``: round-to-nearest, no training;
- ``rtn+lora``: RTN base + a LoRA fine-tune (QLoRA-style: the adapter stays in 16 bit);
- ``lqlora+ft``: LQ-LoRA (rank 16, ILP over the gptq grid, groups 64/128) at the RTN config's bits per
  parameter, then the same fine-tune of its adapters;
- ``l4q``: L4Q with its defaults (step/offset from RTN's grid, quant_lr 1e-2 of each layer's mean
  step, zeros kept integer over the last 25 % of steps), merged and packed with integer zeros:
  GPTQ-exportable, no adapter;
- ``l4q-float``: the same with ``zero_point: float`` (fp16 zeros, native only; 16 bits per group
  instead of ``bits``), at int3 g128 only.

Perplexity on held-out stdlib text (32 x 512), bits per parameter of the linear layers with any
adapter counted at 16 bits, training seconds and the training loop's peak RSS. Each point runs in its
own process (so its peak is its own); LQ-LoRA's cost tables are shared between budgets. Reruns skip
finished points (``results.jsonl``); writes ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from child import child_result, run_child

CONFIGS = [(3, 64), (3, 128), (4, 64), (4, 128)]  # 3-bit first: the goal is at 3 bits
METHODS = ("rtn", "rtn+lora", "lqlora+ft", "l4q", "l4q-float")
DATA = {"calibration": {"source": "stdlib", "split": "train", "samples": 16, "seq_len": 256},
        "eval": {"source": "stdlib", "split": "eval", "samples": 32, "seq_len": 512}}
LORA = {"rank": 16, "alpha": 32}
log = logging.getLogger("l4q_bits")


def rtn_bits(bits: int, group: int) -> float:
    from compress.quant import QuantConfig

    return QuantConfig.uniform(bits, group).bits_per_param


def stages_for(method: str, bits: int, group: int, steps: int) -> list[dict]:
    tune = {"steps": steps, "lr": 2.0e-4, "batch_size": 4, "grad_accum": 1, "seq_len": 256, "save_every": 0}
    rtn = {"quantize": {"method": "rtn", "config": {"type": "uniform", "bits": bits, "group_size": group}}}
    evaluate = {"eval": {"baseline": False}}
    if method == "rtn":
        return [rtn, evaluate]
    if method == "rtn+lora":
        return [rtn, {"finetune": dict(tune, lora=LORA)}, evaluate]
    if method == "lqlora+ft":
        lq = {"rank": LORA["rank"], "alpha": LORA["alpha"], "budget_bits": rtn_bits(bits, group), "grid": "gptq",
              "group_sizes": [64, 128], "iterations": 10}
        return [{"lq_lora": lq}, {"finetune": tune}, evaluate]
    zero = "float" if method == "l4q-float" else "integer"
    return [{"l4q": dict(tune, bits=bits, group_size=group, quant_lr=1.0e-2, lora=LORA, zero_point=zero)}, evaluate]


def run_point(out: Path, method: str, bits: int, group: int, steps: int) -> dict:
    from compress import run_recipe
    from compress.run.recipe import parse_recipe

    name = f"{method}-int{bits}-g{group}"
    point = out / "points" / name.replace("+", "_")
    point.mkdir(parents=True, exist_ok=True)
    shared = out / "lq_lora_cache"
    shared.mkdir(exist_ok=True)
    (point / ".cache").mkdir(exist_ok=True)
    if not (point / ".cache" / "lq_lora").exists():
        (point / ".cache" / "lq_lora").symlink_to(shared.resolve())
    recipe = parse_recipe({"model": "smollm2-135m", "dtype": "float32", "data": DATA, "seed": 0,
                           "stages": stages_for(method, bits, group, steps), "output": str(point)})
    reports = run_recipe(recipe, overwrite=True).reports[1:]
    evaluation, trained = reports[-1], next((r for r in reports if r.name in ("finetune", "l4q")), None)
    adapter_params = trained.metrics.get("trainable_params", 0) if trained and trained.name == "finetune" else 0
    row = {"name": name, "method": method, "bits": bits, "group": group, "steps": steps,
           "ppl": evaluation.metrics["perplexity"], "bits_per_param": evaluation.metrics["bits_per_param"],
           "adapter_params": adapter_params,
           "train_seconds": trained.metrics["train_seconds"] if trained else 0.0,
           "train_peak_rss_mib": trained.metrics["train_peak_rss_mib"] if trained else None}
    if trained is not None and trained.name == "l4q":
        row["ppl_fake_quant"] = trained.metrics.get("perplexity_float_offset")
    return row


def with_adapter_bits(row: dict, linear_params: int) -> float:
    return row["bits_per_param"] + 16 * row["adapter_params"] / linear_params


def markdown(rows: list[dict], linear_params: int) -> str:
    lines = ["| config | method | perplexity | bits/param (linear, with adapters at 16 bit) | train s | "
             "train peak RSS MiB |", "|---|---|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (CONFIGS.index((r["bits"], r["group"])), METHODS.index(r["method"]))):
        peak = f"{row['train_peak_rss_mib']:.0f}" if row["train_peak_rss_mib"] else "-"
        lines.append(f"| int{row['bits']} g{row['group']} | {row['method']} | {row['ppl']:.3f} | "
                     f"{with_adapter_bits(row, linear_params):.3f} | {row['train_seconds']:.0f} | {peak} |")
    return "\n".join(lines) + "\n"


def linear_parameter_count() -> int:
    from compress.planning.plan import architecture_for

    return sum(o * i for o, i in architecture_for("smollm2-135m").linear_shapes().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench/l4q_bits"))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: method,bits,group in this process
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.point:
        method, bits, group = args.point.split(",")
        print(child_result(run_point(args.out, method, int(bits), int(group), args.steps)))
        return
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    for bits, group in CONFIGS:
        for method in METHODS:
            if method == "l4q-float" and (bits, group) != (3, 128):
                continue
            name = f"{method}-int{bits}-g{group}"
            if any(r["name"] == name and r["steps"] == args.steps for r in rows):
                continue
            log.info("point %s", name)
            rows.append(run_child(__file__, ["--out", str(args.out), "--steps", str(args.steps),
                                             "--point", f"{method},{bits},{group}"], name))
            results.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    (args.out / "results.md").write_text(markdown(rows, linear_parameter_count()))
    print(markdown(rows, linear_parameter_count()))


if __name__ == "__main__":
    main()
