"""What the training stages share (``finetune``, ``prune``, ``loram``, ``l4q``): the training keys, new
LoRA adapters, the check and the token windows of their text, and one call that runs the loop with
mid-training checkpoints under ``OUTPUT/.cache/train/`` (kept until the stage ends, used by
``--resume``)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator

from compress.lowrank import LoRALinear, init_default

from ..errors import RecipeError, StageError
from ..execution.memory import PeakMemory, model_tensor_bytes
from ..execution.placement import whole_model_on_device
from ..models.data import file_problem, token_windows
from ..models.text_specs import TextOrigin
from ..stage import STRICT, StageConfig
from ..targets import check_selector, select_linears, set_module
from ..training.distill import DistillSpec, distill_loss_fn
from ..training.loop import STATE_FILE, NonFiniteLoss, TrainHooks, TrainResult, TrainSettings, train


class LoraSpec(BaseModel):
    model_config = STRICT
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


class TrainingConfig(StageConfig):
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
    save_every: int = Field(50, ge=0)
    gradient_checkpointing: bool = False
    data: TextOrigin | None = None
    seed: int | None = None
    distill: DistillSpec | None = None  # KL to the unquantized model's predictions (``compress.training.distill``)

    def settings(self, recipe_seed: int, eval_every: int = 0) -> TrainSettings:
        return TrainSettings(self.steps, self.lr, self.batch_size, self.grad_accum, self.warmup, self.weight_decay,
                             self.max_grad_norm, self.optimizer, eval_every, self.save_every,
                             recipe_seed if self.seed is None else self.seed)


def lora_rank(key: str, spec: LoraSpec | None) -> list[tuple[str, int, list[str], list[str]]]:
    """A ``lora:`` block's entry for ``Stage.low_rank`` (none when the block is absent)."""
    return [] if spec is None else [(f"{key}.rank", spec.rank, list(spec.targets), list(spec.ignore))]


def has_adapters(model) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def attach_adapters(model, spec: LoraSpec, seed: int) -> int:
    """Wrap every selected linear in a new ``LoRALinear`` (PEFT init); returns how many."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for name, module in select_linears(model, spec.targets, spec.ignore):
        if ".lora_" in f"{name}.":
            continue
        layer = LoRALinear(module, spec.rank, spec.alpha, spec.dropout)
        layer.to(next(iter([*module.parameters(), *module.buffers()])).device)
        init_default(layer, generator)
        set_module(model, name, layer)
        count += 1
    return count


def lora_parameters(model) -> dict:
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def check_training_data(recipe, where: str, data: TextOrigin | None) -> None:
    """A training stage's text (``data:`` at ``where``, else ``data.calibration``) exists."""
    problem = file_problem(Path(data.path)) if data is not None and data.path is not None else None
    if problem:
        raise RecipeError(f"{where}.data.path: {data.path} {problem}")
    if data is None and recipe.spec.data.calibration is None:
        raise RecipeError(f"{where}: needs data: or data.calibration")


def training_windows(ctx, config: TrainingConfig) -> torch.Tensor:
    origin = config.data or ctx.recipe.spec.data.calibration
    wanted = config.samples or config.steps * config.batch_size * config.grad_accum
    return token_windows(ctx.tokenizer, origin.text_source("train"), wanted, config.seq_len,
                         at_least=None if config.samples else config.batch_size)


# settings a resumed training run may change: they steer the steps to come, not the state so far
RESUMABLE_SETTINGS = ("lr", "quant_lr", "weight_decay", "max_grad_norm", "save_every", "eval_every")


def _location(root, target, path: tuple = ()) -> tuple | None:
    """The keys that lead from config ``root`` to the sub-config ``target`` (the same object), or None."""
    if root is target:
        return path
    for key in type(root).model_fields:
        value = getattr(root, key)
        if isinstance(value, BaseModel):
            found = _location(value, target, path + (key,))
            if found is not None:
                return found
    return None


def training_key(ctx, config: TrainingConfig) -> str:
    """The name of one training phase's mid-training checkpoints: everything that made the model
    this phase starts from, and this phase's settings, except its own ``RESUMABLE_SETTINGS``; so
    lowering ``lr`` after a divergence and running with ``--resume`` continues from the kept
    checkpoint, while a change to an earlier phase of the stage (LoRAM's pruning or alignment) starts
    this phase again. A phase whose settings are not a part of the stage's config (made from several
    keys) keeps none of its rates out: changing them starts it again."""
    stage = ctx.entry.to_dict()
    location = _location(ctx.entry.config, config)
    if location is not None:
        holder = stage[ctx.entry.name]
        for key in location:
            holder = holder[key]
        for key in RESUMABLE_SETTINGS:
            holder.pop(key, None)
    earlier = ctx.recipe.fingerprint(ctx.entry.index - 1)
    return hashlib.sha256(json.dumps([earlier, stage], sort_keys=True).encode()).hexdigest()[:16]


def _remove_stale_states(root: Path, keep: Path, phase: str) -> None:
    """Earlier recipe versions' checkpoints of this phase (their keys differ): nothing can resume them."""
    for stale in root.glob(f"*-{phase}") if root.is_dir() else []:
        if stale != keep and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def run_training(ctx, config: TrainingConfig, params: dict, windows: torch.Tensor, eval_every: int = 0,
                 evaluate=None, hooks: TrainHooks | None = None, grad_only: dict | None = None,
                 phase: str = "train", param_lr: dict | None = None) -> TrainResult:
    """The loop with this stage's checkpoint directory (one per ``phase`` of a stage that trains more
    than once), the model on the run's device when the plan says it fits (``compress.execution.placement``);
    a failure names the stage and keeps the state."""
    settings = config.settings(ctx.recipe.spec.seed, eval_every)
    state_dir = ctx.out_dir / ".cache" / "train" / f"{training_key(ctx, config)}-{phase}"
    loss_fn = distill_loss_fn(ctx, windows, config.distill) if getattr(config, "distill", None) else None
    if not ctx.resume:
        shutil.rmtree(state_dir, ignore_errors=True)
    if config.gradient_checkpointing:
        ctx.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        with PeakMemory(ctx.device) as peak, whole_model_on_device(ctx, ctx.entry.where, ctx.entry.index):
            result = train(ctx.model, params, windows, settings, state_dir, ctx.resume, evaluate, ctx.track,
                           hooks, grad_only, param_lr, loss_fn)
        result.peak_rss_mib, result.rss_growth_mib = peak.rss_mib, peak.rss_mib - peak.start_rss_mib
        result.peak_cuda_mib = peak.cuda_mib
        result.model_mib = model_tensor_bytes(ctx.model) / 2**20
    except StageError as err:
        said = isinstance(err, NonFiniteLoss)  # it says itself which checkpoint is kept
        kept = " (the last saved training state is kept)" if (state_dir / STATE_FILE).is_file() and not said else ""
        raise StageError(f"{ctx.entry.where}: {err}{kept}") from None
    finally:
        if config.gradient_checkpointing:
            ctx.model.gradient_checkpointing_disable()
    shutil.rmtree(state_dir, ignore_errors=True)
    _remove_stale_states(state_dir.parent, state_dir, phase)
    return result


def tail_mean(losses: list[float], count: int = 10) -> float | None:
    tail = losses[-count:]
    return sum(tail) / len(tail) if tail else None
