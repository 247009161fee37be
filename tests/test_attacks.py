import math

import pytest
import torch
import torchattacks
from torch import nn

from ensdiv.attacks import ATTACKS, apgd, apgd_checkpoints, dlr_loss, fgsm, mifgsm, pgd
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two shared cores: intra-op threads only fight each other on these tiny models.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LinearBinary(nn.Module):
    """Logits (f, -f) with f = w·x + b: the decision boundary is the hyperplane f = 0."""

    def __init__(self, w, b):
        super().__init__()
        self.lin = nn.Linear(w.numel(), 1)
        with torch.no_grad():
            self.lin.weight.copy_(w[None])
            self.lin.bias.fill_(b)

    def forward(self, x):
        f = self.lin(x.flatten(1))
        return torch.cat([f, -f], dim=1)


def linear_case(seed, n=400, shape=(1, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    w = torch.randn(d, generator=g)
    b = -0.5 * w.sum().item()  # boundary through the cube's centre
    model = LinearBinary(w, b)
    # Inside [0.3, 0.7]: no eps below 0.3 lets clipping to [0, 1] interfere.
    x = 0.3 + 0.4 * torch.rand(n, *shape, generator=g)
    with torch.no_grad():
        f = model.lin(x.flatten(1)).squeeze(1)
    pred = (f < 0).long()
    y = pred.clone()
    y[:20] = 1 - y[:20]  # a few misclassified samples: already "fooled", must stay so
    dist = {"linf": f.abs() / w.abs().sum(), "l2": f.abs() / w.norm()}
    return model, x, y, dist


def check_ball(x_adv, x, eps, norm):
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps + 1e-5).all())
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad


@pytest.mark.parametrize(
    "attack, norm, eps, random_start",
    [("pgd", "linf", 0.03, True), ("pgd", "linf", 0.03, False), ("pgd", "l2", 0.1, True),
     ("pgd", "l2", 0.1, False), ("fgsm", "linf", 0.03, False)],
)
def test_linear_model_exact_boundary(attack, norm, eps, random_start):
    model, x, y, dist = linear_case(0)
    if attack == "pgd":
        g = torch.Generator().manual_seed(1)
        # L2: the default budget (2.5 eps in all) shrinks a random start's component along the
        # boundary only by ~e^-1.5, too little for samples at 0.98 eps; eps/4 per step converges.
        alpha = eps / 4 if norm == "l2" else None
        x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=30, norm=norm,
                    random_start=random_start, generator=g)
    else:
        x_adv = fgsm(model, x, y, eps=eps)
    check_ball(x_adv, x, eps, norm)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
        fooled = model(x_adv).argmax(1) != y
    expected = ~correct | (dist[norm] < eps)
    clear = (dist[norm] - eps).abs() > 0.02 * eps
    # Both sides of the edge are well populated, so the check means something.
    assert int((correct & clear & (dist[norm] < eps)).sum()) > 50
    assert int((correct & clear & (dist[norm] > eps)).sum()) > 50
    assert torch.equal(fooled[clear], expected[clear])


def test_linear_model_targeted_reaches_other_side():
    model, x, y, dist = linear_case(2)
    with torch.no_grad():
        pred = model(x).argmax(1)
    target = 1 - pred
    x_adv = pgd(model, x, target, eps=0.03, steps=30, targeted=True,
                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hit = model(x_adv).argmax(1) == target
    clear = (dist["linf"] - 0.03).abs() > 0.02 * 0.03
    assert torch.equal(hit[clear], (dist["linf"] < 0.03)[clear])


def success(model, x_adv, y):
    with torch.no_grad():
        return float((model(x_adv).argmax(1) != y).float().mean())


def test_as_strong_as_torchattacks(digits_model):
    model, x, y = digits_model
    eps, steps, alpha = 0.1, 10, 0.025
    rates = {}
    # Random starts differ between the two libraries: compare means over a few seeds.
    ours, theirs = [], []
    for seed in range(3):
        ours.append(success(model, pgd(model, x, y, eps=eps, alpha=alpha, steps=steps,
                                       generator=torch.Generator().manual_seed(seed)), y))
        torch.manual_seed(100 + seed)
        ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        theirs.append(success(model, ta(x, y), y))
    rates["pgd"] = (sum(ours) / 3, sum(theirs) / 3)
    rates["pgd_no_start"] = (
        success(model, pgd(model, x, y, eps=eps, alpha=alpha, random_start=False), y),
        success(model, torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps,
                                        random_start=False)(x, y), y),
    )
    rates["fgsm"] = (success(model, fgsm(model, x, y, eps=eps), y),
                     success(model, torchattacks.FGSM(model, eps=eps)(x, y), y))
    rates["mifgsm"] = (
        success(model, mifgsm(model, x, y, eps=eps, steps=steps), y),
        success(model, torchattacks.MIFGSM(model, eps=eps, alpha=eps / steps, steps=steps,
                                           decay=1.0)(x, y), y),
    )
    for name, (r_ours, r_theirs) in rates.items():
        assert r_ours >= r_theirs - 0.02, (name, rates)
    # Same deterministic algorithm: PGD without random start can only gain from keeping the best.
    assert rates["pgd_no_start"][0] >= rates["pgd_no_start"][1]
    # Sanity: the attacks do something at this budget but are not trivially total.
    assert 0.1 < rates["pgd"][0] < 1.0


def test_targeted_pgd_on_digits(digits_model):
    model, x, y = digits_model
    target = (y + 1) % 10
    x_adv = pgd(model, x, target, eps=0.2, steps=20, targeted=True,
                generator=torch.Generator().manual_seed(0))
    check_ball(x_adv, x, 0.2, "linf")
    with torch.no_grad():
        hit = float((model(x_adv).argmax(1) == target).float().mean())
    assert hit > 0.3  # chance is 0.1


def test_restarts_keep_best(digits_model):
    model, x, y = digits_model
    rates = []
    for restarts in (1, 3):
        g = torch.Generator().manual_seed(7)
        x_adv = pgd(model, x, y, eps=0.08, alpha=0.04, steps=3, restarts=restarts, generator=g)
        check_ball(x_adv, x, 0.08, "linf")
        rates.append(success(model, x_adv, y))
    assert rates[1] >= rates[0]
    # Best-of-steps: every sample PGD fools with 3 steps stays fooled when given more steps.
    g = torch.Generator().manual_seed(7)
    short = pgd(model, x, y, eps=0.08, alpha=0.04, steps=3, generator=g)
    g = torch.Generator().manual_seed(7)
    long = pgd(model, x, y, eps=0.08, alpha=0.04, steps=8, generator=g)
    with torch.no_grad():
        assert bool(((model(short).argmax(1) != y) <= (model(long).argmax(1) != y)).all())


def small_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.0),
                         nn.Linear(12, 3))


ALL_CALLS = [
    ("fgsm", {}),
    ("pgd", {"norm": "linf"}),
    ("pgd", {"norm": "l2", "restarts": 2}),
    ("mifgsm", {}),
]


@pytest.mark.parametrize("name, kwargs", ALL_CALLS)
@pytest.mark.parametrize("training", [True, False])
def test_mode_and_grads_untouched(name, kwargs, training):
    model = small_net().train(training)
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    ATTACKS[name](model, x, y, eps=0.1, **kwargs)
    assert all(m.training == training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    preset = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), preset, strict=True):
        p.grad = g.clone()
    with torch.no_grad():  # the attack must still get its input gradients
        x_adv = ATTACKS[name](model, x, y, eps=0.1, **kwargs)
    assert not torch.equal(x_adv, x)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), preset, strict=True))
    assert all(m.training == training for m in model.modules())


@pytest.mark.parametrize("name, kwargs", ALL_CALLS)
def test_per_sample_eps_and_zero_eps(name, kwargs):
    model = small_net()
    x = torch.rand(5, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # correctly classified: PGD returns misclassified ones as they are
    eps = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.0])
    x_adv = ATTACKS[name](model, x, y, eps=eps, **kwargs)
    norm = kwargs.get("norm", "linf")
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps + 1e-6).all())
    assert torch.equal(x_adv[[0, 4]], x[[0, 4]])
    assert bool((size[1:4] > 0).all())
    assert torch.equal(ATTACKS[name](model, x, y, eps=0.0, **kwargs), x)
    # A 0-d tensor eps broadcasts like a float.
    if name == "pgd":
        kwargs = {**kwargs, "generator": torch.Generator().manual_seed(0)}
    a = ATTACKS[name](model, x, y, eps=torch.tensor(0.1), **kwargs)
    if name == "pgd":
        kwargs["generator"].manual_seed(0)
    assert torch.equal(a, ATTACKS[name](model, x, y, eps=0.1, **kwargs))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_reproducible_with_generator(norm):
    model = small_net()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    a = pgd(model, x, y, eps=0.3, norm=norm, restarts=2, generator=torch.Generator().manual_seed(3))
    b = pgd(model, x, y, eps=0.3, norm=norm, restarts=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    check_ball(a, x, 0.3, norm)


def test_float64_and_ensemble():
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    for name in ATTACKS:
        check_ball(ATTACKS[name](ens, x, y, eps=0.05), x, 0.05, "linf")
    model = small_net().double()
    xd = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    for name in ATTACKS:
        assert ATTACKS[name](model, xd, torch.tensor([0, 1, 2]), eps=0.1).dtype == torch.float64


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize(
    "change, match",
    [
        ({"eps": -0.1}, "eps must be finite and >= 0"),
        ({"eps": float("nan")}, "eps must be finite"),
        ({"eps": float("inf")}, "eps must be finite"),
        ({"eps": torch.tensor([0.1, -0.1, 0.1, 0.1])}, "eps must be finite and >= 0"),
        ({"eps": torch.full((3,), 0.1)}, r"shape \(4,\)"),
        ({"eps": "0.1"}, "eps must be a number"),
        ({"x": torch.full((4, 1, 4, 4), 1.5)}, r"x must lie in \[0, 1\]"),
        ({"x": torch.full((4, 1, 4, 4), -0.01)}, r"x must lie in \[0, 1\]"),
        ({"x": torch.full((4, 1, 4, 4), float("nan"))}, r"x must lie in \[0, 1\]"),
        ({"x": torch.ones(4, 1, 4, 4, dtype=torch.long)}, "floating-point"),
        ({"y": torch.tensor([0, 1, 2])}, r"y must have shape \(4,\)"),
        ({"y": torch.zeros(4, 1, dtype=torch.long)}, r"y must have shape \(4,\)"),
        ({"y": torch.tensor([0, 1, 2, 3])}, r"labels must lie in \[0, 3\)"),
        ({"y": torch.tensor([0, -1, 2, 0])}, r"labels must lie in \[0, 3\)"),
        ({"y": torch.tensor([0.0, 1.0, 2.0, 0.0])}, "y must be an integer tensor"),
        ({"y": torch.tensor([True, False, True, False])}, "y must be an integer tensor"),
    ],
)
def test_bad_common_input(name, change, match):
    args = {"x": torch.rand(4, 1, 4, 4), "y": torch.tensor([0, 1, 2, 0]), "eps": 0.1}
    args.update(change)
    with pytest.raises(EnsdivError, match=match):
        ATTACKS[name](small_net(), args["x"], args["y"], eps=args["eps"])


@pytest.mark.parametrize("name", ["pgd", "mifgsm"])
@pytest.mark.parametrize(
    "change, match",
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 2.5}, "steps must be an integer >= 1"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -0.01}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
    ],
)
def test_bad_iterative_input(name, change, match):
    with pytest.raises(EnsdivError, match=match):
        ATTACKS[name](small_net(), torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]), eps=0.1,
                      **change)


def test_bad_pgd_and_mifgsm_specific_input():
    model, x, y = small_net(), torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    with pytest.raises(EnsdivError, match="restarts must be an integer >= 1"):
        pgd(model, x, y, eps=0.1, restarts=0)
    with pytest.raises(EnsdivError, match="unknown norm 'l1'; choose one of: l2, linf"):
        pgd(model, x, y, eps=0.1, norm="l1")
    with pytest.raises(EnsdivError, match="decay"):
        mifgsm(model, x, y, eps=0.1, decay=-1.0)
    with pytest.raises(EnsdivError, match="shape"):
        fgsm(nn.Identity(), x, y, eps=0.1)  # not [B, K] logits
    assert issubclass(EnsdivError, ValueError)


def test_pgd_returns_already_misclassified_samples_unchanged():
    model = small_net()
    x = torch.rand(6, 1, 4, 4)
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 3
    assert torch.equal(pgd(model, x, wrong, eps=0.1), x)


# ------------------------------------------------------------------ keep rules and APGD
def test_keep_last_ends_on_the_surface_of_the_ball():
    model, x, y, dist = linear_case(3)
    eps = 0.05
    x_last = pgd(model, x, y, eps=eps, steps=20, keep="last",
                 generator=torch.Generator().manual_seed(0))
    check_ball(x_last, x, eps, "linf")
    # The loss gradient of a linear model has one sign pattern: 20 steps of 2.5·eps/20 from any
    # start in the ball end at x ± eps in every coordinate (x lies in [0.3, 0.7]: no clipping).
    torch.testing.assert_close((x_last - x).abs(), torch.full_like(x, eps), atol=1e-6, rtol=0)
    x_first = pgd(model, x, y, eps=eps, steps=20, keep="success",
                  generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        correct = model(x).argmax(1) == y
        fooled_first = model(x_first).argmax(1) != y
    # kept at its first success, an example is an inside point of the ball (not every
    # coordinate at ±eps, as the full-budget one) for most fooled samples
    inside = (x_first - x).flatten(1).abs().mean(1) < 0.99 * eps
    assert int((fooled_first & correct & inside).sum()) > 0.8 * int((fooled_first & correct).sum())
    assert torch.equal(fooled_first, model(x_last).argmax(1) != y)


def test_mifgsm_keep_rules():
    model, x, y, dist = linear_case(4)
    x_last = mifgsm(model, x, y, eps=0.05, steps=10)
    torch.testing.assert_close((x_last - x).abs(), torch.full_like(x, 0.05), atol=1e-6, rtol=0)
    x_first, steps = mifgsm(model, x, y, eps=0.05, steps=10, keep="success", return_steps=True)
    with torch.no_grad():
        fooled = model(x_first).argmax(1) != y
    assert torch.equal(fooled, steps >= 0)
    assert bool(((x_first - x).abs().amax((1, 2, 3))[steps > 0] <= 0.05 + 1e-6).all())


@pytest.mark.parametrize("norm, eps", [("linf", 0.03), ("l2", 0.1)])
def test_apgd_fools_exactly_the_samples_within_eps_of_the_boundary(norm, eps):
    model, x, y, dist = linear_case(5)
    x_adv = apgd(model, x, y, eps=eps, norm=norm, steps=30)
    check_ball(x_adv, x, eps, norm)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
        fooled = model(x_adv).argmax(1) != y
    clear = (dist[norm] - eps).abs() > 0.02 * eps
    assert int((correct & clear & (dist[norm] < eps)).sum()) > 50
    assert int((correct & clear & (dist[norm] > eps)).sum()) > 50
    assert torch.equal(fooled[clear], (~correct | (dist[norm] < eps))[clear])


def test_apgd_checkpoints_follow_the_paper():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for n in (1, 5, 10, 25, 1000):
        w = apgd_checkpoints(n)
        assert w == sorted(set(w)) and all(0 < v <= n for v in w)


def test_dlr_loss_is_scale_and_shift_invariant():
    z = torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    torch.testing.assert_close(dlr_loss(3 * z + 1, y), dlr_loss(z, y), atol=1e-4, rtol=1e-4)
    z = torch.tensor([[5.0, 1.0, 0.0, -1.0], [1.0, 5.0, 0.0, -1.0]])
    torch.testing.assert_close(dlr_loss(z, torch.tensor([0, 0])), torch.tensor([-0.8, 0.8]))
    with pytest.raises(EnsdivError, match="at least 3 classes"):
        apgd(LinearBinary(torch.ones(4), 0.0), torch.rand(2, 1, 2, 2), torch.tensor([0, 1]),
             eps=0.1, loss="dlr")


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.6)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_as_strong_as_torchattacks(digits_model, loss, norm, eps):
    model, x, y = digits_model
    ours = success(model, apgd(model, x, y, eps=eps, norm=norm, loss=loss, steps=25), y)
    ta = torchattacks.APGD(model, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=25,
                           n_restarts=1, seed=0, loss=loss)
    theirs = success(model, ta(x, y), y)
    assert 0.1 < theirs < 0.95  # a regime where strength shows
    assert ours >= theirs - 0.02, (ours, theirs)
    # and at least as strong as 25-step PGD, the attack it improves on
    assert ours >= success(model, pgd(model, x, y, eps=eps, norm=norm, steps=25,
                                      generator=torch.Generator().manual_seed(0)), y) - 0.02


def test_apgd_restarts_seed_and_steps():
    model, x, y = small_net(), torch.rand(12, 1, 4, 4), torch.randint(0, 3, (12,))
    a, sa = apgd(model, x, y, eps=0.2, steps=10, restarts=2, seed=4, return_steps=True)
    b = apgd(model, x, y, eps=0.2, steps=10, restarts=2, seed=4)
    assert torch.equal(a, b)
    with torch.no_grad():
        fooled = model(a).argmax(1) != y
    assert torch.equal(fooled, sa >= 0) and int(sa.max()) <= 20
    state = torch.random.get_rng_state()
    apgd(model, x, y, eps=0.2, steps=3)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    with pytest.raises(EnsdivError, match="unknown APGD loss"):
        apgd(model, x, y, eps=0.1, loss="cw")
    with pytest.raises(EnsdivError, match="seed must be an integer"):
        apgd(model, x, y, eps=0.1, seed=-1)
    with pytest.raises(EnsdivError, match="unknown keep rule"):
        pgd(model, x, y, eps=0.1, keep="first")
