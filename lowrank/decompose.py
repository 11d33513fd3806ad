"""LQ-LoRA decomposition: W ≈ Q + L1 @ L2 with Q quantized and L1 [out, r], L2 [r, in] in fp32.

Alternating minimization (LQ-LoRA, Guo et al. 2024, Alg. 1):

    Q = 0
    repeat up to ``iterations`` times:
        L1, L2 = rank-r SVD of (W - Q)                 (weighted when row/column weights are given)
        Q      = quantize(W - L1 @ L2)
        error  = || sqrt(F) ⊙ (W - Q - L1 @ L2) ||_F   (F = 1 without Fisher information)
        stop at the first iteration whose error rises

and return the *best* iterate seen (the reference code returns the one after the rise).

The SVD is randomized (``torch.svd_lowrank``'s algorithm, Halko et al. 2009, with ``oversampling``
extra columns; ``randomized_svd``). Its Gaussian test matrix is drawn from a CPU generator seeded
with ``seed`` and then moved to the matrix's device, so the draw is the same on every device and
the caller's RNG (CPU or CUDA) is never touched. Singular values are split evenly:
L1 = U sqrt(S), L2 = sqrt(S) V^T.

Fisher mode (two-sided weighting): with row weights r_i = sqrt(mean_j F_ij) and column weights
c_j = sqrt(mean_i F_ij) (floored at ``eps`` times their mean, so dead rows or columns cannot divide
by zero), the rank-r minimizer of ||(r c^T) ⊙ (A - L1 L2)||_F is the SVD of diag(r) A diag(c),
unscaled: L1 = L̃1 / r, L2 = L̃2 / c. Only the low-rank step and the error are weighted; the
quantization step stays plain round-to-nearest.

``quantize`` replaces round-to-nearest by another quantizer of W - L1 L2 (GPTQ with the layer's
input Hessian H), and ``error`` the Frobenius error by another measure of the residual R (for
GPTQ: the output error sqrt(tr(R H Rᵀ)) / sqrt(2), ``hessian_error``), used to pick the best
iterate and to stop.

Output-aware mode (``hessian`` given, H = 2/n Σ x xᵀ of the layer's inputs): everything is judged by
the layer's output error ||X Rᵀ||_F = sqrt(tr(R H Rᵀ) / 2). The low-rank step is H-whitened: with
S the lower Cholesky factor of H + damp · mean(diag H) · I (``whitening``), the rank-r minimizer of
||(A - L1 L2) S||_F is the SVD of A S, mapped back: L2 = L̃2 S⁻¹. With a Fisher as well, its row
weights ρ_i = mean_j F_ij / mean_j (H_jj / 2) (the output side of the Kronecker-factored Fisher
F_ij ≈ E[δ_i²] E[x_j²]) weight the output rows: error sqrt(Σ_i ρ_i (R H Rᵀ)_ii / 2), about the
loss increase to second order, so that costs compare across layers; the SVD is then of
diag(sqrt ρ) A S. Given the Fisher of the outputs instead (a vector [out]: Σ over samples and
positions of δ_i², ``fisher.output_fisher``), ρ is that vector: E[δ_i²] measured per position
rather than recovered from per-sample weight gradients summed over positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from compress.quant.config import QuantConfig
from compress.quant.qweight import QuantizedWeight


@dataclass
class Decomposition:
    left: torch.Tensor  # L1 [out, rank] fp32
    right: torch.Tensor  # L2 [rank, in] fp32
    quantized: QuantizedWeight  # Q
    error: float  # (weighted) Frobenius error of the returned iterate
    errors: list[float] = field(default_factory=list)  # every iteration's error, in order
    best_iteration: int = 0

    def low_rank(self) -> torch.Tensor:
        return self.left @ self.right


def fisher_weights(fisher: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Row weights [out] and column weights [in] of a diagonal Fisher [out, in] (two-sided heuristic)."""
    fisher = fisher.float().clamp(min=0)
    rows, cols = fisher.mean(dim=1).sqrt(), fisher.mean(dim=0).sqrt()
    return (rows.clamp(min=eps * float(rows.mean()) + 1e-30),
            cols.clamp(min=eps * float(cols.mean()) + 1e-30))


def gaussian(rows: int, cols: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """A [rows, cols] standard normal matrix in ``like``'s dtype and on its device, drawn on the CPU
    from a generator seeded with ``seed`` (the numbers ``torch.manual_seed(seed); torch.randn`` give)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draw = torch.randn(rows, cols, dtype=like.dtype, generator=generator, device="cpu")
    return draw.to(like.device)


def randomized_svd(matrix: torch.Tensor, q: int, seed: int, niter: int = 2
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [m, q], S [q], V [n, q]) of a real matrix [m, n]: ``torch.svd_lowrank(matrix, q, niter)``
    step for step (so identical on the CPU after ``torch.manual_seed(seed)``), with the random test
    matrix from ``gaussian`` instead of the global RNG of the matrix's device."""
    tall = matrix.shape[0] >= matrix.shape[1]
    a = matrix if tall else matrix.mT  # the range finder works on the tall orientation
    basis = torch.linalg.qr(a @ gaussian(a.shape[1], q, seed, a)).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.mT @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    u, v = basis @ u, vh.mT
    return (u, s, v) if tall else (v, s, u)


def low_rank_factors(matrix: torch.Tensor, rank: int, oversampling: int = 10, seed: int = 0,
                     rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                     whiten: "Whitening | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 [out, rank], L2 [rank, in]) of the best rank-``rank`` fit, weighted by rows (and cols, or
    the ``whiten`` factor S on the input side) if given."""
    target = matrix.float()
    if rows is not None:
        target = rows.view(-1, 1) * target
    if whiten is not None:
        target = target @ whiten.factor
    elif cols is not None:
        target = target * cols.view(1, -1)
    u, s, v = randomized_svd(target, min(rank + oversampling, *target.shape), seed)
    root = s[:rank].sqrt()
    left, right = u[:, :rank] * root, root.view(-1, 1) * v[:, :rank].t()
    if rows is not None:
        left = left / rows.view(-1, 1)
    if whiten is not None:
        right = right @ whiten.inverse
    elif cols is not None:
        right = right / cols.view(1, -1)
    return left, right


@dataclass
class Whitening:
    factor: torch.Tensor  # S [in, in], lower triangular, S Sᵀ = H + damp · mean(diag H) · I
    inverse: torch.Tensor  # S⁻¹


def whitening(hessian: torch.Tensor, damp: float = 0.01) -> Whitening:
    """S and S⁻¹ of the dampened H (float32, on H's device); damp is doubled until H is positive
    definite."""
    h = hessian.double()
    mean = max(float(h.diagonal().mean()), 1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    while True:
        factor, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if int(info) == 0:
            break
        damp *= 2
    inverse = torch.linalg.solve_triangular(factor, eye, upper=False)
    return Whitening(factor.float(), inverse.float())


def output_row_weights(hessian: torch.Tensor, fisher: torch.Tensor | None) -> torch.Tensor | None:
    """sqrt ρ [out] (module docstring) of a Fisher of the weight [out, in] or of the outputs [out]
    (``fisher.output_fisher``: ρ itself), or None without one."""
    if fisher is None:
        return None
    if fisher.dim() == 1:
        rho = fisher.float().clamp(min=0)
    else:
        rho = fisher.float().clamp(min=0).mean(dim=1) / max(float(hessian.diagonal().mean()) / 2, 1e-30)
    root = rho.sqrt()
    return root.clamp(min=1e-6 * float(root.mean()) + 1e-30)


def output_error(hessian: torch.Tensor, rows: torch.Tensor | None = None) -> Callable[[torch.Tensor], float]:
    """Residual R [out, in] -> sqrt(Σ_i ρ_i (R H Rᵀ)_ii / 2), ρ = rows² (1 without rows)."""
    def error(residual: torch.Tensor) -> float:
        per_row = ((residual @ hessian) * residual).sum(dim=1)
        if rows is not None:
            per_row = per_row * rows.square()
        return float(per_row.sum().clamp(min=0).div(2).sqrt())
    return error


def weighted_error(residual: torch.Tensor, fisher: torch.Tensor | None) -> float:
    if fisher is None:
        return float(torch.linalg.norm(residual))
    return float(torch.linalg.norm(residual * fisher.float().clamp(min=0).sqrt()))


def hessian_error(hessian: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """Residual R [out, in] -> sqrt(tr(R H Rᵀ) / 2): the layer-output error ||X Rᵀ|| for H = 2 XᵀX."""
    return output_error(hessian)


def lq_decompose(weight: torch.Tensor, rank: int, config: QuantConfig, iterations: int = 20,
                 fisher: torch.Tensor | None = None, oversampling: int = 10, seed: int = 0,
                 quantize: Callable[[torch.Tensor, QuantConfig], QuantizedWeight] | None = None,
                 error: Callable[[torch.Tensor], float] | None = None,
                 hessian: torch.Tensor | None = None) -> Decomposition:
    """Decompose ``weight`` [out, in] into a ``config``-quantized Q plus a rank-``rank`` L1 @ L2;
    output-aware when ``hessian`` is given (module docstring)."""
    if iterations < 1:
        raise ValueError(f"iterations: {iterations} must be at least 1")
    quantize = quantize or QuantizedWeight.quantize
    target = weight.detach().float()
    whiten = None
    if hessian is not None:
        rows, cols, whiten = output_row_weights(hessian, fisher), None, whitening(hessian)
        error = error or output_error(hessian, rows)
    else:
        rows, cols = fisher_weights(fisher) if fisher is not None else (None, None)
        error = error or (lambda residual: weighted_error(residual, fisher))
    residual_q = torch.zeros_like(target)
    best, errors = None, []
    for step in range(iterations):
        left, right = low_rank_factors(target - residual_q, rank, oversampling, seed + step, rows, cols, whiten)
        quantized = quantize(target - left @ right, config)
        residual_q = quantized.dequantize()
        errors.append(error(target - residual_q - left @ right))
        if best is None or errors[-1] < best.error:
            best = Decomposition(left, right, quantized, errors[-1], best_iteration=step)
        elif errors[-1] > errors[-2]:
            break
    best.errors = errors
    return best
