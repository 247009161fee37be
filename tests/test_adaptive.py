import pytest
import torch
from torch import nn

from ensdiv.adaptive import agreement_pgd, penalized_pgd, select_worst
from ensdiv.attacks import pgd, pgd_objective
from ensdiv.data import load_dataset
from ensdiv.disagreement import DisagreementDetector
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError
from ensdiv.runs.train import train_run
from ensdiv.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gal_digits():
    ens, _ = train_run(TrainConfig(dataset="digits", arch="mlp", members=3, epochs=6,
                                   diversity="gal", lam=1.0, seed=0), progress=False)
    ens.eval()
    _, test, _ = load_dataset("digits")
    x, y = test.tensors
    det = DisagreementDetector(ens, score="mean_kl_to_mean").fit(x[-150:])
    return ens, x[:100], y[:100], det


def broken(ens, det, x_adv, y):
    with torch.no_grad():
        wrong = ens.predict(x_adv) != y
    return wrong & ~det.detect(x_adv)


def test_pgd_objective_keep_rules_on_a_linear_model():
    torch.manual_seed(0)
    lin = nn.Linear(16, 1)
    x = 0.3 + 0.4 * torch.rand(50, 1, 4, 4)

    def objective(xa):
        f = lin(xa.flatten(1)).squeeze(1)
        return f, f > 0  # push f up; success once positive

    kw = dict(eps=0.1, steps=20, random_start=False)
    last = pgd_objective(objective, x, keep="last", **kw)
    best = pgd_objective(objective, x, keep="best", **kw)
    first = pgd_objective(objective, x, keep="success", **kw)
    for xa in (last, best, first):
        assert float((xa - x).abs().max()) <= 0.1 + 1e-6
    with torch.no_grad():
        f_last, f_best, f_first = (lin(t.flatten(1)).squeeze(1) for t in (last, best, first))
        reach = lin(x.flatten(1)).squeeze(1) + 0.1 * lin.weight.abs().sum()
    # the full budget reaches the corner of the ball (the maximum of a linear function)
    torch.testing.assert_close(f_last, reach, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f_best, f_last, atol=1e-4, rtol=1e-4)
    ok = reach > 0
    assert bool((f_first[ok] > 0).all()) and bool((f_first[ok] <= f_best[ok] + 1e-6).all())
    assert bool((f_first[ok] < f_best[ok] - 1e-3).any())  # first success stops early
    with pytest.raises(EnsdivError, match="unknown keep rule"):
        pgd_objective(objective, x, eps=0.1, keep="first")


def test_select_worst_prefers_broken_then_wrong_then_low_score():
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=3, seed=0).eval()
    x = torch.rand(20, 1, 8, 8)
    with torch.no_grad():
        y = ens.predict(x)
    a, b = torch.rand(20, 1, 8, 8), torch.rand(20, 1, 8, 8)
    out = select_worst(ens, x, y, [x, a, b])
    with torch.no_grad():
        wrong = [ens.predict(t) != y for t in (x, a, b)]
    picked_wrong = ens.predict(out) != y
    assert torch.equal(picked_wrong, wrong[0] | wrong[1] | wrong[2])
    rows_a = torch.all(out == a, dim=(1, 2, 3))
    rows_b = torch.all(out == b, dim=(1, 2, 3))
    assert bool((rows_a | rows_b | torch.all(out == x, dim=(1, 2, 3))).all())
    with pytest.raises(EnsdivError, match="at least one candidate"):
        select_worst(ens, x, y, [])


def test_agreement_attack_makes_members_agree_and_evades(gal_digits):
    ens, x, y, det = gal_digits
    g = torch.Generator().manual_seed(0)
    white = pgd(ens, x, y, eps=0.3, steps=20, keep="last", generator=g)
    agree = agreement_pgd(ens, x, y, eps=0.3, steps=20, detector=det,
                          generator=torch.Generator().manual_seed(0))
    assert float((agree - x).abs().max()) <= 0.3 + 1e-6
    with torch.no_grad():
        votes = ens.member_logits(agree).argmax(-1)
    unanimous = (votes == votes[0]).all(0) & (votes[0] != y)
    assert float(unanimous.float().mean()) > 0.8
    # it evades the detector the oblivious white-box attack runs into
    assert int(broken(ens, det, agree, y).sum()) > int(broken(ens, det, white, y).sum()) + 30


def test_all_targets_break_at_least_what_the_runner_up_breaks(gal_digits):
    ens, x, y, det = gal_digits
    x, y = x[:40], y[:40]
    kw = dict(eps=0.15, steps=10, detector=det)
    one = agreement_pgd(ens, x, y, target="runner_up", generator=torch.Generator().manual_seed(0),
                        **kw)
    every = agreement_pgd(ens, x, y, target="all", generator=torch.Generator().manual_seed(0),
                          **kw)
    b1, ball = broken(ens, det, one, y), broken(ens, det, every, y)
    assert bool((ball | ~b1).all())  # every input the runner-up run broke stays broken


def test_penalized_attack_beats_the_oblivious_one_against_the_detector(gal_digits):
    ens, x, y, det = gal_digits
    white = pgd(ens, x, y, eps=0.3, steps=20, keep="last",
                generator=torch.Generator().manual_seed(0))
    pen = penalized_pgd(ens, x, y, eps=0.3, steps=20, detector=det, kappas=(1.0, 10.0),
                        generator=torch.Generator().manual_seed(0))
    assert int(broken(ens, det, pen, y).sum()) > int(broken(ens, det, white, y).sum())


def test_adaptive_attack_errors(gal_digits):
    ens, x, y, det = gal_digits
    other = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=5).eval()
    with pytest.raises(EnsdivError, match="different ensemble"):
        agreement_pgd(other, x[:4], y[:4], eps=0.1, detector=det)
    with pytest.raises(EnsdivError, match="unknown agreement target"):
        agreement_pgd(ens, x[:4], y[:4], eps=0.1, target="third")
    with pytest.raises(EnsdivError, match="kappas needs at least one"):
        penalized_pgd(ens, x[:4], y[:4], eps=0.1, detector=det, kappas=())
    with pytest.raises(EnsdivError, match="kappa must be"):
        penalized_pgd(ens, x[:4], y[:4], eps=0.1, detector=det, kappas=(-1.0,))
    with pytest.raises(EnsdivError, match="call fit"):
        penalized_pgd(ens, x[:4], y[:4], eps=0.1, detector=DisagreementDetector(ens))
    with pytest.raises(EnsdivError, match="need an Ensemble"):
        agreement_pgd(nn.Linear(64, 10), x[:4], y[:4], eps=0.1)
    with pytest.raises(EnsdivError, match="shape"):
        agreement_pgd(ens, torch.rand(4, 1, 28, 28), y[:4], eps=0.1)
