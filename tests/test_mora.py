import copy

import pytest
import torch
from torch import nn

from ensdiv._mora import MORA_MIX, member_weights, mora_loss
from ensdiv.aggregation import AGGREGATIONS, Aggregated
from ensdiv.attacks import apgd, mora, pgd
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError
from ensdiv.models import build_model


def _identical(m=3, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    member = build_model("cnn", in_shape=(1, 8, 8), num_classes=10).to(dtype).eval()
    return member, Ensemble([member] + [copy.deepcopy(member) for _ in range(m - 1)]).eval()


class _MarginScaled(nn.Module):
    """A member whose logits are divided by their (constant) top-1 − top-2 margin."""

    def __init__(self, member):
        super().__init__()
        self.member, self.in_shape = member, member.in_shape

    def forward(self, x):
        z = self.member(x)
        top = z.detach().topk(2, dim=1).values
        return z / (top[:, 0] - top[:, 1]).clamp_min(1e-6)[:, None]


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.8)])
def test_identical_members_make_mora_exactly_apgd(norm, eps):
    # float64: the two losses are the same function written two ways, so their gradients differ
    # by round-off (~1e-16 relative here, ~1e-7 in float32). An L∞ step takes the gradient's
    # sign, which round-off flips only on a component within that relative distance of zero:
    # of the ~10^5 components a run visits, one lands there with chance ~10^5 × 1e-7 = 1e-2 in
    # float32 (on some CPU, a different path from then on) and ~10^5 × 1e-16 = 1e-11 in
    # float64, so there the L∞ paths agree bit for bit. L2 steps follow the gradient's
    # direction, so round-off shows in the iterates: 1e-10 is ~1e6 units of float64 round-off
    # on pixels ≤ 1 over 15 steps, far below any real difference between two attacks (≥ 1e-3).
    member, ens = _identical(dtype=torch.float64)
    x = torch.rand(48, 1, 8, 8, dtype=torch.float64)
    y = ens.predict(x)
    # unnormalised: every mixing weight gives the averaged output's loss, so MORA is APGD-CE
    # with one restart per mixing weight
    plain, s_plain = apgd(ens, x, y, eps=eps, norm=norm, steps=15, restarts=len(MORA_MIX),
                          return_steps=True)
    ours, s_ours = mora(ens, x, y, eps=eps, norm=norm, steps=15, normalize=False,
                        return_steps=True)
    same = torch.equal if norm == "linf" else lambda a, b: torch.allclose(a, b, rtol=0,
                                                                          atol=1e-10)
    assert same(plain, ours) and torch.equal(s_plain, s_ours)
    assert 0 < int((s_ours >= 0).sum()) < len(y)  # a regime where the trajectory matters
    # normalised: APGD-CE on the margin-scaled member
    scaled = apgd(_MarginScaled(member), x, y, eps=eps, norm=norm, steps=15,
                  restarts=len(MORA_MIX))
    assert same(scaled, mora(ens, x, y, eps=eps, norm=norm, steps=15))


def test_loss_and_weights_follow_the_formula():
    z = torch.randn(3, 5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    p = z.softmax(-1)
    p_bar = p.mean(0)
    for b in range(5):
        others = [k for k in range(4) if k != int(y[b])]
        c = max(others, key=lambda k: float(p_bar[b, k]))
        for i in range(3):
            want = p[i, b, c] * (p[i, b, y[b]] / p_bar[b, y[b]] + (1 - p[i, b, c]) / p_bar[b, c])
            torch.testing.assert_close(member_weights(z, y)[i, b], want)
    # the loss with s = 1 and only correct members, unnormalised, by hand
    w = member_weights(z, y) * (z.argmax(-1) == y).double()
    mixed = (w[..., None] * z).sum(0) / w.sum(0)[:, None]
    has = w.sum(0) > 0
    want = torch.nn.functional.cross_entropy(mixed, y, reduction="none")
    got = mora_loss(z, y, s=1.0, normalize=False)
    torch.testing.assert_close(got[has], want[has])
    # inputs with no correct member fall back to the averaged output
    avg = torch.nn.functional.cross_entropy(torch.log(p_bar), y, reduction="none")
    torch.testing.assert_close(got[~has], avg[~has])


@pytest.mark.parametrize("rule", AGGREGATIONS)
@pytest.mark.parametrize("norm, eps", [("linf", 0.07), ("l2", 0.5)])
def test_stays_in_the_ball_and_in_the_box(rule, norm, eps):
    ens = Ensemble.build("cnn", 3, in_shape=(1, 8, 8), num_classes=10, seed=2).eval()
    x = torch.rand(20, 1, 8, 8)
    x[:4] = 0.0  # on the box's corner
    y = torch.randint(0, 10, (20,))
    x_adv, first = mora(ens, x, y, eps=eps, norm=norm, steps=6, aggregation=rule,
                        return_steps=True)
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((size <= eps + 1e-5).all()) and x_adv.min() >= 0 and x_adv.max() <= 1
    fooled = Aggregated(ens, rule).predict(x_adv) != y
    assert torch.equal(first >= 0, fooled)  # success judged on the rule itself


def test_beats_pgd_on_a_diverse_ensemble_at_equal_iterations(digits_gal_ensemble):
    ens, x, y = digits_gal_ensemble

    def success(x_adv):
        return float((ens.predict(x_adv) != y).float().mean())

    eps = 0.1
    base = success(pgd(ens, x, y, eps=eps, steps=100, generator=torch.Generator().manual_seed(0)))
    assert 0.2 < base < 0.9  # a regime where strength shows
    # 5 mixing weights × 20 iterations = 100 iterations; and one weight × 100
    assert success(mora(ens, x, y, eps=eps, steps=20)) >= base
    assert success(mora(ens, x, y, eps=eps, steps=100, mix=(0.5,))) >= base


def test_zero_eps_and_misclassified_inputs_are_left_alone():
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10).eval()
    x = torch.rand(6, 1, 8, 8)
    y = ens.predict(x)
    assert torch.equal(mora(ens, x, y, eps=0.0), x)
    wrong = (y + 1) % 10
    assert torch.equal(mora(ens, x, wrong, eps=0.3, steps=3), x)


def test_a_single_network_is_a_one_member_ensemble():
    net = build_model("mlp", in_shape=(1, 8, 8), num_classes=10).eval()
    x = torch.rand(8, 1, 8, 8)
    y = net(x).argmax(1)
    assert mora(net, x, y, eps=0.1, steps=4).shape == x.shape


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": -0.1}, "eps"),
    ({"eps": 0.1, "norm": "l1"}, "unknown norm"),
    ({"eps": 0.1, "steps": 0}, "steps"),
    ({"eps": 0.1, "aggregation": "max"}, "unknown aggregation rule"),
    ({"eps": 0.1, "stand_in": "vote"}, "stand-in"),
    ({"eps": 0.1, "mix": ()}, "mix"),
    ({"eps": 0.1, "mix": (0.5, 2.0)}, "mix"),
    ({"eps": 0.1, "temperature": 0.0}, "temperature"),
    ({"eps": 0.1, "seed": -1}, "seed"),
])
def test_bad_arguments_are_one_clear_error(kwargs, match):
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10).eval()
    with pytest.raises(EnsdivError, match=match):
        mora(ens, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), **kwargs)
