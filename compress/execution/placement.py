"""Whole-model stages on the compute device: the model goes there when ``compress plan`` says the
stage fits the device's free memory, and comes back to host memory after the stage.

Stages that walk units (``compress.execution.walker``: quantize, lq_lora, export) place one unit at a time.
Stages that need the whole model at once (finetune, l4q, prune, loram, eval) are placed whole: the
packed bases then run through the Triton kernels (which have autograd), dense bases in the model's
dtype, the trainable parameters as they were made (fp32). When the plan's estimate for the stage is
above the device's free memory the stage ends with one line giving both numbers and what to change,
never a silent fallback to the CPU; only eval, which needs no gradients, walks the units instead
(one layer on the device at a time, ``compress.execution.evaluate.perplexity_by_units``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import StageError
from ..planning.plan import GIB
from .memory import model_tensor_bytes
from .walker import HOST, move

log = logging.getLogger(__name__)


WEIGHT_PARTS = ("frozen_base", "trainable")  # what the model's own tensors are, counted exactly instead


def stage_need(recipe, index: int, model_bytes: int) -> tuple[float, str]:
    """(bytes, how they add up) for stage ``index`` on the device: the model's own tensors
    (``model_bytes``) plus what ``compress plan`` predicts beyond the weights for the stage's
    largest row (gradients, optimizer state, activations, KV cache, temporaries)."""
    from ..planning.plan_report import stage_rows

    rows = stage_rows(recipe, index)
    label = max(rows, key=lambda k: sum(v for p, v in rows[k].items() if p not in WEIGHT_PARTS))
    extra = {part: value for part, value in rows[label].items() if part not in WEIGHT_PARTS and value}
    parts = [f"model {model_bytes / GIB:.2f}"] + [f"{part} {value / GIB:.2f}" for part, value in extra.items()]
    return model_bytes + sum(extra.values()), f"{label}: {', '.join(parts)} GiB"


def free_bytes(device: torch.device) -> int:
    """What the device has free now (the CUDA driver's count)."""
    return torch.cuda.mem_get_info(device)[0]


def unfit_message(where: str, device: torch.device, need: float, free: float, detail: str) -> str:
    return (f"{where}: needs about {need / GIB:.2f} GiB on {device} by compress plan ({detail}), {free / GIB:.2f} "
            "GiB free: lower batch_size, set gradient_checkpointing: true, or run with device: cpu")


@contextmanager
def whole_model_on_device(ctx, where: str, index: int, walk_instead: bool = False, model=None) -> Iterator[bool]:
    """The model (``ctx.model``, or another resident ``model``) on ``ctx.device`` inside the block
    when stage ``index``'s plan fits (yields True), back on the host after. On the CPU nothing moves.
    When it does not fit: ``walk_instead`` yields False (the caller walks the units), otherwise one
    line (``StageError``)."""
    if model is None and not ctx.units.holds_model:  # streaming: one unit at a time, never the whole model
        if not walk_instead:
            raise StageError(f"{where}: needs the whole model at once, and a streaming recipe holds one unit")
        yield False
        return
    if ctx.device.type == "cpu":
        yield True
        return
    model = ctx.model if model is None else model
    need, detail = stage_need(ctx.recipe, index, model_tensor_bytes(model))
    free = free_bytes(ctx.device)
    if need > free:
        if not walk_instead:
            raise StageError(unfit_message(where, ctx.device, need, free, detail))
        log.info("%s: the model does not fit %s (%.2f GiB needed, %.2f free): walking it layer by layer",
                 where, ctx.device, need / GIB, free / GIB)
        yield False
        return
    try:
        move(model, ctx.device)
        yield True
    finally:
        move(model, HOST)
        torch.cuda.empty_cache()
