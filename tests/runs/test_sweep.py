import json

import pytest

from ensdiv.attack_suite import AttackSpec, sanity_warnings, transfer_spec, whitebox_suite
from ensdiv.errors import EnsdivError
from ensdiv.io import read_jsonl
from ensdiv.runs.rundir import RECORDS
from ensdiv.runs.sweep import SweepConfig, run_sweep

TINY = SweepConfig(dataset="digits", arch="mlp", members=2, lams=(0.0, 2.0), seeds=1, epochs=1,
                   n_eval=30, attacks=("fgsm", "pgd"), eps=(0.05, 0.2), steps=2,
                   apgd_steps=4)


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


def test_records_hold_the_full_test_set_accuracy_of_the_last_epoch(tiny_sweep, tmp_path):
    """``ensemble_acc`` is on the n evaluation points; ``test_acc`` is the training's own last
    epoch on the whole test set — and a sweep written before it existed gets it from its run
    folders' metrics when read."""
    import shutil

    from ensdiv.loop import read_metrics
    from ensdiv.runs.records import read_sweep_records, run_name

    out, records, _ = tiny_sweep
    for rec in records:
        final = read_metrics(out / run_name(rec["lam"], rec["seed"]))[-1]
        assert final["epoch"] == rec["epochs"] and final["n"] == 360  # digits' test split
        assert (rec["test_acc"], rec["test_member_acc"], rec["test_n"]) == (
            final["ensemble_acc"], final["member_acc"], final["n"])
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / RECORDS).write_text("".join(
        json.dumps({k: v for k, v in r.items() if not k.startswith("test_")}) + "\n"
        for r in records))
    assert read_sweep_records(old) == json.loads(json.dumps(records))
    shutil.rmtree(old / run_name(2.0, 0))  # no run folder: nothing to fill in
    assert "test_acc" not in read_sweep_records(old)[1]


def test_finished_points_are_not_retrained(tiny_sweep):
    out, records, _ = tiny_sweep
    lines = []
    again = run_sweep(TINY, out, resume=True, progress=False, log=lines.append)
    assert again == json.loads(json.dumps(records))
    assert not any("lam=" in line for line in lines)


def test_interrupted_sweep_resumes(tmp_path):
    cfg = SweepConfig(**{**TINY.__dict__, "lams": (0.0,), "attacks": ("fgsm",), "eps": (0.1,)})
    run_sweep(cfg, tmp_path, progress=False, log=lambda s: None)
    (tmp_path / RECORDS).unlink()  # as if killed after training, before the record
    recs = run_sweep(cfg, tmp_path, resume=True, progress=False, log=lambda s: None)
    assert len(recs) == 1


def test_different_sweep_refused(tiny_sweep):
    out, _, _ = tiny_sweep
    other = SweepConfig(**{**TINY.__dict__, "seeds": 2})
    with pytest.raises(EnsdivError, match="different sweep"):
        run_sweep(other, out, progress=False, log=lambda s: None)
    with pytest.raises(EnsdivError, match=r"differs in seeds \(saved 1, given 2\)"):
        run_sweep(other, out, resume=True, progress=False, log=lambda s: None)


@pytest.mark.parametrize("kwargs, message", [
    ({"lams": (-1.0,)}, "lams must be >= 0"),
    ({"members": 1}, "at least 2 members"),
    ({"attacks": ("cw",)}, "fgsm, mifgsm, pgd"),
    ({"eps": (-0.1,)}, "eps"),
    ({"seeds": 0}, "seeds"),
    ({"n_eval": 0}, "n_eval"),
    ({"apgd_steps": 0}, "apgd steps"),
    ({"attacks": ("apgd",)}, "fgsm, mifgsm, pgd"),
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
    slow = [{"attack": "pgd", "eps": 0.1, "blackbox": {"rate": 0.2},
             "whitebox": {"rate": 0.5, "warning": "white-box pgd had not converged"}}]
    assert sanity_warnings(0.0, 1.0, slow) == ["white-box pgd had not converged"]


def test_records_say_which_attack_budget_keep_rule_and_seed(tiny_sweep):
    _, records, _ = tiny_sweep
    for rec in records:
        for a in rec["attacks"]:
            eps = a["eps"]
            made = a["transfer"]["crafted_with"]
            assert made["keep"] == "last"
            assert made["eps"] == eps and made["steps"] == a["steps"]
            assert a["to_ensemble"]["crafted_with"] == made
            assert a["blackbox"]["crafted_with"] == {**made, "on": "surrogate"}
            wb = a["whitebox"]
            assert wb["total"] == round(rec["ensemble_acc"] * rec["n"])
            assert "warning" in wb and "half_budget" in wb
            if a["attack"] == "pgd":
                first = a["transfer_first_success"]["crafted_with"]
                assert first["keep"] == "success" and first["seed"] == rec["eval_seed"]
                assert a["transfer_mean_first_success"] == a["transfer_first_success"][
                    "mean_transfer"]
                assert list(wb["attacks"]) == ["pgd", "apgd-ce", "apgd-dlr"]
                setups = {k: v["setup"] for k, v in wb["attacks"].items()}
                assert setups["pgd"]["steps"] == 2 and setups["pgd"]["keep"] == "success"
                assert setups["apgd-ce"]["steps"] == setups["apgd-dlr"]["steps"] == 4
                assert all(s["seed"] == rec["eval_seed"] and s["eps"] == eps
                           for s in setups.values())
                half = {k: v["setup"]["steps"] for k, v in wb["half_budget"]["attacks"].items()}
                assert half == {"pgd": 1, "apgd-ce": 2, "apgd-dlr": 2}
                # PGD alone ran on every correct input; the union is at least its success.
                assert wb["attacks"]["pgd"]["total"] == wb["total"]
                assert wb["fooled"] >= wb["attacks"]["pgd"]["fooled"]
                assert wb["fooled"] >= wb["half_budget"]["fooled"]
            else:
                assert list(wb["attacks"]) == ["fgsm"]


def test_attack_specs():
    cfg = SweepConfig(steps=10, apgd_steps=50, eval_seed=3)
    names = [s.name for s in whitebox_suite("pgd", 0.1, cfg)]
    assert names == ["pgd", "apgd-ce", "apgd-dlr"]
    assert [s.name for s in whitebox_suite("mifgsm", 0.1, cfg)] == ["mifgsm"]
    t = transfer_spec("pgd", 0.1, cfg)
    assert (t.keep, t.steps, t.seed) == ("last", 10, 3)
    assert t.to_dict()["alpha"] == pytest.approx(0.025)
    assert AttackSpec("fgsm", 0.1, 10, "last", 0).budget == 1
    assert AttackSpec("pgd", 0.1, 1, "last", 0).halved().steps == 1


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
    code = main(["plot", "gdr-vs-attack", str(tmp_path / "s"), "--out-dir",
                 str(tmp_path / "fig"), "--table"])
    text = capsys.readouterr().out
    assert code == 0 and "| member → member transfer, FGSM |" in text
    assert "| FGSM | 0.1 | one step |" in text and "Spearman ρ (p) over n = 2" in text
    code = main(["plot", "gdr-vs-attack", str(tmp_path / "none")])
    assert code == 2 and "no sweep records" in capsys.readouterr().err
    code = main(["plot", "gdr-vs-attack", str(tmp_path / "s")])  # default: beside the records
    assert code == 0 and (tmp_path / "s" / "figures" / "gdr_vs_attack.png").exists()


def test_log_has_a_line_per_trained_epoch(tiny_sweep):
    _, _, lines = tiny_sweep
    assert "  surrogate epoch 1/1" in lines[0]
    epoch_lines = [s for s in lines if " epoch 1/1: loss " in s]
    assert len(epoch_lines) == 3  # surrogate + 2 ensembles
    assert any(s.startswith("  lam=2 seed=0 epoch 1/1") for s in epoch_lines)


def test_records_hold_the_used_lam_and_plain_floats(tiny_sweep):
    out, records, _ = tiny_sweep
    plain = json.loads((out / "lam0-seed0" / "config.json").read_text())
    assert plain["diversity"] == "none" and plain["lam"] == 0.0
    gal = json.loads((out / "lam2-seed0" / "config.json").read_text())
    assert gal["diversity"] == "gal" and gal["lam"] == 2.0
    for r in records:
        assert r["time"].endswith("Z")
        for acc in [*r["member_acc"], r["ensemble_acc"]]:
            assert acc * r["n"] == pytest.approx(round(acc * r["n"]), abs=1e-3)


def test_sweep_needs_resume_to_continue_and_a_diversity_for_lams(tiny_sweep, tmp_path):
    out, _, _ = tiny_sweep
    with pytest.raises(EnsdivError, match="holds this sweep already.*--resume"):
        run_sweep(TINY, out, progress=False, log=lambda s: None)
    none = SweepConfig(**{**TINY.__dict__, "diversity": "none"})
    with pytest.raises(EnsdivError, match="needs a diversity term"):
        none.validate()
    assert SweepConfig(**{**TINY.__dict__, "diversity": "none", "lams": (0.0,)}).validate()


def test_validation_happens_before_any_training(tmp_path):
    bad = SweepConfig(**{**TINY.__dict__, "eps": (float("inf"),)})
    with pytest.raises(EnsdivError, match=r"--eps must be a number in \(0, 1\]"):
        run_sweep(bad, tmp_path / "s", progress=False, log=lambda s: None)
    assert not (tmp_path / "s").exists()


def test_cli_sweep_resumes_from_out_alone(tmp_path, capsys):
    from ensdiv.cli import main

    argv = ["sweep", "--dataset", "digits", "--arch", "mlp", "--members", "2", "--lams", "0,1",
            "--seeds", "1", "--epochs", "1", "--n-eval", "20", "--attacks", "fgsm", "--eps",
            "0.1", "--quiet", "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    first = (tmp_path / "s" / RECORDS).read_text().splitlines()
    (tmp_path / "s" / RECORDS).write_text(first[0] + "\n")  # as if killed before the 2nd record
    capsys.readouterr()
    assert main(["sweep", "--out", str(tmp_path / "s"), "--resume", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "lam=1 seed=0:" in out and "lam=0 seed=0:" not in out
    assert len((tmp_path / "s" / RECORDS).read_text().splitlines()) == 2


def test_train_with_the_sweeps_flags_reproduces_a_sweep_ensemble(tiny_sweep, tmp_path):
    import torch

    from ensdiv.cli import main

    out, _, _ = tiny_sweep
    assert main(["train", "--dataset", "digits", "--arch", "mlp", "--members", "2",
                 "--epochs", "1", "--diversity", "gal", "--lam", "2", "--seed", "0",
                 "--quiet", "--out", str(tmp_path / "t")]) == 0
    a = torch.load(out / "lam2-seed0" / "checkpoint.pt", weights_only=True)["ensemble"]
    b = torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)["ensemble"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "t" / "config.json").read_text()) == json.loads(
        (out / "lam2-seed0" / "config.json").read_text())


def test_two_sweeps_plot_and_table_together(tiny_sweep, tmp_path, capsys):
    """A second regularizer's sweep without its own plain baseline joins the first one's."""
    from ensdiv.cli import main

    out, _, _ = tiny_sweep
    other = SweepConfig(**{**TINY.__dict__, "diversity": "cos", "lams": (1.0,)})
    run_sweep(other, tmp_path / "cos", progress=False, log=lambda s: None)
    code = main(["plot", "gdr-vs-attack", str(out), str(tmp_path / "cos"), "--out-dir",
                 str(tmp_path / "fig"), "--table"])
    text = capsys.readouterr().out
    assert code == 0 and "3 ensembles, GDR" in text
    assert "| measure | λ = 0 | gal λ = 2 | cos λ = 1 |" in text
    assert "| λ = 0 | gal λ = 2 | fall (×) | cos λ = 1 | fall (×) |" in text
    assert (tmp_path / "fig" / "gdr_vs_attack.png").stat().st_size > 10_000


@pytest.mark.parametrize("diversity,own", [("trs", "trs_eps"), ("dverge", "dverge_eps"),
                                           ("adp", "adp_alpha")])
def test_a_sweep_trains_every_baseline_at_its_defaults(diversity, own):
    cfg = SweepConfig(**{**TINY.__dict__, "diversity": diversity}).validate()
    plain, method = cfg.train_config(0.0, 0), cfg.train_config(2.0, 0)
    assert plain.diversity == "none" and getattr(plain, own) is None
    assert method.diversity == diversity and method.lam == 2.0
    assert getattr(method, own) is not None  # the method's default, recorded


def test_a_dverge_sweep_runs(tmp_path):
    cfg = SweepConfig(**{**TINY.__dict__, "diversity": "dverge", "lams": (1.0,),
                         "attacks": ("fgsm",), "eps": (0.1,)})
    (rec,) = run_sweep(cfg, tmp_path, progress=False, log=lambda s: None)
    assert rec["trained_with"] == "dverge" and 0 <= rec["gdr"] <= 0.5


def test_a_sweep_can_be_judged_on_held_out_training_data(tmp_path):
    import torch

    from ensdiv.data import load_dataset, validation_split
    from ensdiv.errors import EnsdivError
    from ensdiv.io import read_json, read_jsonl
    from ensdiv.runs.sweep import SweepConfig, run_sweep

    config = SweepConfig(dataset="digits", arch="mlp", members=2, lams=(0.0,), seeds=1,
                         epochs=1, attacks=("fgsm",), eps=(0.1,), n_eval=20, steps=2,
                         apgd_steps=2, val_fraction=0.2, eval_split="val")
    data = load_dataset("digits")
    x_val = validation_split(data[0], 0.2, seed=0)[1].tensors[0]
    assert torch.equal(config.eval_data(data).tensors[0], x_val)  # never the test images
    recs = run_sweep(config, tmp_path / "s", progress=False, log=lambda s: None)
    assert recs[0]["eval_split"] == "val" and recs[0]["n"] == 20
    trained = read_json(tmp_path / "s" / "lam0-seed0" / "config.json")
    assert trained["val_fraction"] == 0.2  # its ensembles never trained on those images
    assert read_jsonl(tmp_path / "s" / "lam0-seed0" / "metrics.jsonl")[0]["val_n"] == len(x_val)
    with pytest.raises(EnsdivError, match="needs|give --val-fraction"):
        SweepConfig(eval_split="val").validate()
    with pytest.raises(EnsdivError, match="unknown eval split 'train'"):
        SweepConfig(eval_split="train").validate()
