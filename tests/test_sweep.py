import json

import pytest

from ensdiv.errors import EnsdivError
from ensdiv.io import read_jsonl
from ensdiv.sweep import RECORDS, SweepConfig, run_sweep, sanity_warnings

TINY = SweepConfig(dataset="digits", arch="mlp", members=2, lams=(0.0, 2.0), seeds=1, epochs=1,
                   n_eval=30, attacks=("fgsm", "pgd"), eps=(0.05, 0.2), steps=2)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    lines = []
    records = run_sweep(TINY, out, progress=False, log=lines.append)
    return out, records, lines


def test_records_complete_and_round_trip(tiny_sweep):
    out, records, lines = tiny_sweep
    assert [(r["lam"], r["seed"]) for r in records] == [(0.0, 0), (2.0, 0)]
    assert read_jsonl(out / RECORDS) == json.loads(json.dumps(records))
    rec = records[1]
    assert rec["trained_with"] == "gal" and records[0]["trained_with"] == "none"
    for key in ("member_acc", "ensemble_acc", "gdr", "gdr_sem", "gdr_n", "gdr_excluded",
                "mean_cos", "n", "eval_seed", "huge_eps_pgd", "warnings", "attacks"):
        assert key in rec
    assert rec["n"] == 30 and rec["gdr_n"] + rec["gdr_excluded"] == 30
    assert {(a["attack"], a["eps"]) for a in rec["attacks"]} == {
        ("fgsm", 0.05), ("fgsm", 0.2), ("pgd", 0.05), ("pgd", 0.2)}
    for a in rec["attacks"]:
        assert {"whitebox", "transfer_mean", "blackbox", "transfer", "steps"} <= set(a)
        assert 0 <= a["whitebox"]["rate"] <= 1 and a["whitebox"]["total"] <= 30
    assert any("lam=2 seed=0" in line for line in lines)


def test_finished_points_are_not_retrained(tiny_sweep):
    out, records, _ = tiny_sweep
    lines = []
    again = run_sweep(TINY, out, progress=False, log=lines.append)
    assert again == json.loads(json.dumps(records))
    assert not any("lam=" in line for line in lines)


def test_interrupted_sweep_resumes(tmp_path):
    cfg = SweepConfig(**{**TINY.__dict__, "lams": (0.0,), "attacks": ("fgsm",), "eps": (0.1,)})
    run_sweep(cfg, tmp_path, progress=False, log=lambda s: None)
    (tmp_path / RECORDS).unlink()  # as if killed after training, before the record
    recs = run_sweep(cfg, tmp_path, progress=False, log=lambda s: None)
    assert len(recs) == 1


def test_different_sweep_refused(tiny_sweep):
    out, _, _ = tiny_sweep
    other = SweepConfig(**{**TINY.__dict__, "seeds": 2})
    with pytest.raises(EnsdivError, match="different sweep.*seeds"):
        run_sweep(other, out, progress=False, log=lambda s: None)


@pytest.mark.parametrize("kwargs, message", [
    ({"lams": (-1.0,)}, "lams must be >= 0"),
    ({"members": 1}, "at least 2 members"),
    ({"attacks": ("cw",)}, "fgsm, mifgsm, pgd"),
    ({"eps": (-0.1,)}, "eps"),
    ({"seeds": 0}, "seeds"),
    ({"n_eval": 0}, "n_eval"),
])
def test_validation(kwargs, message):
    with pytest.raises(EnsdivError, match=message):
        SweepConfig(**{**TINY.__dict__, **kwargs}).validate()


def test_sanity_warnings():
    ok = [{"attack": "pgd", "eps": 0.1, "whitebox": {"rate": 0.5}, "blackbox": {"rate": 0.2}}]
    assert sanity_warnings(0.0, 1.0, ok) == []
    bad = [{"attack": "pgd", "eps": 0.1, "whitebox": {"rate": 0.1}, "blackbox": {"rate": 0.2}}]
    msgs = sanity_warnings(0.5, 0.7, bad)
    assert len(msgs) == 3
    assert "zero input gradient" in msgs[0] and "eps=1.0" in msgs[1] and "beats" in msgs[2]


def test_cli_sweep_and_plot_end_to_end(tmp_path, capsys):
    from ensdiv.cli import main

    code = main(["sweep", "--dataset", "digits", "--arch", "mlp", "--members", "2",
                 "--lams", "0,1", "--seeds", "1", "--epochs", "1", "--n-eval", "20",
                 "--attacks", "fgsm", "--eps", "0.1", "--out", str(tmp_path / "s"), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0 and "2 records in" in text
    code = main(["plot", "gdr-vs-attack", str(tmp_path / "s"), "--out-dir",
                 str(tmp_path / "fig"), "--attack", "fgsm"])
    text = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "fig" / "gdr_vs_attack.png").stat().st_size > 10_000
    assert (tmp_path / "fig" / "transfer_heatmaps.png").stat().st_size > 10_000
    assert "2 ensembles, GDR" in text and "spearman_rho" in text
    code = main(["plot", "gdr-vs-attack", str(tmp_path / "none")])
    assert code == 2 and "no sweep records" in capsys.readouterr().err
