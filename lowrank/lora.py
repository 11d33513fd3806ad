"""LoRALinear: a trainable low-rank update wrapped around any frozen linear layer.

    y = base(x) + scaling * B(A(dropout(x))),     scaling = alpha / rank,     ΔW = scaling * B @ A

as PEFT computes it (``lora_A``: in -> rank, ``lora_B``: rank -> out, no biases), so the adapter
tensors export unchanged as a PEFT adapter. The base may be an ``nn.Linear``, a ``QuantLinear`` or any
module with ``in_features``/``out_features`` and a ``dequantize()`` or ``weight``; it is held, not
subclassed (PEFT's ``base_layer``), and its parameters are frozen.

Merging: a dense base absorbs ΔW in place (``merge`` / ``unmerge``); a packed base cannot, so
``merged_linear()`` returns a new dense ``nn.Linear`` holding the dequantized weight plus ΔW.
Initializers are free functions in ``lowrank.init``. ``set_module`` replaces a submodule by its dotted
name (the one definition: ``compress.targets`` and the other libraries use it).
"""

from __future__ import annotations

import torch
from torch import nn

# bits per adapter weight when adapters are stored in NF8 with double-quantized scales (block 64,
# 8-bit scales in blocks of 256, fp32 second level), as LQ-LoRA counts them
NF8_BITS = 8 + 8 / 64 + 32 / (64 * 256)


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight [out, in] in fp32 (dequantized for packed layers)."""
    if hasattr(base, "dequantize"):
        return base.dequantize(torch.float32)
    return base.weight.detach().float()


def module_device(module: nn.Module) -> torch.device | None:
    """The device of a module's first parameter or buffer (None for a module with neither)."""
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return None if tensor is None else tensor.device


class LoRALinear(nn.Module):
    """The adapter of ``base`` (created on the base's device, fp32)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank: {rank} must be at least 1")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, float(alpha)
        device = module_device(base)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        nn.init.zeros_(self.lora_B.weight)  # the update starts at zero; lowrank.init sets A

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling * B @ A, [out, in], in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        adapter_dtype = self.lora_A.weight.dtype
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(adapter_dtype)))) * self.scaling
        return result + update.to(result.dtype)

    def merge(self) -> None:
        """Add ΔW to a dense base's weight (forward then skips the adapter)."""
        if self.merged:
            return
        if not isinstance(self.base_layer, nn.Linear):
            raise TypeError(f"cannot merge into a {type(self.base_layer).__name__} in place; use merged_linear()")
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.copy_((weight.float() + self.delta_weight().float()).to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.copy_((weight.float() - self.delta_weight().float()).to(weight.dtype))
        self.merged = False

    def merged_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A new dense ``nn.Linear`` equal to base + ΔW (any base, packed ones included)."""
        weight = base_weight(self.base_layer)
        if not self.merged:
            weight = weight + self.delta_weight().detach().float()
        bias = getattr(self.base_layer, "bias", None)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=dtype,
                           device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight.to(dtype))
            if bias is not None:
                linear.bias.copy_(bias.detach().to(dtype))
        return linear

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, base={type(self.base_layer).__name__}"


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in ``model`` in place of the submodule called ``name`` (e.g. model.layers.0.mlp.up_proj)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def merge_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every ``LoRALinear`` in ``model`` by the dense ``nn.Linear`` base + ΔW (frozen), in
    ``dtype`` or else its base weight's dtype (fp32 for packed bases); returns how many."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, layer in layers:
        width = dtype or getattr(getattr(layer.base_layer, "weight", None), "dtype", torch.float32)
        set_module(model, name, layer.merged_linear(width).requires_grad_(False))
    return len(layers)
