"""Shared pieces of Genz's orthant-probability integration (private to ensdiv).

Used by :func:`ensdiv.gdr.orthant_probability` (the metric) and
:func:`ensdiv.diversity.gdr_loss` (the differentiable training estimator).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


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
