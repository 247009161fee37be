"""TRS (ensdiv/trs.py) against its definition written as a loop of
``torch.autograd.grad(create_graph=True)`` — values and the parameters' gradients."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError
from ensdiv.trs import (
    TRS_SMOOTH,
    TrsLoss,
    similarity,
    smoothness,
    smoothness_pgd,
    trs_loss,
    trs_radius,
)


def _reference(ens, x, y, points, yp, *, lam, smooth):
    """TRS by hand: per-member autograd gradients, |cos| per pair, squared norms."""
    xx = x.clone().requires_grad_(True)
    grads, ces = [], []
    for m in ens.members:
        ce = F.cross_entropy(m(xx), y)
        (g,) = torch.autograd.grad(ce * len(y), xx, create_graph=True)
        grads.append(g.flatten(1))
        ces.append(ce)
    sims = [F.cosine_similarity(grads[i], grads[j], dim=1).abs().mean()
            for i, j in itertools.combinations(range(len(grads)), 2)]
    sim = torch.stack(sims).mean()
    if points is None:
        norms = torch.stack([g.pow(2).sum(1) for g in grads])
    else:
        half = len(y) - len(yp)
        pp = points.clone().requires_grad_(True)
        moved = []
        for m in ens.members:
            (g,) = torch.autograd.grad(F.cross_entropy(m(pp), yp, reduction="sum"), pp,
                                       create_graph=True)
            moved.append(g.flatten(1))
        norms = torch.stack([torch.cat([a[:half], b]).pow(2).sum(1)
                             for a, b in zip(grads, moved, strict=True)])
    return torch.stack(ces).sum() + lam * sim + smooth * norms.mean()


@pytest.mark.parametrize("members", [2, 3, 5])
def test_trs_loss_equals_its_definition_values_and_parameter_gradients(members):
    torch.manual_seed(0)
    ens = Ensemble.build("cnn", members, in_shape=(1, 8, 8), num_classes=10, seed=1)
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    loss, stats = trs_loss(ens, x, y, lam=3.0, smooth=0.5, eps=0.0)
    want = _reference(ens, x, y, None, None, lam=3.0, smooth=0.5)
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, list(ens.parameters()))
    ref = torch.autograd.grad(want, list(ens.parameters()))
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert 0 <= float(stats["trs_similarity"]) <= 1 and float(stats["trs_smoothness"]) > 0


def test_trs_loss_with_smoothness_points_equals_its_definition():
    ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=2)
    x, y = torch.rand(7, 1, 8, 8), torch.arange(7)
    torch.manual_seed(5)
    loss, _ = trs_loss(ens, x, y, lam=2.0, smooth=0.3, eps=0.1, steps=3)
    torch.manual_seed(5)  # the same random start
    points = smoothness_pgd(ens, x[3:], y[3:], eps=0.1, steps=3)
    want = _reference(ens, x, y, points, y[3:], lam=2.0, smooth=0.3)
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, list(ens.parameters()))
    ref = torch.autograd.grad(want, list(ens.parameters()))
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_similarity_and_smoothness_closed_forms():
    g = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 3.0], [0.0, -1.0]]])  # M=2, B=2
    # sample 0: orthogonal (|cos| 0); sample 1: opposite (|cos| 1, GAL would reward it)
    assert float(similarity(g)) == pytest.approx(0.5)
    assert float(smoothness(g)) == pytest.approx((1 + 4 + 9 + 1) / 4)
    with pytest.raises(EnsdivError, match="at least 2 members"):
        similarity(g[:1])


def test_smoothness_pgd_stays_in_the_ball_and_raises_the_gradient_norm():
    ens = Ensemble.build("cnn", 3, in_shape=(1, 8, 8), num_classes=10, seed=0)
    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    z = smoothness_pgd(ens, x, y, eps=0.1, steps=6)
    assert float((z - x).abs().max()) <= 0.1 + 1e-6 and z.min() >= 0 and z.max() <= 1

    def norm(points):
        pp = points.clone().requires_grad_(True)
        total = 0.0
        for m in ens.members:
            (g,) = torch.autograd.grad(F.cross_entropy(m(pp), y, reduction="sum"), pp)
            total += float(g.pow(2).sum())
        return total

    noise = (x + torch.empty_like(x).uniform_(-0.1, 0.1)).clamp(0, 1)
    assert norm(z) > 1.2 * max(norm(x), norm(noise))  # ascent, not the random start


def test_radius_schedule_and_loss_object():
    assert trs_radius(1, 10) == pytest.approx(0.1)  # the authors' 0.1 → 0.2
    assert trs_radius(10, 10) == pytest.approx(0.19)
    assert trs_radius(3, 4, eps=0.2, eps_start=0.0) == pytest.approx(0.1)
    loss_fn = TrsLoss(eps=0.0)
    loss_fn.set_epoch(5, 5)
    assert loss_fn.radius == 0.0 and loss_fn.smooth == TRS_SMOOTH
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
    loss, stats = TrsLoss(eps=0.2, steps=1)(ens, torch.rand(4, 1, 8, 8), torch.arange(4))
    assert float(stats["trs_radius"]) == pytest.approx(0.1) and torch.isfinite(loss)


@pytest.mark.parametrize("kwargs,message", [
    ({"lam": -1.0}, "lam must be >= 0"),
    ({"smooth": float("nan")}, "TRS smoothness weight must be a finite number"),
    ({"eps": 1.5}, "TRS eps must be at most 1"),
    ({"eps": 0.1, "eps_start": 0.2}, "TRS eps start 0.2 is larger than TRS eps 0.1"),
    ({"steps": 0}, "TRS steps must be >= 1"),
])
def test_bad_hyper_parameters_are_one_line(kwargs, message):
    with pytest.raises(EnsdivError, match=message):
        TrsLoss(**kwargs)


def test_one_member_is_refused():
    ens = Ensemble.build("mlp", 1, in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(EnsdivError, match="TRS needs at least 2 members"):
        trs_loss(ens, torch.rand(2, 1, 8, 8), torch.arange(2))
