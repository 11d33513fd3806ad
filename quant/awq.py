"""AWQ (Lin et al., 2024, "Activation-aware Weight Quantization"): scale each input channel of a
group of linears up before rounding, by how large its activations are, and fold the inverse scale
into the module that produces those activations, so that the float model is unchanged and the
salient channels lose less to rounding.

For a group of linears reading one input X (q/k/v, gate/up, down) with mean |x| per channel
``x_mean`` and, with ``duo_scaling``, the per-channel mean of the group's weights normalized within
their quantization groups ``w_mean`` (AutoAWQ / llm-compressor), each ratio r of a ``grid`` over
[0, 1) gives

    s = x_mean^r / (w_mean^(1-r) + 1e-4), clamped at 1e-4, divided by sqrt(max(s) min(s))

and the chosen s minimizes the group's output error after rounding W s to the target config and
dividing s back out: sum over members of tr(ΔW H ΔWᵀ), ΔW = W - Q(W s) / s, with H = the
calibration Hessian of X (``||X ΔWᵀ||²`` up to a constant). The identity scale is a candidate too, so
a group never ends worse off than plain rounding. Ours scores the linears' own outputs, where
AutoAWQ and llm-compressor run the enclosing attention or MLP block; no clipping search.

The fold divides s out of the producer: a norm's weight (``(1 + w) / s - 1`` for norms that scale by
``1 + w``, as Gemma's), a linear's rows; for inputs no module produces, the rows of ``up_proj`` for
``down_proj`` (act(gate) * up) and of ``v_proj`` for ``o_proj`` when their shapes match (no GQA).
A group is left unscaled when its input has no such producer or is read by modules outside it.
After ``prepare_layer`` the layer is rounded by the quantizer ``then`` names, with fresh statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .config import QuantConfig
from .qweight import QuantizedWeight

log = logging.getLogger(__name__)
SIBLINGS = {"down_proj": "up_proj", "o_proj": "v_proj"}  # inputs computed in code: whose rows scale them


@dataclass(frozen=True)
class AWQSettings:
    """The recipe fields of ``method: awq`` (see the module docstring)."""

    then: Literal["rtn", "gptq"] = "rtn"
    grid: int = field(default=20, metadata={"ge": 1, "le": 200})
    duo_scaling: bool = True


def weight_importance(weights: list[torch.Tensor], config: QuantConfig) -> torch.Tensor:
    """Per input channel, the mean over the group's rows of |w| / max |w| within each quantization
    segment (``w_mean`` of AutoAWQ's duo scaling)."""
    stacked = torch.cat([w.detach().float() for w in weights])
    rows, columns = stacked.shape
    segment = columns if config.segment <= 0 or columns % config.segment else config.segment
    grouped = stacked.abs().reshape(-1, segment)
    return (grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)).reshape(rows, columns).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float, duo_scaling: bool) -> torch.Tensor:
    if duo_scaling:
        scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        scales = x_mean.pow(ratio).clamp(min=1e-4)
    scales = scales / (scales.max() * scales.min()).sqrt()
    return torch.where(torch.isfinite(scales), scales, torch.ones_like(scales))


def scaled_error(weights: list[torch.Tensor], configs: list[QuantConfig], hessian: torch.Tensor,
                 scales: torch.Tensor) -> float:
    """sum_m tr(ΔW_m H ΔW_mᵀ) with ΔW = W - Q(W s) / s, each member rounded to its own config: the
    group's output error after rounding."""
    total = 0.0
    for weight, config in zip(weights, configs):
        w = weight.detach().float()
        delta = w - QuantizedWeight.quantize(w * scales, config).dequantize() / scales
        total += float(((delta @ hessian) * delta).sum())
    return total


def search_scales(weights: list[torch.Tensor], configs: list[QuantConfig], stats,
                  settings: AWQSettings) -> tuple[torch.Tensor, float | None]:
    """(best scales, their ratio; None for the identity) over the grid (module docstring)."""
    hessian, x_mean = stats.hessian, stats.abs_mean.to(stats.hessian.device)
    w_mean = weight_importance(weights, configs[0]).to(x_mean.device)
    best = (torch.ones_like(x_mean), None, scaled_error(weights, configs, hessian, torch.ones_like(x_mean)))
    for step in range(settings.grid):
        ratio = step / settings.grid
        scales = candidate_scales(x_mean, w_mean, ratio, settings.duo_scaling)
        error = scaled_error(weights, configs, hessian, scales)
        if error < best[2]:
            best = (scales, ratio, error)
    return best[0], best[1]


def _offset_norm(norm: nn.Module) -> bool:
    """Whether a norm scales by (1 + weight): its output with weight (and bias) zeroed is not zero."""
    saved = [(p, p.detach().clone()) for p in (norm.weight, getattr(norm, "bias", None)) if p is not None]
    try:
        for p, _ in saved:
            p.data.zero_()
        probe = torch.randn(2, norm.weight.shape[0], dtype=norm.weight.dtype, device=norm.weight.device)
        return bool(norm(probe).abs().amax() > 0)
    finally:
        for p, value in saved:
            p.data.copy_(value)


def _sibling(group, groups) -> nn.Module | None:
    """The linear whose output rows scale ``group``'s input channel by channel (``SIBLINGS``)."""
    if len(group.modules) != 1:
        return None
    name, module = next(iter(group.modules.items()))
    parent, _, leaf = name.rpartition(".")
    wanted = f"{parent}.{SIBLINGS.get(leaf, '')}"
    found = next((m for g in groups for n, m in g.modules.items() if n == wanted), None)
    return found if isinstance(found, nn.Linear) and found.out_features == module.in_features else None


def fold_target(group, groups) -> nn.Module | None:
    """Where the inverse scales of ``group`` can go (module docstring), or None."""
    if set(map(id, group.readers)) != set(map(id, group.modules.values())):
        return None  # someone else reads this input: scaling it would change them
    producer = group.producer if group.producer is not None else _sibling(group, groups)
    if isinstance(producer, nn.Linear) or (producer is not None and isinstance(getattr(producer, "weight", None), torch.Tensor)
                                            and producer.weight.dim() == 1):
        return producer
    return None


@torch.no_grad()
def fold(target: nn.Module, members: list[nn.Module], scales: torch.Tensor) -> None:
    """Divide ``scales`` out of ``target``'s outputs and multiply them into ``members``' inputs."""
    for member in members:
        member.weight.mul_(scales.to(member.weight.dtype).view(1, -1))
    if isinstance(target, nn.Linear):
        target.weight.div_(scales.to(target.weight.dtype).view(-1, 1))
    elif _offset_norm(target):
        target.weight.copy_((1 + target.weight.float()) / scales - 1)
    else:
        target.weight.div_(scales.to(target.weight.dtype))
    if getattr(target, "bias", None) is not None:
        target.bias.div_(scales.to(target.bias.dtype))


def prepare_layer(layer: nn.Module, groups: list, configs: dict[str, QuantConfig], settings: AWQSettings) -> None:
    """Search every group's scales on the float layer, then fold them all (module docstring)."""
    chosen = []
    for group in groups:
        target = fold_target(group, groups)
        if target is None:
            log.debug("awq: %s left unscaled (no producer to fold into)", ", ".join(group.modules))
            continue
        weights, members = [m.weight for m in group.modules.values()], [configs[n] for n in group.modules]
        scales, ratio = search_scales(weights, members, group.stats, settings)
        if ratio is not None:
            chosen.append((target, list(group.modules.values()), scales))
    for target, members, scales in chosen:
        fold(target, members, scales.to(members[0].weight.device))
