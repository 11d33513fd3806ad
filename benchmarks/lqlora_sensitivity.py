"""How well LQ-LoRA's ILP costs predict the loss: one matrix quantized at a time (SmolLM2-135M, Gemma-3-270M).

    .venv/bin/python benchmarks/lqlora_sensitivity.py [--model gemma3-270m] [--windows 4] [--bits 2] [--group 64]

For chosen projections of chosen layers, each weight alone is replaced by its RTN quantization
(asymmetric, ``--bits``/``--group``) and the increase of the mean next-token loss on ``--windows``
calibration windows of the held-out benchmark (``heldout.py``'s corpus, windows and fp32 model,
built by it when missing) is measured; the matrix is then restored. Next to it, each cost the ILP
could rank configs by, for the same residual R = W - Q:

- ``output+fisher``: the ``output`` objective with the Fisher (the default with calibration data):
  sum_i rho_i (R H R^T)_ii / 2, rho from the diagonal empirical Fisher (``lowrank.decompose``);
- ``output+outputs``: the same with ``fisher: outputs``, rho the Fisher of the matrix's outputs
  (squared gradients per position, from the same backward passes: ``lowrank.fisher.output_fisher``);
- ``output``: tr(R H R^T) / 2, the layer's own output error, no Fisher;
- ``weight+fisher``: the ``weight`` objective, ||R * sqrt(F)||^2;
- ``weight``: ||R||^2, plain Frobenius.

H (2/n sum x x^T) and F come from the same windows. The verdict is each cost's Spearman rank
correlation with the measured increase over all the matrices (the ILP only compares costs, so the
ranks are what matter), and the spread of measured / predicted (max / min over the matrices). Writes
``benchmarks/results/lqlora_sensitivity.json`` (``lqlora_sensitivity_<model>.json`` for another
model than SmolLM2) and prints the table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from child import bench_args
from heldout import add_model_option, default_out, model_option, windows_file
from peers import dense_model_dir

from compress.execution.evaluate import window_nll
from compress.lowrank.decompose import output_error, output_row_weights, weighted_error
from compress.lowrank.fisher import empirical_fisher, output_fisher
from compress.quant import QuantConfig, QuantizedWeight
from compress.quant.gptq import HessianAccumulator

log = logging.getLogger("lqlora_sensitivity")
RESULTS = Path(__file__).resolve().parent / "results" / "lqlora_sensitivity.json"
KINDS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
COSTS = ("output+fisher", "output+outputs", "output", "weight+fisher", "weight")
LAYERS = {"smollm2-135m": "1,4,8,12,16,20,24,26,28", "gemma3-270m": "1,3,5,7,9,11,13,15,17"}


def mean_loss(model, windows: torch.Tensor) -> float:
    """Mean next-token loss per predicted token over ``windows`` (one batch)."""
    with torch.no_grad():
        total, tokens = window_nll(model, windows)
    return total / tokens


def hessians(model, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    accumulators = {n: HessianAccumulator(model.get_submodule(n).in_features) for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, a=a: a.add(i[0])) for n, a in accumulators.items()]
    mean_loss(model, windows)
    for hook in hooks:
        hook.remove()
    return {n: a.hessian for n, a in accumulators.items()}


def costs(residual: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor,
          outputs: torch.Tensor) -> dict[str, float]:
    rows, output_rows = output_row_weights(hessian, fisher), output_row_weights(hessian, outputs)
    return {"output+fisher": output_error(hessian, rows)(residual) ** 2,
            "output+outputs": output_error(hessian, output_rows)(residual) ** 2,
            "output": output_error(hessian)(residual) ** 2,
            "weight+fisher": weighted_error(residual, fisher) ** 2, "weight": weighted_error(residual, None) ** 2}


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [torch.tensor(x, dtype=torch.float64).argsort().argsort().double() for x in (a, b)]
    centred = [r - r.mean() for r in ranks]
    return float((centred[0] * centred[1]).sum() / (centred[0].norm() * centred[1].norm()))


def measure(model, names: list[str], windows: torch.Tensor, config: QuantConfig) -> list[dict]:
    start = time.perf_counter()
    with output_fisher({n: model.get_submodule(n) for n in names}) as outputs:  # the same backward passes
        fisher = empirical_fisher(model, list(windows), [f"{n}.weight" for n in names])
    h = hessians(model, names, windows)
    base = mean_loss(model, windows)
    log.info("Fisher and Hessians of %d matrices on %d windows: %.0f s", len(names), len(windows), time.perf_counter() - start)
    rows = []
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight.data.clone()
        quantized = QuantizedWeight.quantize(weight, config).dequantize()
        module.weight.data.copy_(quantized)
        increase = mean_loss(model, windows) - base
        module.weight.data.copy_(weight)
        rows.append({"matrix": name, "loss_increase": increase,
                     **costs(weight - quantized, h[name], fisher[f"{name}.weight"].float(), outputs[name].float())})
        log.info("%s: loss +%.4g", name, increase)
    return rows


def report(rows: list[dict]) -> list[str]:
    measured = [r["loss_increase"] for r in rows]
    lines = ["| cost | Spearman with the measured loss increase | measured / predicted, max / min over matrices |",
             "|---|---:|---:|"]
    for cost in COSTS:
        ratios = [r["loss_increase"] / r[cost] for r in rows if r["loss_increase"] > 0]
        lines.append(f"| {cost} | {spearman(measured, [r[cost] for r in rows]):.2f} | {max(ratios) / min(ratios):.3g} |")
    lines += ["", "| matrix | loss increase | " + " | ".join(COSTS) + " |", "|---|" + "---:|" * (len(COSTS) + 1)]
    for r in rows:
        lines.append(f"| {r['matrix'].removeprefix('model.layers.')} | {r['loss_increase']:.4g} | "
                     + " | ".join(f"{r[c]:.4g}" for c in COSTS) + " |")
    return lines


def main() -> None:
    def options(parser):
        parser.add_argument("--windows", type=int, default=4, help="calibration windows (the last ones of heldout's 128)")
        parser.add_argument("--bits", type=int, default=2)
        parser.add_argument("--group", type=int, default=64)
        parser.add_argument("--layers", help="layer indices, comma-separated (default: nine spread over the model)")
        add_model_option(parser)

    model_name = model_option()
    args = bench_args(__doc__.splitlines()[0], default_out(model_name), options)
    from compress.models.sources import load_model, resolve_model  # noqa: PLC0415 - after bench_args set offline mode

    model, _ = load_model(resolve_model(str(dense_model_dir(args.out, model_name))), "float32")
    windows = load_file(str(windows_file(args.out, model_name)))["calibration"][-args.windows:]
    layers = map(int, (args.layers or LAYERS[model_name]).split(","))
    names = [f"model.layers.{layer}.{kind}" for layer in layers for kind in KINDS]
    rows = measure(model, names, windows, QuantConfig.uniform(args.bits, args.group))
    results = RESULTS if model_name == "smollm2-135m" else RESULTS.with_name(f"{RESULTS.stem}_{model_name}.json")
    results.write_text(json.dumps({"model": model_name, "bits": args.bits, "group": args.group,
                                   "windows": args.windows, "rows": rows}, indent=1) + "\n")
    print("\n".join(report(rows)))  # noqa: T201 - the table is the script's output


if __name__ == "__main__":
    main()
