"""GPTQ (Frantar et al., ICLR 2023): quantize W column by column, spreading each column's rounding
error over the columns not yet quantized so that the layer output X·Wᵀ changes least.

With H = 2/n · Σ x xᵀ over the layer's calibration inputs (x = one token's input row), dampened by
``damp`` · mean(diag H), and U the upper Cholesky factor of H⁻¹, column i is rounded to q_i and the
rest move by W[:, j] -= (w_i - q_i) / U[i, i] · U[i, j] for j > i. Blocks of ``block`` columns are
updated lazily (one matmul per block). A group's scale and zero are chosen when the loop reaches
its first column, as in the reference implementation and GPTQModel: from W as the lazy updates of
the blocks before have left it, without the updates made so far inside the current block. (Taking
them from the fully updated columns is as valid; on SmolLM2-135M g64 it gave int3 13.12 vs 12.70
and int4 7.48 vs 7.52, differences of the size GPTQ shows under any small change of its input, see
BENCHMARKS.md.) With ``act_order`` the columns run by decreasing diag(H) and
the groups' parameters come from the original W before the loop ("static groups"), so every group
stays a contiguous run of input columns and the checkpoint needs no act-order ``g_idx``.

The grid is the RTN grid of ``uniform.choose_qparams`` (asymmetric integer zero >= 1, symmetric, or
fp16 float zero), so with H = I GPTQ returns exactly RTN's codes, scales and zeros.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import QuantConfig, effective_group
from .qweight import QuantizedWeight
from .uniform import choose_qparams, to_float_zero_tensors, to_gptq_tensors

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running H = 2/n · Σ x xᵀ (float32 [in, in]) over every token row seen by ``add``.

    H lives on ``device`` when given; otherwise it follows the first inputs (nothing is summed
    before them) and later inputs are brought to it."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0
        self._follow = device is None

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        if self._follow and self.rows == 0 and self.hessian.device != x.device:
            self.hessian = torch.zeros_like(self.hessian, device=x.device)
        x = x.to(self.hessian.device)
        total = self.rows + x.shape[0]
        self.hessian.mul_(self.rows / total).addmm_(x.t(), x, alpha=2.0 / total)
        self.rows = total


@dataclass
class GPTQResult:
    quantized: QuantizedWeight
    loss: float  # Σ over columns of (w - q)² / U[i, i]²: GPTQ's own estimate of the output error


def _column_codes(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, config: QuantConfig):
    """(codes, dequantized column) of one column [N] with its group's scale/zero [N]: the RTN rule
    of ``uniform.quantize_codes``."""
    maxq = 2**config.bits - 1
    if config.float_zero:
        codes = torch.clamp(torch.round(column / scale + zero), 0, maxq)
    else:
        codes = torch.clamp(torch.round(column / scale) + zero, 0, maxq)
    return codes, (codes - zero) * scale


def _inverse_cholesky(hessian: torch.Tensor, damp: float, retries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp · mean(diag H) · I)⁻¹; a Hessian that is not positive
    definite at ``damp`` (too few calibration tokens for its width) is retried with 10x the damping."""
    for attempt in range(retries + 1):
        damped = hessian.clone()
        damped.diagonal().add_(damp * 10**attempt * float(damped.diagonal().mean()))
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                if attempt:
                    log.warning("GPTQ: Hessian not positive definite at damp %g; used %g", damp, damp * 10**attempt)
                return upper
    raise ValueError(f"GPTQ: the Hessian is not positive definite even at damp {damp * 10**retries:g}")


def _group_params(weight: torch.Tensor, config: QuantConfig, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero [N, G] (fp32) of a weight chosen by the RTN rule."""
    scales, zeros = [], []
    for start in range(0, weight.shape[1], group):
        scale, zero = choose_qparams(weight[:, start:start + group], config)
        scales.append(scale.float())
        zeros.append(zero.float())
    return torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig, damp: float = 0.01,
                  block: int = 128, act_order: bool = False, dtype: torch.dtype = torch.float32) -> GPTQResult:
    """GPTQ of ``weight`` [N, K] given its inputs' Hessian [K, K] into a uniform ``config``."""
    if config.kind != "uniform":
        raise ValueError(f"GPTQ quantizes to uniform configs, not {config.name}")
    out_features, in_features = weight.shape
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match in_features {in_features}")
    device = weight.device
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(device=device, dtype=dtype).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    group = effective_group(config, in_features)
    static = act_order or group >= in_features  # parameters fixed before the loop
    scale, zero = _group_params(w, config, group) if static else (None, None)
    if act_order:
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        order = torch.arange(in_features, device=device)
    w, h = w[:, order], h[order][:, order]
    upper = _inverse_cholesky(h, damp)
    if not static:
        scale = torch.zeros(out_features, -(-in_features // group), dtype=dtype, device=device)
        zero = torch.zeros_like(scale)
    codes = torch.zeros(out_features, in_features, dtype=dtype, device=device)
    column_groups = (order // group).tolist()  # one host copy, not a device sync per column
    loss = torch.zeros((), dtype=torch.float64, device=device)  # float64: the sum of the python floats
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        chunk = w[:, start:end].clone()
        errors = torch.zeros(out_features, end - start, dtype=dtype, device=device)
        inverse = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            g = column_groups[column]
            if not static and column % group == 0:  # w: updated by the blocks before this one only
                s, z = choose_qparams(w[:, column:column + group], config)
                scale[:, g], zero[:, g] = s.to(dtype)[:, 0], z.to(dtype)[:, 0]
            codes[:, column], quantized = _column_codes(chunk[:, i], scale[:, g], zero[:, g], config)
            error = (chunk[:, i] - quantized) / inverse[i, i]
            loss += (error**2).sum().double() / 2
            chunk[:, i:] -= error.unsqueeze(1) * inverse[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    codes = codes[:, torch.argsort(order)].to(torch.uint8)
    pack = to_float_zero_tensors if config.float_zero else to_gptq_tensors
    zero_out = zero.to(torch.float16) if config.float_zero else zero.round().to(torch.int32)
    tensors = pack(codes, scale.to(torch.float16), zero_out, config)
    return GPTQResult(QuantizedWeight(config, (out_features, in_features), tensors), float(loss))
