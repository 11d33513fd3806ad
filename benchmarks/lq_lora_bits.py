"""Perplexity vs bits per parameter on SmolLM2-135M (issue 5 benchmark), all methods in one run.

    .venv/bin/python benchmarks/lq_lora_bits.py [--out out/bench/lq_lora_bits] [--finetune-budgets 2.5,3.25]

Methods, over the decoder's linear layers (lm_head and embeddings stay dense):

- ``rtn``: uniform asymmetric RTN at each fixed config (2/3/4 bits x groups 64/128);
- ``ilp``: the ILP's mixed precision without a low-rank part (``lq_lora`` rank 0);
- ``lqlora`` / ``lqlora-fisher``: LQ-LoRA rank 64 (alpha 16) without / with Fisher weighting;
- ``bnb-nf4``: bitsandbytes NF4 with double quantization (the QLoRA config, 4.127 bits).

The ILP methods run at budgets 2.5 ... 4.0 bits on the ``gptq`` grid restricted to groups 64 and 128
(group 32 matches SmolLM2's own Q4_1 origin, which would flatter 4-bit g32). Every point is scored
before fine-tuning; points at ``--finetune-budgets`` (and the RTN configs and NF4 nearest to them)
are scored again after the same short fine-tune: LQ-LoRA trains its own adapters, the others a fresh
rank-64 LoRA. Cost tables are shared between budgets (one cache), and each point's pipeline state
is kept, so rerunning the script skips what is done and extends a point with its fine-tune.
Writes ``results.jsonl``, ``results.md`` and ``ppl_vs_bits.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

BUDGETS = (2.5, 2.75, 3.0, 3.25, 3.5, 4.0)
RTN_CONFIGS = [(bits, group) for bits in (2, 3, 4) for group in (128, 64)]
DATA = {"calibration": {"source": "stdlib", "split": "train", "samples": 16, "seq_len": 256},
        "eval": {"source": "stdlib", "split": "eval", "samples": 32, "seq_len": 512}}
LORA = {"rank": 64, "alpha": 16}
FINETUNE = {"steps": 24, "lr": 2.0e-4, "batch_size": 4, "grad_accum": 1, "seq_len": 256, "save_every": 8}
NF8_BITS = 8 + 8 / 64 + 32 / (64 * 256)
log = logging.getLogger("lq_lora_bits")


def first_stage(method: str, budget: float | None, rtn: tuple[int, int] | None) -> dict:
    if method == "rtn":
        bits, group = rtn
        return {"quantize": {"method": "rtn", "config": {"type": "uniform", "bits": bits, "group_size": group}}}
    rank = 0 if method == "ilp" else 64
    return {"lq_lora": {"rank": rank, "alpha": 16, "budget_bits": budget, "grid": "gptq", "group_sizes": [64, 128],
                        "fisher": method == "lqlora-fisher", "iterations": 10, "workers": 1}}


def run_point(out: Path, name: str, stage: dict, finetune: bool) -> dict:
    import compress
    from compress.run.recipe import parse_recipe

    point_dir = out / "points" / name
    point_dir.mkdir(parents=True, exist_ok=True)
    shared = out / "cache"
    shared.mkdir(exist_ok=True)
    if not (point_dir / ".cache").exists():
        (point_dir / ".cache").symlink_to(shared.resolve())
    stages = [stage, {"eval": {"baseline": False}}]
    if finetune:
        lora = {} if "lq_lora" in stage and stage["lq_lora"]["rank"] > 0 else {"lora": LORA}
        stages += [{"finetune": dict(FINETUNE, **lora)}, {"eval": {"baseline": False}}]
    recipe = parse_recipe({"model": "smollm2-135m", "dtype": "float32", "data": DATA, "stages": stages,
                                    "output": str(point_dir), "seed": 0})
    result = compress.run_recipe(recipe, resume=True)
    reports = {(r.index, r.name): r for r in result.reports}
    quant = reports[(0, next(iter(stage)))].metrics
    row = {"name": name, "bits": quant["bits_per_param"], "ppl": reports[(1, "eval")].metrics["perplexity"],
           "seconds_quantize": reports[(0, next(iter(stage)))].seconds}
    adapter_bits = quant.get("bits_per_param_with_adapters_16bit", row["bits"]) - row["bits"]
    if finetune:
        tune = reports[(2, "finetune")]
        row.update(ppl_finetuned=reports[(3, "eval")].metrics["perplexity"], seconds_finetune=tune.seconds,
                   peak_rss_mib_finetune=tune.peak_rss_mib)
        if adapter_bits == 0:  # a fresh LoRA: count it like LQ-LoRA's
            adapter_bits = 16 * tune.metrics["trainable_params"] / quant["quantized_params"]
    row.update(bits_adapters_16bit=row["bits"] + adapter_bits, bits_adapters_nf8=row["bits"] + adapter_bits * NF8_BITS / 16)
    return row


def bnb_nf4_point(finetune: bool) -> dict:
    """bitsandbytes NF4 + double quantization (QLoRA) on the same layers, the same eval and fine-tune."""
    import bitsandbytes as bnb
    import torch

    from compress.models.data import token_windows
    from compress.execution.evaluate import perplexity
    from compress.lowrank import LoRALinear, init_default
    from compress.models.sources import load_model, resolve_model
    from compress.run.recipe import SourceSpec
    from compress.targets import select_linears, set_module
    from compress.training.loop import TrainSettings, train

    model, tokenizer = load_model(resolve_model("smollm2-135m"), "float32")
    params = 0
    start = time.perf_counter()
    for name, linear in select_linears(model, ["Linear"], ["lm_head"]):
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        layer.load_state_dict(linear.state_dict())
        set_module(model, name, layer.to("cpu"))
        params += linear.weight.numel()
    row = {"name": "bnb-nf4", "bits": 4 + 8 / 64 + 32 / (64 * 256), "seconds_quantize": time.perf_counter() - start}
    evals = token_windows(tokenizer, SourceSpec(**DATA["eval"]).text_source("eval"), 32, 512)
    row["ppl"] = perplexity(model, evals)
    if finetune:
        generator = torch.Generator().manual_seed(0)
        for name, layer in select_linears(model, ["Linear4bit"], []):
            wrapped = LoRALinear(layer, LORA["rank"], LORA["alpha"])
            init_default(wrapped, generator)
            set_module(model, name, wrapped)
        lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
        windows = token_windows(tokenizer, SourceSpec(**DATA["calibration"]).text_source("train"),
                                FINETUNE["steps"] * FINETUNE["batch_size"], FINETUNE["seq_len"])
        settings = TrainSettings(FINETUNE["steps"], FINETUNE["lr"], FINETUNE["batch_size"], FINETUNE["grad_accum"])
        result = train(model, lora, windows, settings)
        row.update(ppl_finetuned=perplexity(model, evals), seconds_finetune=result.seconds)
        adapter_bits = 16 * sum(p.numel() for p in lora.values()) / params
    else:
        adapter_bits = 16 * sum(LORA["rank"] * (m.in_features + m.out_features)
                                for _, m in select_linears(model, ["Linear4bit"], [])) / params
    row.update(bits_adapters_16bit=row["bits"] + adapter_bits, bits_adapters_nf8=row["bits"] + adapter_bits * NF8_BITS / 16)
    return row


def points(finetune_budgets: set[float]) -> list[tuple[str, dict, bool]]:
    found = []
    for bits, group in RTN_CONFIGS:
        storage = bits + (16 + bits) / group
        tune = any(abs(storage - b) < 0.2 for b in finetune_budgets)
        found.append((f"rtn-{bits}b-g{group}", first_stage("rtn", None, (bits, group)), tune))
    for method in ("lqlora-fisher", "lqlora", "ilp"):
        for budget in BUDGETS:
            found.append((f"{method}-{budget}", first_stage(method, budget, None), budget in finetune_budgets))
    return sorted(found, key=lambda point: not point[2])  # the fine-tuned points first


def fp32_point() -> dict:
    from compress.models.data import token_windows
    from compress.execution.evaluate import perplexity
    from compress.models.sources import load_model, resolve_model
    from compress.run.recipe import SourceSpec

    model, tokenizer = load_model(resolve_model("smollm2-135m"), "float32")
    evals = token_windows(tokenizer, SourceSpec(**DATA["eval"]).text_source("eval"), 32, 512)
    return {"name": "fp32", "bits": 32.0, "ppl": perplexity(model, evals)}


def fp32_lora_point(out: Path) -> dict:
    """The unquantized model with the same fine-tune (a fresh rank-64 LoRA): how much of the gain after
    fine-tuning is adaptation to the text domain rather than recovered quantization error."""
    from compress import run_recipe
    from compress.run.recipe import parse_recipe

    stages = [{"finetune": dict(FINETUNE, lora=LORA)}, {"eval": {"baseline": False}}]
    recipe = parse_recipe({"model": "smollm2-135m", "dtype": "float32", "data": DATA, "stages": stages,
                           "output": str(out / "points" / "fp32-lora"), "seed": 0})
    result = run_recipe(recipe, resume=True)
    tune = result.reports[1]
    return {"name": "fp32-lora", "bits": 32.0, "ppl": load_rows(out / "results.jsonl")["fp32"]["ppl"],
            "ppl_finetuned": result.reports[2].metrics["perplexity"], "seconds_finetune": tune.seconds}


def load_rows(path: Path) -> dict[str, dict]:
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows[row["name"]] = row
    return rows


def save_row(path: Path, rows: dict, row: dict) -> None:
    rows[row["name"]] = row
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows.values()))


def markdown(rows: dict) -> str:
    lines = ["| method | bits/param | + adapters 16-bit | + adapters NF8 | ppl before | ppl after finetune | quantize s | finetune s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows.values(), key=lambda r: (r["name"].rsplit("-", 1)[0], r["bits"])):
        after = f"{row['ppl_finetuned']:.3f}" if "ppl_finetuned" in row else "-"
        tune = f"{row['seconds_finetune']:.0f}" if "seconds_finetune" in row else "-"
        lines.append(f"| {row['name']} | {row['bits']:.3f} | {row.get('bits_adapters_16bit', row['bits']):.3f} | "
                     f"{row.get('bits_adapters_nf8', row['bits']):.3f} | {row['ppl']:.3f} | {after} | "
                     f"{row.get('seconds_quantize', 0):.0f} | {tune} |")
    return "\n".join(lines) + "\n"


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    families = {}
    for row in rows.values():
        if row["name"] not in ("fp32", "fp32-lora"):
            name = row["name"]
            family = (name.rsplit("-", 1)[0] if name[:3] in ("ilp", "lql") else
                      "bnb-nf4 (QLoRA)" if name == "bnb-nf4" else name.split("-")[0])
            families.setdefault(family, []).append(row)
    for axis, key, title in ((axes[0], "ppl", "before fine-tuning"), (axes[1], "ppl_finetuned", "after fine-tuning")):
        for family, members in sorted(families.items()):
            members = sorted((r for r in members if key in r), key=lambda r: r["bits"])
            if members:
                axis.plot([r["bits"] for r in members], [r[key] for r in members], "o-", label=family)
        if "fp32" in rows:
            axis.axhline(rows["fp32"]["ppl"], color="gray", linestyle="--", label="fp32")
        if key == "ppl_finetuned" and "fp32-lora" in rows:
            axis.axhline(rows["fp32-lora"]["ppl_finetuned"], color="black", linestyle=":", label="fp32 + same LoRA")
        axis.set_title(title)
        axis.set_xlabel("bits per parameter (quantized base, adapters excluded)")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity (stdlib eval, 32 x 512)")
    axes[1].legend()
    figure.suptitle("SmolLM2-135M: perplexity vs bits")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench/lq_lora_bits"))
    parser.add_argument("--finetune-budgets", default="2.5,3.25")
    parser.add_argument("--only", default="", help="comma-separated point names (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = load_rows(results)
    budgets = {float(b) for b in args.finetune_budgets.split(",") if b}
    wanted = set(args.only.split(",")) - {""}
    if "fp32" not in rows and (not wanted or "fp32" in wanted):
        save_row(results, rows, fp32_point())
    tune_nf4 = bool(budgets)  # the QLoRA reference every fine-tuned point is compared with
    if (not wanted or "bnb-nf4" in wanted) and ("bnb-nf4" not in rows or (tune_nf4 and "ppl_finetuned" not in rows["bnb-nf4"])):
        log.info("point bnb-nf4 (finetune: %s)", tune_nf4)
        save_row(results, rows, bnb_nf4_point(tune_nf4))
    if budgets and "fp32-lora" not in rows and (not wanted or "fp32-lora" in wanted):
        save_row(results, rows, fp32_lora_point(args.out))
    for name, stage, finetune in points(budgets):
        if (wanted and name not in wanted) or (name in rows and ("ppl_finetuned" in rows[name] or not finetune)):
            continue
        log.info("point %s (finetune: %s)", name, finetune)
        save_row(results, rows, run_point(args.out, name, stage, finetune))
    (args.out / "results.md").write_text(markdown(rows))
    plot(rows, args.out / "ppl_vs_bits.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
