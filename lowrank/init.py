"""Initializers for ``LoRALinear`` adapters (free functions, one per scheme).

- ``init_default``: PEFT's default, A Kaiming-uniform (a = sqrt(5)), B = 0: the first forward equals
  the base layer's.
- ``init_from_factors``: LQ-LoRA's mapping of a decomposition W ≈ Q + L1 @ L2 onto an adapter over
  Q: with s = alpha / rank, ``A = L2 / sqrt(s)`` and ``B = L1 / sqrt(s)``, so ``s * B @ A = L1 @ L2``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .lora import LoRALinear


def kaiming_uniform_(weight: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """PEFT's lora_A init: kaiming_uniform_(a=sqrt(5)) on a [rank, in] weight = U(-1/sqrt(in), 1/sqrt(in)).

    A ``generator`` on another device than the weight (a CPU generator for a CUDA adapter) draws
    on its own device and the values are copied over: the same numbers wherever the weight lives."""
    with torch.no_grad():
        bound = 1 / math.sqrt(weight.shape[1])
        if generator is None or generator.device == weight.device:
            weight.uniform_(-bound, bound, generator=generator)
            return
        draw = torch.empty(weight.shape, dtype=weight.dtype, device=generator.device)
        weight.copy_(draw.uniform_(-bound, bound, generator=generator))


def init_default(layer: LoRALinear, generator: torch.Generator | None = None) -> None:
    kaiming_uniform_(layer.lora_A.weight, generator)
    with torch.no_grad():
        nn.init.zeros_(layer.lora_B.weight)


def init_from_factors(layer: LoRALinear, left: torch.Tensor, right: torch.Tensor) -> None:
    """Set the adapter so that its ΔW equals ``left @ right`` (L1 [out, rank], L2 [rank, in])."""
    if left.shape != (layer.out_features, layer.rank) or right.shape != (layer.rank, layer.in_features):
        raise ValueError(f"factors {list(left.shape)} x {list(right.shape)} do not fit a rank-{layer.rank} "
                         f"adapter on [{layer.out_features}x{layer.in_features}]")
    root = math.sqrt(layer.scaling)
    with torch.no_grad():
        layer.lora_A.weight.copy_(right / root)
        layer.lora_B.weight.copy_(left / root)
