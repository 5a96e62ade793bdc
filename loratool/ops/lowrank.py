"""Facts about B @ A without ever forming it.

With B = Qb Rb and A^T = Qa Ra, B @ A = Qb (Rb Ra^T) Qa^T, so the singular values of B @ A are those
of the small r x r core Rb Ra^T: exact, in O((out + in) r^2) instead of O(out * in * r).
Any square root R of the Gram matrix (R^T R = B^T B) serves as Rb, so the core comes from two r x r
Gram matrices (one matrix product each, in float64) and their eigendecompositions: several times
faster than Householder QR on tall factors, and float64 leaves ample accuracy for float32 data.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lazy_torch import torch

FP32_EPS = 2.0**-23  # torch.finfo(torch.float32).eps


def _gram_root(gram: torch.Tensor) -> torch.Tensor:
    """R with R^T R = gram, for a symmetric positive semi-definite gram."""
    eigenvalues, vectors = torch.linalg.eigh(gram)
    return eigenvalues.clamp_min(0).sqrt()[:, None] * vectors.T


def core_singular_values(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Singular values of up @ down (up: out x r, down: r x in), largest first, in float64.

    A rank above the product's own size (a file may declare r = 65536 on an 8 x 8 layer) would make
    the r x r core the largest thing in memory: then the product itself is the smaller matrix, and
    either way memory stays below the factors' own size."""
    up, down = up.double(), down.double()
    rank = up.shape[1]
    if rank * rank > up.shape[0] * down.shape[1]:
        return torch.linalg.svdvals(up @ down)
    return torch.linalg.svdvals(_gram_root(up.T @ up) @ _gram_root(down @ down.T).T)


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Rank at the tolerance numpy's matrix_rank uses, for data that is at best float32."""
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return 0
    tol = float(singular_values[0]) * max(shape) * FP32_EPS
    return int((singular_values > tol).sum())


def max_abs_product(
    up: torch.Tensor,
    down: torch.Tensor,
    offset: torch.Tensor | None = None,
    scale: float = 1.0,
    rows_per_chunk: int = 1024,
) -> float:
    """max |offset + scale * up @ down|, computed a block of rows at a time to bound memory."""
    best = 0.0
    up, down = up.float(), down.float()
    for start in range(0, up.shape[0], rows_per_chunk):
        block = scale * (up[start : start + rows_per_chunk] @ down)
        if offset is not None:
            block += offset[start : start + rows_per_chunk].float()
        best = max(best, float(block.abs().max()))
    return best


@dataclass
class CoreSVD:
    """The SVD of up @ down without forming it: up @ down = (qb u) diag(s) (vh qa^T)."""

    qb: torch.Tensor
    u: torch.Tensor
    s: torch.Tensor  # every singular value of up @ down, largest first
    vh: torch.Tensor
    qa: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of the best rank-`rank` approximation, singular values split evenly
        (B = Qb U sqrt(S), A = sqrt(S) V^T Qa^T) so neither factor carries all the magnitude."""
        keep = min(rank, self.s.numel())
        root = self.s[:keep].sqrt()
        return self.qb @ (self.u[:, :keep] * root), (root[:, None] * self.vh[:keep]) @ self.qa.T


def core_svd(up: torch.Tensor, down: torch.Tensor) -> CoreSVD:
    """QR of both factors and an SVD of the small r x r core, in float64 on the factors' device."""
    qb, rb = torch.linalg.qr(up.double())
    qa, ra = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return CoreSVD(qb, u, s, vh, qa)


def best_rank(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the best rank-`rank` approximation of up @ down (Eckart-Young), never forming
    it; returned in float32."""
    new_up, new_down = core_svd(up, down).factors(rank)
    return new_up.float(), new_down.float()
