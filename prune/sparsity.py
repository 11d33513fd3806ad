"""Non-structured weight masks for LoRAM's ``semi`` and ``unstructured`` variants (magnitude based).

- ``unstructured``: the ``ratio`` smallest-magnitude weights of each matrix are zero.
- ``semi``: 2:4, in every group of 4 consecutive input weights of a row the 2 smallest are zero.

Shapes are unchanged (the saving needs sparse storage or kernels; LoRAM counts parameters), so LoRA
adapters trained on the sparse model already have the original shapes. ``KeepSparse`` re-applies
the masks after every optimizer step of a full-parameter (alignment) run.
"""

from __future__ import annotations

import torch
from torch import nn

from .hooks import StepHooks


def magnitude_mask(weight: torch.Tensor, method: str, ratio: float = 0.5) -> torch.Tensor:
    """Boolean keep-mask [out, in] of one weight, on its device."""
    magnitude = weight.detach().float().abs()
    if method == "semi":
        if weight.shape[1] % 4:
            raise ValueError(f"2:4 sparsity needs in_features divisible by 4 (got {weight.shape[1]})")
        groups = magnitude.view(weight.shape[0], -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(2, dim=2).indices, True)
        return keep.view_as(weight)
    if method != "unstructured":
        raise ValueError(f"sparsity method {method!r}: not semi or unstructured")
    removed = int(ratio * weight.numel())
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if removed:
        keep[torch.topk(magnitude.flatten(), removed, largest=False).indices] = False
    return keep.view_as(weight)


def sparsify(modules: dict[str, nn.Linear], method: str, ratio: float) -> dict[str, torch.Tensor]:
    """Zero the masked weights of every module in place; returns the keep-masks by name."""
    masks = {}
    with torch.no_grad():
        for name, module in modules.items():
            masks[name] = magnitude_mask(module.weight, method, ratio)
            module.weight.mul_(masks[name])
    return masks


class KeepSparse(StepHooks):
    def __init__(self, modules: dict[str, nn.Linear], masks: dict[str, torch.Tensor]):
        self.modules, self.masks = modules, masks

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            for name, module in self.modules.items():
                mask = self.masks[name] = self.masks[name].to(module.weight.device)  # moved once, if ever
                module.weight.mul_(mask)
