"""Peak memory of an L4Q training step vs a LoRA step vs full-parameter QAT on SmolLM2-135M (issue 8).

    .venv/bin/python benchmarks/l4q_memory.py [--out out/bench/l4q_memory] [--steps 4]

Same model (fp32 on CPU), data (stdlib train text), batch (2 x 256 tokens), optimizer (AdamW) and
steps for each method; each runs in its own process with glibc's mmap threshold fixed at 128 KiB so
that RSS follows the live tensors:

- ``lora``: the ``finetune`` stage, LoRA rank 16 / alpha 32 on every linear of the 16-bit-or-wider
  dense base (the usual LoRA step);
- ``l4q``: the ``l4q`` stage, 4 bits, group 64, the same LoRA (L4QMatmul keeps only x between
  forward and backward and recomputes W' and Wq);
- ``qat``: full-parameter QAT, every linear weight trainable with the same per-group LSQ fake
  quantization through plain autograd (round with a straight-through estimator), AdamW over all of
  them: weights, their gradients, two Adam moments, and the autograd-saved W-sized tensors.

Reported: the RSS growth over the loaded model during training, and the peak minus the process after
imports (model + training). Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from child import child_result, run_child

METHODS = ("lora", "l4q", "qat")
BATCH, SEQ = 2, 256
LORA = {"rank": 16, "alpha": 32}
log = logging.getLogger("l4q_memory")


def stage_point(out: Path, method: str, steps: int) -> dict:
    from compress import run_recipe
    from compress.run.recipe import parse_recipe

    train = {"steps": steps, "batch_size": BATCH, "grad_accum": 1, "seq_len": SEQ, "lr": 1.0e-4, "save_every": 0,
             "lora": LORA}
    stage = {"finetune": train} if method == "lora" else {"l4q": dict(train, bits=4, group_size=64)}
    recipe = parse_recipe({"model": "smollm2-135m", "dtype": "float32", "seed": 0, "stages": [stage],
                           "data": {"calibration": {"source": "stdlib", "split": "train", "samples": 16,
                                                    "seq_len": SEQ}},
                           "output": str(out / method)})
    metrics = run_recipe(recipe, overwrite=True).reports[1].metrics
    return {"peak_rss_mib": metrics["train_peak_rss_mib"], "growth_mib": metrics["train_rss_growth_mib"],
            "seconds": metrics["train_seconds"]}


class FakeQuantLinear(torch.nn.Module):
    """Full QAT: a trainable weight with per-group LSQ step/offset, fake-quantized by plain autograd."""

    def __init__(self, linear: torch.nn.Linear, bits: int = 4, group_size: int = 64):
        from compress.lowrank.l4q import rtn_qparams

        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().float().clone())
        self.bias = linear.bias
        step, offset = rtn_qparams(self.weight, bits, group_size)
        self.step, self.offset = torch.nn.Parameter(step), torch.nn.Parameter(offset)
        self.levels, self.group_size = 2**bits, group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compress.lowrank.l4q import expand_groups

        step, offset = expand_groups(self.step, self.group_size), expand_groups(self.offset, self.group_size)
        v = (self.weight - offset) / step
        q = torch.clamp(v + (torch.round(v) - v).detach(), 0, self.levels - 1)
        return torch.nn.functional.linear(x, step * q + offset, self.bias)


def qat_point(steps: int) -> dict:
    from compress.models.data import TextSource, token_windows
    from compress.execution.memory import PeakMemory
    from compress.models.sources import load_model, resolve_model
    from compress.targets import select_linears, set_module
    from compress.training.loop import TrainSettings, train

    model, tokenizer = load_model(resolve_model("smollm2-135m"), "float32")
    for name, module in select_linears(model, ["Linear"], ["lm_head"]):
        set_module(model, name, FakeQuantLinear(module))
    params = {n: p for n, p in model.named_parameters() if n.endswith((".weight", ".step", ".offset"))
              and "layers." in n and ("proj" in n)}
    windows = token_windows(tokenizer, TextSource("stdlib", "train"), 16, SEQ)
    settings = TrainSettings(steps=steps, lr=1.0e-5, batch_size=BATCH, save_every=0)
    with PeakMemory() as peak:
        result = train(model, params, windows, settings)
    return {"peak_rss_mib": peak.rss_mib, "growth_mib": peak.rss_mib - peak.start_rss_mib, "seconds": result.seconds,
            "trainable_params": sum(p.numel() for p in params.values())}


def one_method(out: Path, method: str, steps: int) -> dict:
    import psutil

    baseline = psutil.Process().memory_info().rss / 2**20
    row = qat_point(steps) if method == "qat" else stage_point(out, method, steps)
    return {"method": method, "steps": steps, "baseline_rss_mib": baseline,
            "model_and_training_peak_mib": row["peak_rss_mib"] - baseline, **row}


def markdown(rows: list[dict]) -> str:
    lora = next(r for r in rows if r["method"] == "lora")
    lines = ["| method | peak RSS MiB | training growth over the loaded model MiB | vs LoRA | "
             "model + training at peak MiB | vs LoRA | seconds per step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['peak_rss_mib']:.0f} | {row['growth_mib']:.0f} | "
                     f"{row['growth_mib'] / lora['growth_mib']:.2f}x | {row['model_and_training_peak_mib']:.0f} | "
                     f"{row['model_and_training_peak_mib'] / lora['model_and_training_peak_mib']:.2f}x | "
                     f"{row['seconds'] / row['steps']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench/l4q_memory"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: one method in this process
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.method:
        print(child_result(one_method(args.out, args.method, args.steps)))
        return
    rows = []
    for method in METHODS:
        log.info("method %s", method)
        rows.append(run_child(__file__, ["--out", str(args.out), "--steps", str(args.steps), "--method", method],
                              method, fixed_mmap=True))
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "results.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
