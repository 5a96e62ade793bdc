"""The orthogonal matrices OFT and BOFT train, built as each library builds them.

Both parameterize a rotation by a skew-symmetric Q through the Cayley transform, but the
conventions differ in the details that decide the numbers: LyCORIS forms (I + Q)(I - Q)^-1 from
Q = P - P^T after clipping the norm of all of a module's Q together; PEFT's OFT forms
(I - Q)(I + Q)^-1 exactly, or I + 2Q + 2Q^2 + ... + Q^n (the Neumann series of the other sign), from
the packed upper triangle, after clipping each block's norm (COFT); PEFT's BOFT forms
(I - S)(I + S)^-1 with S = (P - P^T) / 2. Each kind calls the one its library uses.
"""

from __future__ import annotations

from ..lazy_torch import torch


def lycoris_cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """LyCORIS: Q = P - P^T over the last two axes, scaled down to norm `constraint` when the norm
    of all of them together exceeds it (constraint <= 0: no limit), then (I + Q)(I - Q)^-1."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = float(q.norm()) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def skew_from_upper(vectors: torch.Tensor, size: int) -> torch.Tensor:
    """PEFT's OFT stores each block's Q as its strict upper triangle, row by row."""
    rows, cols = torch.triu_indices(size, size, 1)
    upper = torch.zeros(vectors.shape[0], size, size, dtype=vectors.dtype)
    upper[:, rows, cols] = vectors
    return upper - upper.transpose(-1, -2)


def peft_coft(q: torch.Tensor, eps: float) -> torch.Tensor:
    """Constrained OFT: each block's Q scaled to Frobenius norm eps / sqrt(blocks) when larger."""
    limit = eps / (q.shape[0] ** 0.5)
    norms = q.flatten(1).norm(dim=1).reshape(-1, 1, 1)
    return torch.where(norms <= limit, q, q * (limit / norms))


def peft_oft_cayley(q: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """PEFT's OFT rotation: exact (I - Q)(I + Q)^-1, or with `neumann_terms` the truncated series
    I + 2Q + ... + 2Q^k + Q^(k+1), k = max(2, terms - 2) (I + 2Q for 2 terms, I for fewer)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye.clone()
    if neumann_terms < 2:
        return r
    r = r + 2 * q
    if neumann_terms == 2:
        return r
    power = q
    for _ in range(max(2, neumann_terms - 2) - 1):
        power = power @ q
        r = r + 2 * power
    return r + power @ q


def peft_boft_cayley(blocks: torch.Tensor) -> torch.Tensor:
    """PEFT's BOFT: S = (P - P^T) / 2 and (I - S)(I + S)^-1, block by block."""
    s = 0.5 * (blocks - blocks.transpose(-1, -2))
    eye = torch.eye(s.shape[-1], dtype=s.dtype).expand_as(s)
    return torch.linalg.solve(eye + s, eye - s, left=False)


def rotate_row_blocks(weight: torch.Tensor, rotations: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Each block of `b` consecutive rows of the (rows, columns) matrix `weight`, left-multiplied by
    its (b, b) rotation (or that rotation's transpose)."""
    n, b, _ = rotations.shape
    blocks = weight.reshape(n, b, -1)
    turned = rotations.transpose(-1, -2) if transpose else rotations
    return (turned @ blocks).reshape(weight.shape)
