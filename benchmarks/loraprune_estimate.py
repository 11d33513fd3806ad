"""How well LoRAPrune's gradient estimate ranks units, per module, on SmolLM2-135M (issue 6).

    .venv/bin/python benchmarks/loraprune_estimate.py [--steps 20] [--out out/bench/loraprune_estimate]

LoRA (rank 8, alpha 16) is trained with AdamW (lr 2e-4, batch 4 x 256 tokens of stdlib train text)
while W0 of a few layers also requires grad, so the true dL/dW0 is at hand at the same step. At the
chosen steps, every module's per-unit scores (rows of q/k/v/gate/up, input columns of o/down; KV
groups for attention, channels for the MLP) are computed three ways: the LoRA estimate |Ĝ ⊙ W|,
magnitude |W| and the true gradient |G ⊙ W0|, and the Spearman rank correlation of the first two with
the third is reported, averaged over the layers. Writes ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
log = logging.getLogger("loraprune_estimate")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [torch.argsort(torch.argsort(x)).double() for x in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()))


def unit_totals(unit, leaf: str, score: torch.Tensor) -> torch.Tensor:
    """Per-unit sums of element scores: KV groups for attention, channels for the MLP."""
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return score.reshape(unit.kv_groups, -1).sum(1)
    if leaf == "o_proj":
        return score.reshape(score.shape[0], unit.kv_groups, -1).sum((0, 2))
    return score.sum(0) if leaf == "down_proj" else score.sum(1)


def correlations(model, units) -> dict[str, tuple[list[float], list[float]]]:
    from compress.prune.importance import weight_importance

    found = {leaf: ([], []) for leaf in LEAVES}
    for unit in units:
        for leaf in LEAVES:
            layer = model.get_submodule(unit.module(leaf))
            true = unit_totals(unit, leaf, weight_importance(layer, "gradient"))
            found[leaf][0].append(spearman(unit_totals(unit, leaf, weight_importance(layer, "loraprune")), true))
            found[leaf][1].append(spearman(unit_totals(unit, leaf, weight_importance(layer, "magnitude")), true))
    return found


def measure(steps: int, probes: set[int]) -> list[dict]:
    from compress.models.data import TextSource, token_windows
    from compress.models.sources import load_model, resolve_model
    from compress.prune import layer_units
    from compress.stages.training_common import LoraSpec, attach_adapters, lora_parameters

    torch.manual_seed(0)
    model, tokenizer = load_model(resolve_model("smollm2-135m"), "float32")
    attach_adapters(model, LoraSpec(rank=8, alpha=16), 0)
    units = layer_units(model)[3:29:4]
    weights = [model.get_submodule(u.module(leaf)).base_layer.weight for u in units for leaf in LEAVES]
    for weight in weights:
        weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(lora_parameters(model).values()), lr=2.0e-4)
    windows = token_windows(tokenizer, TextSource("stdlib", "train"), 4 * steps, 256)
    model.train()
    rows = []
    for step in range(steps):
        batch = windows[4 * step:4 * step + 4]
        model(input_ids=batch, labels=batch).loss.backward()
        if step in probes:
            log.info("step %d: scoring %d layers", step, len(units))
            rows += [{"step": step, "module": leaf, "lora": sum(lora) / len(lora), "magnitude": sum(mag) / len(mag)}
                     for leaf, (lora, mag) in correlations(model, units).items()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for weight in weights:
            weight.grad = None
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| step | module | unit | Spearman(LoRA estimate, true) | Spearman(magnitude, true) |",
             "|---:|---|---|---:|---:|"]
    for row in rows:
        unit = "input column" if row["module"] in ("o_proj", "down_proj") else "output row"
        lines.append(f"| {row['step']} | {row['module']} | {unit} | {row['lora']:+.2f} | {row['magnitude']:+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench/loraprune_estimate"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(measure(args.steps, {0, args.steps // 2, args.steps - 1}))
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
