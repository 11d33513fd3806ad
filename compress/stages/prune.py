"""prune: structured pruning of KV groups and MLP channels, guided by LoRA gradients (LoRAPrune).

```yaml
- prune: {method: loraprune, ratio: 0.3, units: [heads, channels], steps: 200, every: 10,
          uniform: true, lora: {rank: 8, alpha: 16}, lr: 2.0e-4}
```

LoRA adapters (``lora``) are trained on ``data:`` or ``data.calibration`` while units are scored by
``method`` (``loraprune``: the W0 gradient estimated from the LoRA gradients; ``gradient``: the true
one, the memory-hungry baseline; ``magnitude``; ``random``). Every ``every`` steps the lowest units
of each prunable layer are masked, following a cubic ramp from 0 to ``ratio`` between the
``prune_warmup`` and ``prune_cooldown`` fractions of the steps; the last event lands exactly on
``ratio``. At the end the masked units are removed from the weights and the adapters merged (they
have learned to compensate for the removed units), or dropped with ``merge_lora: false``.
``uniform: true`` prunes every layer by the same count and writes a standard config (any format
can export it); otherwise the first ``skip_first`` fraction of layers and the last ``skip_last`` are
left whole (LoRAPrune's default); formats that cannot hold per-layer widths refuse at validate. Kept widths are
multiples of ``round_to``. ``loraprune`` scores units from the modules where they are output rows
(q/k/v, gate/up) unless ``score_columns: true``: its estimate for o_proj/down_proj input columns is
mostly noise (see compress/prune/loraprune.py). The removed indices per layer go to ``config.json`` (``compress_pruning``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Literal, Optional

import torch
from pydantic import Field

from compress.lowrank import LoRALinear, merge_adapters
from compress.prune import (PruningHooks, kept_count, layer_units, prunable_layers, prune_events, shrink_layer,
                            update_config)
from compress.prune.units import ATTENTION, MLP

from ..errors import RecipeError, StageError
from ..model_state import ModelState
from ..models.architectures import pruning_problem
from ..planning.plan_training import training_breakdown
from ..planning.stage_memory import PlanState, prune_range, training_setup
from ..stage import Stage
from .training_common import (LoraSpec, TrainingConfig, attach_adapters, check_training_data, has_adapters,
                              lora_parameters, lora_rank, run_training, tail_mean, training_windows)

log = logging.getLogger(__name__)


class PruneConfig(TrainingConfig):
    method: Literal["loraprune", "gradient", "magnitude", "random"] = "loraprune"
    ratio: float = Field(0.3, gt=0, lt=1)
    units: list[Literal["heads", "channels"]] = Field(["heads", "channels"], min_length=1)
    every: int = Field(10, ge=1)
    uniform: bool = False
    round_to: int = Field(32, ge=1)
    skip_first: float = Field(0.1, ge=0, lt=1)
    skip_last: int = Field(1, ge=0)
    prune_warmup: float = Field(0.1, ge=0, lt=1)
    prune_cooldown: float = Field(0.1, ge=0, lt=1)
    grad_accum: int = Field(1, ge=1)
    merge_lora: bool = True  # false: drop the LoRA, keep the original weights at the kept positions
    score_columns: Optional[bool] = None  # default: false for loraprune (noise there), true otherwise
    lora: LoraSpec = LoraSpec(rank=8, alpha=16)


def check(recipe, entry, model) -> None:
    config: PruneConfig = entry.config
    if config.distill is not None:
        raise RecipeError(f"{entry.where}.distill: only for finetune, l4q and loram (prune's LoRA only scores units)")
    if config.prune_warmup + config.prune_cooldown >= 1:
        raise RecipeError(f"{entry.where}: prune_warmup + prune_cooldown must leave room for the ramp (< 1)")
    problem = pruning_problem(model.config)
    if problem:
        raise RecipeError(f"{entry.where}: {problem}")
    try:
        units = layer_units(model)
    except (ValueError, AttributeError) as err:
        raise RecipeError(f"{entry.where}: {err}") from None
    if not _prunable(config, len(units)):
        raise RecipeError(f"{entry.where}: no layer left to prune among {len(units)} "
                          f"(skip_first {config.skip_first}, skip_last {config.skip_last})")
    check_training_data(recipe, entry.where, config.data)


def effect(entry, model, state: ModelState) -> ModelState:
    """``uniform: false`` leaves decoder layers of different widths."""
    return state if entry.config.uniform else state.with_uneven_widths(entry.where)


def _score_columns(config: PruneConfig) -> bool:
    return config.method != "loraprune" if config.score_columns is None else config.score_columns


def _prunable(config: PruneConfig, num_layers: int) -> list[int]:
    return list(range(num_layers)) if config.uniform else prunable_layers(num_layers, config.skip_first, config.skip_last)


def _probe_logits(ctx) -> torch.Tensor:
    vocab = ctx.model.get_input_embeddings().num_embeddings
    probe = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ctx.model(input_ids=probe, use_cache=False).logits.float()


def _shrink(ctx, hooks: PruningHooks, units: list, keep_lora: bool = True) -> dict:
    """Remove the masked units and merge the adapters (zeroed first unless ``keep_lora``: the shrunk
    model is then the original weights at the kept positions); returns the removed indices per layer."""
    if not keep_lora:
        with torch.no_grad():
            for module in ctx.model.modules():
                if isinstance(module, LoRALinear):
                    module.lora_B.weight.zero_()
    masked = _probe_logits(ctx)
    hooks.masks.remove()
    removed = {}
    for unit in units:
        groups, channels = hooks.masks.kept[unit.index]
        shrink_layer(ctx.model, unit, groups, channels)
        removed[str(unit.index)] = {"kv_groups": torch.nonzero(~groups).flatten().tolist(),
                                    "channels": torch.nonzero(~channels).flatten().tolist(),
                                    "kv_groups_before": unit.kv_groups, "channels_before": unit.channels}
    merge_adapters(ctx.model)
    difference = float((masked - _probe_logits(ctx)).abs().max())
    if difference > 1e-3 * max(1.0, float(masked.abs().max())):
        raise StageError(f"{ctx.entry.where}: the shrunk model differs from the masked one (max |diff| {difference:.3g})")
    return {"removed": removed, "shrink_max_abs_logit_diff": difference}


def run(ctx, config: PruneConfig, report) -> None:
    prune_structured(ctx, config, report)
    ctx.state = effect(ctx.entry, ctx.model, ctx.state)


def prune_structured(ctx, config: PruneConfig, report, phase: str = "prune") -> dict:
    """Prune ``ctx.model`` in place (LoRA run with masks, shrink, merge or drop the LoRA); returns the
    removed units."""
    if has_adapters(ctx.model):
        raise StageError(f"{ctx.entry.where}: the model already carries LoRA adapters; prune before adding them")
    units = layer_units(ctx.model)
    chosen = [units[i] for i in _prunable(config, len(units))]
    params_before = sum(p.numel() for p in ctx.model.parameters())
    seed = ctx.recipe.spec.seed if config.seed is None else config.seed
    attach_adapters(ctx.model, config.lora, seed)
    events = prune_events(config.steps, config.every, config.ratio, 0.0, config.prune_warmup, config.prune_cooldown)
    hooks = PruningHooks(ctx.model, chosen, config.method, events, "heads" in config.units,
                         "channels" in config.units, config.round_to, seed, _score_columns(config))
    grad_only = {}
    if config.method == "gradient":  # the true dL/dW0 needs W0 to require grad: the baseline's memory cost
        grad_only = {f"{u.module(leaf)}.weight": ctx.model.get_submodule(u.module(leaf)).base_layer.weight
                     for u in chosen for leaf in ATTENTION + MLP}
    params = lora_parameters(ctx.model)
    result = run_training(ctx, config, params, training_windows(ctx, config), hooks=hooks, grad_only=grad_only,
                          phase=phase)
    shrunk = _shrink(ctx, hooks, chosen, config.merge_lora)
    standard = update_config(ctx.model)
    ctx.model.config.compress_pruning = {"method": config.method, "ratio": config.ratio, "layers": shrunk["removed"]}
    ctx.state = ctx.state.pruned("prune", ctx.model.config.compress_pruning)
    params_after = sum(p.numel() for p in ctx.model.parameters())
    report.metrics.update(method=config.method, ratio=config.ratio, params_before=params_before,
                          params_after=params_after, params_removed=1 - params_after / params_before,
                          events=len(events), uniform_config=standard, final_loss=tail_mean(result.losses),
                          first_loss=result.losses[0], shrink_max_abs_logit_diff=shrunk["shrink_max_abs_logit_diff"],
                          train_seconds=result.seconds, train_peak_rss_mib=result.peak_rss_mib,
                          train_rss_growth_mib=result.rss_growth_mib, train_model_mib=result.model_mib,
                          label=f"{config.method} {config.ratio:g}")
    report.notes.append(f"{len(chosen)} of {len(units)} layers pruned at {len(events)} events; parameters "
                        f"{params_before:,} -> {params_after:,} ({1 - params_after / params_before:.1%} removed); "
                        + ("standard config" if standard else "per-layer widths (no standard config)"))
    note = _whole_heads_note(config, chosen)
    if note:
        report.notes.append(note)
        log.info("%s: %s", ctx.entry.where, note)
    return ctx.model.config.compress_pruning


def _whole_heads_note(config: PruneConfig, chosen: list) -> str | None:
    """One line when heads are asked for but no layer can lose a KV group (one is always kept, so a
    model with a single KV head, like Gemma-3-270M, keeps all its attention)."""
    if "heads" not in config.units or not chosen:
        return None
    if all(kept_count(u.kv_groups, config.ratio, u.group_heads * u.head_dim, config.round_to) == u.kv_groups
           for u in chosen):
        groups = sorted({u.kv_groups for u in chosen})
        return (f"heads: {'/'.join(map(str, groups))} KV group(s) per layer, and at ratio {config.ratio:g} none can go "
                "(each layer keeps at least one): every head is kept, only MLP channels were pruned")
    return None


def memory(arch, config: PruneConfig, state: PlanState) -> list[tuple[str, dict]]:
    """LoRA-guided pruning's training; the layers are then narrower."""
    setup = replace(training_setup(state.setup, config, "prune", config.lora.rank),
                    gradient_criterion=config.method == "gradient")
    start, end = prune_range(arch, config)
    state.setup = replace(state.setup, prune_ratio=config.ratio, prune_start=start, prune_end=end)
    return [(f"prune ({config.method})", training_breakdown(arch, setup))]


STAGE = Stage(name="prune", config=PruneConfig, run=run, modifies_model=True, check=check, effect=effect, memory=memory,
              low_rank=lambda config: lora_rank("lora", config.lora))
