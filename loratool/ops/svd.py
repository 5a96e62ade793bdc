"""Truncated SVDs for extract and resize: near-optimal, deterministic, and much cheaper than a full SVD.

Peers call `torch.linalg.svd` on every full weight delta (minutes to an hour for a big model). A
randomized block Krylov method needs only a few products of the delta with thin matrices: a random
sketch Q_0 = orth(D G), power sweeps Q_i = orth(D orth(D^T Q_{i-1})), and the best rank-k
approximation of D inside the span of all the Q_i together (one more product, then the SVD of a
small matrix). Keeping every block, not only the last as plain power iteration does, matters for
the deltas of real fine-tunes: past the change's true rank their spectrum is a flat noise floor,
where the last block alone converges slowly (1.001-1.003x the optimal error after 5 sweeps in our
measurements) and the whole Krylov space is within 1.0005x after 3.

The error of the result is known exactly: with K the basis and s~ the singular values of K^T D,
||D - (truncation)||_F^2 = ||D||_F^2 - sum_{i<=k} s~_i^2. Energies are summed in float64; products
run in the delta's dtype on its device. The starting sketch comes from a CPU generator seeded per
module, so a run is repeatable and the GPU and the CPU start from the same numbers.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

SWEEPS = 3  # power sweeps: the Krylov space holds 4 blocks of rank + oversampling columns
DYNAMIC_METHODS = ("fro", "ratio", "cumulative", "eps")
# A full SVD of a matrix whose smaller side is at most this costs about what the sketch does (256 x
# 2048: 40 ms on two CPU cores).
EXACT_BELOW = 512


@dataclass
class Truncated:
    """The top singular triplets of a matrix D, and how much of D they hold."""

    u: torch.Tensor  # (m, k)
    s: torch.Tensor  # largest first: the top k, or every singular value when `complete`
    vh: torch.Tensor  # (k, n)
    energy: float  # ||D||_F^2
    sweeps: int  # power sweeps run (0 for an exact SVD)
    complete: bool = False  # s holds the whole spectrum (an exact SVD)

    def kept_energy(self, rank: int) -> float:
        return float(self.s[:rank].double().square().sum())

    def relative_error(self, rank: int) -> float:
        """||D - D_rank||_F / ||D||_F for the rank-`rank` truncation. From the whole spectrum when
        known (the tail itself, no cancellation); else ||D||^2 minus the kept energy, good to about
        3e-4 absolute (float32 singular values)."""
        if self.energy == 0.0:
            return 0.0
        if self.complete:
            spectrum = self.s.double().square()
            return math.sqrt(float(spectrum[rank:].sum() / spectrum.sum()))
        return math.sqrt(max(self.energy - self.kept_energy(rank), 0.0) / self.energy)

    def retained(self, rank: int) -> float:
        """Share of ||D||_F^2 the rank-`rank` truncation keeps."""
        if self.energy == 0.0:
            return 1.0
        total = float(self.s.double().square().sum()) if self.complete else self.energy
        return min(self.kept_energy(rank) / total, 1.0)


def seed_for(name: str, seed: int = 0) -> int:
    """A stable per-module seed (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode()) ^ seed


def exact_svd(matrix: torch.Tensor, rank: int | None = None) -> Truncated:
    """A full SVD: the top `rank` vectors (all when None) and every singular value."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = s.numel() if rank is None else rank
    return Truncated(u[:, :rank], s, vh[:rank], squared_norm(matrix), 0, complete=True)


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    seed: int,
    oversample: int | None = None,
    energy: float | None = None,
    exact_below: int | None = None,
) -> Truncated:
    """The top `rank` singular triplets of `matrix`, within a hair of the optimal truncation.

    `energy` is ||matrix||_F^2 when the caller has it. A matrix whose smaller side is at most
    `exact_below` (default EXACT_BELOW) or the Krylov space's width gets the exact SVD instead.
    """
    m, n = matrix.shape
    width = rank + (oversample if oversample is not None else max(10, rank // 2))
    if min(m, n) <= max(EXACT_BELOW if exact_below is None else exact_below, (SWEEPS + 1) * width):
        return exact_svd(matrix, rank)
    energy = squared_norm(matrix) if energy is None else energy
    generator = torch.Generator().manual_seed(seed)
    sketch = torch.randn(n, width, generator=generator, dtype=torch.float32).to(matrix.device, matrix.dtype)
    block = torch.linalg.qr(matrix @ sketch).Q
    blocks = [block]
    for _ in range(SWEEPS):
        block = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ block).Q).Q
        blocks.append(block)
    basis = torch.linalg.qr(torch.cat(blocks, dim=1)).Q
    core_t = matrix.T @ basis  # (K^T D)^T
    v, s, uh = torch.linalg.svd(core_t, full_matrices=False)  # core_t = V S U^T of the small core
    return Truncated(basis @ uh[:rank].T, s[:rank], v[:, :rank].T, energy, SWEEPS)


def squared_norm(tensor: torch.Tensor) -> float:
    """||tensor||_F^2 to about 1e-8: row norms in float32 (short sums, vectorized), their squares
    summed in float64. One float32 sum over millions of entries drifts by 1e-3, which would swamp
    the error estimate `energy - captured`; a float64 copy of the matrix would cost 10x the time."""
    rows = tensor.reshape(tensor.shape[0], -1)
    return float(torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).double().square().sum())


def residual_energy(matrix: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """||matrix - up @ down||_F^2 from thin products only:
    ||D||^2 - 2 tr(B^T D A^T) + tr((B^T B)(A A^T))."""
    cross = float(((up.T @ matrix) * down).double().sum())
    gram = float(((up.T @ up).double() * (down @ down.T).double()).sum())
    return max(squared_norm(matrix) - 2 * cross + gram, 0.0)


def balanced_factors(t: Truncated, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down the rank-`rank` truncation and the singular values split evenly
    (B = U sqrt(S), A = sqrt(S) V^T), so neither factor carries all the magnitude."""
    root = t.s[:rank].sqrt()
    return t.u[:, :rank] * root, root[:, None] * t.vh[:rank]


def parse_dynamic(spec: str) -> tuple[str, float]:
    """`fro:0.9` -> ("fro", 0.9); raises ValueError with a readable reason."""
    method, sep, value = spec.partition(":")
    if not sep or method not in DYNAMIC_METHODS:
        raise ValueError(f"{spec!r}: expected METHOD:VALUE with METHOD one of {', '.join(DYNAMIC_METHODS)}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{spec!r}: {value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{spec!r}: the value must be a positive number")
    if method in ("fro", "cumulative") and number > 1:
        raise ValueError(f"{spec!r}: {method} keeps a share of the spectrum, between 0 and 1")
    if method == "ratio" and number < 1:
        raise ValueError(f"{spec!r}: ratio keeps S_i >= S_0 / VALUE, so VALUE must be at least 1")
    return method, number


def dynamic_rank(s: torch.Tensor, method: str, value: float, energy: float | None = None) -> int:
    """The smallest rank the rule accepts (at least 1, at most len(s)).

    - fro: sqrt(sum S[:k]^2 / ||D||_F^2) >= value (`energy` = ||D||_F^2; the kept spectrum's own
      sum when None),
    - ratio: keep S_i >= S_0 / value,
    - cumulative: sum S[:k] / sum S >= value (`s` must be the whole spectrum),
    - eps: keep S_i > value.
    """
    s = s.double()
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 1
    if method in ("fro", "cumulative"):
        terms = s.square() if method == "fro" else s
        total = energy if method == "fro" and energy is not None else float(terms.sum())
        share = terms.cumsum(0) / total
        if method == "fro":
            share = share.sqrt()
        # Slack of a float32 rounding, so a spectrum that reaches the target exactly is not pushed
        # one rank up by rounding in the singular values or their sum.
        reached = (share >= value * (1 - 1e-7)).nonzero()
        k = int(reached[0]) + 1 if reached.numel() else s.numel()
    elif method == "ratio":
        k = int((s >= float(s[0]) / value).sum())
    elif method == "eps":
        k = int((s > value).sum())
    else:
        raise ValueError(f"unknown dynamic method {method!r}")
    return max(1, min(k, s.numel()))


def clamp_quantile(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's extraction clamp: with all of S in up, both factors are clamped to +-(the `quantile`
    of their signed values taken together), then rebalanced (which leaves the product as kohya's).

    torch.quantile refuses inputs above 2^24 elements (sd-scripts issue 1485); a sort does not.
    """
    norms = down.norm(dim=1).clamp_min(torch.finfo(down.dtype).tiny)
    up, down = up * norms, down / norms[:, None]  # S into up, as kohya's U @ diag(S)
    values = torch.cat([up.flatten(), down.flatten()]).sort().values
    position = quantile * (values.numel() - 1)  # linear interpolation, as torch.quantile does
    lo = math.floor(position)
    hi = min(lo + 1, values.numel() - 1)
    limit = float(values[lo] + (position - lo) * (values[hi] - values[lo]))
    up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    return rebalance(up, down)


def rebalance(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each rank-1 term so its up column and down row have equal norms; the product is unchanged."""
    up_norms = up.norm(dim=0)
    down_norms = down.norm(dim=1)
    ok = (up_norms > 0) & (down_norms > 0)
    c = torch.where(ok, (down_norms / up_norms.where(ok, torch.ones_like(up_norms))).sqrt(), torch.ones_like(up_norms))
    return up * c, down / c[:, None]
