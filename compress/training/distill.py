"""Knowledge distillation for the training stages (``finetune``, ``l4q``, ``loram``; issue 23): the
student is trained on a mix of the next-token loss and the KL divergence to the unquantized model's
predictions.

```yaml
distill: {teacher: base, weight: 0.5, temperature: 2.0, top_k: 64}
```

loss = (1 - weight) · CE(student, next tokens) + weight · T² · KL(p_T ‖ q_T), at every position of
every window. p_T and q_T are the teacher's and the student's softmax at temperature T, both read on
the same k + 1 outcomes: each of the teacher's ``top_k`` most likely tokens, and "any other token"
(the tail, one outcome holding the rest of the mass). That is the exact KL between the two
distributions coarsened to those outcomes: zero, with zero gradient, when the student equals the
teacher, and never more than the full-vocabulary KL. The tail is not optional: renormalizing p over
its top k alone (the first version) made the target "all mass on k tokens", which at T = 2 is far
from the teacher itself: SmolLM2-135M puts 75 % of its T = 2 mass outside its top 64 (median 77 %),
so the loss at the teacher was 5.9 and training sharpened the student instead of matching the
teacher (issue 23's held-out run: L4Q with it was worse than without, out of domain worse than its
GPTQ start). T² keeps the gradient's scale independent of T (Hinton et al. 2015).

``teacher: base`` is the recipe's ``model`` as loaded, before any stage. Its top-k logits and its
log tail mass at T for every training window are computed once, before the loop, and cached under
``OUTPUT/.cache/distill/`` (a resumed run reads them): windows x seq_len x (top_k x 8 + 4) bytes
(fp32 value + int32 index, fp32 tail). A teacher in a safetensors directory runs one decoder layer at
a time (``compress.execution.streaming``), so it adds one layer and one chunk of activations to the peak
memory, not a model; a built-in or GGUF teacher is loaded whole for the pass and dropped before
training.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from ..models.chunked_loss import last_hidden, reduce_by_slices, sum_over_slices
from ..stage import STRICT

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


def top_log_probs(logits: torch.Tensor, indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at ``indices`` [..., k], float64 (autograd keeps one V-wide tensor,
    the log-softmax)."""
    return F.log_softmax(logits.float() / temperature, dim=-1).gather(-1, indices.long()).double()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (x is clamped just below 0)."""
    x = x.clamp(max=-1e-30)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_tail_mass(top_log_p: torch.Tensor) -> torch.Tensor:
    """log of the mass outside the top k [...] from their log-probabilities [..., k], summed in
    float64: exact to the fp32 log-probabilities' rounding (~1e-7 absolute). A tail below that is not
    resolved (its term weighs at most its own mass; the top-k terms still pull the student's tail up);
    where the k cover the vocabulary it comes out ~0 and weighs nothing. At the defaults (T 2, top 64)
    SmolLM2-135M's tails hold 75 % of the mass on average."""
    return log1mexp(top_log_p.double().logsumexp(-1))


def coarse_kl(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
              teacher_tail: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(p_T ‖ q_T) on the teacher's top k plus the tail (module docstring)."""
    return coarse_kl_terms(student_logits, teacher_values, teacher_indices, teacher_tail, temperature).mean().float()


def coarse_kl_terms(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                    teacher_tail: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_T ‖ q_T) on the teacher's top k plus the tail at every position [...], float64."""
    student_top = top_log_probs(student_logits, teacher_indices, temperature)
    student_tail = log_tail_mass(student_top)
    tail = teacher_tail.double()
    teacher_top = F.log_softmax(teacher_values.double() / temperature, dim=-1) + log1mexp(tail).unsqueeze(-1)
    return (teacher_top.exp() * (teacher_top - student_top)).sum(-1) + tail.exp() * (tail - student_tail)


def distill_loss(student_logits: torch.Tensor, windows: torch.Tensor, teacher_values: torch.Tensor,
                 teacher_indices: torch.Tensor, teacher_tail: torch.Tensor, weight: float,
                 temperature: float) -> torch.Tensor:
    """The module docstring's loss for logits [b, s, vocab] of token ``windows`` [b, s]."""
    logits = student_logits.float()
    next_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    if weight == 0:
        return next_token
    kl = coarse_kl(logits, teacher_values, teacher_indices, teacher_tail, temperature)
    return (1 - weight) * next_token + weight * temperature**2 * kl


def chunked_distill_loss(model, windows: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                         teacher_tail: torch.Tensor, weight: float, temperature: float) -> torch.Tensor:
    """``distill_loss`` of the model's logits for ``windows``, the head applied to slices of positions
    (``compress.models.chunked_loss``): no [b, s, vocab] tensor is kept for the backward pass."""
    hidden = last_hidden(model, windows)
    count = windows.shape[0]
    targets = F.pad(windows[:, 1:], (0, 1))  # the last position predicts nothing: masked out of the CE
    scored = torch.ones(windows.shape, dtype=torch.float32, device=windows.device)
    scored[:, -1] = 0
    next_tokens, positions = count * (windows.shape[1] - 1), windows.numel()

    def loss(logits, targets, scored, values, indices, tail) -> torch.Tensor:  # this slice's share of the mean
        cross = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        next_token = (cross * scored.flatten()).sum() / next_tokens
        if weight == 0:
            return next_token
        kl = coarse_kl_terms(logits, values, indices, tail, temperature).sum() / positions
        return (1 - weight) * next_token + weight * temperature**2 * kl

    total = sum_over_slices(model, hidden, loss, targets, scored, teacher_values, teacher_indices, teacher_tail)
    return total.float()


def _cache_path(ctx, windows: torch.Tensor, spec: DistillSpec) -> Path:
    digest = hashlib.sha256(windows.contiguous().numpy().tobytes())
    digest.update(f"{ctx.recipe.spec.model}|{ctx.recipe.spec.dtype}|{spec.top_k}|T={spec.temperature}|tail".encode())
    return ctx.out_dir / ".cache" / "distill" / f"{digest.hexdigest()[:24]}.safetensors"


def _teacher_units(ctx):
    """A source of units (``compress.execution.walker``) for the recipe's model as loaded, on the run's device."""
    from ..models.sources import load_model, resolve_model
    from ..execution.streaming import StreamedModel
    from ..execution.walker import ResidentModel

    source = resolve_model(ctx.recipe.spec.model)
    path = source.path
    if path is not None and Path(path).is_dir() and any(Path(path).glob("*.safetensors")):
        return StreamedModel.open(Path(path), ctx.recipe.spec.dtype, device=ctx.device)
    model, _ = load_model(source, ctx.recipe.spec.dtype)
    return ResidentModel(model.eval(), ctx.device)


def teacher_targets(ctx, windows: torch.Tensor, spec: DistillSpec) -> dict[str, torch.Tensor]:
    """{values [n, s, k] fp32, indices [n, s, k] int32, tail [n, s] fp32}: the teacher's top-k logits
    and its log tail mass at the spec's temperature for every training window, from the cache or
    computed chunk by chunk (module docstring)."""
    from ..checkpoint.tensors import read_safetensors, write_safetensors
    from ..execution.evaluate import hidden_by_units

    path = _cache_path(ctx, windows, spec)
    if path.is_file():
        return read_safetensors(path)
    units = _teacher_units(ctx)

    def reduce(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:  # one slice of positions [b, p, vocab]
        values, indices = top_logits(logits, spec.top_k)
        tail = log_tail_mass(top_log_probs(logits, indices, spec.temperature)).float()
        return values.cpu(), indices.to(torch.int32).cpu(), tail.cpu()

    parts: dict[str, list[torch.Tensor]] = {"values": [], "indices": [], "tail": []}
    for chunk in ctx.track(list(torch.split(windows, CHUNK)), "distill teacher"):
        slices = hidden_by_units(units, chunk, lambda model, states: reduce_by_slices(model, states, reduce))
        for name, tensors in zip(("values", "indices", "tail"), zip(*slices)):
            parts[name].append(torch.cat(tensors, dim=1))
    del units
    result = {name: torch.cat(tensors).contiguous() for name, tensors in parts.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    write_safetensors(partial, result, metadata={})
    partial.replace(path)
    log.info("distill: teacher top-%d logits and tail mass of %d windows cached in %s", spec.top_k,
             windows.shape[0], path)
    return result


def distill_loss_fn(ctx, windows: torch.Tensor, spec: DistillSpec):
    """``loss(model, batch, indices)`` for ``compress.training.loop.train``: the distillation loss of the
    windows at ``indices`` against their cached teacher targets."""
    targets = teacher_targets(ctx, windows, spec)

    def loss(model, batch: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        values, top, tail = (targets[name][indices].to(batch.device) for name in ("values", "indices", "tail"))
        return chunked_distill_loss(model, batch, values, top, tail, spec.weight, spec.temperature)

    return loss
