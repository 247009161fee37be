"""Tests for ensdiv.gdr: Gaussian orthant probabilities and the Gradient Diversity Rating."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from ensdiv.diversity import pairwise_cosine
from ensdiv.errors import EnsdivError
from ensdiv.gdr import GDRResult, gdr, orthant_probability, summarize_gdr


def _unit_angles(*degrees: float) -> torch.Tensor:
    """Planar unit gradients at the given angles, as grads [M, 1, 2] (float64)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], -1)[:, None, :]


def _random_cos(m: int, n: int, d: int, seed: int, shared: float = 2.0) -> torch.Tensor:
    """[n, m, m] cosine matrices of random gradients in d dims; a shared component of random
    weight in [0, shared] makes many of them positively correlated."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, n, d, generator=gen, dtype=torch.float64)
    w = torch.rand(1, n, 1, generator=gen, dtype=torch.float64) * shared
    return pairwise_cosine(g + w * torch.randn(1, n, d, generator=gen, dtype=torch.float64))


def _monte_carlo(corr: torch.Tensor, n: int = 10**6, seed: int = 0) -> float:
    """P(z > 0), z ~ N(0, corr), from n seeded samples (works for singular corr too)."""
    gen = torch.Generator().manual_seed(seed)
    evals, evecs = torch.linalg.eigh(corr.to(torch.float64))
    root = evecs * evals.clamp_min(0).sqrt()
    hits = 0
    for _ in range(4):
        z = torch.randn(n // 4, corr.shape[-1], generator=gen, dtype=torch.float64) @ root.T
        hits += int((z > 0).all(-1).sum())
    return hits / n


# ---------------------------------------------------------------- closed forms, M = 1, 2, 3


def test_m1_is_one_half():
    assert orthant_probability(torch.ones(1, 1)).item() == 0.5
    assert orthant_probability(torch.ones(3, 1, 1)).tolist() == [0.5] * 3


@pytest.mark.parametrize(
    ("angle", "expected"),
    [(0.0, 0.5), (90.0, 0.25), (180.0, 0.0), (60.0, 1 / 3), (120.0, 1 / 6), (45.0, 3 / 8)],
)
def test_m2_hand_picked_angles(angle, expected):
    # (pi - theta) / (2 pi): the arc of directions on the positive side of both gradients.
    grads = _unit_angles(0.0, angle)
    assert gdr(grads).item() == pytest.approx(expected, abs=1e-12)
    corr = pairwise_cosine(grads)
    assert orthant_probability(corr).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("grads", "expected"),
    [
        (torch.ones(3, 1, 4, dtype=torch.float64), 0.5),  # parallel
        (torch.eye(3, dtype=torch.float64)[:, None, :], 0.125),  # orthogonal
        (_unit_angles(0.0, 120.0, 240.0), 0.0),  # "Mercedes": nothing fools all three
        (_unit_angles(0.0, 90.0, 180.0), 0.0),  # two opposite members
        (_unit_angles(0.0, 0.0, 90.0), 0.25),  # a duplicate: back to M = 2
    ],
)
def test_m3_hand_picked(grads, expected):
    assert gdr(grads).item() == pytest.approx(expected, abs=1e-12)


def test_m3_matches_formula_on_random_matrices():
    corr = _random_cos(3, 50, 5, seed=1)
    c = corr.numpy()
    expected = 1 / 8 + (np.arcsin(c[:, 0, 1]) + np.arcsin(c[:, 0, 2]) + np.arcsin(c[:, 1, 2])) / (
        4 * np.pi
    )
    np.testing.assert_allclose(orthant_probability(corr).numpy(), expected, atol=1e-12)


# ---------------------------------------------------------------- Genz, M >= 4


@pytest.mark.parametrize("m", [4, 5, 6, 7, 8])
def test_genz_matches_monte_carlo(m):
    # 10^6 samples: Monte Carlo standard error <= 5e-4, so 2e-3 is a 4-sigma band.
    corr = torch.cat([_random_cos(m, 2, 16, seed=10 + m), _random_cos(m, 1, 16, 20 + m, 0.0)])
    got = orthant_probability(corr)
    for k in range(len(corr)):
        assert got[k].item() == pytest.approx(_monte_carlo(corr[k], seed=k), abs=2e-3)


@pytest.mark.parametrize("m", [4, 5, 6])
def test_genz_matches_scipy(m):
    # scipy's mvn cdf is Genz's own Fortran code (randomized lattice rules); at abseps=1e-6
    # it is an independent reference far tighter than our 1e-3 guarantee.
    corr = _random_cos(m, 4, 16, seed=30 + m)
    got = orthant_probability(corr)
    for k in range(len(corr)):
        ref = multivariate_normal.cdf(
            np.zeros(m), cov=corr[k].numpy(), abseps=1e-6, releps=0.0, rng=np.random.default_rng(k)
        )
        assert got[k].item() == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("m", [4, 6, 8])
def test_known_exact_values(m):
    eye = torch.eye(m, dtype=torch.float64)
    # Independent: 2^-M. Equicorrelated with rho = 1/2: 1/(M+1) (exchangeable argument).
    assert orthant_probability(eye).item() == pytest.approx(2.0**-m, abs=1e-6)
    half = 0.5 * eye + 0.5
    assert orthant_probability(half).item() == pytest.approx(1 / (m + 1), abs=1e-5)
    # Regular simplex (cos = -1/(M-1), singular): the gradients sum to zero, so no direction
    # raises all losses.
    simplex = (1 + 1 / (m - 1)) * eye - 1 / (m - 1)
    assert orthant_probability(simplex).item() == pytest.approx(0.0, abs=1e-6)
    assert orthant_probability(torch.ones(m, m)).item() == 0.5


def test_permutation_invariance():
    corr = _random_cos(7, 6, 16, seed=3)
    base = orthant_probability(corr)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        perm = torch.randperm(7, generator=gen)
        permuted = corr[:, perm][:, :, perm]
        torch.testing.assert_close(orthant_probability(permuted), base, atol=1e-4, rtol=0)


def test_batched_equals_one_at_a_time():
    corr = _random_cos(5, 6, 16, seed=5).reshape(2, 3, 5, 5)
    batched = orthant_probability(corr)
    assert batched.shape == (2, 3)
    looped = torch.stack([torch.stack([orthant_probability(c) for c in row]) for row in corr])
    torch.testing.assert_close(batched, looped, atol=1e-12, rtol=0)


@pytest.mark.parametrize("m", [4, 5, 7])
def test_duplicate_member_matches_smaller_ensemble(m):
    gen = torch.Generator().manual_seed(40 + m)
    g = torch.randn(m - 1, 3, 16, generator=gen, dtype=torch.float64) + torch.randn(
        1, 3, 16, generator=gen, dtype=torch.float64
    )
    dup = torch.cat([g, 2.5 * g[1:2]])  # member m-1 is member 1, rescaled: C is singular
    torch.testing.assert_close(gdr(dup), gdr(g), atol=1e-4, rtol=0)
    opposite = torch.cat([g, -g[1:2]])
    torch.testing.assert_close(
        gdr(opposite), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0
    )


@pytest.mark.parametrize(("m", "d"), [(5, 2), (6, 3), (8, 3), (8, 5)])
def test_rank_deficient_matches_monte_carlo(m, d):
    # More members than gradient dimensions: rank(C) = d < M.
    corr = _random_cos(m, 2, d, seed=50 + m + d)
    got = orthant_probability(corr)
    for k in range(len(corr)):
        assert got[k].item() == pytest.approx(_monte_carlo(corr[k], seed=k), abs=2e-3)


def test_deterministic_and_independent_of_global_rng():
    corr = _random_cos(6, 4, 16, seed=6)
    torch.manual_seed(0)
    first = orthant_probability(corr)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    second = orthant_probability(corr)
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)


def test_dtype_follows_input():
    corr = _random_cos(4, 3, 16, seed=7)
    assert orthant_probability(corr).dtype == torch.float64
    out32 = orthant_probability(corr.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), orthant_probability(corr), atol=1e-5, rtol=0)
    assert orthant_probability(corr[:0]).shape == (0,)


@pytest.mark.parametrize(
    "bad",
    [
        torch.ones(3),  # not a matrix
        torch.ones(3, 4),  # not square
        torch.tensor([[1.0, 0.5], [0.2, 1.0]]),  # not symmetric
        torch.tensor([[2.0, 0.5], [0.5, 1.0]]),  # covariance, not correlation
        torch.tensor([[1.0, 1.5], [1.5, 1.0]]),  # |c| > 1
        torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]),
        torch.ones(2, 2, dtype=torch.int64),
    ],
)
def test_invalid_matrix_raises(bad):
    with pytest.raises(EnsdivError):
        orthant_probability(bad)


# ---------------------------------------------------------------- gdr and its summary


def test_gdr_matches_orthant_of_cosines():
    gen = torch.Generator().manual_seed(8)
    for m in (2, 3, 5):
        grads = torch.randn(m, 6, 3, 4, 4, generator=gen)
        expected = orthant_probability(pairwise_cosine(grads.double()))
        got = gdr(grads)
        assert got.shape == (6,) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("m", [2, 3, 4, 6])
def test_gdr_in_range(m):
    gen = torch.Generator().manual_seed(9 + m)
    grads = torch.randn(m, 64, 8, generator=gen) + torch.randn(1, 64, 8, generator=gen)
    values = gdr(grads)
    assert ((values >= 0) & (values <= 0.5)).all()


def test_gdr_nan_for_zero_gradient():
    gen = torch.Generator().manual_seed(11)
    for m in (2, 3, 5):
        grads = torch.randn(m, 4, 7, generator=gen)
        grads[m - 1, 1] = 0.0
        grads[0, 3] = 0.0
        values = gdr(grads)
        assert torch.isnan(values).tolist() == [False, True, False, True]
        keep = [0, 2]
        torch.testing.assert_close(values[keep], gdr(grads[:, keep]))


def test_gdr_tiny_gradient_is_not_zero():
    grads = _unit_angles(0.0, 60.0)
    grads[1] *= 1e-30  # tiny but nonzero: the direction is still defined
    assert gdr(grads).item() == pytest.approx(1 / 3, abs=1e-12)


@pytest.mark.parametrize(
    "bad", [torch.ones(1, 3, 4), torch.ones(4), torch.full((2, 3, 4), float("nan"))]
)
def test_gdr_invalid_raises(bad):
    with pytest.raises(EnsdivError):
        gdr(bad)


def test_gdr_m1_message():
    with pytest.raises(EnsdivError, match="at least 2 members"):
        gdr(torch.ones(1, 3, 4))


def test_summarize_gdr_counts_and_moments():
    values = torch.tensor([0.1, float("nan"), 0.3, 0.2, float("nan"), 0.4], dtype=torch.float64)
    res = summarize_gdr(values)
    used = np.array([0.1, 0.3, 0.2, 0.4])
    assert (res.n_used, res.n_excluded) == (4, 2)
    assert res.mean == pytest.approx(used.mean())
    assert res.sem == pytest.approx(used.std(ddof=1) / 2)
    assert isinstance(res.mean, float) and isinstance(res.n_used, int)


def test_summarize_gdr_edge_cases():
    nothing = summarize_gdr(torch.full((3,), float("nan")))
    assert (nothing.n_used, nothing.n_excluded) == (0, 3)
    assert math.isnan(nothing.mean) and math.isnan(nothing.sem)
    one = summarize_gdr(torch.tensor([0.25]))
    assert (one.mean, one.n_used, one.n_excluded) == (0.25, 1, 0) and math.isnan(one.sem)
    empty = summarize_gdr(torch.zeros(0))
    assert (empty.n_used, empty.n_excluded) == (0, 0)


def test_gdr_result_is_frozen():
    res = GDRResult(mean=0.2, sem=0.01, n_used=10, n_excluded=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.mean = 0.3  # type: ignore[misc]


def test_gradient_diversity_closed_forms_and_exclusions():
    from ensdiv.gdr import gradient_diversity

    # sample 0: orthogonal pair (GDR 1/4, cos 0); sample 1: angle 60° (GDR 1/2 - 60/360 = 1/3,
    # cos 1/2); sample 2: member 1's gradient is zero (excluded from GDR)
    g = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],
                      [[0.0, 2.0], [0.5, 0.75 ** 0.5], [0.0, 0.0]]])
    d = gradient_diversity(g)
    assert d["gdr_n"] == 2 and d["gdr_excluded"] == 1
    assert d["gdr"] == pytest.approx((1 / 4 + 1 / 3) / 2, abs=1e-6)
    assert d["gdr_sem"] == pytest.approx(abs(1 / 3 - 1 / 4) / 2, abs=1e-6)
    cos = torch.nn.functional.cosine_similarity(g[0], g[1], dim=-1, eps=1e-12)
    assert d["mean_cos"] == pytest.approx(float(cos.mean()), abs=1e-6)
