"""L4Q (Jeon et al., ACL 2025): quantization-aware LoRA whose result is a fully quantized weight.

    W'  = W0 + s_lora B A                               (merge first, full precision)
    v   = (W' - offset) / step                          (per group of ``group_size`` input columns)
    Wq  = step * clamp(round(v), 0, 2^bits - 1) + offset
    y   = x Wq^T (+ bias)

``L4QMatmul`` is a custom autograd Function that saves only x and the parameters (W0, A, B, step,
offset) and recomputes W' and Wq in backward, so no W-sized tensor lives between forward and
backward. x and W0 are saved as they come, in their own dtype (bf16 / fp16 for a half-precision
model: the input itself and the frozen base weight itself, no copies); forward and backward upcast
them to the trainable parameters' dtype (fp32 in ``L4QLinear``) as temporaries and do all the
arithmetic there. The output is in that dtype, grad x in x's. Its gradients are those of a
straight-through estimator on round():

    G_Wq = G_y^T X (all tokens, not the first sample: a bug of the public reimplementation)
    M    = 1[0 <= v <= Qp]
    dA   = s_lora B^T (G_Wq * M)           dB = s_lora (G_Wq * M) A^T
    dstep   = g * sum_group G_Wq * (M ? round(v) - v : clamp(v, 0, Qp))
    doffset = g * sum_group G_Wq * (1 - M)
    dx   = G_y Wq

with ``grad_scale`` g (LSQ's 1 / sqrt(group_size * Qp) by default in ``L4QLinear``).
"""

from __future__ import annotations

import torch


def expand_groups(values: torch.Tensor, group_size: int, width: int | None = None) -> torch.Tensor:
    """[out, groups] -> [out, width]: one value per weight of its group (the last group may be
    partial when ``width`` is not a multiple of ``group_size``)."""
    return values.repeat_interleave(group_size, dim=1)[:, :width]


def sum_groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, ceil(in / group_size)]: the sum over each group's weights."""
    pad = (-values.shape[1]) % group_size
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    return values.reshape(values.shape[0], -1, group_size).sum(dim=2)


def fake_quantize(weight: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, group_size: int,
                  levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Wq, v) of a merged weight [out, in] with per-group step and offset [out, ceil(in / group_size)]."""
    width = weight.shape[1]
    step_full, offset_full = expand_groups(step, group_size, width), expand_groups(offset, group_size, width)
    v = (weight - offset_full) / step_full
    return step_full * torch.clamp(torch.round(v), 0, levels - 1) + offset_full, v


def compute_dtype(*params: torch.Tensor) -> torch.dtype:
    """The dtype L4Q's arithmetic runs in: that of the trainable parameters (A, B, step, offset),
    promoted together (fp32 in ``L4QLinear``, fp64 in the exactness tests)."""
    dtype = params[0].dtype
    for param in params[1:]:
        dtype = torch.promote_types(dtype, param.dtype)
    return dtype


class L4QMatmul(torch.autograd.Function):
    """y = x Wq^T with Wq the fake-quantized W0 + scaling B A; saves x and W0 in their own dtype
    and recomputes Wq in backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w0, lora_a, lora_b, step, offset, scaling: float, group_size: int, levels: int,
                grad_scale: float):
        dtype = compute_dtype(lora_a, lora_b, step, offset)
        merged = w0.to(dtype) + scaling * (lora_b @ lora_a)
        quantized, _ = fake_quantize(merged, step, offset, group_size, levels)
        ctx.save_for_backward(x, w0, lora_a, lora_b, step, offset)
        ctx.settings = (scaling, group_size, levels, grad_scale)
        return x.to(dtype) @ quantized.t()

    @staticmethod
    def backward(ctx, grad_y):
        x, w0, lora_a, lora_b, step, offset = ctx.saved_tensors
        scaling, group_size, levels, grad_scale = ctx.settings
        dtype = compute_dtype(lora_a, lora_b, step, offset)
        grad_y = grad_y.to(dtype)
        merged = w0.to(dtype) + scaling * (lora_b @ lora_a)
        quantized, v = fake_quantize(merged, step, offset, group_size, levels)
        grad_x = (grad_y @ quantized).to(x.dtype) if ctx.needs_input_grad[0] else None
        tokens = x.reshape(-1, x.shape[-1]).to(dtype)
        grad_wq = grad_y.reshape(-1, grad_y.shape[-1]).t() @ tokens  # every token
        inside = (v >= 0) & (v <= levels - 1)
        grad_merged = grad_wq * inside
        grad_a = scaling * (lora_b.t() @ grad_merged)
        grad_b = scaling * (grad_merged @ lora_a.t())
        step_term = torch.where(inside, torch.round(v) - v, torch.clamp(v, 0, levels - 1))
        grad_step = grad_scale * sum_groups(grad_wq * step_term, group_size)
        grad_offset = grad_scale * sum_groups(grad_wq * (~inside), group_size)
        return grad_x, None, grad_a, grad_b, grad_step, grad_offset, None, None, None, None


def rtn_qparams(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, offset) [out, ceil(in / group_size)] of round-to-nearest's asymmetric grid: fp16 scale
    and an integer zero >= 1 over the group's range widened to include 0 (so an integer-zero export
    rounds nothing at the start)."""
    from compress.quant import QuantConfig
    from compress.quant.uniform import choose_qparams

    scale, zero = choose_qparams(weight.detach().float(), QuantConfig.uniform(bits, group_size))
    return scale.float().contiguous(), (-scale.float() * zero.float()).contiguous()


class L4QLinear(torch.nn.Module):
    """A frozen dense linear W0 with a LoRA adapter (PEFT names) and learned per-group quantization
    parameters; its forward is the L4Q fake-quantized product. ``init``: None (round-to-nearest's
    grid of W0, ``rtn_qparams``) or a uniform asymmetric ``QuantizedWeight`` of the same group size
    (RTN, GPTQ, ...) whose scales and zero points become step and offset = -scale * zero. Either
    way the first forward (B = 0) is the initial quantized model."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, bits: int, group_size: int,
                 init=None, generator: torch.Generator | None = None):
        super().__init__()
        import math

        from .init import kaiming_uniform_

        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.bits, self.group_size = rank, float(alpha), bits, group_size
        self.lora_A = torch.nn.Linear(self.in_features, rank, bias=False, dtype=torch.float32)
        self.lora_B = torch.nn.Linear(rank, self.out_features, bias=False, dtype=torch.float32)
        kaiming_uniform_(self.lora_A.weight, generator)
        torch.nn.init.zeros_(self.lora_B.weight)
        step, offset = self._initial_qparams(init)
        self.step, self.offset = torch.nn.Parameter(step), torch.nn.Parameter(offset)
        self.grad_scale = 1.0 / math.sqrt(group_size * (2**bits - 1))

    def _initial_qparams(self, init) -> tuple[torch.Tensor, torch.Tensor]:
        if init is None:
            return rtn_qparams(self.base_layer.weight, self.bits, self.group_size)
        from compress.quant.config import UniformConfig
        from compress.quant.uniform import from_gptq_tensors

        config = init.config
        if not isinstance(config, UniformConfig) or config.bits != self.bits or config.group_size != self.group_size:
            raise ValueError(f"cannot start L4Q ({self.bits}-bit, group {self.group_size}) from {config.name}")
        _, scale, zero = from_gptq_tensors(init.tensors, config.bits, init.shape)
        return scale.float().contiguous(), (-scale.float() * zero.float()).contiguous()

    @torch.no_grad()
    def export_qparams(self, integer_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) [out, groups] the packed layer stores: fp16 scale = step, zero = -offset /
        scale; with ``integer_zero`` rounded into GPTQ v1's range [1, 2^bits - 1] (fp32 values)."""
        scale = self.step.detach().to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny)
        zero = -self.offset.detach() / scale.float()
        return scale, torch.round(zero).clamp(1, 2**self.bits - 1) if integer_zero else zero

    @torch.no_grad()
    def round_offset_to_integer_zero(self) -> None:
        """step := its fp16 value, offset := -step * z with the integer zero z of ``export_qparams``:
        the fake quantization becomes exactly the integer-zero grid the GPTQ packing holds."""
        scale, zero = self.export_qparams(integer_zero=True)
        self.step.copy_(scale.float())
        self.offset.copy_(-scale.float() * zero)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def merged_weight(self) -> torch.Tensor:
        return self.base_layer.weight.float() + self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized product in fp32 (x and W0 go in as they are, see ``L4QMatmul``), plus
        the bias in fp32, returned in x's dtype."""
        y = L4QMatmul.apply(x, self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.step,
                            self.offset, self.scaling, self.group_size, 2**self.bits, self.grad_scale)
        if self.base_layer.bias is not None:
            y = y + self.base_layer.bias.float()
        return y.to(x.dtype)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized merged weight Wq [out, in] the forward uses (fp32)."""
        return fake_quantize(self.merged_weight(), self.step, self.offset, self.group_size, 2**self.bits)[0]
