"""l4q: quantization-aware LoRA training that ends in fully quantized weights (no adapter ships).

```yaml
- l4q: {bits: 4, group_size: 64, steps: 200, lr: 1.0e-4, quant_lr: 1.0e-2,
        lora: {rank: 16, alpha: 32}, zero_point: integer}
- l4q: {bits: 3, group_size: 64, steps: 64, distill: {weight: 0.5, temperature: 2.0}}
```

Every selected linear becomes an ``L4QLinear``: its LoRA (PEFT init, so the first forward is the
initial quantized model) and its per-group step and offset are trained together through the
fake-quantized W0 + s B A (``lr`` for LoRA; ``quant_lr`` for step/offset, relative: each layer's
rate is ``quant_lr`` times its mean initial step, because Adam moves a parameter by about its rate
per step whatever the parameter's scale, and steps differ 2x per bit and 10x between layers) on
``data:`` or ``data.calibration``. Step/offset start from round-to-nearest's grid of W0 (integer
zeros, the range widened to include 0; also for ``zero_point: float``, where a min-max start
measured worse), or, for a layer an earlier ``quantize`` stage (RTN or GPTQ) packed with the same
bits and group size, from its scales and zeros (its dequantized weight is then W0); after
``lq_lora``, W0 = Q + s B A and a Q on the same grid gives the start. A min-max start with ``zero_point: integer`` would put the offset between
integer zeros, and rounding it at the end costs most of what training gained (measured:
BENCHMARKS.md, L4Q). At the end LoRA is merged and the weight quantized with the learned
parameters: codes round((W - offset) / step) with fp16 scale = step. ``zero_point: integer`` rounds
-offset / step to an integer zero (GPTQ-compatible); ``float`` keeps it as an fp16 zero per group
(``int<b>-g<g>-fzero``, 16 more bits per group; integer-zero formats refuse it). The report gives the
perplexity of the fake-quantized model and of the packed one when the recipe has eval data.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field, model_serializer, model_validator

from compress.lowrank import LoRALinear
from compress.lowrank.l4q import L4QLinear
from compress.quant import QuantConfig, QuantizedWeight, QuantLinear
from compress.quant.uniform import quantize_codes, to_float_zero_tensors, to_gptq_tensors

from ..errors import RecipeError, StageError
from ..execution.evaluate import perplexity
from ..model_state import ModelState, ModuleQuant, selected_quant
from ..planning.plan_training import training_breakdown
from ..planning.stage_memory import PlanState, quantized, training_setup
from ..stage import Stage
from ..targets import select_linears, set_module
from ..training.loop import TrainHooks
from .training_common import (LoraSpec, TrainingConfig, check_training_data, has_adapters, run_training, tail_mean,
                              training_windows)


class L4QConfig(TrainingConfig):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(64, ge=1)
    lr: float = Field(1.0e-4, gt=0)
    quant_lr: float = Field(1.0e-2, gt=0)  # in units of each layer's mean initial step (BENCHMARKS.md, L4Q)
    lora: LoraSpec = LoraSpec(rank=16, alpha=32)
    zero_point: Literal["integer", "float"] = "integer"
    integer_zero_from: float = Field(0.75, ge=0, le=1)  # fraction of steps after which zeros stay integer
    targets: list[str] = ["Linear"]
    ignore: list[str] = ["lm_head"]

    @model_validator(mode="after")
    def _integer_zero_from_needs_integer_zeros(self) -> "L4QConfig":
        if "integer_zero_from" in self.model_fields_set and self.zero_point != "integer":
            raise ValueError("integer_zero_from: only with zero_point: integer (float zeros are never rounded)")
        return self

    @model_serializer(mode="wrap")
    def _integer_zero_from_only_for_integer(self, handler):
        data = handler(self)
        if self.zero_point != "integer":
            data.pop("integer_zero_from", None)
        return data


def check(recipe, entry, model) -> None:
    config: L4QConfig = entry.config
    selected = select_linears(model, config.targets, config.ignore)
    if not selected:
        raise RecipeError(f"{entry.where}.targets: selects no linear layer")
    check_training_data(recipe, entry.where, config.data)


def effect(entry, model, state: ModelState) -> ModelState:
    """Every selected linear ends packed: asymmetric, integer or float zero points (``finalize``)."""
    config: L4QConfig = entry.config
    packed = QuantConfig.uniform(config.bits, config.group_size, sym=False, float_zero=config.zero_point == "float")
    return state.quantized(selected_quant(model, config.targets, config.ignore,
                                          lambda module: ModuleQuant(packed, by=entry.where)))


def _same_grid(module, config: L4QConfig) -> bool:
    grids = [QuantConfig.uniform(config.bits, config.group_size, sym) for sym in (True, False)]
    return isinstance(module, QuantLinear) and module.config in grids


def _dense_start(module, config: L4QConfig) -> tuple[torch.nn.Linear, QuantizedWeight | None]:
    """(dense W0 layer, packed weight to start step/offset from, or None for W0's RTN grid). An LQ-LoRA
    layer gives W0 = Q + s B A, and its Q's scales and zeros when Q is on L4Q's grid."""
    if isinstance(module, LoRALinear):
        base = module.base_layer
        return module.merged_linear(torch.float32), base.quantized_weight() if _same_grid(base, config) else None
    if isinstance(module, QuantLinear):
        dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(module.dequantize(torch.float32))
            if module.bias is not None:
                dense.bias.copy_(module.bias.float())
        return dense, module.quantized_weight() if _same_grid(module, config) else None
    return module, None


def finalize(layer: L4QLinear, float_zero: bool = False) -> QuantLinear:
    """Merge the LoRA and quantize with the learned step and zero = -offset / step: rounded to an
    integer (GPTQ), or kept as fp16 with ``float_zero``."""
    config = QuantConfig.uniform(layer.bits, layer.group_size, sym=False, float_zero=float_zero)
    with torch.no_grad():
        scale, zero = layer.export_qparams(integer_zero=not float_zero)
        if float_zero:
            zero, pack = zero.to(torch.float16), to_float_zero_tensors
        else:
            zero, pack = zero.to(torch.int32), to_gptq_tensors
        merged = layer.merged_weight()
        codes = quantize_codes(merged, scale, zero, config)
        weight = QuantizedWeight(config, tuple(merged.shape), pack(codes, scale, zero, config))
    return QuantLinear.from_weight(weight, layer.base_layer.bias)


class IntegerZeroSettling(TrainHooks):
    """From step ``start`` on, after every optimizer step, round each layer's zero to an integer
    (and its step to fp16): the rest of training sees the grid the GPTQ export will hold, so the
    final packing loses nothing to rounding. Stateless: a resumed run applies it from the same step."""

    def __init__(self, layers: dict[str, L4QLinear], start: int):
        self.layers, self.start = layers, start

    def after_step(self, step: int) -> None:
        if step >= self.start:
            for layer in self.layers.values():
                layer.round_offset_to_integer_zero()


def _wrap(ctx, config: L4QConfig, seed: int) -> dict[str, L4QLinear]:
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in select_linears(ctx.model, config.targets, config.ignore):
        dense, start = _dense_start(module, config)
        layers[name] = L4QLinear(dense, config.lora.rank, config.lora.alpha, config.bits, config.group_size,
                                 init=start, generator=generator)
        set_module(ctx.model, name, layers[name])
    return layers


def run(ctx, config: L4QConfig, report) -> None:
    if has_adapters(ctx.model):
        raise StageError(f"{ctx.entry.where}: the model carries LoRA adapters; l4q adds and merges its own")
    layers = _wrap(ctx, config, ctx.recipe.spec.seed if config.seed is None else config.seed)
    params, param_lr = {}, {}
    for name, layer in layers.items():
        for leaf in ("lora_A.weight", "lora_B.weight", "step", "offset"):
            params[f"{name}.{leaf}"] = layer.get_parameter(leaf)
            if leaf in ("step", "offset"):  # Adam moves a parameter ~lr per step whatever its scale
                param_lr[f"{name}.{leaf}"] = config.quant_lr * float(layer.step.detach().mean())
    hooks = None
    if config.zero_point == "integer" and config.integer_zero_from < 1:
        hooks = IntegerZeroSettling(layers, max(1, round(config.integer_zero_from * config.steps)))
    result = run_training(ctx, config, params, training_windows(ctx, config), param_lr=param_lr, hooks=hooks)
    evaluate = ctx.recipe.spec.data.eval is not None
    if evaluate:
        report.metrics["perplexity_float_offset"] = perplexity(ctx.model, ctx.windows("eval"))
    float_zero = config.zero_point == "float"
    for name, layer in layers.items():
        packed = finalize(layer, float_zero)
        set_module(ctx.model, name, packed)
        ctx.state = ctx.state.quantized({name: ModuleQuant(packed.config, by=ctx.entry.where)})
    if evaluate:
        key = f"perplexity_{config.zero_point}_zero"
        report.metrics[key] = perplexity(ctx.model, ctx.windows("eval"))
        report.notes.append(f"packing with {config.zero_point} zero points: perplexity "
                            f"{report.metrics['perplexity_float_offset']:.3f} -> {report.metrics[key]:.3f}")
    report.metrics.update(first_loss=result.losses[0], final_loss=tail_mean(result.losses), layers=len(layers),
                          train_seconds=result.seconds, train_peak_rss_mib=result.peak_rss_mib,
                          train_rss_growth_mib=result.rss_growth_mib, train_model_mib=result.model_mib,
                          label=f"l4q int{config.bits}-g{config.group_size}")


def memory(arch, config: L4QConfig, state: PlanState) -> list[tuple[str, dict]]:
    """Quantization-aware LoRA training; the base ends packed."""
    setup = replace(training_setup(state.setup, config, "l4q", config.lora.rank),
                    l4q=QuantConfig.uniform(config.bits, config.group_size))
    quantized(state, QuantConfig.uniform(config.bits, config.group_size, float_zero=config.zero_point == "float"),
              f"int{config.bits}-g{config.group_size}")
    return [("l4q", training_breakdown(arch, setup))]


STAGE = Stage(name="l4q", config=L4QConfig, run=run, modifies_model=True, quantizes=True, check=check, effect=effect,
              memory=memory,
              low_rank=lambda config: [("lora.rank", config.lora.rank, config.targets, config.ignore)])
