"""ensdiv.stats against numpy and scipy."""

import math

import numpy as np

from ensdiv.stats import binomial_se, mean_and_se, spearman


def test_mean_se_matches_numpy_and_skips_undefined():
    from ensdiv.stats import mean_se

    assert mean_se([0.25, 0.27]) == "0.260 ± 0.010"  # std(ddof=1) 0.01414 / √2
    assert mean_se([0.1, None, float("nan")]) == "0.100"
    assert mean_se([None]) == "—" and mean_se([]) == "—"
    assert mean_se([1.0, 2.0, 3.0], digits=1) == "2.0 ± 0.6"


def test_binomial_se_matches_scipy():
    import math

    from scipy.stats import binom


    for p, n in [(0.1, 250), (0.5, 500), (0.97, 40), (0.0, 10)]:
        assert math.isclose(binomial_se(p, n), binom.std(n, p) / n, rel_tol=1e-12, abs_tol=0)
    assert math.isnan(binomial_se(0.3, 0)) and math.isnan(binomial_se(math.nan, 10))


def test_mean_and_se_is_numpys():
    v = [0.3, 0.1, 0.25, 0.7]
    mean, se = mean_and_se([*v, None, float("nan")])
    assert math.isclose(mean, np.mean(v)) and math.isclose(se, np.std(v, ddof=1) / 2)
    assert math.isnan(mean_and_se([0.4])[1]) and all(map(math.isnan, mean_and_se([])))


def test_spearman_is_pearson_of_ranks_and_nan_where_undefined():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    b[:10] += 2 * a[:10]
    ra, rb = a.argsort().argsort(), b.argsort().argsort()  # no ties: ranks are a permutation
    rho, p = spearman(a, b)
    assert math.isclose(rho, np.corrcoef(ra, rb)[0, 1], rel_tol=1e-12) and 0 < p < 1
    assert all(map(math.isnan, spearman([1, 2], [2, 1])))  # fewer than 3 pairs
    assert all(map(math.isnan, spearman([1, 2, 3], [5, 5, 5])))  # a constant series
