"""ensdiv.tuning: the radius rule, the declared grids and the selection rule."""

import math

import pytest

from ensdiv.errors import EnsdivError
from ensdiv.tuning import GRIDS, METHODS, grid_points, scaled_radius, select, tuned_settings


def test_radii_keep_each_papers_ratio_of_training_radius_to_evaluation_eps():
    assert scaled_radius("dverge", 0.03) == pytest.approx(0.07)  # the paper's own setting
    assert scaled_radius("dverge", 0.1) == pytest.approx(0.07 / 0.03 * 0.1)
    assert scaled_radius("trs", 0.1) == pytest.approx(0.1)
    assert scaled_radius("dverge", 0.9) == 1.0  # never past the whole pixel range
    with pytest.raises(EnsdivError, match="unknown method with a radius 'gal'"):
        scaled_radius("gal", 0.1)


def test_every_grid_is_declared_and_expands_in_order():
    for method in METHODS:
        points = grid_points(method, 0.1)
        assert len(points) == math.prod(len(v) for v in GRIDS[method].values())
        assert all(p["diversity"] == method for p in points)
    assert all(p["noise_sigma"] == 0.25 for p in grid_points("drt", 0.1))  # DRT's own noise
    for method in ("cos", "gal", "gdr"):  # the first tuning chose 2 for all three: its edge
        assert max(p["lam"] for p in grid_points(method, 0.1)) > 2
    trs = grid_points("trs", 0.1)
    assert [(p["lam"], p["trs_eps"], p["trs_eps_start"]) for p in trs] == [
        (10.0, 0.05, round(0.05 / 3, 6)), (10.0, 0.1, round(0.1 / 3, 6)),
        (10.0, 0.2, round(0.2 / 3, 6)), (40.0, 0.05, round(0.05 / 3, 6)),
        (40.0, 0.1, round(0.1 / 3, 6)), (40.0, 0.2, round(0.2 / 3, 6))]


def _rec(method, val, transfer, white=0.0, **settings):
    return {"method": method, "settings": settings, "val_acc": val, "transfer": transfer,
            "whitebox_acc": white}


def test_the_rule_picks_the_least_transfer_within_a_point_of_plain():
    recs = [_rec("none", 0.980, 0.50),
            _rec("gal", 0.971, 0.20, lam=0.1),   # 0.9 points below plain: allowed
            _rec("gal", 0.969, 0.05, lam=2.0),   # 1.1 points below: too costly
            _rec("trs", 0.975, 0.10, 0.2, lam=10), _rec("trs", 0.978, 0.10, 0.3, lam=40),
            _rec("adp", 0.90, 0.01, lam=1.0), _rec("cos", 0.979, float("nan"), lam=0.1)]
    out = select(recs)
    assert out["chosen"]["gal"]["settings"] == {"lam": 0.1}
    assert out["chosen"]["trs"]["settings"] == {"lam": 40}  # tie on transfer: more robust
    assert "adp" not in out["chosen"] and "best 0.9000" in out["rejected"]["adp"]
    assert out["fallback"]["adp"]["settings"] == {"lam": 1.0} and "gal" not in out["fallback"]
    assert "cos" in out["rejected"]  # an undefined transfer never wins
    assert select(recs, tolerance=0.02)["chosen"]["gal"]["settings"] == {"lam": 2.0}
    with pytest.raises(EnsdivError, match="needs the plain ensemble's record"):
        select(recs[1:])


def test_the_final_runs_read_the_choice_or_a_stated_fallback():
    recs = [_rec("none", 0.980, 0.50), _rec("gal", 0.975, 0.20, lam=0.5),
            _rec("drt", 0.90, 0.1, lam=0.1), _rec("drt", 0.95, 0.3, lam=0.5),
            _rec("drt", 0.95, 0.2, lam=2.0)]
    choice = select(recs)
    choice["chosen"] = {m: {"point": "x", **r} for m, r in choice["chosen"].items()}
    choice["fallback"] = {m: {"point": "drt-2", **r} for m, r in choice["fallback"].items()}
    assert tuned_settings(choice, "gal") == ({"lam": 0.5}, None)
    assert tuned_settings(choice, "none") == ({"diversity": "none"}, None)
    settings, note = tuned_settings(choice, "drt")
    assert settings == {"lam": 2.0}  # highest validation accuracy, then lower transfer
    assert "chose no drt setting" in note and "drt-2" in note
    with pytest.raises(EnsdivError, match="holds no setting for trs; it tuned: drt, gal"):
        tuned_settings(choice, "trs")
