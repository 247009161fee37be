import json
import math

import pytest
import torch

from ensdiv.aggregation import AGGREGATIONS, Aggregated
from ensdiv.attacks import apgd, square
from ensdiv.card import CARD_ATTACKS, Card, CardBudget
from ensdiv.card_stages import robustness_card
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError

TINY = CardBudget(apgd_steps=6, mora_steps=3, square_queries=40, transfer_steps=3)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ens = Ensemble.build("cnn", 3, in_shape=(1, 8, 8), num_classes=10, seed=4).eval()
    x = torch.rand(24, 1, 8, 8)
    y = ens.predict(x)
    y[:4] = (y[:4] + 1) % 10  # some inputs wrong clean
    return ens, x, y


@pytest.mark.parametrize("rule", AGGREGATIONS)
def test_card_fields_are_present_typed_and_json(setup, rule):
    ens, x, y = setup
    card = robustness_card(ens, x, y, eps=0.08, aggregations=rule, budget=TINY, surrogate=ens)
    assert isinstance(card, Card)
    as_json = card.to_dict()
    json.dumps(as_json, allow_nan=False)  # strict JSON
    assert Card.from_dict(json.loads(json.dumps(as_json))) == card  # what a table reads back
    assert card.n == 24 and card.aggregation == rule and card.number_forward_passes == 3
    correct = int((Aggregated(ens, rule).predict(x) == y).sum())
    assert card.clean_acc == correct / 24
    (e,) = card.evaluations
    assert e["aggregation"] == rule and e["robust_acc"] == card.robust_acc
    assert 0 <= card.robust_acc <= e["averaged_output_robust_acc"] <= card.clean_acc
    assert set(e["attacks"]) == set(CARD_ATTACKS)
    # the cascade: broke-first counts add up to the worst case
    broken = sum(a["broke_first"] for a in e["attacks"].values())
    assert card.clean_acc - card.robust_acc == pytest.approx(broken / 24)
    assert e["attacks"]["apgd-ce"]["total"] == correct
    for a in e["attacks"].values():
        assert a["seconds"] >= 0 and a["setup"]["eps"] == 0.08
    assert len(card.members) == 3 and len(card.transfer["fooled"]) == 3
    assert 0 <= card.gdr <= 0.5 and -1 <= card.mean_cos <= 1
    # the transfer from the surrogate is the evaluation's; the card names the model
    assert e["surrogate"]["crafted_with"]["on"] == "surrogate"
    assert card.surrogate["members"] == 3 and card.surrogate["weights"] == \
        card.weights_fingerprint
    assert math.isfinite(card.robust_acc_se)
    assert isinstance(card.warnings, list) and card.zero_grad_fraction == 0.0
    assert set(card.seconds) == {"gradients", "members", "transfer", f"whitebox-{rule}",
                                 "surrogate", "total"}


def test_every_rule_in_one_card_headlined_by_the_first(setup):
    ens, x, y = setup
    card = robustness_card(ens, x, y, eps=0.08, aggregations=("vote", "softmax"), budget=TINY)
    assert [e["aggregation"] for e in card.evaluations] == ["vote", "softmax"]
    assert card.aggregation == "vote" and card.robust_acc == card.evaluation("vote")[
        "robust_acc"]
    assert card.evaluation("logits") is None and card.surrogate is None


def test_from_dict_refuses_what_is_not_a_card():
    with pytest.raises(EnsdivError, match="no format"):
        Card.from_dict({"name": "x"})
    with pytest.raises(EnsdivError, match="it lacks eps, evaluations"):
        Card.from_dict({"format": "ensdiv.card/1", "name": "x", "dataset": None, "n": 1,
                        "aggregation": "softmax", "clean_acc": 1.0, "robust_acc": 0.0,
                        "robust_acc_se": 0.0})


def test_worst_case_is_at_least_every_single_attack_per_input(setup):
    ens, x, y = setup
    card = robustness_card(ens, x, y, eps=0.08, budget=TINY)
    model = Aggregated(ens, "softmax")
    correct = model.predict(x) == y
    alone = {
        "apgd-ce": apgd(model, x, y, eps=0.08, loss="ce", steps=TINY.apgd_steps, seed=0),
        "square": square(model, x, y, eps=0.08, queries=TINY.square_queries, seed=0),
    }
    robust = card.robust_acc * 24
    for name, adv in alone.items():
        still = int((correct & (model.predict(adv) == y)).sum())
        assert robust <= still, name


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": 0.0}, "eps"),
    ({"eps": -0.1}, "eps"),
    ({"eps": 0.1, "aggregations": "median"}, "unknown aggregation rule"),
    ({"eps": 0.1, "budget": CardBudget(apgd_steps=0)}, "apgd_steps"),
])
def test_bad_inputs_are_one_line(setup, kwargs, match):
    ens, x, y = setup
    with pytest.raises(EnsdivError, match=match):
        robustness_card(ens, x, y, **kwargs)


def test_a_single_network_is_not_an_ensemble(setup):
    ens, x, y = setup
    with pytest.raises(EnsdivError, match="at least 2 members"):
        robustness_card(Ensemble([ens.members[0]]), x, y, eps=0.1)


def test_the_white_box_cascade_says_each_attack_as_it_finishes():
    from ensdiv.card_stages import card_whitebox
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
    x = torch.rand(12, 1, 8, 8)
    y = ens.predict(x)
    lines = []
    w = card_whitebox(ens, x, y, eps=0.1, budget=CardBudget(apgd_steps=3, mora_steps=1,
                                                             square_queries=5,
                                                             transfer_steps=1),
                      log=lines.append)
    assert [ln.split(":")[0].strip() for ln in lines] == list(CARD_ATTACKS)
    for line, name in zip(lines, CARD_ATTACKS, strict=True):
        a = w["attacks"][name]
        assert f"{a['fooled']} of the {a['total']} inputs left" in line
