import math

import pytest
import torch
from scipy.stats import binomtest, norm
from torch import nn

from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, EnsdivWarning
from ensdiv.models import build_model
from ensdiv.smoothing import (
    ABSTAIN,
    Smooth,
    average_certified_radius,
    certified_accuracy,
    lower_confidence_bound,
    max_certifiable_radius,
    upper_confidence_bound,
)


class LinearBinary(nn.Module):
    """Logits (f, -f), f = w·x + b: class 0 where f > 0; the exact ℓ2 radius is |f| / ‖w‖."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w.clone()), nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        f = x.flatten(1) @ self.w + self.b
        return torch.stack([f, -f], 1)

    def exact_radius(self, x):
        with torch.no_grad():
            return float((x.flatten() @ self.w + self.b).abs() / self.w.norm())


class Threshold(nn.Module):
    """Class 0 when the noise on pixel 0 is below σ·Φ⁻¹(p): P(class 0) = p exactly (x0 = ½)."""

    def __init__(self, p, sigma):
        super().__init__()
        self.cut = 0.5 + sigma * float(norm.ppf(p))
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        top = (x.flatten(1)[:, 0] < self.cut).float()
        return torch.stack([top, 1 - top], 1)


def test_clopper_pearson_bounds_equal_scipy_binomtest():
    for k, n, alpha in [(0, 10, 0.05), (3, 10, 0.05), (97, 100, 0.001), (100, 100, 0.01),
                        (5000, 10_000, 0.001)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
        assert lower_confidence_bound(k, n, alpha) == pytest.approx(ci.low, abs=1e-9)
        assert upper_confidence_bound(k, n, alpha) == pytest.approx(ci.high, abs=1e-9)
    assert max_certifiable_radius(0.5, 10_000, 0.001) == pytest.approx(0.5 * 3.195, abs=2e-3)


def test_linear_model_radius_never_exceeds_the_exact_one_and_approaches_cohens():
    torch.manual_seed(0)
    w = torch.randn(16)
    model = LinearBinary(w, -0.5 * float(w.sum()))
    sm = Smooth(model, num_classes=2, sigma=0.25, seed=1)
    n, alpha = 20_000, 0.001
    for _ in range(40):
        x = torch.rand(1, 4, 4)
        exact = model.exact_radius(x)
        with torch.no_grad():
            truth = 0 if float(model(x[None])[0, 0]) > 0 else 1
        cls, radius = sm.certify(x, n0=100, n=n, alpha=alpha, batch_size=5_000)
        if cls == ABSTAIN:
            # only points whose expected bound is near 1/2 (or at the cap) may abstain
            assert exact < 0.25 * 0.2 or exact > max_certifiable_radius(0.25, n, alpha)
            continue
        assert cls == truth and radius <= exact + 1e-6
        p = float(norm.cdf(exact / 0.25))
        expected = 0.25 * float(norm.ppf(lower_confidence_bound(round(p * n), n, alpha)))
        if exact < max_certifiable_radius(0.25, n, alpha) - 0.05:
            assert radius == pytest.approx(expected, abs=0.03)


@pytest.mark.parametrize("p", [0.7, 0.9])
def test_certify_false_certificates_at_most_alpha_by_simulation(p):
    sigma, alpha, runs = 0.5, 0.05, 10_000
    sm = Smooth(Threshold(p, sigma), num_classes=2, sigma=sigma, seed=3)
    x = torch.full((1, 1, 1), 0.5)
    true_radius = sigma * float(norm.ppf(p))
    false = 0
    for _ in range(runs):
        cls, radius = sm.certify(x, n0=5, n=50, alpha=alpha, batch_size=64)
        false += cls != ABSTAIN and (cls != 0 or radius > true_radius)
    se = math.sqrt(alpha * (1 - alpha) / runs)
    assert false / runs <= alpha + 3 * se


def test_certify_radius_false_certificates_at_most_alpha_by_simulation():
    sigma, alpha, runs = 0.5, 0.05, 10_000
    p = 0.8
    radius = sigma * float(norm.ppf(p)) + 1e-3  # just out of reach: any certificate is false
    sm = Smooth(Threshold(p, sigma), num_classes=2, sigma=sigma, seed=4)
    x = torch.full((1, 1, 1), 0.5)
    false = sum(sm.certify_radius(x, radius, alpha=alpha, stages=(20, 60), n0=5, beta=0.01,
                                  batch_size=64)[0] != ABSTAIN for _ in range(runs))
    se = math.sqrt(alpha * (1 - alpha) / runs)
    assert false / runs <= alpha + 3 * se


def test_certify_radius_saves_samples_on_easy_points_and_stays_sound_on_a_linear_model():
    torch.manual_seed(0)
    w = torch.randn(16)
    model = LinearBinary(w, -0.5 * float(w.sum()))
    sm = Smooth(model, num_classes=2, sigma=0.25, seed=2)
    asked = 0.2
    used_easy, seen = [], 0
    for _ in range(60):
        x = torch.rand(1, 4, 4)
        exact = model.exact_radius(x)
        cls, used = sm.certify_radius(x, asked, alpha=0.001, stages=(1_000, 10_000, 100_000),
                                      batch_size=10_000)
        if exact < asked:
            assert cls == ABSTAIN  # never certifies a point whose exact radius is smaller
        if exact > 2 * asked:  # easy: certified at the first stage
            assert cls != ABSTAIN and used == 1_100
            used_easy.append(used)
        seen += 1
    assert used_easy and seen == 60


def test_early_stop_abstains_after_one_stage_when_the_radius_is_out_of_reach():
    sm = Smooth(Threshold(0.6, 0.5), num_classes=2, sigma=0.5, seed=0)
    cls, used = sm.certify_radius(torch.full((1, 1, 1), 0.5), 1.0, alpha=0.001,
                                  stages=(1_000, 10_000, 100_000), batch_size=1_000)
    assert cls == ABSTAIN and used == 1_100


def test_predict_and_ensemble_rules():
    torch.manual_seed(0)
    member = build_model("mlp", in_shape=(1, 8, 8), num_classes=10).eval()
    one = Ensemble([member]).eval()
    x = torch.rand(1, 8, 8)
    a = Smooth(member, num_classes=10, sigma=0.3, seed=5).certify(x, n0=20, n=500, alpha=0.01,
                                                                   batch_size=128)
    b = Smooth(one, num_classes=10, sigma=0.3, seed=5).certify(x, n0=20, n=500, alpha=0.01,
                                                                batch_size=128)
    assert a == b  # a one-member ensemble is its member
    c = Smooth(one, num_classes=10, sigma=0.3, seed=5).certify(x, n0=20, n=500, alpha=0.01,
                                                                batch_size=37)
    assert c == a  # batch size does not change the draws' use
    ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
    counts = Smooth(ens, num_classes=10, sigma=0.3, seed=1).sample_counts(x, 300, 100)
    assert int(counts.sum()) == 300
    votes = Smooth(ens, num_classes=10, sigma=0.3, seed=1, vote=True).sample_counts(x, 300, 100)
    assert int(votes.sum()) == 300
    # same seed, same noise: the mean-softmax class equals the ensemble's on each noisy copy
    sm = Smooth(ens, num_classes=10, sigma=0.0001, seed=1)
    assert int(sm.sample_counts(x, 50, 50).argmax()) == int(ens.predict(x[None]))
    assert sm.predict(x, n=200, alpha=0.001, batch_size=100) == int(ens.predict(x[None]))
    tie = Smooth(Threshold(0.5, 0.5), num_classes=2, sigma=0.5, seed=0)
    assert tie.predict(torch.full((1, 1, 1), 0.5), n=1_000, alpha=0.001, batch_size=500) \
        == ABSTAIN


def test_warns_when_the_radius_is_beyond_reach():
    sm = Smooth(Threshold(0.99, 0.5), num_classes=2, sigma=0.5)
    with pytest.warns(EnsdivWarning, match="beyond the largest radius"):
        cls, _ = sm.certify_radius(torch.full((1, 1, 1), 0.5), 2.0, alpha=0.001,
                                   stages=(100,), batch_size=100)
    assert cls == ABSTAIN


@pytest.mark.parametrize("make, match", [
    (lambda m, x: Smooth(m, num_classes=2, sigma=0.0), "sigma must be a finite number > 0"),
    (lambda m, x: Smooth(m, num_classes=2, sigma=-1.0), "sigma must be"),
    (lambda m, x: Smooth(m, num_classes=2, sigma=0.5, vote=True), "needs an Ensemble"),
    (lambda m, x: Smooth(m, num_classes=2, sigma=0.5).certify(x, n0=0, n=10, alpha=0.1,
                                                              batch_size=5), "n0"),
    (lambda m, x: Smooth(m, num_classes=2, sigma=0.5).certify(x, n0=1, n=0, alpha=0.1,
                                                              batch_size=5), "n must be"),
    (lambda m, x: Smooth(m, num_classes=2, sigma=0.5).certify(x, n0=1, n=10, alpha=1.0,
                                                              batch_size=5), "alpha"),
    (lambda m, x: Smooth(m, num_classes=2, sigma=0.5).certify(x[None], n0=1, n=10, alpha=0.1,
                                                              batch_size=5), "batch dimension"),
    (lambda m, x: Smooth(m, num_classes=2, sigma=0.5).certify(x + 2, n0=1, n=10, alpha=0.1,
                                                              batch_size=5), r"\[0, 1\]"),
    (lambda m, x: Smooth(m, num_classes=2, sigma=0.5).predict(x, n=10, alpha=0.0,
                                                              batch_size=5), "alpha"),
])
def test_bad_arguments(make, match):
    model = LinearBinary(torch.ones(4), -2.0)
    with pytest.raises(EnsdivError, match=match):
        make(model, torch.rand(1, 2, 2))


def test_certified_accuracy_and_acr():
    recs = [{"correct": True, "radius": 0.6}, {"correct": True, "radius": 0.2},
            {"correct": False, "radius": 0.9}, {"correct": True, "radius": 0.0}]
    assert certified_accuracy(recs, [0.0, 0.25, 0.5, 1.0]) == [0.75, 0.25, 0.25, 0.0]
    assert average_certified_radius(recs) == pytest.approx(0.2)
    assert math.isnan(average_certified_radius([]))


def test_channels_last_changes_the_memory_format_not_the_counts():
    torch.manual_seed(0)
    a = build_model("cnn", in_shape=(1, 12, 12), num_classes=10).eval()
    b = build_model("cnn", in_shape=(1, 12, 12), num_classes=10).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 12, 12)
    kept = Smooth(a, num_classes=10, sigma=0.3, seed=2, channels_last=False)
    moved = Smooth(b, num_classes=10, sigma=0.3, seed=2, channels_last=True)
    assert a.body[4].weight.is_contiguous() and b.body[4].weight.is_contiguous()
    assert moved.base.body[4].weight.is_contiguous(memory_format=torch.channels_last)
    assert not moved.base.body[4].weight.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(moved.base(x[None]), a(x[None]))
    # round-off may flip a rare near-tie copy, never more than a few of 500
    diff = (kept.sample_counts(x, 500, 100) - moved.sample_counts(x, 500, 100)).abs().sum()
    assert int(diff) <= 4


@pytest.mark.parametrize("channels_last", [False, True])
def test_smooth_leaves_the_callers_model_as_it_was(channels_last):
    from ensdiv.ensemble import Ensemble

    ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
    before = {k: (v.clone(), v.is_contiguous()) for k, v in ens.state_dict().items()}
    smooth = Smooth(ens, num_classes=10, sigma=0.5, channels_last=channels_last)
    smooth.predict(torch.rand(1, 8, 8), n=20, alpha=0.01, batch_size=20)
    for k, v in ens.state_dict().items():
        assert torch.equal(v, before[k][0]) and v.is_contiguous() == before[k][1], k
    conv = [v for v in ens.state_dict().values() if v.ndim == 4]
    assert conv and all(v.is_contiguous() for v in conv)  # never moved to channels-last
    assert (smooth.base is ens) == (not channels_last)
