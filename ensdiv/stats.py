"""The few statistics every table and card states: a mean with its standard error, a binomial
standard error, Spearman's ρ — and how a number with its standard error is written.

Undefined is NaN, never an error: a mean of nothing, a standard error of one value, a rate over
zero inputs or a correlation of a constant series.

Example:
    >>> mean_se([0.25, 0.27]), round(binomial_se(0.5, 100), 3)
    ('0.260 ± 0.010', 0.05)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats


def number(v: Any) -> float:
    """A record's number; ``null`` (None) is NaN.

    Example:
        >>> number(None), number(0.5)
        (nan, 0.5)
    """
    return math.nan if v is None else float(v)


def mean_and_se(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and standard error (std with ddof 1 over √n) of the defined values; NaN for what
    they do not define (no value: both; one value: the standard error).

    Example:
        >>> [round(v, 3) for v in mean_and_se([0.25, 0.27, None])], mean_and_se([0.5])
        ([0.26, 0.01], (0.5, nan))
    """
    v = np.array([number(x) for x in values], dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, math.nan
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return float(v.mean()), se


def mean_se(values: Sequence[float | None], digits: int = 3) -> str:
    """``mean ± standard error`` (:func:`mean_and_se`) of the defined values; "—" if none.

    Example:
        >>> mean_se([0.5]), mean_se([None])
        ('0.500', '—')
    """
    mean, se = mean_and_se(values)
    if math.isnan(mean):
        return "—"
    if math.isnan(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def binomial_se(p: float, n: int) -> float:
    """Binomial standard error √(p(1 − p)/n) of a proportion ``p`` measured on ``n`` inputs;
    NaN when ``n`` is 0 or ``p`` is undefined.

    Example:
        >>> round(binomial_se(0.5, 100), 3), binomial_se(0.5, 0)
        (0.05, nan)
    """
    return math.sqrt(p * (1 - p) / n) if n and math.isfinite(p) else math.nan


def spearman(a: Sequence[float] | np.ndarray,
             b: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Spearman's rank correlation ρ of two paired series and its two-sided p-value (scipy's
    ``spearmanr``); both NaN with fewer than 3 pairs or a constant series.

    Example:
        >>> round(spearman([1, 2, 3, 4], [1, 3, 2, 4])[0], 12)
        0.8
        >>> spearman([1, 2], [2, 1])
        (nan, nan)
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    res = stats.spearmanr(a, b)
    return float(res.statistic), float(res.pvalue)
