"""Shared pieces of Genz's orthant-probability integration (private to ensdiv).

Used by :func:`ensdiv.gdr.orthant_probability` (the metric) and
:func:`ensdiv.diversity.gdr_loss` (the differentiable training estimator), which share the exact
closed forms for M = 2 and 3 (:func:`orthant_closed_form`) and the integration pieces for larger M.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


def orthant_closed_form(corr: Tensor) -> Tensor:
    """P(all z_i > 0) for z ~ N(0, corr), exact, for M = 2 and 3: ``1/4 + asin(c)/(2 pi)`` and
    ``1/8 + (asin c12 + asin c13 + asin c23)/(4 pi)`` (Sheppard). ``corr`` is ``[..., M, M]``;
    the result ``[...]`` is differentiable in it.

    Example:
        >>> float(orthant_closed_form(torch.eye(2)))
        0.25
    """
    m = corr.shape[-1]
    if m == 2:
        return 0.25 + torch.asin(corr[..., 0, 1]) / (2 * math.pi)
    if m == 3:
        asin = (torch.asin(corr[..., 0, 1]) + torch.asin(corr[..., 0, 2])
                + torch.asin(corr[..., 1, 2]))
        return 0.125 + asin / (4 * math.pi)
    raise ValueError(f"closed forms exist for M = 2 and 3 only; got M = {m}")


@lru_cache(maxsize=32)
def sobol_points(dim: int, n: int, seed: int) -> Tensor:
    """``[n, dim]`` scrambled Sobol points in ``[0, 1)``, float64 on CPU (cached; do not mutate)."""
    engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    return engine.draw(n, dtype=torch.float64)


def pivoted_cholesky(c: Tensor, rank_tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gibson-Glasbey-Elston ordered, pivoted Cholesky factor of ``c`` ``[N, M, M]`` (float64).

    At step ``i`` the remaining variable least likely to satisfy ``z_j < 0`` - given the earlier
    ones at their truncated means - goes next; variables whose residual variance is below
    ``rank_tol`` go last with a zero column (they are linear functions of the earlier ones).
    Returns the lower-triangular ``L`` of the permuted matrix, ``[N, M, M]``, ``[N, M]`` flags
    of those dependent rows, and the ``[N, M]`` permutations.
    """
    n, m = c.shape[0], c.shape[-1]
    rows = torch.arange(n, device=c.device)
    a = c.clone()
    chol = torch.zeros_like(c)
    ey = torch.zeros(n, m, dtype=c.dtype, device=c.device)
    dependent = torch.zeros(n, m, dtype=torch.bool, device=c.device)
    perm = torch.arange(m, device=c.device).repeat(n, 1)
    for i in range(m):
        lrest = chol[:, i:, :i]
        var = a.diagonal(dim1=-2, dim2=-1)[:, i:] - (lrest * lrest).sum(-1)
        free = var > rank_tol
        sd = torch.where(free, var, 1.0).sqrt()
        beta = -(lrest * ey[:, None, :i]).sum(-1) / sd
        j = i + torch.where(free, torch.special.ndtr(beta), math.inf).argmin(-1)
        swap = torch.arange(m, device=c.device).repeat(n, 1)
        swap[rows, i] = j
        swap[rows, j] = i
        a = a[rows[:, None, None], swap[:, :, None], swap[:, None, :]]
        chol = chol[rows[:, None], swap]
        perm = perm.gather(1, swap)
        pick = j - i
        free_i, sd_i, beta_i = free[rows, pick], sd[rows, pick], beta[rows, pick]
        dependent[:, i] = ~free_i
        chol[:, i, i] = torch.where(free_i, sd_i, 0.0)
        col = a[:, i + 1 :, i] - (chol[:, i + 1 :, :i] * chol[:, i, None, :i]).sum(-1)
        chol[:, i + 1 :, i] = torch.where(free_i[:, None], col / sd_i[:, None], 0.0)
        # E[w | w < beta] = -phi(beta) / Phi(beta), in logs so deep tails do not give 0/0.
        log_phi = -0.5 * beta_i * beta_i - 0.5 * math.log(2 * math.pi)
        ey[:, i] = torch.where(free_i, -torch.exp(log_phi - torch.special.log_ndtr(beta_i)), 0.0)
    return chol, dependent, perm
