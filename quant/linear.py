"""QuantLinear: a frozen linear layer stored as packed tensors.

Buffers only (names as in the checkpoint: ``qweight``/``qzeros``/``scales``/``g_idx`` for uniform,
``codes``/``scale_codes``/``scale_scales``/``scale_offset`` for NF, optional ``bias``) and a forward
through ``kernels.dequant_matmul``. No algorithm logic lives here.

The kernel layout (``QuantizedWeight.kernel_weight``: 3-bit and NF codes repacked into K-major planes) is built on
the first forward and cached until a buffer changes (``.to(device)``, ``load_state_dict``); it is not
part of the state dict. ``backend`` names the kernel the last forward ran (reports collect it).
"""

from __future__ import annotations

import torch
from torch import nn

from compress import kernels

from .config import QuantConfig
from .qweight import QuantizedWeight


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, config: QuantConfig, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        for name, (dtype, shape) in config.tensor_specs((out_features, in_features)).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.backend: str | None = None
        self._names = tuple(config.tensor_specs((out_features, in_features)))  # the packed buffers
        self._layout: tuple[tuple, kernels.KernelWeight] | None = None

    @classmethod
    def from_weight(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, weight.config, bias is not None, device="meta")
        for name, tensor in weight.tensors.items():
            setattr(layer, name, tensor)
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    @classmethod
    def quantize(cls, linear: nn.Linear, config: QuantConfig) -> "QuantLinear":
        return cls.from_weight(QuantizedWeight.quantize(linear.weight, config), linear.bias)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def W_q(self) -> torch.Tensor:  # noqa: N802  (the name PEFT probes, after qweight, for a packed layer's device)
        """The packed codes, the config's first tensor (``qweight`` for uniform, ``codes`` for NF)."""
        return getattr(self, self._names[0])

    def quantized_weight(self) -> QuantizedWeight:
        names = self.config.tensor_specs(self.shape)
        return QuantizedWeight(self.config, self.shape, {n: getattr(self, n) for n in names})

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    def kernel_weight(self) -> kernels.KernelWeight:
        """The cached kernel layout of this layer's buffers (rebuilt when any buffer changed). Read
        from ``_buffers`` directly: this runs on every forward, where nn.Module's attribute lookup
        costs more than a small layer's matmul."""
        buffers = self._buffers
        key = tuple((buffers[n].data_ptr(), buffers[n]._version) for n in self._names)
        key += (buffers[self._names[0]].device,)
        if self._layout is None or self._layout[0] != key:
            self._layout = (key, self.quantized_weight().kernel_weight())
        return self._layout[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.kernel_weight()
        backend = kernels.select_backend(x, weight=weight)[0]
        self.__dict__["backend"] = backend  # a plain attribute: skip nn.Module's __setattr__ on every forward
        return kernels.dequant_matmul(x, weight, self.bias, backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.config.name}"
