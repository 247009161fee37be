"""Tests for ensdiv.diversity: pairwise cosines and the cos / GAL / GDR training losses."""

import itertools
import math

import numpy as np
import pytest
import torch

from ensdiv.diversity import (
    DIVERSITY_LOSSES,
    cosine_loss,
    gal_loss,
    gdr_loss,
    pairwise_cosine,
)
from ensdiv.errors import EnsdivError
from ensdiv.gdr import orthant_probability

LOSSES = [cosine_loss, gal_loss, gdr_loss]


def _grads(m: int, b: int, *feat: int, seed: int, dtype=torch.float64, shared: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, b, *feat, generator=gen, dtype=dtype)
    return g + shared * torch.randn(1, b, *feat, generator=gen, dtype=dtype)


def _numpy_cos(grads: torch.Tensor) -> np.ndarray:
    g = grads.detach().double().numpy()
    m, b = g.shape[:2]
    out = np.zeros((b, m, m))
    for k in range(b):
        for i in range(m):
            for j in range(m):
                u, v = g[i, k].ravel(), g[j, k].ravel()
                out[k, i, j] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return out


# ---------------------------------------------------------------- pairwise_cosine


@pytest.mark.parametrize("feat", [(), (5,), (3, 4, 4)])
def test_pairwise_cosine_matches_numpy_loop(feat):
    grads = _grads(4, 3, *feat, seed=1)
    got = pairwise_cosine(grads)
    assert got.shape == (3, 4, 4) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), _numpy_cos(grads), atol=1e-12)


def test_pairwise_cosine_float32_and_scale_invariance():
    grads = _grads(3, 5, 7, seed=2, dtype=torch.float32)
    got = pairwise_cosine(grads)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _numpy_cos(grads), atol=1e-6)
    scaled = grads * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    torch.testing.assert_close(pairwise_cosine(scaled), got, atol=1e-6, rtol=0)


def test_pairwise_cosine_zero_member_is_finite_with_zero_row():
    grads = _grads(3, 2, 6, seed=3).requires_grad_()
    masked = grads * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)[:, None, None]
    cos = pairwise_cosine(masked)
    assert torch.isfinite(cos).all()
    assert (cos[:, 1, :] == 0).all() and (cos[:, :, 1] == 0).all()
    cos.sum().backward()
    assert torch.isfinite(grads.grad).all()
    assert (grads.grad[1] == 0).all()


def test_pairwise_cosine_rejects_one_dim():
    with pytest.raises(EnsdivError):
        pairwise_cosine(torch.ones(3))


# ---------------------------------------------------------------- losses vs explicit loops


def test_cosine_and_gal_match_loops():
    grads = _grads(4, 5, 3, 2, seed=4)
    cos = _numpy_cos(grads)
    pairs = list(itertools.combinations(range(4), 2))
    mean_cos = np.mean([np.mean([cos[k, a, b] for a, b in pairs]) for k in range(5)])
    gal = np.mean([math.log(sum(math.exp(cos[k, a, b]) for a, b in pairs)) for k in range(5)])
    assert cosine_loss(grads).item() == pytest.approx(mean_cos, abs=1e-12)
    assert gal_loss(grads).item() == pytest.approx(gal, abs=1e-12)


def test_loss_values_at_parallel_gradients():
    grads = torch.ones(3, 2, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    assert cosine_loss(grads).item() == pytest.approx(1.0)
    assert gal_loss(grads).item() == pytest.approx(math.log(3 * math.e))
    assert gdr_loss(grads).item() == pytest.approx(0.5, abs=5e-4)


@pytest.mark.parametrize("m", [2, 3])
def test_gdr_loss_closed_form_equals_orthant_mean(m):
    grads = _grads(m, 16, 10, seed=5 + m)
    expected = orthant_probability(pairwise_cosine(grads)).mean()
    assert gdr_loss(grads).item() == pytest.approx(expected.item(), abs=1e-6)
    # Near-parallel: the shrink toward I costs at most ~sqrt(2e-6)/(2 pi) per pair.
    near = grads[:1] + 1e-5 * grads
    expected = orthant_probability(pairwise_cosine(near)).mean()
    assert gdr_loss(near).item() == pytest.approx(expected.item(), abs=5e-4)


@pytest.mark.parametrize("m", [4, 5, 6, 7, 8])
def test_gdr_loss_genz_close_to_orthant(m):
    # Measured (docstring): per-sample error <= 4e-4 for M <= 8; the batch mean is tighter.
    grads = _grads(m, 24, 16, seed=10 + m, shared=1.5)
    exact = orthant_probability(pairwise_cosine(grads))
    assert gdr_loss(grads).item() == pytest.approx(exact.mean().item(), abs=2e-4)
    for k in range(4):
        assert gdr_loss(grads[:, k : k + 1]).item() == pytest.approx(exact[k].item(), abs=1e-3)


def test_gdr_loss_deterministic_and_dtype():
    grads = _grads(5, 4, 6, seed=20, dtype=torch.float32)
    torch.manual_seed(0)
    first = gdr_loss(grads)
    torch.manual_seed(1)
    assert torch.equal(first, gdr_loss(grads))
    assert first.dtype == torch.float32 and first.shape == ()


# ---------------------------------------------------------------- degenerate input


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("m", [2, 3, 5])
def test_zero_and_tiny_gradients_are_finite(loss, m):
    grads = _grads(m, 4, 6, seed=30 + m)
    grads[0, 0] = 0.0  # one member zero at sample 0
    grads[:, 1] = 0.0  # every member zero at sample 1
    grads[1, 2] *= 1e-20  # tiny but nonzero
    grads[:, 3] = grads[0, 3]  # all members identical (cos = 1, the edge of asin)
    grads.requires_grad_()
    value = loss(grads)
    (grad,) = torch.autograd.grad(value, grads)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


@pytest.mark.parametrize("loss", LOSSES)
def test_all_zero_float32(loss):
    grads = torch.zeros(4, 3, 5, requires_grad=True)
    value = loss(grads)
    (grad,) = torch.autograd.grad(value, grads)
    assert torch.isfinite(value) and (grad == 0).all()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "bad", [torch.ones(1, 3, 4), torch.ones(5), torch.ones(3, 0, 4)], ids=["m1", "1d", "empty"]
)
def test_invalid_input_raises(loss, bad):
    with pytest.raises(EnsdivError):
        loss(bad)


@pytest.mark.parametrize("loss", LOSSES)
def test_single_member_message(loss):
    with pytest.raises(EnsdivError, match="diversity needs at least 2 members"):
        loss(torch.ones(1, 3, 4))


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize(
    ("loss", "m"),
    [(cosine_loss, 3), (gal_loss, 4), (gdr_loss, 2), (gdr_loss, 3), (gdr_loss, 4), (gdr_loss, 5)],
)
def test_gradcheck(loss, m):
    grads = _grads(m, 2, 3, seed=40 + m).requires_grad_()
    assert torch.autograd.gradcheck(loss, (grads,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("loss", "m"), [(cosine_loss, 3), (gal_loss, 3), (gdr_loss, 3), (gdr_loss, 4)]
)
def test_gradgradcheck(loss, m):
    grads = _grads(m, 1, 3, seed=50 + m).requires_grad_()
    assert torch.autograd.gradgradcheck(loss, (grads,), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("name", ["cos", "gal", "gdr"])
def test_second_order_flows_into_weights(name):
    # The training use: input gradients with create_graph=True, penalty back into the weights.
    gen = torch.Generator().manual_seed(60)
    members = [torch.nn.Linear(6, 3) for _ in range(4)]
    x = torch.randn(5, 6, generator=gen, requires_grad=True)
    y = torch.randint(0, 3, (5,), generator=gen)
    grads = torch.stack(
        [
            torch.autograd.grad(
                torch.nn.functional.cross_entropy(torch.tanh(net(x)), y), x, create_graph=True
            )[0]
            for net in members
        ]
    )
    DIVERSITY_LOSSES[name](grads).backward()
    for net in members:
        assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()
        assert net.weight.grad.abs().sum() > 0


def test_registry():
    assert DIVERSITY_LOSSES == {"cos": cosine_loss, "gal": gal_loss, "gdr": gdr_loss}
