import copy

import pytest
import torch

from ensdiv.aggregation import AGGREGATIONS, Aggregated, aggregate
from ensdiv.attacks import apgd, pgd
from ensdiv.ensemble import Ensemble, majority_vote, mean_log_softmax
from ensdiv.errors import EnsdivError


def test_rules_against_their_definitions():
    z = torch.randn(5, 7, 10, dtype=torch.float64)
    torch.testing.assert_close(aggregate(z, "softmax").exp(), z.softmax(-1).mean(0))
    torch.testing.assert_close(aggregate(z, "logits"), z.mean(0))
    # the vote: argmax is the majority of member classes, ties to the mean softmax
    assert torch.equal(aggregate(z, "vote").argmax(-1), majority_vote(z))
    counts = torch.nn.functional.one_hot(z.argmax(-1), 10).sum(0)
    assert torch.equal(aggregate(z, "vote").floor().long(), counts)


def test_vote_ties_go_to_the_stand_in():
    # members 0 and 1 disagree, member 2 votes a third class: a three-way tie
    z = torch.tensor([[[4.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    soft = aggregate(z, "vote", stand_in="softmax").argmax(-1)
    assert soft.item() == mean_log_softmax(z).argmax(-1).item() == 0
    logit = aggregate(z, "vote", stand_in="logits").argmax(-1)
    assert logit.item() == z.mean(0).argmax(-1).item()


def test_vote_scores_carry_the_stand_in_gradient():
    z = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    (g_vote,) = torch.autograd.grad(aggregate(z, "vote").gather(1, y[:, None]).sum(), z)
    (g_soft,) = torch.autograd.grad(0.5 * mean_log_softmax(z).exp().gather(1, y[:, None]).sum(), z)
    torch.testing.assert_close(g_vote, g_soft)


def test_aggregated_module_predicts_each_rule_and_leaves_the_ensemble_alone():
    ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=3).eval()
    before = copy.deepcopy(ens.state_dict())
    x = torch.rand(16, 1, 8, 8)
    assert torch.equal(Aggregated(ens, "softmax").predict(x), ens.predict(x))
    assert torch.equal(Aggregated(ens, "vote").predict(x), ens.vote(x))
    assert torch.equal(Aggregated(ens, "logits").predict(x),
                       ens.member_logits(x).mean(0).argmax(-1))
    for k, v in ens.state_dict().items():
        assert torch.equal(v, before[k])
    assert not ens.training


@pytest.mark.parametrize("rule", AGGREGATIONS)
def test_attacks_on_a_rule_are_judged_on_it(rule):
    ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=1).eval()
    model = Aggregated(ens, rule)
    x = torch.rand(32, 1, 8, 8)
    y = model.predict(x)
    for x_adv, steps in [(pgd(model, x, y, eps=0.2, steps=10, return_steps=True), "pgd"),
                         (apgd(model, x, y, eps=0.2, steps=10, return_steps=True), "apgd")]:
        adv, first = x_adv
        fooled = model.predict(adv) != y
        # the attack says it succeeded exactly where the rule is fooled
        assert torch.equal(first >= 0, fooled), steps


def test_bad_rules_are_named():
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(EnsdivError,
                       match="aggregation rule .median.; choose one of: logits, softmax, vote"):
        Aggregated(ens, "median")
    with pytest.raises(EnsdivError, match="stand-in"):
        aggregate(torch.zeros(2, 1, 3), "vote", stand_in="vote")
    with pytest.raises(EnsdivError, match=r"\[M, B, K\]"):
        aggregate(torch.zeros(1, 3))
    with pytest.raises(EnsdivError, match="Ensemble"):
        Aggregated(torch.nn.Linear(3, 2))
