"""Truncated SVDs for extract and resize: near-optimal, deterministic, and much cheaper than a full SVD.

Peers call `torch.linalg.svd` on every full weight delta (minutes to an hour for a big model). A
randomized block Krylov method needs only a few products of the delta with thin matrices: a random
sketch Q_0 = orth(D G), power sweeps Q_i = orth(D orth(D^T Q_{i-1})), and the best rank-k
approximation of D inside the span of all the Q_i together. Keeping every block, not only the last
as plain power iteration does, matters for the deltas of real fine-tunes: past the change's true
rank their spectrum is a flat noise floor, where the last block alone converges slowly
(1.001-1.003x the optimal error after 5 sweeps in our measurements) and the whole Krylov space is
within 1.0005x after 3.

Each new block is made orthogonal to the blocks before it (block Lanczos with full
reorthogonalization), so the blocks are the orthonormal basis K as they come and the products
D^T Q_i of the sweeps are the core K^T D already: the projection onto the space costs one product
for the last block, not one as wide as the space. On a CPU the products are bound by memory, so
each is taken in the order that reads D along its rows, and the small factorizations (of blocks a
few dozen columns wide) go through their float64 Gram matrices, several times faster than LAPACK's
QR and SVD at these shapes.

The error of the result is known exactly: with s~ the singular values of K^T D,
||D - (truncation)||_F^2 = ||D||_F^2 - sum_{i<=k} s~_i^2. Energies are summed in float64; products
run in the delta's dtype on its device. The starting sketch comes from a CPU generator seeded per
module, so a run is repeatable and the GPU and the CPU start from the same numbers.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

from ..lazy_torch import torch

SWEEPS = 3  # power sweeps: the Krylov space holds 4 blocks of rank + oversampling columns
DYNAMIC_METHODS = ("fro", "ratio", "cumulative", "eps")
# Below this smaller side a full SVD is used. Above it the sketch is faster whenever the Krylov space
# is narrower than the matrix (measured on two CPU cores, rank 16: 128 x 2048 17 ms exact, 11 ms
# sketched; 256 x 2048 46 vs 12 ms; 1280 x 1280 268 vs 12 ms).
EXACT_BELOW = 128


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


def sketch_width(rank: int, oversample: int | None = None) -> int:
    return rank + (oversample if oversample is not None else max(10, rank // 2))


def sketches(shape: tuple[int, ...], rank: int, oversample: int | None = None, exact_below: int | None = None) -> bool:
    """Whether `randomized_svd` sketches a matrix of this shape (else it runs the exact SVD)."""
    floor = EXACT_BELOW if exact_below is None else exact_below
    return min(shape) > max(floor, (SWEEPS + 1) * sketch_width(rank, oversample))


def random_sketch(n: int, width: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The n x width Gaussian sketch, drawn on the CPU from `seed` and moved to the device: the
    same numbers on every device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=generator, dtype=torch.float32).to(device, dtype)


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    seed: int,
    oversample: int | None = None,
    energy: float | None = None,
    exact_below: int | None = None,
    sketched: torch.Tensor | None = None,
) -> Truncated:
    """The top `rank` singular triplets of `matrix`, within a hair of the optimal truncation.

    `energy` is ||matrix||_F^2 and `sketched` is `matrix @ random_sketch(n, width, seed, ...)`
    when the caller has them (extract takes both while it forms the delta). A matrix whose
    smaller side is at most `exact_below` (default EXACT_BELOW) or the Krylov space's width gets
    the exact SVD instead (`sketches` says which).
    """
    m, n = matrix.shape
    if not sketches(matrix.shape, rank, oversample, exact_below):
        return exact_svd(matrix, rank)
    energy = squared_norm(matrix) if energy is None else energy
    if sketched is None:
        sketched = matrix @ random_sketch(n, sketch_width(rank, oversample), seed, matrix.device, matrix.dtype)
    # Block Lanczos with full reorthogonalization: each new block is made orthogonal to the ones
    # before it, so the blocks together are already an orthonormal basis K of the Krylov space, and
    # the products D^T Q_i a sweep computes are the rows of the core K^T D. The final projection
    # then needs one product (for the last block) instead of one as wide as the whole space.
    blocks = [_new_directions(sketched, [])]
    projected = []  # D^T Q_i: (K^T D)^T, block by block
    for _ in range(SWEEPS):
        if blocks[-1].shape[1] == 0:  # the space is invariant: it holds D's whole range
            break
        back = _transposed_product(matrix, blocks[-1])
        projected.append(back)
        blocks.append(_new_directions(matrix @ _new_directions(back, []), blocks))
    short = rank - sum(b.shape[1] for b in blocks)
    if short > 0:  # D has a lower rank than asked for: any orthonormal directions complete the basis
        filler = random_sketch(short, m, seed + 1, matrix.device, matrix.dtype).T
        blocks.append(_new_directions(filler, blocks))
    projected += [_transposed_product(matrix, block) for block in blocks[len(projected) :]]
    basis, core_t = torch.cat(blocks, dim=1), torch.cat(projected, dim=1)
    v, s, u = _tall_svd(core_t)  # core_t = V S U^T: the small core K^T D is U S V^T
    if s[rank - 1] <= 1e-6 * s[0]:  # D's rank is below `rank`: LAPACK gives the null directions exactly
        v, s, uh = torch.linalg.svd(core_t, full_matrices=False)
        u = uh.T
    return Truncated(basis @ u[:, :rank], s[:rank], v[:, :rank].T.contiguous(), energy, SWEEPS)


def _transposed_product(matrix: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """matrix^T @ block, computed as (block^T @ matrix)^T: the same numbers, but the row-major
    matrix is read along its rows (twice as fast on a CPU for a thin block)."""
    return (block.T @ matrix).T


def _tall_svd(tall: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, s, V) with tall = U diag(s) V^T, s descending, from the eigen-decomposition of the
    float64 Gram matrix: 4-6x faster than LAPACK's SVD of a 2048 x 104 matrix on a CPU. Exact to
    float64 rounding where s_i is above about 1e-6 s_0; a column of U with s_i near zero is not
    meaningful (callers drop or replace those)."""
    wide = tall.double()
    eigenvalues, v = torch.linalg.eigh(wide.T @ wide)  # ascending
    s, v = eigenvalues.flip(0).clamp_min(0).sqrt(), v.flip(1)
    u = wide @ (v / s.clamp_min(torch.finfo(torch.float64).tiny))
    return u.to(tall.dtype), s.to(tall.dtype), v.to(tall.dtype)


def _new_directions(block: torch.Tensor, before: list[torch.Tensor]) -> torch.Tensor:
    """An orthonormal basis of what `block`'s columns add to the orthonormal blocks `before`;
    directions below a 1e-4 share of the block's largest column are dropped (once a Krylov space
    stops growing, what is left of a new block is rounding, and a basis of rounding is not
    orthogonal to anything)."""
    scale = float(torch.linalg.vector_norm(block, dim=0).max()) if block.numel() else 0.0
    previous = torch.cat(before, dim=1) if before else None
    if previous is not None:
        for _ in range(2):  # twice: once is not enough in floating point
            block = block - previous @ (previous.T @ block)
    u, s, _ = _tall_svd(block)
    u = u[:, s > 1e-4 * scale]
    if previous is not None and u.shape[1]:  # what rounding left along `before`, out again
        u = _tall_svd(u - previous @ (previous.T @ u))[0]
    return u


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
