"""Knowledge distillation for the training stages (``finetune``, ``l4q``, ``loram``; issue 23): the
student is trained on a mix of the next-token loss and the KL divergence to the unquantized model's
predictions.

```yaml
distill: {teacher: base, weight: 0.5, temperature: 2.0, top_k: 64}
```

loss = (1 - weight) · CE(student, next tokens) + weight · T² · KL(p_T ‖ q_T), at every position of
every window, where p_T is the teacher's softmax at temperature T over its ``top_k`` largest logits
(renormalized over them) and q_T the student's softmax at T over the whole vocabulary, read at those
tokens (sparse distillation: the teacher's tail holds little mass). T² keeps the gradient's scale
independent of T (Hinton et al. 2015).

``teacher: base`` is the recipe's ``model`` as loaded, before any stage. Its top-k logits for every
training window are computed once, before the loop, and cached under ``OUTPUT/.cache/distill/``
(a resumed run reads them): windows x seq_len x top_k x 8 bytes (fp32 value + int32 index). A
teacher in a safetensors directory runs one decoder layer at a time (``compress.streaming``), so
it adds one layer and one chunk of activations to the peak memory, not a model; a built-in or GGUF
teacher is loaded whole for the pass and dropped before training.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from .stage import STRICT

log = logging.getLogger(__name__)
CHUNK = 16  # windows per teacher pass


class DistillSpec(BaseModel):
    model_config = STRICT
    teacher: Literal["base"] = "base"
    weight: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(2.0, gt=0)
    top_k: int = Field(64, ge=1)


def top_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values fp32, indices int64) of the ``k`` largest logits at every position [..., vocab]."""
    values, indices = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
    return values, indices


def distill_loss(student_logits: torch.Tensor, windows: torch.Tensor, teacher_values: torch.Tensor,
                 teacher_indices: torch.Tensor, weight: float, temperature: float) -> torch.Tensor:
    """The module docstring's loss for logits [b, s, vocab] of token ``windows`` [b, s]."""
    logits = student_logits.float()
    next_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    if weight == 0:
        return next_token
    teacher = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    student = F.log_softmax(logits / temperature, dim=-1).gather(-1, teacher_indices.long())
    kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
    return (1 - weight) * next_token + weight * temperature**2 * kl


def _cache_path(ctx, windows: torch.Tensor, spec: DistillSpec) -> Path:
    digest = hashlib.sha256(windows.contiguous().numpy().tobytes())
    digest.update(f"{ctx.recipe.spec.model}|{ctx.recipe.spec.dtype}|{spec.top_k}".encode())
    return ctx.out_dir / ".cache" / "distill" / f"{digest.hexdigest()[:24]}.safetensors"


def _teacher_units(ctx):
    """A source of units (``compress.walker``) for the recipe's model as loaded, on the run's device."""
    from .models import load_model, resolve_model
    from .streaming import StreamedModel
    from .walker import ResidentModel

    source = resolve_model(ctx.recipe.spec.model)
    path = source.path
    if path is not None and Path(path).is_dir() and any(Path(path).glob("*.safetensors")):
        return StreamedModel.open(Path(path), ctx.recipe.spec.dtype, device=ctx.device)
    model, _ = load_model(source, ctx.recipe.spec.dtype)
    return ResidentModel(model.eval(), ctx.device)


def teacher_targets(ctx, windows: torch.Tensor, spec: DistillSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [n, s, k] fp32, indices [n, s, k] int32) of the teacher's top-k logits for every
    training window, from the cache or computed chunk by chunk (module docstring)."""
    from safetensors.torch import load_file, save_file

    from .evaluate import logits_by_units

    path = _cache_path(ctx, windows, spec)
    if path.is_file():
        cached = load_file(str(path))
        return cached["values"], cached["indices"]
    units = _teacher_units(ctx)
    values, indices = [], []
    for chunk in ctx.track(list(torch.split(windows, CHUNK)), "distill teacher"):
        top = top_logits(logits_by_units(units, chunk), spec.top_k)
        values.append(top[0].cpu())
        indices.append(top[1].to(torch.int32).cpu())
    del units
    result = torch.cat(values), torch.cat(indices)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({"values": result[0].contiguous(), "indices": result[1].contiguous()}, str(partial))
    partial.replace(path)
    log.info("distill: teacher top-%d logits of %d windows cached in %s", spec.top_k, windows.shape[0], path)
    return result


def distill_loss_fn(ctx, windows: torch.Tensor, spec: DistillSpec):
    """``loss(model, batch, indices)`` for ``compress.training.train``: the distillation loss of the
    windows at ``indices`` against their cached teacher targets."""
    values, top = teacher_targets(ctx, windows, spec)

    def loss(model, batch: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=batch, use_cache=False).logits
        return distill_loss(logits, batch, values[indices].to(logits.device), top[indices].to(logits.device),
                            spec.weight, spec.temperature)

    return loss
