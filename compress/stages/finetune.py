"""finetune: train the model's LoRA adapters with everything else frozen.

```yaml
- finetune: {steps: 200, lr: 2.0e-4, batch_size: 4, grad_accum: 4, seq_len: 512, warmup: 0.03,
             max_grad_norm: 1.0, optimizer: adamw, eval_every: 50, save_every: 50,
             lora: {rank: 16, alpha: 32, targets: ["re:.*proj$"]}}
```

The adapters are the ones an earlier stage left (``lq_lora``'s L1 L2 over its Q) or, when there are
none, new ones from ``lora:`` (PEFT's initialization: A Kaiming-uniform, B = 0) over whatever the
layers hold (dense, or packed by ``quantize``: QLoRA). Giving ``lora:`` when adapters exist is an
error. Text comes from ``data:`` (a source as in the recipe's data section) or else the recipe's
``data.calibration`` source, cut into windows of ``seq_len`` tokens; ``samples`` windows (default:
one per sequence the run consumes, steps x batch_size x grad_accum) are cycled in a seeded order.
``optimizer: adamw8bit`` uses bitsandbytes' 8-bit AdamW. ``eval_every`` scores ``data.eval`` during
training. Every ``save_every`` steps the adapters, optimizer and RNG state go to
``OUTPUT/.cache/finetune/``, from which ``compress run --resume`` continues a killed run.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.lowrank import LoRALinear, init_default

from ..errors import RecipeError, StageError
from ..evaluate import perplexity
from ..recipe import TextOrigin
from ..stage import Stage, StageConfig
from ..targets import check_selector, select_linears, set_module
from ..training import TrainSettings, train


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = ["re:.*proj$"]
    ignore: list[str] = ["lm_head"]

    @model_validator(mode="after")
    def _valid_selectors(self) -> "LoraSpec":
        for key in list(self.targets) + list(self.ignore):
            problem = check_selector(key)
            if problem:
                raise ValueError(f"selector {key!r}: {problem}")
        return self


class FinetuneConfig(StageConfig):
    steps: int = Field(200, ge=1)
    lr: float = Field(2.0e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(4, ge=1)
    seq_len: int = Field(512, ge=2)
    samples: int | None = Field(None, ge=1)
    warmup: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    eval_every: int = Field(0, ge=0)
    save_every: int = Field(50, ge=0)
    gradient_checkpointing: bool = False
    lora: LoraSpec | None = None
    data: TextOrigin | None = None
    seed: int | None = None

    def settings(self, recipe_seed: int) -> TrainSettings:
        return TrainSettings(self.steps, self.lr, self.batch_size, self.grad_accum, self.warmup, self.weight_decay,
                             self.max_grad_norm, self.optimizer, self.eval_every, self.save_every,
                             recipe_seed if self.seed is None else self.seed)


def leaves_adapters(config: FinetuneConfig) -> bool:
    return config.lora is not None


def check(recipe, entry, model) -> None:
    config: FinetuneConfig = entry.config
    earlier = [e for e in recipe.stages[:entry.index]
               if e.stage.leaves_adapters is not None and e.stage.leaves_adapters(e.config)]
    if config.lora is not None and earlier:
        raise RecipeError(f"{entry.where}.lora: the model already carries adapters from {earlier[-1].where}; "
                          "drop lora: to train those")
    if config.lora is None and not earlier and not _has_adapters(model):
        raise RecipeError(f"{entry.where}: the model has no LoRA adapters to train; add "
                          "lora: {rank: 16, alpha: 32} or an lq_lora stage before it")
    if config.lora is not None and not select_linears(model, config.lora.targets, config.lora.ignore):
        raise RecipeError(f"{entry.where}.lora.targets: selects no linear layer (targets {config.lora.targets})")
    if config.data is not None and config.data.path is not None and not Path(config.data.path).is_file():
        raise RecipeError(f"{entry.where}.data.path: {config.data.path} does not exist")
    if config.data is None and recipe.spec.data.calibration is None:
        raise RecipeError(f"{entry.where}: needs data: or data.calibration")
    if config.eval_every and recipe.spec.data.eval is None:
        raise RecipeError(f"{entry.where}.eval_every: needs data.eval")


def _has_adapters(model) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _attach_adapters(ctx, spec: LoraSpec, seed: int, report) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    for name, module in select_linears(ctx.model, spec.targets, spec.ignore):
        if ".lora_" in f"{name}.":
            continue
        layer = LoRALinear(module, spec.rank, spec.alpha, spec.dropout)
        layer.to(next(iter([*module.parameters(), *module.buffers()])).device)
        init_default(layer, generator)
        set_module(ctx.model, name, layer)
    report.notes.append(f"new adapters: rank {spec.rank}, alpha {spec.alpha:g} on "
                        f"{sum(isinstance(m, LoRALinear) for m in ctx.model.modules())} layers")


def _windows(ctx, config: FinetuneConfig):
    from ..data import token_windows

    origin = config.data or ctx.recipe.spec.data.calibration
    wanted = config.samples or config.steps * config.batch_size * config.grad_accum
    return token_windows(ctx.tokenizer, origin.text_source("train"), wanted, config.seq_len,
                         at_least=None if config.samples else config.batch_size)


def run(ctx, config: FinetuneConfig, report) -> None:
    settings = config.settings(ctx.recipe.spec.seed)
    if config.lora is not None:
        if _has_adapters(ctx.model):
            raise StageError(f"{ctx.entry.where}.lora: the model already carries adapters; drop lora:")
        _attach_adapters(ctx, config.lora, settings.seed, report)
    params = {n: p for n, p in ctx.model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    if not params:
        raise StageError(f"{ctx.entry.where}: the model has no LoRA adapters to train; add lora:")
    windows = _windows(ctx, config)
    state_dir = ctx.out_dir / ".cache" / "finetune" / ctx.recipe.fingerprint(ctx.entry.index)[:16]
    if not ctx.resume:
        shutil.rmtree(state_dir, ignore_errors=True)
    if config.gradient_checkpointing:
        ctx.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    evaluate = (lambda: perplexity(ctx.model, ctx.windows("eval"))) if config.eval_every else None
    try:
        result = train(ctx.model, params, windows, settings, state_dir, ctx.resume, evaluate, ctx.track)
    except StageError as err:
        kept = " (the last saved training state is kept)" if (state_dir / "train_state.pt").is_file() else ""
        raise StageError(f"{ctx.entry.where}: {err}{kept}") from None
    finally:
        if config.gradient_checkpointing:
            ctx.model.gradient_checkpointing_disable()
    shutil.rmtree(state_dir, ignore_errors=True)
    trainable = sum(p.numel() for p in params.values())
    report.metrics.update(steps=config.steps, trainable_params=trainable, windows=int(windows.shape[0]),
                          tokens=result.tokens, first_loss=result.losses[0] if result.losses else None,
                          final_loss=_tail_mean(result.losses), resumed_from_step=result.resumed_from,
                          train_seconds=result.seconds, label=f"finetune {config.steps} steps")
    report.metrics["losses"] = [round(x, 5) for x in result.losses]
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    report.notes.append(f"{trainable:,} trainable parameters; loss {result.losses[0]:.4f} -> "
                        f"{report.metrics['final_loss']:.4f} (mean of the last 10 steps) over {config.steps} steps"
                        f"{resumed}, {result.tokens:,} tokens")
    if result.evals:
        report.metrics.update(evals=result.evals, perplexity=result.evals[-1]["perplexity"])


def _tail_mean(losses: list[float], count: int = 10) -> float | None:
    tail = losses[-count:]
    return sum(tail) / len(tail) if tail else None


STAGE = Stage(name="finetune", config=FinetuneConfig, run=run, modifies_model=True, check=check,
              leaves_adapters=leaves_adapters)
