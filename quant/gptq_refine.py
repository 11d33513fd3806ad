"""Coordinate-descent refinement of GPTQ's codes (QuantEase, Behdin et al. 2023, on GPTQ's grid).

GPTQ visits each column once: a column's code is fixed before the columns after it are rounded,
so the errors they make can no longer move it. The layer's output error

    f(Q) = tr((W − Q) H (W − Q)ᵀ)        (H: the damped Hessian GPTQ used)

keeps falling when each column is visited again with every other column fixed. As a function of
column j alone f is H_jj · ‖q_j − t_j‖² + const, with the target

    t_j = q_j + (R H)_:j / H_jj,        R = W − Q,

so rounding t_j to column j's grid (its group's scale and zero, the RTN rule, clamped) is the best
grid value for that column: every step leaves f where it was or lowers it, and the refined codes
are never worse than GPTQ's under f. The groups' scales and zeros stay GPTQ's, so the checkpoint
format does not change. G = R H is kept up to date with GPTQ's lazy-batch trick: inside a block of
``block`` columns the step updates only the block's columns of G; one matmul brings the rest up
to date when the block is done. A pass costs about a GPTQ column loop and ``refine`` with one round
(two passes and a scale refit) about three (measured on 576 x 1536 and 1536 x 576 int3 g64 on a
2-core CPU); what it buys on a model is in the quantize stage's docstring.
"""

from __future__ import annotations

import torch

from .config import QuantConfig


def grid_round(target: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized) of values [N] on the grid of their group's scale/zero [N]: the RTN
    rule of ``uniform.quantize_codes``, clamped to the code range."""
    maxq = 2**config.bits - 1
    if config.float_zero:
        codes = torch.clamp(torch.round(target / scale + zero), 0, maxq)
    else:
        codes = torch.clamp(torch.round(target / scale) + zero, 0, maxq)
    return codes, (codes - zero) * scale


def refine_codes(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor, config: QuantConfig, group: int, passes: int,
                 block: int = 128) -> torch.Tensor:
    """``passes`` coordinate-descent passes over the input columns of ``codes`` [N, K] (input
    order; refined copy returned) for ``weight`` [N, K] and ``hessian`` [K, K] with positive
    diagonal. ``scale``/``zero`` [N, G] are the groups' grid, column j in group j // ``group``.
    The loop works on transposes ([K, N]: one column is one contiguous row) and updates, inside a
    block, only the columns it has still to visit; the block's end brings every column up to date."""
    column_group = torch.arange(weight.shape[1], device=weight.device) // group
    scales, zeros = scale.t().contiguous(), zero.t().contiguous()  # [G, N]
    codes = codes.to(weight.dtype).t().contiguous()  # [K, N]
    quantized = (codes - zeros[column_group]) * scales[column_group]
    gradient = hessian @ (weight.t() - quantized)  # (R H)ᵀ = H Rᵀ, H symmetric
    diagonal = hessian.diagonal().tolist()
    groups = column_group.tolist()
    for _ in range(passes):
        for start in range(0, weight.shape[1], block):
            end = min(start + block, weight.shape[1])
            local = gradient[start:end].clone()
            moves = torch.zeros_like(local)
            inside = hessian[start:end, start:end]
            for i in range(end - start):
                j, g = start + i, groups[start + i]
                codes[j], rounded = grid_round(quantized[j] + local[i] / diagonal[j], scales[g], zeros[g], config)
                moves[i] = rounded - quantized[j]
                local[i + 1:] -= inside[i + 1:, i].unsqueeze(1) * moves[i].unsqueeze(0)
                quantized[j] = rounded
            gradient -= hessian[:, start:end] @ moves
    return codes.t().contiguous()


def _group_blocks(matrix: torch.Tensor, group: int, groups: int) -> torch.Tensor:
    """[..., K] → [..., G, group], a partial last group padded with zeros."""
    padded = torch.nn.functional.pad(matrix, (0, groups * group - matrix.shape[-1]))
    return padded.view(*matrix.shape[:-1], groups, group)


def fitted_scales(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor, group: int, ridge: float = 1e-6,
                  chunk_bytes: int = 256 * 2**20) -> torch.Tensor:
    """The groups' scales [N, G] minimising f for fixed codes and zeros (float64). The rows
    decouple; row n's q_j = s_g (c_j − z_g) is linear in its G scales, so with B [K, G] holding
    row n's codes minus zeros in its groups' columns, (Bᵀ H B + λ I) s = Bᵀ H w + λ s₀ (λ:
    ``ridge`` · mean diag(Bᵀ H B), which leaves a group whose codes all sit on the zero at s₀).
    Rows go in chunks whose H B (G · K float64 per row) fits in ``chunk_bytes``."""
    groups, in_features = scale.shape[1], weight.shape[1]
    column_group = torch.arange(in_features, device=weight.device) // group
    h = hessian.double()
    padded = torch.nn.functional.pad(h, (0, 0, 0, groups * group - in_features))  # [G·g, K]
    columns = padded.t().reshape(in_features, groups, group).permute(1, 0, 2)  # [G, K, g]: H[:, group]
    rows = max(1, chunk_bytes // (8 * groups * in_features))
    fitted = []
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        offsets = _group_blocks((codes[part] - zero[part][:, column_group]).double(), group, groups)  # [n, G, g]
        spread = torch.bmm(columns, offsets.permute(1, 2, 0))  # [G, K, n]: H B's columns, per row
        spread = _group_blocks(spread.permute(2, 0, 1), group, groups)  # [n, G', G, g]
        gram = torch.einsum("ngc,nhgc->ngh", offsets, spread)  # Bᵀ H B [n, G, G]
        right = torch.einsum("ngc,ngc->ng", offsets, _group_blocks(weight[part].double() @ h, group, groups))
        strength = ridge * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
        gram = gram + strength[:, None, None] * torch.eye(groups, dtype=torch.float64, device=weight.device)
        right = right + strength[:, None] * scale[part].double()
        fitted.append(torch.linalg.solve(gram, right.unsqueeze(2)).squeeze(2))
    return torch.cat(fitted)


def row_errors(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """r_n H r_nᵀ per row [N] (float64), r = W − Q."""
    residual = (weight - quantized).double()
    return ((residual @ hessian.double()) * residual).sum(dim=1)


def refine(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
           zero: torch.Tensor, config: QuantConfig, group: int, rounds: int,
           block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) after ``rounds`` of [a coordinate-descent pass, the scales refitted] and
    a last pass. A refitted row's scales (rounded to fp16, as stored) are kept only where they
    lower that row's error, and positive, so f never rises."""
    column_group = torch.arange(weight.shape[1], device=weight.device) // group
    dequantized = lambda c, s: (c - zero[:, column_group]) * s[:, column_group]  # noqa: E731
    for _ in range(rounds):
        codes = refine_codes(weight, hessian, codes, scale, zero, config, group, 1, block)
        candidate = fitted_scales(weight, hessian, codes, scale, zero, group).to(torch.float16).to(scale.dtype)
        before = row_errors(weight, dequantized(codes, scale), hessian)
        after = row_errors(weight, dequantized(codes, candidate), hessian)
        keep = (after < before) & (candidate > 0).all(dim=1)
        scale = torch.where(keep.unsqueeze(1), candidate, scale)
    return refine_codes(weight, hessian, codes, scale, zero, config, group, 1, block), scale
