import copy
import functools
import math

import pytest
import torch
from torch import nn

from ensdiv.attacks import fgsm, mifgsm, pgd
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError
from ensdiv.models import build_model
from ensdiv.transferability import (
    Success,
    attack_success,
    convergence_warning,
    success_counts,
    surrogate_transfer,
    transfer_matrix,
    worst_case_success,
)


def test_attack_success_counts_only_correct_inputs():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # class = argmax coordinate
    x = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.2, 0.7], [0.6, 0.4]])
    y = torch.tensor([0, 0, 1, 1])  # the last one is misclassified clean
    x_adv = torch.tensor([[0.1, 0.9], [0.8, 0.3], [0.2, 0.7], [0.6, 0.4]])
    s = success_counts(lin, x, y, x_adv)
    assert (s.fooled, s.total) == (1, 3)
    assert attack_success(lin, x, y, x_adv) == pytest.approx(1 / 3)
    assert math.isnan(Success(0, 0).rate)


@pytest.mark.parametrize("attack", [functools.partial(fgsm, eps=0.1),
                                    functools.partial(pgd, eps=0.1, steps=3,
                                                      random_start=False),
                                    functools.partial(mifgsm, eps=0.1, steps=3)])
def test_identical_members_give_equal_entries(attack):
    torch.manual_seed(0)
    base = build_model("mlp", in_shape=(1, 8, 8), num_classes=4)
    ens = Ensemble([copy.deepcopy(base) for _ in range(3)])
    x = torch.rand(40, 1, 8, 8)
    with torch.no_grad():
        y = base(x).argmax(-1)  # every member is correct on every input
    y[:5] = (y[:5] + 1) % 4  # and wrong on a few
    res = transfer_matrix(ens, x, y, attack=attack)
    mat = res.matrix
    assert torch.all(res.total == 35)
    assert torch.allclose(mat, mat[0, 0].expand_as(mat))
    assert res.mean_transfer == pytest.approx(float(mat[0, 0]))
    # identical members: the ensemble is the member, so every route gives the same success
    assert res.whitebox.rate == pytest.approx(float(mat[0, 0]))
    assert all(s.rate == pytest.approx(float(mat[0, 0])) for s in res.to_ensemble)
    assert res.member_acc == pytest.approx((35 / 40,) * 3)


def test_mode_and_grads_unchanged():
    ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=3, seed=0)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 3, (6,))
    for mode in (True, False):
        ens.train(mode)
        transfer_matrix(ens, x, y, attack=functools.partial(pgd, eps=0.05, steps=2))
        assert ens.training is mode
        assert all(m.training is mode for m in ens.modules())
        assert all(p.grad is None for p in ens.parameters())


def test_transfer_between_different_members_and_record():
    ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=0)
    x, y = torch.rand(30, 1, 8, 8), torch.randint(0, 10, (30,))
    with torch.no_grad():
        y = ens.members[0](x).argmax(-1)
    res = transfer_matrix(ens, x, y, attack=functools.partial(pgd, eps=0.3, steps=5))
    assert res.matrix[0, 0] == 1.0  # white-box on a random MLP at a large eps
    rec = res.to_dict()
    assert set(rec) >= {"matrix", "fooled", "total", "mean_transfer", "to_ensemble",
                        "whitebox", "member_acc", "ensemble_acc", "n"}
    assert rec["n"] == 30 and len(rec["matrix"]) == 3


def test_surrogate_transfer_reuses_adversarials():
    a = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=5, seed=0)
    b = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=5, seed=1)
    x = torch.rand(20, 1, 8, 8)
    with torch.no_grad():
        y = b(x).argmax(-1)
    attack = functools.partial(fgsm, eps=0.2)
    x_adv = attack(a, x, y)
    s1 = surrogate_transfer(a, b, x, y, attack=attack)
    s2 = surrogate_transfer(a, b, x, y, attack=attack, x_adv=x_adv)
    assert s1 == s2 and s1.total == 20


# --- worst case over attacks (AutoAttack's rule) and the convergence warning ---------------

def _identity2():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))  # class = argmax coordinate
    return lin


def test_worst_case_equals_hand_computed_union():
    model = _identity2()
    x = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.2, 0.7], [0.6, 0.4], [0.3, 0.6]])
    y = torch.tensor([0, 0, 1, 1, 1])  # sample 3 is misclassified clean: never counted
    flip = {0: [0.1, 0.9], 1: [0.3, 0.8], 2: [0.7, 0.2], 3: [0.4, 0.6], 4: [0.6, 0.3]}

    def adv(rows):
        a = x.clone()
        for i in rows:
            a[i] = torch.tensor(flip[i])
        return a

    # "a" breaks samples 0, 1; "b" breaks 1, 2 and flips the misclassified 3 (not counted).
    wc = worst_case_success(model, x, y, x_adv={"a": adv([0, 1]), "b": adv([1, 2, 3])})
    assert (wc.union.fooled, wc.union.total) == (3, 4)  # {0, 1, 2} of the 4 correct
    assert (wc.per_attack["a"].fooled, wc.per_attack["a"].total) == (2, 4)
    assert (wc.per_attack["b"].fooled, wc.per_attack["b"].total) == (2, 4)
    assert wc.broken.tolist() == [True, True, True, False, False]
    d = wc.to_dict()
    assert d["rate"] == 0.75 and d["attacks"]["a"]["fooled"] == 2


def test_worst_case_at_least_each_attack_and_cascade_gives_same_union():
    torch.manual_seed(0)
    model = build_model("mlp", in_shape=(1, 8, 8), num_classes=4).eval()
    x = torch.rand(64, 1, 8, 8)
    y = model(x).argmax(-1)
    y[:8] = (y[:8] + 1) % 4  # a few misclassified clean
    attacks = {"fgsm": functools.partial(fgsm, eps=0.05),
               "pgd": functools.partial(pgd, eps=0.05, steps=5, random_start=False),
               "mifgsm": functools.partial(mifgsm, eps=0.05, steps=5)}
    full = worst_case_success(model, x, y, attacks=attacks)
    for s in full.per_attack.values():
        assert full.union.rate >= s.rate and s.total == full.union.total
    assert 0 < full.union.fooled < full.union.total
    cascade = worst_case_success(model, x, y, attacks=attacks, cascade=True)
    assert torch.equal(cascade.broken, full.broken)
    # In the cascade each attack is run only on what is still unbroken.
    assert cascade.per_attack["fgsm"].total == full.union.total
    assert cascade.per_attack["pgd"].total == full.union.total - cascade.per_attack["fgsm"].fooled
    # which attack broke each input first: in a cascade each attack's own count, and in both
    # runs the first attack in order that breaks it
    assert cascade.broken_first_by() == {k: v.fooled for k, v in cascade.per_attack.items()}
    assert torch.equal(cascade.first_breaker >= 0, cascade.broken)
    assert torch.equal(full.first_breaker, cascade.first_breaker)
    assert set(full.seconds) == set(attacks) and all(t >= 0 for t in full.seconds.values())


def test_worst_case_skip_counts_without_attacking():
    model = _identity2()
    x = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.2, 0.7]])
    y = torch.tensor([0, 0, 1])
    seen = []

    def attack(m, xs, ys):
        seen.append(len(xs))
        return xs

    skip = torch.tensor([True, False, False])
    wc = worst_case_success(model, x, y, attacks={"none": attack}, cascade=True, skip=skip)
    assert seen == [2] and wc.union.fooled == 1 and wc.union.total == 3


@pytest.mark.parametrize("kwargs, match", [
    ({}, "attacks or precomputed x_adv"),
    ({"attacks": {}, "x_adv": {}}, "attacks or precomputed x_adv"),
    ({"attacks": {}}, "at least one attack"),
    ({"x_adv": {"a": torch.rand(3, 2)}, "cascade": True}, "cascade needs attacks"),
    ({"x_adv": {"a": torch.rand(2, 2)}}, "shape"),
])
def test_worst_case_bad_arguments(kwargs, match):
    x, y = torch.rand(3, 2), torch.tensor([0, 1, 0])
    with pytest.raises(EnsdivError, match=match):
        worst_case_success(_identity2(), x, y, **kwargs)


def test_convergence_warning_thresholds():
    assert convergence_warning(Success(52, 100), Success(50, 100), what="x") is None
    w = convergence_warning(Success(53, 100), Success(50, 100), what="PGD at eps=0.1")
    assert w.startswith("PGD at eps=0.1 had not converged") and "0.500" in w and "0.530" in w
    assert convergence_warning(Success(0, 0), Success(0, 0), what="x") is None


def test_convergence_warning_fires_on_a_cut_attack_not_on_a_converged_one():
    # Linear model: the inputs within L∞ eps of the boundary are exactly the breakable ones,
    # and a step of eps/10 needs 10 steps to reach the ball's corner.
    torch.manual_seed(0)
    w = torch.randn(16)
    lin = nn.Linear(16, 1)
    with torch.no_grad():
        lin.weight.copy_(w[None])
        lin.bias.fill_(-0.5 * w.sum().item())
    model = nn.Sequential(nn.Flatten(), lin, _PlusMinus())
    x = 0.3 + 0.4 * torch.rand(300, 1, 4, 4)
    y = model(x).argmax(-1)
    eps = 0.08

    def success(steps):
        xa = pgd(model, x, y, eps=eps, alpha=eps / 10, steps=steps, random_start=False)
        return success_counts(model, x, y, xa)

    full = success(40)
    with torch.no_grad():
        margin = lin(x.flatten(1)).squeeze(1).abs() / w.abs().sum()
    assert full.fooled == int((margin < eps).sum())  # the full budget found all of them
    assert convergence_warning(full, success(1), what="PGD") is not None
    assert convergence_warning(full, success(20), what="PGD") is None


class _PlusMinus(nn.Module):
    def forward(self, f):
        return torch.cat([f, -f], dim=1)


def test_worst_case_reports_each_attack_as_it_finishes():
    import functools

    from ensdiv.attacks import fgsm, pgd
    from ensdiv.transferability import worst_case_success
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = torch.rand(16, 1, 8, 8)
    y = net(x).argmax(-1)
    seen = []
    wc = worst_case_success(net, x, y, cascade=True, on_attack=lambda *a: seen.append(a),
                            attacks={"fgsm": functools.partial(fgsm, eps=0.3),
                                     "pgd": functools.partial(pgd, eps=0.3)})
    assert [name for name, _, _ in seen] == ["fgsm", "pgd"]
    assert all(s == wc.per_attack[name] and t >= 0 for name, s, t in seen)
