"""Importance of every weight of a linear layer, by criterion (higher = keep).

- ``loraprune`` (LoRAPrune, Zhang et al. 2024): the gradient of the frozen W0 estimated from the LoRA
  gradients alone, Ĝ = G_B A + B G_A - G_B G_A (one step of size 1 on both factors), times the
  merged weight: |Ĝ ⊙ (W0 + s B A)|. No W-sized gradient is ever kept by autograd.
- ``gradient``: the true ∂L/∂W0 (W0 must then require grad: the memory-hungry baseline), |G ⊙ W0|.
- ``magnitude``: |W0 + s B A| (Ĝ ≡ 1).
- ``random``: uniform noise from a seeded generator (the floor any criterion must beat), drawn on the
  generator's device (the CPU) and then moved to the layer's, so a seed gives the same draws anywhere.

``ImportanceAverage`` keeps the per-unit exponential moving average across steps (0.9), skipping an
update in which any value is not finite.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.lowrank import LoRALinear
from compress.lowrank.lora import base_weight, module_device

CRITERIA = ("loraprune", "gradient", "magnitude", "random")


def lora_weight_gradient(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """Ĝ_W [out, in] = G_B A + B G_A - G_B G_A from the LoRA factors A [r, in], B [out, r]."""
    a, b, grad_a, grad_b = a.float(), b.float(), grad_a.float(), grad_b.float()
    return grad_b @ a + b @ grad_a - grad_b @ grad_a


def merged_weight(layer: nn.Module) -> torch.Tensor:
    """W0 + s B A in fp32 for a LoRA layer, W0 for a plain one."""
    if isinstance(layer, LoRALinear):
        return base_weight(layer.base_layer) + layer.delta_weight().detach().float()
    return base_weight(layer)


def random_importance(layer: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform noise [out, in] drawn on the generator's device (CPU without one), on the layer's device."""
    source = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand((layer.out_features, layer.in_features), generator=generator, device=source)
    device = module_device(layer)
    return noise if device is None else noise.to(device)


def weight_importance(layer: nn.Module, criterion: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Element importance [out, in] of one layer after a backward pass."""
    if criterion == "random":
        return random_importance(layer, generator)
    weight = merged_weight(layer)
    if criterion == "magnitude":
        return weight.abs()
    if criterion == "gradient":
        base = layer.base_layer if isinstance(layer, LoRALinear) else layer
        if base.weight.grad is None:
            raise ValueError("criterion gradient: the base weight has no gradient (it must require grad)")
        return (base.weight.grad.float() * base.weight.detach().float()).abs()
    if criterion != "loraprune":
        raise ValueError(f"criterion {criterion!r}: not one of {', '.join(CRITERIA)}")
    if not isinstance(layer, LoRALinear) or layer.lora_A.weight.grad is None:
        raise ValueError("criterion loraprune: the layer needs a LoRA adapter with gradients")
    estimate = lora_weight_gradient(layer.lora_A.weight.detach(), layer.lora_B.weight.detach(),
                                    layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    return (estimate * weight).abs()


class ImportanceAverage:
    """Exponential moving averages of per-unit importance vectors, by key."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.values: dict[str, torch.Tensor] = {}

    def update(self, key: str, value: torch.Tensor) -> bool:
        """Blend ``value`` in; returns False (and changes nothing) when it holds NaN or inf."""
        if not bool(torch.isfinite(value).all()):
            return False
        previous = self.values.get(key)
        if previous is not None:  # loaded on the host (a resumed checkpoint) while scores are on the device
            previous = previous.to(value.device)
        self.values[key] = value.clone() if previous is None else self.decay * previous + (1 - self.decay) * value
        return True

    def state_dict(self) -> dict:
        return {"decay": self.decay, "values": dict(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.values = state["decay"], dict(state["values"])
