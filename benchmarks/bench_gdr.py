"""``ensdiv.gdr.orthant_probability`` — the GDR of one sample — on 1,024 cosine matrices for
M = 2..16: time, and the largest error against a large reference.

Matrices: cosines of M random 64-dim gradients sharing a common component of random weight
0..2 (the regime GDR meets in practice: 0.07–0.25 on average). M ≤ 3 is a closed form (exact);
for M ≥ 4 the reference is the mean of four 65,536-point runs with other scramblings, on the
first 128 matrices. Goal: error ≤ 1e-3 for M ≤ 16 in well under a second.
"""

import functools

import pytest
import torch

from ensdiv.diversity import pairwise_cosine
from ensdiv.gdr import ORTHANT_POINTS, orthant_probability

from _common import SMOKE, machine

N_MATRICES = 16 if SMOKE else 1024
N_REF = 8 if SMOKE else 128
MS = [2, 4] if SMOKE else [2, 3, 4, 6, 8, 12, 16]


@functools.cache
def matrices(m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(m)
    shared = torch.randn(N_MATRICES, 1, 64, generator=g, dtype=torch.float64)
    weight = 2 * torch.rand(N_MATRICES, 1, 1, generator=g, dtype=torch.float64)
    grads = torch.randn(N_MATRICES, m, 64, generator=g, dtype=torch.float64) + weight * shared
    return pairwise_cosine(grads.transpose(0, 1))


@functools.cache
def reference(m: int) -> torch.Tensor:
    c = matrices(m)[:N_REF]
    if m <= 3:
        return orthant_probability(c)
    points = 4096 if SMOKE else 65_536
    return torch.stack([orthant_probability(c, n_points=points, seed=1000 + s)
                        for s in range(4)]).mean(0)


@pytest.mark.parametrize("n_points", [ORTHANT_POINTS, 1024])
@pytest.mark.parametrize("m", MS)
def test_orthant_probability(benchmark, m, n_points):
    if m <= 3 and n_points != ORTHANT_POINTS:
        pytest.skip("closed form: no points")
    c = matrices(m)
    benchmark.group = "orthant probability, 1,024 matrices"
    p = benchmark.pedantic(orthant_probability, args=(c,), kwargs={"n_points": n_points},
                           rounds=1 if SMOKE else 3, warmup_rounds=0 if SMOKE else 1)
    err = float((p[:N_REF] - reference(m)).abs().max())
    benchmark.extra_info.update(machine("cpu"), bench="orthant", m=m, matrices=N_MATRICES,
                                n_points=n_points if m > 3 else 0, max_error=err,
                                reference_matrices=N_REF, mean_probability=float(p.mean()))
    assert err < 1e-3 or SMOKE, err
