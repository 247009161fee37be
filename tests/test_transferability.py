import copy
import functools
import math

import pytest
import torch
from torch import nn

from ensdiv.attacks import fgsm, mifgsm, pgd
from ensdiv.ensemble import Ensemble
from ensdiv.models import build_model
from ensdiv.transferability import (
    Success,
    attack_success,
    success_counts,
    surrogate_transfer,
    transfer_matrix,
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
