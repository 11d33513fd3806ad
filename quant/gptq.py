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
BENCHMARKS.md.) The columns run in one of three orders (``order``):

- ``natural``: input order;
- ``activation`` (GPTQ's act order): by decreasing diag(H), the groups' parameters taken from the
  original W before the loop ("static groups"), so every group stays a contiguous run of input
  columns and the checkpoint needs no act-order ``g_idx``;
- ``group_aware``: group-aware reordering (Gafni et al., "Dual Precision Quantization", CVPRW 2025;
  GPTQModel's ``act_group_aware``, on by default there): the groups run by decreasing largest
  diag(H) of their columns, and inside a group its columns by decreasing diag(H). Each group is
  still one contiguous run of input columns, quantized in one go, its parameters chosen when the
  loop reaches it; a partial last group keeps its place at the end.

With ``mse_norm`` > 0 a group's scale and zero come from the shrink search of ``scale_search``
(GPTQModel's ``mse``) instead of its min/max. A Hessian that is not positive definite at ``damp`` is
retried with ``damp_increment`` more at a time (GPTQModel's ``damp_auto_increment``) below 1.
With ``refine_rounds`` > 0 the column loop's codes and scales are refined afterwards against the
same damped output error (``gptq_refine``: coordinate descent over the codes, least-squares scales),
which can only lower it; the grid and the checkpoint format stay as they are.

The grid is the RTN grid of ``uniform.choose_qparams`` (asymmetric integer zero >= 1, symmetric, or
fp16 float zero), so with H = I and no refinement GPTQ returns exactly RTN's codes, scales and zeros.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from .config import QuantConfig, UniformConfig
from .gptq_refine import grid_round, refine, row_errors
from .qweight import QuantizedWeight
from .scale_search import search_qparams
from .uniform import choose_qparams, to_float_zero_tensors, to_gptq_tensors

log = logging.getLogger(__name__)
ORDERS = ("natural", "activation", "group_aware")


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
    loss: float  # ½ tr((W − Q) H (W − Q)ᵀ), H damped: GPTQ's Σ (w − q)² / U[i, i]², or recomputed after refinement


def _inverse_cholesky(hessian: torch.Tensor, damp: float, increment: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp · mean(diag H) · I)⁻¹; a Hessian that is not positive
    definite at ``damp`` (too few calibration tokens for its width) is retried at damp + increment,
    damp + 2 · increment, ... while below 1."""
    mean = float(hessian.diagonal().mean())
    tried = damp
    while True:
        damped = hessian.clone()
        damped.diagonal().add_(tried * mean)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                if tried != damp:
                    log.warning("GPTQ: Hessian not positive definite at damp %g; used %g", damp, tried)
                return upper
        following = tried + increment
        if increment <= 0 or following >= 1:
            raise ValueError(f"GPTQ: the Hessian is not positive definite even at damp {tried:g}")
        tried = following


def column_order(diagonal: torch.Tensor, group: int, order: str) -> torch.Tensor:
    """The order in which GPTQ visits the input columns, from diag(H) (see the module docstring)."""
    width = diagonal.numel()
    if order == "natural":
        return torch.arange(width, device=diagonal.device)
    if order == "activation":
        return torch.argsort(diagonal, descending=True, stable=True)
    if order != "group_aware":
        raise ValueError(f"GPTQ order {order!r}: one of {', '.join(ORDERS)}")
    whole = width // group * group
    grouped = diagonal[:whole].view(-1, group)
    inside = torch.argsort(grouped, dim=1, descending=True, stable=True)
    by_group = torch.argsort(grouped.amax(dim=1), descending=True, stable=True)
    starts = torch.arange(0, whole, group, device=diagonal.device).unsqueeze(1)
    visited = (inside + starts)[by_group].reshape(-1)
    return torch.cat([visited, torch.arange(whole, width, device=diagonal.device)])


def _qparams(weight: torch.Tensor, config: QuantConfig, mse_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    return search_qparams(weight, config, mse_norm) if mse_norm > 0 else choose_qparams(weight, config)


def _group_params(weight: torch.Tensor, config: QuantConfig, group: int,
                  mse_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero [N, G] (fp32) of a weight."""
    scales, zeros = [], []
    for start in range(0, weight.shape[1], group):
        scale, zero = _qparams(weight[:, start:start + group], config, mse_norm)
        scales.append(scale.float())
        zeros.append(zero.float())
    return torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


@dataclass(frozen=True)
class GPTQSettings:
    """How GPTQ runs (the module docstring); the defaults are the quantize stage's, and each field's
    metadata holds the bounds a recipe is held to (``quant.quantizers``)."""

    damp: float = field(default=0.05, metadata={"gt": 0, "lt": 1})
    damp_increment: float = field(default=0.01, metadata={"ge": 0, "lt": 1})
    block: int = field(default=128, metadata={"ge": 1})
    order: Literal[ORDERS] = "group_aware"
    mse_norm: float = field(default=0.0, metadata={"ge": 0})  # 0: min/max group parameters; > 0: the shrink search
    refine_rounds: int = field(default=1, metadata={"ge": 0, "le": 16})  # code/scale refinement rounds (``gptq_refine``)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig,
                  settings: GPTQSettings = GPTQSettings(), dtype: torch.dtype = torch.float32) -> GPTQResult:
    """GPTQ of ``weight`` [N, K] given its inputs' Hessian [K, K] into a uniform ``config``."""
    return gptq_quantize_stacked([weight], hessian, config, settings, dtype)[0]


def gptq_quantize_stacked(weights: list[torch.Tensor], hessian: torch.Tensor, config: QuantConfig,
                          settings: GPTQSettings = GPTQSettings(),
                          dtype: torch.dtype = torch.float32) -> list[GPTQResult]:
    """GPTQ of linears that read one input (one Hessian [K, K]) into one ``config``, run as one
    matrix of their stacked rows: GPTQ treats rows independently (the order, damp and H⁻¹ come from
    H alone; a row's groups, rounding and error feedback are its own), so each result is the one
    ``gptq_quantize`` gives the weight alone, up to float rounding, for one column loop in all."""
    if not isinstance(config, UniformConfig):
        raise ValueError(f"GPTQ quantizes to uniform configs, not {config.name}")
    in_features = weights[0].shape[1]
    if any(weight.shape[1] != in_features for weight in weights):
        raise ValueError(f"stacked GPTQ needs one in_features, got {[tuple(w.shape) for w in weights]}")
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match in_features {in_features}")
    w = torch.cat([weight.detach().to(dtype) for weight in weights])
    h = hessian.detach().to(device=w.device, dtype=dtype).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    group = config.group_for(in_features)
    static = settings.order == "activation" or group >= in_features  # parameters fixed before the loop
    params = _group_params(w, config, group, settings.mse_norm) if static else None
    order = column_order(h.diagonal(), group, settings.order)
    upper = _inverse_cholesky(h[order][:, order], settings.damp, settings.damp_increment)
    codes, scale, zero, losses = _quantize_columns(w[:, order], upper, order, config, group, params, settings)
    codes = codes[:, torch.argsort(order)]
    if settings.refine_rounds > 0:
        h.diagonal().add_(settings.damp * float(h.diagonal().mean()))
        codes, scale = refine(w, h, codes, scale, zero, config, group, settings.refine_rounds, settings.block)
        column_group = torch.arange(in_features, device=w.device) // group
        losses = row_errors(w, (codes - zero[:, column_group]) * scale[:, column_group], h) / 2
    codes = codes.to(torch.uint8)
    pack = to_float_zero_tensors if config.float_zero else to_gptq_tensors
    zero_out = zero.to(torch.float16) if config.float_zero else zero.round().to(torch.int32)
    results, start = [], 0
    for weight in weights:
        rows = slice(start, start + weight.shape[0])
        tensors = pack(codes[rows], scale[rows].to(torch.float16), zero_out[rows], config)
        results.append(GPTQResult(QuantizedWeight(config, tuple(weight.shape), tensors), float(losses[rows].sum())))
        start += weight.shape[0]
    return results


def _quantize_columns(w: torch.Tensor, upper: torch.Tensor, order: torch.Tensor, config: QuantConfig, group: int,
                      params, settings: GPTQSettings):
    """GPTQ's blocked column loop over the reordered weight ``w`` (updated in place): (codes in
    the visiting order, scale [N, G], zero [N, G], each row's loss [N] float64). ``params``: the
    static groups' (scale, zero), or None to choose each group's when the loop reaches its first column."""
    out_features, in_features = w.shape
    dtype, device = w.dtype, w.device
    if params is None:
        scale = torch.zeros(out_features, -(-in_features // group), dtype=dtype, device=device)
        zero = torch.zeros_like(scale)
    else:
        scale, zero = (t.to(dtype) for t in params)
    codes = torch.zeros(out_features, in_features, dtype=dtype, device=device)
    column_groups = (order // group).tolist()  # one host copy, not a device sync per column
    losses = torch.zeros(out_features, dtype=torch.float64, device=device)
    for start in range(0, in_features, settings.block):
        end = min(start + settings.block, in_features)
        chunk = w[:, start:end].clone()
        errors = torch.zeros(out_features, end - start, dtype=dtype, device=device)
        inverse = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            g = column_groups[column]
            if params is None and column % group == 0:  # w: updated by the blocks before this one only
                s, z = _qparams(w[:, column:column + group], config, settings.mse_norm)
                scale[:, g], zero[:, g] = s.to(dtype)[:, 0], z.to(dtype)[:, 0]
            codes[:, column], quantized = grid_round(chunk[:, i], scale[:, g], zero[:, g], config)
            error = (chunk[:, i] - quantized) / inverse[i, i]
            losses += error.double()**2 / 2
            chunk[:, i:] -= error.unsqueeze(1) * inverse[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return codes, scale, zero, losses
