"""LoRAM on SmolLM2-135M fine-tuned on a held-out text domain (issue 7 benchmark).

    .venv/bin/python benchmarks/loram_domain.py [--out out/bench/loram] [--steps 60] [--ratio 0.5]

Domain: English technical prose, the Python reference documentation shipped in every Python as
``pydoc_data.topics`` (topics split 7:1 into train and eval by a hash of their names); general text:
the stdlib-code eval split used elsewhere. Variants, same LoRA (rank 8, alpha 16), data and steps:

- ``large``: SmolLM2 without fine-tuning;
- ``large+lora``: LoRA trained on the large model directly (the upper bound);
- ``loram`` / ``loram+align`` / ``qloram`` / ``qloram+align``: LoRAPrune to ``--ratio`` (LoRAPrune's layer
  exemptions; its LoRA only scores units and is dropped), optional alignment (40 steps) on general
  text, optional NF4 small model, LoRA on the small model, recovered onto the large one. The small
  model's own perplexity with its LoRA is reported too. Rerun with another ``--ratio`` to add rows.

Each variant runs in its own process so that its training-phase peak RSS is its own. Reruns skip
finished variants (``results.jsonl``); writes ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path

from child import child_result, run_child

GENERAL = {"source": "stdlib", "split": "eval", "samples": 32, "seq_len": 512}
LORA = {"rank": 8, "alpha": 16}
VARIANTS = ("large", "large+lora", "loram", "loram+align", "qloram", "qloram+align")
log = logging.getLogger("loram_domain")


def write_domain(out: Path) -> tuple[Path, Path]:
    """Train and eval text files of the domain (deterministic split of the documentation topics)."""
    from pydoc_data.topics import topics

    train, evaluation = out / "domain_train.txt", out / "domain_eval.txt"
    parts = {"train": [], "eval": []}
    for name in sorted(topics):
        split = "eval" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 8 == 0 else "train"
        parts[split].append(topics[name])
    train.write_text("\n\n".join(parts["train"]))
    evaluation.write_text("\n\n".join(parts["eval"]))
    return train, evaluation


def stages_for(variant: str, train: Path, steps: int, ratio: float) -> list[dict]:
    tune = {"steps": steps, "lr": 2.0e-4, "batch_size": 4, "grad_accum": 1, "seq_len": 256, "save_every": 0,
            "data": {"path": str(train)}}
    if variant == "large":
        return [{"eval": {"baseline": False}}]
    if variant == "large+lora":
        return [{"finetune": dict(tune, lora=LORA)}, {"eval": {"baseline": False}}]
    loram = {"prune": {"method": "loraprune", "ratio": ratio, "uniform": False, "steps": 20, "every": 2,
                       "batch_size": 4, "seq_len": 256, "save_every": 0, "lora": LORA},
             "train": dict(tune, lora=LORA), "quantize_small": "nf4" if variant.startswith("q") else None}
    if variant.endswith("+align"):
        loram.update(align_steps=40, align_lr=5.0e-5)
    return [{"loram": loram}, {"eval": {"baseline": False}}]


def run_variant(out: Path, variant: str, steps: int, ratio: float) -> dict:
    """One variant in this process: the recipe, then perplexity on general text from the saved model."""
    from compress import run_recipe
    from compress.checkpoint.load import load_checkpoint
    from compress.models.data import token_windows
    from compress.execution.evaluate import perplexity
    from compress.run.recipe import SourceSpec, parse_recipe

    train, evaluation = write_domain(out)
    data = {"calibration": {"source": "stdlib", "split": "train", "samples": 16, "seq_len": 256},
            "eval": {"path": str(evaluation), "samples": 16, "seq_len": 512}}
    point = out / "points" / f"{variant.replace('+', '_')}-{ratio}"
    recipe = parse_recipe({"model": "smollm2-135m", "dtype": "float32", "data": data, "seed": 0,
                           "stages": stages_for(variant, train, steps, ratio), "output": str(point)})
    result = run_recipe(recipe, overwrite=True)
    trained = next((r for r in result.reports if r.name in ("finetune", "loram")), None)
    row = {"variant": variant, "steps": steps, "ratio": ratio if variant.startswith(("loram", "qloram")) else None,
           "ppl_domain": result.reports[-1].metrics["perplexity"]}
    if trained is not None:
        model = load_checkpoint(point / ".stages" / f"00-{trained.name}" / "model", dtype="float32")
        m = trained.metrics
        row.update(seconds=trained.seconds, train_peak_rss_mib=m["train_peak_rss_mib"],
                   train_rss_growth_mib=m["train_rss_growth_mib"], small_ppl_domain=m.get("small_perplexity"),
                   small_params=m.get("small_params"), storage_reduction_16bit=m.get("storage_reduction_16bit"))
    else:
        from compress.models.sources import load_model, resolve_model

        model = load_model(resolve_model("smollm2-135m"), "float32")[0]
    windows = token_windows(recipe_tokenizer(), SourceSpec(**GENERAL).text_source("eval"), 32, 512)
    row["ppl_general"] = perplexity(model, windows)
    return row


def recipe_tokenizer():
    from compress.models.sources import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m"))


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | ratio | ppl domain | ppl general | small + LoRA ppl domain | train peak RSS MiB | "
             "train RSS growth MiB | param memory reduction (16-bit) | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (VARIANTS.index(r["variant"]), -(r.get("ratio") or 0))):
        def cell(key, fmt):
            return format(row[key], fmt) if row.get(key) is not None else "-"
        lines.append(f"| {row['variant']} | {cell('ratio', 'g')} | {cell('ppl_domain', '.3f')} | {cell('ppl_general', '.3f')} | "
                     f"{cell('small_ppl_domain', '.3f')} | {cell('train_peak_rss_mib', '.0f')} | "
                     f"{cell('train_rss_growth_mib', '.0f')} | {cell('storage_reduction_16bit', '.2f')} | "
                     f"{cell('seconds', '.0f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench/loram"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ratio", type=float, default=0.5, help="LoRAM's pruning ratio")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset to run")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        print(child_result(run_variant(args.out, args.variant, args.steps, args.ratio)))
        return
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    for variant in [v for v in VARIANTS if v in args.variants.split(",")]:
        ratio = args.ratio if variant.startswith(("loram", "qloram")) else None
        if any(r["variant"] == variant and r["steps"] == args.steps and r.get("ratio", 0.5 if ratio else None) == ratio
               for r in rows):
            continue
        log.info("variant %s", variant)
        rows.append(run_child(__file__, ["--out", str(args.out), "--steps", str(args.steps), "--ratio", str(args.ratio),
                                         "--variant", variant], f"variant {variant}"))
        results.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    (args.out / "results.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
