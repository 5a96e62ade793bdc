"""The SVD building blocks of extract and resize: accuracy against a full SVD, determinism, the
dynamic-rank rules on planted spectra, and kohya's clamp without torch.quantile's size limit."""

from __future__ import annotations

import math

import pytest
import torch

from loratool.ops.lowrank import best_rank, core_svd
from loratool.ops.svd import (
    EXACT_BELOW,
    balanced_factors,
    clamp_quantile,
    dynamic_rank,
    exact_svd,
    parse_dynamic,
    randomized_svd,
    rebalance,
    residual_energy,
)


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, s.numel(), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, s.numel(), generator=g, dtype=torch.float64)).Q
    return ((u * s.double()) @ v.T).float()


def optimal_error(matrix: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(matrix.double())
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def measured_error(matrix: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    d = matrix.double()
    return float((d - up.double() @ down.double()).norm() / d.norm())


def planted_plus_noise(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, 5, generator=g) @ torch.randn(5, n, generator=g)
    return low + 0.05 * torch.randn(m, n, generator=g)


SPECTRA = {
    "planted+noise": lambda: planted_plus_noise(300, 200),
    "slow decay": lambda: with_spectrum(300, 200, torch.arange(1, 201, dtype=torch.float64) ** -0.5),
    "flat": lambda: with_spectrum(250, 240, torch.ones(240, dtype=torch.float64)),
    "power law": lambda: with_spectrum(400, 180, torch.arange(1, 181, dtype=torch.float64) ** -1.0),
    "wide": lambda: planted_plus_noise(120, 500, seed=3),
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("rank", [1, 8, 16])
def test_randomized_error_is_within_a_thousandth_of_optimal(name, rank):
    matrix = SPECTRA[name]()
    t = randomized_svd(matrix, rank, seed=7, exact_below=0)
    assert t.sweeps >= 1  # the randomized path, not the exact fallback
    up, down = balanced_factors(t, rank)
    got = measured_error(matrix, up, down)
    assert got <= 1.001 * optimal_error(matrix, rank) + 1e-7
    assert t.relative_error(rank) == pytest.approx(got, rel=1e-3, abs=1e-6)
    assert t.retained(rank) == pytest.approx(1 - got**2, abs=1e-5)


def test_exactly_low_rank_is_recovered():
    g = torch.Generator().manual_seed(1)
    matrix = torch.randn(200, 4, generator=g) @ torch.randn(4, 150, generator=g)
    up, down = balanced_factors(randomized_svd(matrix, 4, seed=0, exact_below=0), 4)
    assert measured_error(matrix, up, down) < 1e-5


@pytest.mark.parametrize("true_rank", [0, 3, 9])
def test_a_rank_above_the_matrix_s_own_is_still_orthonormal_and_exact(true_rank):
    """The Krylov space stops growing at the matrix's rank: the missing directions are filled in
    and the factors still hold the matrix exactly, with orthonormal singular vectors."""
    g = torch.Generator().manual_seed(2)
    matrix = torch.randn(900, true_rank, generator=g) @ torch.randn(true_rank, 800, generator=g)
    t = randomized_svd(matrix, 12, seed=0, exact_below=0)
    assert t.u.shape == (900, 12) and t.vh.shape == (12, 800) and t.s.shape == (12,)
    assert torch.allclose(t.u.T @ t.u, torch.eye(12), atol=1e-5)
    assert torch.allclose(t.vh @ t.vh.T, torch.eye(12), atol=1e-5)
    up, down = balanced_factors(t, 12)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    assert float((matrix - up @ down).norm()) <= 1e-5 * max(1.0, float(matrix.norm()))


def test_randomized_is_deterministic_per_seed():
    matrix = planted_plus_noise(300, 200)
    a, b = randomized_svd(matrix, 8, seed=5, exact_below=0), randomized_svd(matrix, 8, seed=5, exact_below=0)
    assert torch.equal(a.u, b.u) and torch.equal(a.s, b.s) and torch.equal(a.vh, b.vh)
    c = randomized_svd(matrix, 8, seed=6, exact_below=0)
    assert not torch.equal(a.u, c.u)


def test_small_matrices_take_the_exact_path():
    assert randomized_svd(planted_plus_noise(300, EXACT_BELOW), 8, seed=0).sweeps == 0
    assert randomized_svd(planted_plus_noise(300, EXACT_BELOW + 1), 8, seed=0).sweeps >= 1
    matrix = planted_plus_noise(80, 70)
    t = randomized_svd(matrix, 8, seed=0, exact_below=0)  # the Krylov space would be as wide as the matrix
    assert t.sweeps == 0
    up, down = balanced_factors(t, 8)
    assert measured_error(matrix, up, down) == pytest.approx(optimal_error(matrix, 8), rel=1e-5)


def test_balanced_factors_split_the_singular_values_evenly():
    t = exact_svd(planted_plus_noise(60, 50), 6)
    up, down = balanced_factors(t, 6)
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(up.norm(dim=0).square(), t.s[:6], rtol=1e-5, atol=0)


# -- dynamic rank rules ----------------------------------------------------------------------------
S = torch.tensor([10.0, 8.0, 6.0, 0.5, 0.05, 0.01])


@pytest.mark.parametrize(
    ("method", "value", "want"),
    [
        ("ratio", 10.0, 3),  # keep S_i >= 1
        ("ratio", 100.0, 4),  # keep S_i >= 0.1
        ("ratio", 1.0, 1),  # only S_0 itself
        ("ratio", 2000.0, 6),
        ("eps", 0.5, 3),  # S_i > 0.5, strictly
        ("eps", 0.4, 4),
        ("eps", 100.0, 1),  # nothing above: still rank 1, never 0
        ("cumulative", 24 / 24.56, 3),  # exactly reaches the sum of the top 3
        ("cumulative", 0.5, 2),
        ("fro", 0.99, 3),
        ("fro", 0.5, 1),  # a dynamic rank of 1 (kohya's rule cannot go below 2)
        ("fro", 1.0, 6),
    ],
)
def test_dynamic_rank_rules(method, value, want):
    assert dynamic_rank(S, method, value) == want


def test_fro_uses_the_whole_matrix_energy_when_given():
    # Only the top 3 of a spectrum are known; the rest of the energy counts against the share.
    top = torch.tensor([3.0, 2.0, 1.0])
    assert dynamic_rank(top, "fro", 0.9) == 2  # of 14: sqrt(13/14) = 0.96
    assert dynamic_rank(top, "fro", 0.9, energy=20.0) == 3  # of 20: sqrt(13/20) = 0.81 < 0.9 -> capped at 3


def test_zero_spectrum_gives_rank_one():
    assert dynamic_rank(torch.zeros(4), "fro", 0.9) == 1


@pytest.mark.parametrize(
    "spec", ["fro", "fro:", "frob:0.9", "fro:abc", "fro:0", "fro:-1", "fro:1.5", "cumulative:2", "ratio:0.5", "eps:nan"]
)
def test_bad_dynamic_specs_are_refused(spec):
    with pytest.raises(ValueError):
        parse_dynamic(spec)


def test_dynamic_spec_parses():
    assert parse_dynamic("ratio:20") == ("ratio", 20.0)
    assert parse_dynamic("eps:1e-3") == ("eps", 1e-3)


# -- kohya's clamp ---------------------------------------------------------------------------------
def test_clamp_matches_kohyas_rule_on_a_small_module():
    matrix = planted_plus_noise(80, 60)
    t = exact_svd(matrix, 8)
    up, down = clamp_quantile(*balanced_factors(t, 8), 0.99)
    # kohya: U = U @ diag(S), then both clamped to +-(the 0.99 quantile of their values together).
    u, vh = t.u * t.s[:8], t.vh
    limit = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), 0.99)
    want = u.clamp(-limit, limit) @ vh.clamp(-limit, limit)
    # An entry right at the limit may fall either side of it by rounding: compare loosely.
    torch.testing.assert_close(up @ down, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(up @ down, u @ vh)  # the clamp did bite


def test_clamp_has_no_size_limit():
    n = (1 << 24) // 4 + 1  # up and down together: above torch.quantile's 2^24 elements
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(n, 2, generator=g), torch.randn(2, n, generator=g)
    with pytest.raises(RuntimeError):
        torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)
    new_up, new_down = clamp_quantile(up, down, 0.99)
    assert torch.isfinite(new_up).all() and torch.isfinite(new_down).all()


def test_rebalance_keeps_the_product():
    g = torch.Generator().manual_seed(2)
    up, down = torch.randn(30, 4, generator=g) * 100, torch.randn(4, 20, generator=g) / 100
    new_up, new_down = rebalance(up, down)
    torch.testing.assert_close(new_up @ new_down, up @ down, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_up.norm(dim=0), new_down.norm(dim=1), rtol=1e-5, atol=0)


# -- the QR core of resize and combine ----------------------------------------------------------------
def test_core_svd_gives_the_spectrum_and_the_optimal_truncation():
    g = torch.Generator().manual_seed(4)
    up, down = torch.randn(90, 12, generator=g), torch.randn(12, 70, generator=g)
    core = core_svd(up, down)
    dense = up.double() @ down.double()
    torch.testing.assert_close(core.s, torch.linalg.svdvals(dense)[:12], rtol=1e-9, atol=1e-9)
    new_up, new_down = best_rank(up, down, 5)
    got = float((dense - new_up.double() @ new_down.double()).norm() / dense.norm())
    assert got == pytest.approx(float(core.s[5:].square().sum().sqrt() / core.s.square().sum().sqrt()), rel=1e-5)
    assert math.isclose(float(new_up.norm(dim=0)[0]), float(new_down.norm(dim=1)[0]), rel_tol=1e-5)


def test_residual_energy_from_thin_products():
    matrix = planted_plus_noise(90, 70)
    g = torch.Generator().manual_seed(9)
    up, down = torch.randn(90, 5, generator=g), torch.randn(5, 70, generator=g)
    want = float((matrix.double() - up.double() @ down.double()).square().sum())
    assert residual_energy(matrix, up, down) == pytest.approx(want, rel=1e-5)
