"""loram: train LoRA on a pruned (optionally 4-bit) small model, recover it to the large model's shapes.

```yaml
- loram: {prune: {method: loraprune, ratio: 0.5, uniform: true}, align_steps: 100,
          quantize_small: nf4, train: {steps: 200, lr: 1.0e-4, lora: {rank: 8, alpha: 16}},
          output: adapter}      # adapter | merged
- loram: {prune: {ratio: 0.5}, train: {steps: 200, distill: {weight: 0.5, temperature: 2.0}}}
```

LoRAM (Zhang et al., ICLR 2025): the large model is set aside (written to ``OUTPUT/.cache/loram/``),
a copy is pruned (``prune``: any ``prune`` stage method, structured; or ``semi`` 2:4 /
``unstructured`` magnitude masks, shapes unchanged; the LoRA of a LoRAPrune run only scores units and
is dropped, so the small model holds the large model's own weights at the kept positions, as in
LoRAM, unless ``prune: {merge_lora: true}``), optionally aligned by ``align_steps`` of
full-parameter training with lm_head frozen (``align_lr``, on ``align_data`` or ``data.calibration``:
general text, not the fine-tuning domain), optionally quantized (``quantize_small``:
``nf4`` through bitsandbytes with double quantization = QLoRAM, or any ``quantize`` config), and
LoRA is trained on it (``train``). The adapters are then recovered to the original shapes (zero at
removed neurons) and put on the large model, kept as adapters (export writes a PEFT adapter for the
large base) or ``merged``. The small model is cached after pruning/alignment/quantization, so
``--resume`` after a crash in LoRA training continues that training instead of pruning again.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Literal

from pydantic import Field

from compress.lowrank import merge_adapters
from compress.prune import layer_units
from compress.prune.sparsity import KeepSparse, sparsify
from compress.quant import QuantConfig

from ..checkpoint.store import load_checkpoint, save_model
from ..errors import RecipeError
from ..execution.evaluate import perplexity
from ..execution.memory import model_tensor_bytes, release_freed_memory
from ..model_state import ModelState
from ..models.architectures import pruning_problem
from ..models.text_specs import TextOrigin
from ..planning.plan_training import training_breakdown
from ..planning.stage_memory import PlanState, prune_range, training_setup
from ..stage import Stage, StageConfig
from .loram_small import dense_linears, quantize_small, recover, report_sizes
from .prune import PruneConfig, prune_structured
from .quantize import QuantSpec
from .training_common import (LoraSpec, TrainingConfig, attach_adapters, check_training_data, lora_parameters,
                              lora_rank, run_training, tail_mean, training_windows)

STRUCTURED = ("loraprune", "gradient", "magnitude", "random")


class LoramPrune(PruneConfig):
    method: Literal["loraprune", "gradient", "magnitude", "random", "semi", "unstructured"] = "loraprune"
    uniform: bool = True
    merge_lora: bool = False


class LoramTrain(TrainingConfig):
    lr: float = Field(1.0e-4, gt=0)
    lora: LoraSpec = LoraSpec(rank=8, alpha=16)


class LoramConfig(StageConfig):
    prune: LoramPrune = LoramPrune()
    align_steps: int = Field(0, ge=0)
    align_lr: float = Field(5.0e-5, gt=0)
    align_data: TextOrigin | None = None  # general text for alignment; default data.calibration
    quantize_small: Literal["nf4"] | QuantSpec | None = None
    train: LoramTrain = LoramTrain()
    output: Literal["adapter", "merged"] = "adapter"
    evaluate_small: bool = True  # perplexity of the small model with its LoRA on data.eval, before recovery


def check(recipe, entry, model) -> None:
    config: LoramConfig = entry.config
    if config.prune.method in STRUCTURED:
        problem = pruning_problem(model.config)
        if problem:
            raise RecipeError(f"{entry.where}.prune.method: {config.prune.method}: {problem}; "
                              "prune: {method: semi} or {method: unstructured} keeps the shapes")
        try:
            layer_units(model)
        except (ValueError, AttributeError) as err:
            raise RecipeError(f"{entry.where}: {err}") from None
    for part in ("prune", "train"):
        check_training_data(recipe, f"{entry.where}.{part}", getattr(config, part).data)


def effect(entry, model, state: ModelState) -> ModelState:
    """``output: merged`` leaves the large model dense (its adapters folded in)."""
    return state.dequantized(entry.where) if entry.config.output == "merged" else state


def _prune_small(ctx, config: LoramConfig, report) -> dict:
    """Prune (and align) ``ctx.model`` in place; returns the removed units ({} for semi/unstructured)."""
    prune = config.prune
    if prune.method in STRUCTURED:
        removed = prune_structured(ctx, PruneConfig(**prune.model_dump(exclude={"method"}), method=prune.method),
                                   report, phase="loram-prune")["layers"]
        hooks = None
    else:
        modules = dense_linears(ctx.model)
        hooks = KeepSparse(modules, sparsify(modules, prune.method, prune.ratio))
        removed = {}
    if config.align_steps:
        params = {n: p for n, p in ctx.model.named_parameters()
                  if not n.startswith("lm_head") and p is not ctx.model.get_output_embeddings().weight}
        settings = config.train.model_dump(include=set(TrainingConfig.model_fields) - {"data", "steps", "lr"})
        align = TrainingConfig(**settings, steps=config.align_steps, lr=config.align_lr, data=config.align_data)
        result = run_training(ctx, align, params, training_windows(ctx, align), hooks=hooks, phase="loram-align")
        report.metrics.update(align_first_loss=result.losses[0], align_final_loss=tail_mean(result.losses))
    return removed


def _small_model(ctx, config: LoramConfig, cache, report) -> dict:
    """Make ``ctx.model`` the pruned (aligned) small model, from the cache when a run is resumed;
    returns the removed units."""
    small_dir = cache / "small"
    if ctx.resume and (small_dir / "compress.json").is_file():
        ctx.model = load_checkpoint(small_dir, dtype=ctx.recipe.spec.dtype)
        report.notes.append(f"small model from {small_dir} (resumed)")
    else:
        removed = _prune_small(ctx, config, report)
        ctx.model.config.compress_pruning = {"method": config.prune.method, "ratio": config.prune.ratio,
                                             "layers": removed}
        save_model(ctx.model, small_dir)
    return ctx.model.config.compress_pruning["layers"]


def run(ctx, config: LoramConfig, report) -> None:
    cache = ctx.out_dir / ".cache" / "loram" / ctx.recipe.fingerprint(ctx.entry.index)[:16]
    if not ctx.resume:
        shutil.rmtree(cache, ignore_errors=True)
    for stale in cache.parent.iterdir() if cache.parent.is_dir() else []:  # an earlier recipe's copies
        if stale != cache:
            shutil.rmtree(stale, ignore_errors=True)
    large_params, large_bytes = sum(p.numel() for p in ctx.model.parameters()), model_tensor_bytes(ctx.model)
    if not (cache / "large" / "compress.json").is_file():
        save_model(ctx.model, cache / "large")
    removed = _small_model(ctx, config, cache, report)
    small = ctx.model
    small_params = sum(p.numel() for p in small.parameters())
    quantize_small(small, config.quantize_small)
    release_freed_memory()  # the large model's pruned parts: back to the OS before training is measured
    storage = {"small": model_tensor_bytes(small), "small_16bit": model_tensor_bytes(small, 2), "large": large_bytes}
    seed = ctx.recipe.spec.seed if config.train.seed is None else config.train.seed
    attach_adapters(small, config.train.lora, seed)
    params = lora_parameters(small)
    result = run_training(ctx, config.train, params, training_windows(ctx, config.train), phase="loram-train")
    del params
    if config.evaluate_small and ctx.recipe.spec.data.eval is not None:
        report.metrics["small_perplexity"] = perplexity(small, ctx.windows("eval"))
    large = load_checkpoint(cache / "large", dtype=ctx.recipe.spec.dtype)
    count = recover(small, large, removed)
    if config.output == "merged":
        merge_adapters(large)
    ctx.model = large
    ctx.state = effect(ctx.entry, large, ctx.state).pruned(
        "loram", {"method": config.prune.method, "ratio": config.prune.ratio, "layers": removed})
    shutil.rmtree(cache, ignore_errors=True)
    report_sizes(report, config, result, large_params, small_params, storage, count)


def memory(arch, config: LoramConfig, state: PlanState) -> list[tuple[str, dict]]:
    """Pruning the small copy, aligning it, then LoRA on it (pruned, optionally 4-bit)."""
    structured = config.prune.method in STRUCTURED
    start, end = prune_range(arch, config.prune)
    small = replace(state.setup, prune_ratio=config.prune.ratio if structured else 0.0, prune_start=start,
                    prune_end=end)
    rows = [("loram (prune)", training_breakdown(arch, training_setup(state.setup, config.prune, "prune",
                                                                      config.prune.lora.rank)))]
    if config.align_steps:
        rows.append(("loram (align, full)", training_breakdown(arch, replace(small, method="full"))))
    if config.quantize_small == "nf4":
        small = replace(small, base=QuantConfig.nf(4, 64, 8, 256, "float32"))
    elif config.quantize_small is not None:
        small = replace(small, base=config.quantize_small.to_config())
    train = training_setup(small, config.train, "loram", config.train.lora.rank)
    rows.append(("loram (train small)", training_breakdown(arch, train)))
    state.rank = config.train.lora.rank
    return rows


STAGE = Stage(name="loram", config=LoramConfig, run=run, modifies_model=True, check=check, effect=effect, memory=memory,
              leaves_adapters=lambda config: config.output == "adapter",
              low_rank=lambda config: [*lora_rank("prune.lora", config.prune.lora),
                                       *lora_rank("train.lora", config.train.lora)])
