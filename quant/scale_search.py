"""Per-group scale search: the group range shrunk until rounding costs least.

Min/max scales (``uniform.choose_qparams``) spend grid points on a group's outliers. The search
tries the range [low, high] scaled by p = 1, 1 - 1/grid, ... down to 1 - max_shrink (``grid`` = 100,
``max_shrink`` = 0.8: 80 candidates, the GPTQ authors' reference code and GPTQModel's ``mse``),
derives each candidate's scale and zero by the same rules as min/max (fp16 scales, integer zeros
>= 1, the symmetric zero 2^(b-1)), rounds the group's values with them and keeps, per group, the
candidate with the smallest Σ |q − w|^norm. Values beyond a shrunk range are clipped to it. p = 1
is min/max, so the result is never worse than min/max under the searched norm.
"""

from __future__ import annotations

import torch

from .config import QuantConfig
from .uniform import group_codes, group_view, qparams_from_range

GRID = 100
MAX_SHRINK = 0.8


def shrink_factors(grid: int = GRID, max_shrink: float = MAX_SHRINK) -> list[float]:
    """p = 1 - i / grid for i in [0, max_shrink · grid)."""
    return [1 - i / grid for i in range(int(max_shrink * grid))]


def rounding_error(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, config: QuantConfig,
                   norm: float, valid: torch.Tensor) -> torch.Tensor:
    """Σ over each group's valid values of |dequantized − value|^norm: [N, G] from groups [N, G, g]."""
    codes = group_codes(groups, scale, zero, config)
    error = (codes - zero.float().unsqueeze(-1)).mul_(scale.float().unsqueeze(-1)).sub_(groups)
    return error.abs_().pow_(norm).mul_(valid).sum(dim=-1)


def search_qparams(weight: torch.Tensor, config: QuantConfig, norm: float, grid: int = GRID,
                   max_shrink: float = MAX_SHRINK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale fp16 [N, G], zero [N, G]) of a float weight [N, K] chosen by the search."""
    if norm <= 0:
        raise ValueError(f"scale search norm {norm} must be positive")
    in_features = weight.shape[1]
    group = config.group_for(in_features)
    groups = group_view(weight.float(), group)
    valid = (torch.arange(groups.shape[1] * group, device=weight.device) < in_features).float()
    valid = valid.view(groups.shape[1], group)  # zero padding of a partial last group is not scored
    low, high = torch.aminmax(groups, dim=2)
    best_scale, best_zero, best_error = None, None, None
    for factor in shrink_factors(grid, max_shrink):
        scale, zero = qparams_from_range(low * factor, high * factor, config)
        error = rounding_error(groups, scale, zero, config, norm, valid)
        if best_error is None:
            best_scale, best_zero, best_error = scale, zero, error
            continue
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_error = torch.where(better, error, best_error)
    return best_scale, best_zero
