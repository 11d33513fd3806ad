"""The training loop shared by the stages that train (``finetune`` first; pruning and LoRAM reuse it).

Only the parameters handed to ``train`` change; everything else in the model is frozen. One step is
``grad_accum`` micro-batches of ``batch_size`` token windows (causal LM loss, averaged), then gradient
clipping, an optimizer step (torch AdamW, or bitsandbytes' 8-bit AdamW) and a learning rate from
``lr_multiplier``: linear warm-up, then cosine decay to zero.

The batch order is a pure function of the seed and the step (a fresh permutation of the windows per
epoch), and the schedule a pure function of the step, so a run resumed from a checkpoint (trainable
tensors, optimizer state, RNG state, history) continues exactly as if it had not stopped. A resumed
run may change the rates (``lr``, weight decay, clipping): the optimizer keeps its moments, takes the
new rates and the log says so. The checkpoint before the latest is kept beside it: when a loss turns
nan or inf, the latest may hold the divergence itself (see ``_keep_good_checkpoint``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

from compress.prune.hooks import StepHooks

from ..checkpoint.atomic import atomic_write_bytes
from ..errors import StageError
from ..execution.evaluate import check_token_ids
from ..models.chunked_loss import causal_lm_loss as chunked_causal_lm_loss

log = logging.getLogger(__name__)
STATE_FILE = "train_state.pt"
PREVIOUS_FILE = "train_state.prev.pt"


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float
    batch_size: int
    grad_accum: int = 1
    warmup: float = 0.03  # fraction of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    eval_every: int = 0  # 0: no evaluation during training
    save_every: int = 50  # 0: no mid-training checkpoints
    seed: int = 0


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean loss of every step
    evals: list[dict] = field(default_factory=list)  # {"step", "perplexity"}
    resumed_from: int = 0
    seconds: float = 0.0
    tokens: int = 0
    peak_rss_mib: float = 0.0  # filled by callers that measure the loop (process RSS)
    peak_cuda_mib: float | None = None  # and the CUDA allocator's peak when it ran on a GPU
    rss_growth_mib: float = 0.0
    model_mib: float = 0.0  # the model's tensors (parameters and buffers, shared ones once) when training began


# What a stage may add to the loop (pruning): ``after_backward(step)`` once the step's gradients are
# accumulated and clipped, ``after_step(step)`` after the optimizer step, and a ``state_dict`` that
# travels in the mid-training checkpoint. The interface (with no-op defaults) is the pruning
# library's, which may not import this module; the loop takes any object with its four methods.
TrainHooks = StepHooks


def lr_multiplier(step: int, total: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` (step 0 gets 1 / warmup_steps), then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def micro_batch(step: int, micro: int, settings: TrainSettings, num_windows: int) -> torch.Tensor:
    """Window indices of micro-batch ``micro`` of ``step``: consecutive slices of per-epoch permutations."""
    size = settings.batch_size
    start = (step * settings.grad_accum + micro) * size
    orders, indices = {}, []
    for position in range(start, start + size):
        epoch, offset = divmod(position, num_windows)
        if epoch not in orders:  # a batch spans at most two epochs: one permutation each
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(num_windows, generator=generator)
        indices.append(int(orders[epoch][offset]))
    return torch.tensor(indices)


def build_optimizer(params: dict[str, nn.Parameter], settings: TrainSettings,
                    param_lr: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """AdamW (or 8-bit AdamW) over ``params``; those named in ``param_lr`` get their own learning rate."""
    param_lr = param_lr or {}
    groups = [{"params": [p for n, p in params.items() if n not in param_lr]}]
    for lr in sorted(set(param_lr.values())):
        groups.append({"params": [p for n, p in params.items() if param_lr.get(n) == lr], "lr": lr})
    groups = [g for g in groups if g["params"]]
    if settings.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def causal_lm_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy: for a transformers causal LM the head is applied to slices of
    positions (``compress.models.chunked_loss``); any other module computes its own ``labels=`` loss."""
    if callable(getattr(model, "get_decoder", None)) and callable(getattr(model, "get_output_embeddings", None)):
        return chunked_causal_lm_loss(model, windows)
    return model(input_ids=windows, labels=windows, use_cache=False).loss


# another training loss (``compress.training.distill``): (model, batch of windows, their indices) -> loss
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def previous_file(path: Path) -> Path:
    """Where the checkpoint before the latest is kept (a divergence can make the latest unusable)."""
    return path.with_name(PREVIOUS_FILE)


def _save_state(path: Path, step: int, params: dict[str, nn.Parameter], optimizer, result: TrainResult,
                hooks: TrainHooks) -> None:
    """The training state after ``step`` steps in ``path``; the one it replaces moves to the previous file."""
    state = {"step": step, "params": {n: p.detach().clone() for n, p in params.items()},
             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "hooks": hooks.state_dict(),
             "losses": result.losses, "evals": result.evals, "tokens": result.tokens,
             "rates": optimizer_rates(optimizer)}
    device = next(iter(params.values())).device
    if device.type == "cuda":  # dropout draws from the GPU's generator
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    if path.is_file():
        os.replace(path, previous_file(path))
    atomic_write_bytes(path, buffer.getvalue())


def optimizer_rates(optimizer) -> list[dict]:
    """The settings of each parameter group that a resumed run may change (and their values)."""
    return [{"lr": group["initial_lr"], "weight_decay": group["weight_decay"]} for group in optimizer.param_groups]


def _load_state(path: Path, params: dict[str, nn.Parameter], optimizer, result: TrainResult,
                hooks: TrainHooks) -> int:
    """Restore the state in ``path`` (or, when a crash came between the two writes, the previous file,
    which then becomes the latest); the optimizer keeps its moments but takes this run's rates, and a
    change is logged."""
    if not path.is_file():
        os.replace(previous_file(path), path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: say so rather than train from a bad state
        raise StageError(f"{path}: unreadable training checkpoint ({type(err).__name__}); delete it to "
                         "restart training") from None
    if {n: tuple(t.shape) for n, t in state["params"].items()} != {n: tuple(p.shape) for n, p in params.items()}:
        raise StageError(f"{path}: holds different trainable tensors than this model; delete it to restart")
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(state["params"][name])
    rates = optimizer_rates(optimizer)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:
        raise StageError(f"{path}: its optimizer state does not fit this run's ({err}); delete it to restart") from None
    for group, rate in zip(optimizer.param_groups, rates):
        group.update(initial_lr=rate["lr"], weight_decay=rate["weight_decay"])
    changes = [f"group {i} {key} {old[key]:g} -> {new[key]:g}" for i, (old, new) in
               enumerate(zip(state.get("rates", rates), rates)) for key in new if old[key] != new[key]]
    if changes:
        log.info("resuming with changed optimizer settings (moments kept): %s", ", ".join(changes))
    torch.set_rng_state(state["rng"])
    device = next(iter(params.values())).device
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    hooks.load_state_dict(state["hooks"])
    result.losses, result.evals, result.tokens = state["losses"], state["evals"], state["tokens"]
    return state["step"]


class NonFiniteLoss(StageError):
    """A training loss that is nan or inf at ``step`` (counted from 1); the message names it."""

    def __init__(self, message: str, step: int = 0):
        super().__init__(message)
        self.step = step


def stored_step(path: Path) -> int:
    """The step of the training checkpoint in ``path`` (0: none there, or unreadable)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:  # missing, torn or foreign: there is no step to go back to
        return 0


def _keep_good_checkpoint(path: Path | None, saved: list[int], failed: int) -> str:
    """After a non-finite loss at step ``failed``: keep the latest checkpoint that did not lead to it
    and say how to go on. The loss of step ``failed`` comes from the weights after step
    ``failed - 1``, so a checkpoint of that step holds the divergence itself; the one before it
    (kept beside) is the last good one."""
    latest = saved[-1]
    if path is not None and latest and latest == failed - 1:
        good = saved[0] if len(saved) > 1 else stored_step(previous_file(path))
        good = good if previous_file(path).is_file() else 0
        if good:
            os.replace(previous_file(path), path)
        else:
            path.unlink(missing_ok=True)
            previous_file(path).unlink(missing_ok=True)
        latest = good
    if path is None or not latest:
        return ("; no training checkpoint from before it was kept: lower lr in the recipe and run it again "
                "(with --resume the earlier stages are reused and training starts at step 0)")
    return (f"; the last good training checkpoint (step {latest}) is kept in {path}: lower lr in the recipe and run it "
            f"again with --resume (training continues from step {latest} with the new rate)")


def _step(model, windows, params, optimizer, settings: TrainSettings, step: int, hooks: TrainHooks,
          grad_only: dict[str, nn.Parameter], loss_fn: LossFn | None = None) -> float:
    total = 0.0
    for micro in range(settings.grad_accum):
        indices = micro_batch(step, micro, settings, windows.shape[0])
        batch = windows[indices].to(next(iter(params.values())).device)
        loss = loss_fn(model, batch, indices) if loss_fn else causal_lm_loss(model, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"training loss is {float(loss.detach())} at step {step + 1}", step + 1)
        (loss / settings.grad_accum).backward()
        total += float(loss.detach()) / settings.grad_accum
    if settings.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(params.values()), settings.max_grad_norm)
    hooks.after_backward(step + 1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for parameter in grad_only.values():
        parameter.grad = None
    return total


def _resume(path: Path, params: dict, optimizer, scheduler, result: TrainResult, hooks, multiplier) -> None:
    """Load the training checkpoint at ``path`` and put the schedule at its step."""
    result.resumed_from = _load_state(path, params, optimizer, result, hooks)
    scheduler.last_epoch = result.resumed_from  # the multiplier is a function of the step alone
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier(result.resumed_from)


def train(model: nn.Module, params: dict[str, nn.Parameter], windows: torch.Tensor, settings: TrainSettings,
          state_dir: Path | None = None, resume: bool = False, evaluate: Callable[[], float] | None = None,
          track=None, hooks: TrainHooks | None = None, grad_only: dict[str, nn.Parameter] | None = None,
          param_lr: dict[str, float] | None = None, loss_fn: LossFn | None = None) -> TrainResult:
    """Train ``params`` (every other parameter frozen) on token ``windows`` [n, seq_len];
    ``grad_only`` parameters get gradients (for ``hooks`` to read) but are never updated;
    ``loss_fn`` replaces the next-token loss."""
    hooks, grad_only = hooks or StepHooks(), grad_only or {}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in [*params.values(), *grad_only.values()]:
        parameter.requires_grad_(True)
    check_token_ids(model, windows)
    optimizer = build_optimizer(params, settings, param_lr)
    warmup = max(1, round(settings.warmup * settings.steps)) if settings.warmup > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, settings.steps, warmup))
    result, path = TrainResult(), state_dir / STATE_FILE if state_dir else None
    if path is not None and resume and (path.is_file() or previous_file(path).is_file()):
        _resume(path, params, optimizer, scheduler, result, hooks, lambda step: lr_multiplier(step, settings.steps, warmup))
        log.info("resuming training at step %d of %d from %s", result.resumed_from, settings.steps, path)
    start = time.perf_counter()
    model.train()
    steps = range(result.resumed_from, settings.steps)
    saved = [result.resumed_from]  # steps of the training checkpoints on disk, latest last (0: none)
    try:
        for step in track(steps, "train") if track else steps:
            result.losses.append(_step(model, windows, params, optimizer, settings, step, hooks, grad_only, loss_fn))
            result.tokens += settings.grad_accum * settings.batch_size * windows.shape[1]
            scheduler.step()
            done = step + 1
            hooks.after_step(done)
            if evaluate is not None and settings.eval_every and (done % settings.eval_every == 0 or done == settings.steps):
                model.eval()
                result.evals.append({"step": done, "perplexity": evaluate()})
                model.train()
                log.info("step %d: loss %.4f, eval perplexity %.3f", done, result.losses[-1], result.evals[-1]["perplexity"])
            if path is not None and settings.save_every and done % settings.save_every == 0 and done < settings.steps:
                _save_state(path, done, params, optimizer, result, hooks)
                saved = [saved[-1], done]
    except NonFiniteLoss as err:
        raise NonFiniteLoss(f"{err}{_keep_good_checkpoint(path, saved, err.step)}") from None
    finally:
        model.eval()
        for parameter in [*params.values(), *grad_only.values()]:
            parameter.requires_grad_(False)
            parameter.grad = None
    result.seconds = time.perf_counter() - start
    return result
