"""finetune: train the model's LoRA adapters with everything else frozen.

```yaml
- finetune: {steps: 200, lr: 2.0e-4, batch_size: 4, grad_accum: 4, seq_len: 512, warmup: 0.03,
             max_grad_norm: 1.0, optimizer: adamw, eval_every: 50, save_every: 50,
             lora: {rank: 16, alpha: 32, targets: ["re:.*proj$"]}}
- finetune: {steps: 200, distill: {teacher: base, weight: 0.5, temperature: 2.0, top_k: 64}}
```

``distill`` trains on the KL divergence to the unquantized model's predictions mixed with the
next-token loss (``compress.training.distill``; also for ``l4q`` and ``loram``).

The adapters are the ones an earlier stage left (``lq_lora``'s L1 L2 over its Q) or, when there are
none, new ones from ``lora:`` (PEFT's initialization: A Kaiming-uniform, B = 0) over whatever the
layers hold (dense, or packed by ``quantize``: QLoRA). Giving ``lora:`` when adapters exist is an
error. Text comes from ``data:`` (a source as in the recipe's data section) or else the recipe's
``data.calibration`` source, cut into windows of ``seq_len`` tokens; ``samples`` windows (default:
one per sequence the run consumes, steps x batch_size x grad_accum) are cycled in a seeded order.
``optimizer: adamw8bit`` uses bitsandbytes' 8-bit AdamW. ``eval_every`` scores ``data.eval`` during
training. Every ``save_every`` steps the adapters, optimizer and RNG state go to
``OUTPUT/.cache/train/``, from which ``compress run --resume`` continues a killed run.
"""

from __future__ import annotations

from pydantic import Field

from ..errors import RecipeError, StageError
from ..execution.evaluate import perplexity
from ..planning.plan_training import training_breakdown
from ..planning.stage_memory import PlanState, training_setup
from ..stage import Stage
from ..targets import select_linears
from .training_common import (LoraSpec, TrainingConfig, attach_adapters, check_training_data, has_adapters,
                              lora_parameters, lora_rank, run_training, tail_mean, training_windows)


class FinetuneConfig(TrainingConfig):
    eval_every: int = Field(0, ge=0)
    lora: LoraSpec | None = None


def leaves_adapters(config: FinetuneConfig) -> bool:
    return config.lora is not None


def check(recipe, entry, model) -> None:
    config: FinetuneConfig = entry.config
    earlier = [e for e in recipe.stages[:entry.index]
               if e.stage.leaves_adapters is not None and e.stage.leaves_adapters(e.config)]
    if config.lora is not None and earlier:
        raise RecipeError(f"{entry.where}.lora: the model already carries adapters from {earlier[-1].where}; "
                          "drop lora: to train those")
    if config.lora is None and not earlier and not has_adapters(model):
        raise RecipeError(f"{entry.where}: the model has no LoRA adapters to train; add "
                          "lora: {rank: 16, alpha: 32} or an lq_lora stage before it")
    if config.lora is not None and not select_linears(model, config.lora.targets, config.lora.ignore):
        raise RecipeError(f"{entry.where}.lora.targets: selects no linear layer (targets {config.lora.targets})")
    check_training_data(recipe, entry.where, config.data)
    if config.eval_every and recipe.spec.data.eval is None:
        raise RecipeError(f"{entry.where}.eval_every: needs data.eval")


def run(ctx, config: FinetuneConfig, report) -> None:
    if config.lora is not None:
        if has_adapters(ctx.model):
            raise StageError(f"{ctx.entry.where}.lora: the model already carries adapters; drop lora:")
        seed = ctx.recipe.spec.seed if config.seed is None else config.seed
        count = attach_adapters(ctx.model, config.lora, seed)
        report.notes.append(f"new adapters: rank {config.lora.rank}, alpha {config.lora.alpha:g} on {count} layers")
    params = lora_parameters(ctx.model)
    if not params:
        raise StageError(f"{ctx.entry.where}: the model has no LoRA adapters to train; add lora:")
    windows = training_windows(ctx, config)
    evaluate = (lambda: perplexity(ctx.model, ctx.windows("eval"))) if config.eval_every else None
    result = run_training(ctx, config, params, windows, config.eval_every, evaluate)
    trainable = sum(p.numel() for p in params.values())
    report.metrics.update(steps=config.steps, trainable_params=trainable, windows=int(windows.shape[0]),
                          tokens=result.tokens, first_loss=result.losses[0] if result.losses else None,
                          final_loss=tail_mean(result.losses), resumed_from_step=result.resumed_from,
                          train_seconds=result.seconds, train_peak_rss_mib=result.peak_rss_mib,
                          train_rss_growth_mib=result.rss_growth_mib, train_model_mib=result.model_mib,
                          label=f"finetune {config.steps} steps")
    report.metrics["losses"] = [round(x, 5) for x in result.losses]
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    report.notes.append(f"{trainable:,} trainable parameters; loss {result.losses[0]:.4f} -> "
                        f"{report.metrics['final_loss']:.4f} (mean of the last 10 steps) over {config.steps} steps"
                        f"{resumed}, {result.tokens:,} tokens")
    if result.evals:
        report.metrics.update(evals=result.evals, perplexity=result.evals[-1]["perplexity"])


def memory(arch, config: FinetuneConfig, state: PlanState) -> list[tuple[str, dict]]:
    """LoRA over a dense base, QLoRA over a packed one."""
    rank = config.lora.rank if config.lora is not None else state.rank
    method = "lora" if state.base_label == "dense" else "qlora"
    state.rank = rank
    setup = training_setup(state.setup, config, method, rank)
    return [(f"finetune ({method}, {state.base_label})", training_breakdown(arch, setup))]


STAGE = Stage(name="finetune", config=FinetuneConfig, run=run, modifies_model=True, check=check, memory=memory,
              leaves_adapters=leaves_adapters, low_rank=lambda config: lora_rank("lora", config.lora))
