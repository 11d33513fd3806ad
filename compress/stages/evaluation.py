"""eval: perplexity of the current model on the recipe's held-out text (``data.eval``).

```yaml
- eval: {baseline: true, batch_size: 4}
```

With ``baseline: true`` (the default) the run also scores the model as loaded, before any stage, so
the summary shows the two side by side. The whole model runs on the recipe's device when ``compress
plan`` says it fits there; otherwise (and in a streaming recipe) the windows go through the model one
decoder layer at a time on the device: the same operations, so the same perplexity.
"""

from __future__ import annotations

from pydantic import Field

from ..execution.evaluate import kernels_used, perplexity, perplexity_by_units
from ..execution.placement import whole_model_on_device
from ..models.chunked_loss import loss_slice_bytes
from ..planning.plan import inference_breakdown
from ..planning.stage_memory import PlanState, held
from ..stage import Stage, StageConfig
from .report import StageReport


class EvalConfig(StageConfig):
    baseline: bool = True
    batch_size: int = Field(4, ge=1)


def linear_bits_per_param(model) -> float | None:
    """Bits per weight over the linear layers inside decoder layers: packed storage for quantized
    layers, the dtype's width for dense ones."""
    from compress.quant import QuantLinear
    from torch import nn

    bits = params = 0
    for name, module in model.named_modules():
        if ".layers." not in f".{name}" or ".lora_" in f"{name}.":
            continue  # outside decoder layers, or an adapter factor (counted separately)
        if isinstance(module, QuantLinear):
            bits += module.config.storage_bits(module.shape)
            params += module.shape[0] * module.shape[1]
        elif isinstance(module, nn.Linear):
            bits += module.weight.numel() * module.weight.element_size() * 8
            params += module.weight.numel()
    return bits / params if params else None


def score(ctx, batch_size: int, report: StageReport, index: int) -> None:
    """Perplexity on ``data.eval``: the whole model on the run's device when the plan says eval stage
    ``index`` fits it, else one layer at a time (``compress.execution.placement``)."""
    windows = ctx.windows("eval")
    spec = ctx.recipe.spec.data.eval
    with whole_model_on_device(ctx, f"stages[{index}].eval", index, walk_instead=True) as whole:
        if whole:
            ppl = perplexity(ctx.model, windows, batch_size, ctx.track)
        else:
            ppl = perplexity_by_units(ctx.units, windows, batch_size, ctx.track)
            report.notes.append(f"scored one decoder layer at a time on {ctx.device}")
    report.metrics.update(perplexity=ppl, eval_windows=int(windows.shape[0]), eval_seq_len=int(windows.shape[1]),
                          eval_data=spec.text_source("eval").describe(),
                          bits_per_param=linear_bits_per_param(ctx.model), **kernels_used(ctx.model, ctx.device))



def run(ctx, config: EvalConfig, report: StageReport) -> None:
    score(ctx, config.batch_size, report, ctx.entry.index)
    baseline = ctx.metrics.get("baseline_perplexity")
    if baseline:
        change = report.metrics["perplexity"] / baseline - 1
        report.metrics["vs_baseline"] = change
        report.notes.append(f"perplexity {report.metrics['perplexity']:.3f} vs {baseline:.3f} as loaded "
                            f"({change:+.1%})")


def eval_batch_size(recipe) -> int:
    """The batch size of the recipe's last eval stage (scores from equal batches compare exactly)."""
    stages = [e for e in recipe.stages if e.name == "eval"]
    return stages[-1].config.batch_size if stages else EvalConfig().batch_size


def wants_baseline(recipe):
    """The first eval stage (a ``StageEntry``) when it asks for a baseline."""
    first = next((e for e in recipe.stages if e.name == "eval"), None)
    return first if first is not None and first.config.baseline else None


def memory(arch, config: EvalConfig, state: PlanState) -> list[tuple[str, dict]]:
    """The model as served for perplexity: decoder activations, one slice of logits, the KV cache."""
    serving = inference_breakdown(arch, None, config.batch_size, state.eval_seq)
    width = state.setup.compute_bytes / 2  # inference_breakdown counts 16-bit values
    layer = serving["activations"] - 4 * config.batch_size * arch.vocab  # less decode's last-token logits
    return [("eval", {**held(arch, state), "activations": layer * width + loss_slice_bytes(arch, config.batch_size,
                                                                                          state.eval_seq, width * 2),
                      "kv_cache": serving["kv_cache"] * width})]


STAGE = Stage(name="eval", config=EvalConfig, run=run, modifies_model=False, needs_data=("eval",),
              memory=memory, streaming=lambda config: None)
