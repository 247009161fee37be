import json
import math
import re

import pytest

from ensdiv.card import CARD_ATTACKS, Card
from ensdiv.cli import main
from ensdiv.errors import EnsdivError
from ensdiv.runs import evaluate as ev
from ensdiv.runs.evaluate import EvaluateConfig, write_card
from ensdiv.runs.records import read_card
from ensdiv.runs.report import card_table
from ensdiv.runs.train import train_run
from ensdiv.training import TrainConfig

TINY = ["--n", "30", "--apgd-steps", "4", "--mora-steps", "2", "--square-queries", "20",
        "--transfer-steps", "3", "--quiet"]


def tiny(run, **kw):
    return EvaluateConfig(run=str(run), n=30, apgd_steps=4, mora_steps=2, square_queries=20,
                          transfer_steps=3, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("eval")
    train_run(TrainConfig(dataset="digits", arch="mlp", members=2, epochs=2, seed=0),
              out_dir=root / "plain", progress=False)
    train_run(TrainConfig(dataset="digits", arch="mlp", members=2, epochs=2, seed=5),
              out_dir=root / "other", progress=False)
    train_run(TrainConfig(dataset="digits", arch="mlp", members=1, epochs=1, seed=1),
              out_dir=root / "single", progress=False)
    return root


def test_card_fields_are_present_typed_and_rendered(runs, tmp_path, capsys):
    out = tmp_path / "card"
    args = ["evaluate", str(runs / "plain"), "--out", str(out), "--aggregation",
            "softmax,vote", "--surrogate", str(runs / "other"), "--sigma", "0.25",
            "--cert-points", "4", "--cert-n", "50", "--name", "tiny", *TINY]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| tiny | digits | 0.1 | softmax |" in printed
    assert "| tiny | digits | 0.1 | vote |" in printed
    card = json.loads((out / "card.json").read_text())
    # RobustBench's fields
    for key, kind in [("name", str), ("dataset", str), ("threat_model", str), ("eps", float),
                      ("architecture", str), ("clean_acc", float), ("robust_acc", float),
                      ("n", int), ("number_forward_passes", int), ("reported", str)]:
        assert isinstance(card[key], kind), key
    assert card["name"] == "tiny" and card["threat_model"] == "Linf"
    assert card["architecture"] == "2 × mlp" and card["number_forward_passes"] == 2
    assert card["n"] == 30 and card["seed"] == 0 and card["aggregation"] == "softmax"
    assert len(card["weights_fingerprint"]) == 16 and card["ensdiv_version"]
    assert [e["aggregation"] for e in card["evaluations"]] == ["softmax", "vote"]
    head = card["evaluations"][0]
    assert card["robust_acc"] == head["robust_acc"] and card["clean_acc"] == head["clean_acc"]
    for e in card["evaluations"]:
        assert set(e["attacks"]) == set(CARD_ATTACKS)
        assert 0 <= e["robust_acc"] <= e["averaged_output_robust_acc"] <= e["clean_acc"]
        assert e["surrogate"]["crafted_with"]["on"] == "surrogate"
        assert {"huge_eps_pgd", "apgd_ce_half_budget"} <= set(e["sanity"])
        for a in e["attacks"].values():
            assert a["setup"]["eps"] == 0.1 and a["setup"]["seed"] == 0
    assert len(card["members"]) == 2 and len(card["transfer"]["fooled"]) == 2
    assert 0 <= card["gdr"] <= 0.5 and -1 <= card["mean_cos"] <= 1
    assert card["surrogate"]["given"] == str(runs / "other")
    cert = card["certified"]
    assert cert["points"] == 4 and len(cert["accuracy"]) == 5 and cert["sigma"] == 0.25
    assert set(card["seconds"]) >= {"gradients", "members", "transfer", "whitebox-softmax",
                                    "whitebox-vote", "surrogate", "certified", "total"}
    md = (out / "card.md").read_text()
    assert md.startswith("# tiny — robustness card") and "vote (via softmax)" in md
    assert "Certified (Cohen et al., σ = 0.25" in md
    # the leaderboard reads cards back, one row per rule
    assert main(["evaluate", "--table", str(out), str(out / "card.json")]) == 0
    table = capsys.readouterr().out.strip().split("\n\n")[0].splitlines()
    assert len(table) == 2 + 4 and table[2].startswith("| tiny | digits | 0.1 | softmax | ")
    # the run's training time comes with it; --by-method groups cards by training method
    assert card["training"]["seconds"] > 0 and card["training"]["diversity"] == "none"
    assert main(["evaluate", "--table", str(out), "--by-method"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 3 and rows[2].startswith("| plain | 1 | ")
    # one run carded twice is one seed, not two: refused rather than averaged
    assert main(["evaluate", "--table", str(out), str(out), "--by-method"]) == 2
    assert "is carded more than once" in capsys.readouterr().err


def test_a_killed_evaluation_resumes_from_its_folder_and_equals_an_uninterrupted_one(
        runs, tmp_path, monkeypatch):
    fresh = write_card(tiny(runs / "plain", aggregations=("softmax", "logits")),
                       tmp_path / "fresh", log=lambda s: None)
    calls = []
    real = ev.card_whitebox

    def dies_on_the_second_rule(*a, **kw):
        calls.append(kw["aggregation"])
        if kw["aggregation"] == "logits":
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ev, "card_whitebox", dies_on_the_second_rule)
    out = tmp_path / "killed"
    args = ["evaluate", str(runs / "plain"), "--out", str(out), "--aggregation",
            "softmax,logits", *TINY]
    assert main(args) == 130  # interrupted
    assert calls == ["softmax", "logits"] and not (out / "card.json").exists()
    assert (out / "parts" / "whitebox-softmax.json").exists()
    # a plain rerun is refused: the folder holds a started evaluation
    assert main(args) == 2
    monkeypatch.setattr(ev, "card_whitebox", lambda *a, **kw: calls.append(kw["aggregation"])
                        or real(*a, **kw))
    assert main(["evaluate", "--out", str(out), "--resume", "--quiet"]) == 0
    assert calls == ["softmax", "logits", "logits"]  # softmax's stage was not run again
    resumed = read_card(out)

    def strip(card):
        card = json.loads(json.dumps(card.to_dict()))
        for k in ("seconds", "reported"):
            card.pop(k)
        for e in card["evaluations"]:
            for a in e["attacks"].values():
                a.pop("seconds")
        card["transfer"].pop("seconds")
        return card

    assert strip(resumed) == strip(fresh)


@pytest.mark.parametrize("extra, match", [
    (["--eps", "0"], "--eps must be a number in \\(0, 1\\]"),
    (["--eps", "-0.1"], "--eps must be"),
    (["--aggregation", "median"],
     "unknown aggregation rule .median.; choose one of: logits, softmax, vote"),
    (["--aggregation", "vote,vote"], "names a rule twice"),
    (["--apgd-steps", "0"], "--apgd-steps"),
])
def test_bad_settings_are_one_line_before_any_work(runs, tmp_path, capsys, extra, match):
    out = tmp_path / "bad"
    assert main(["evaluate", str(runs / "plain"), "--out", str(out), *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ensdiv: error:") and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
    assert not out.exists()


def test_a_single_model_is_not_an_ensemble(runs, tmp_path, capsys):
    assert main(["evaluate", str(runs / "single"), "--out", str(tmp_path / "s"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "single model, not an ensemble" in err and len(err.strip().splitlines()) == 1


def test_a_surrogate_of_another_data_set_is_refused(runs, tmp_path, capsys):
    from ensdiv.ensemble import Ensemble
    foreign = tmp_path / "foreign.pt"
    Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10,
                   config={"dataset": "mnist5k"}).save(foreign)
    with pytest.raises(EnsdivError, match="trained on mnist5k.*same data set"):
        write_card(tiny(runs / "plain", surrogate=str(foreign)), tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_cli_misuse_is_one_line(runs, tmp_path, capsys):
    for args, match in [
        (["evaluate", str(runs / "plain")], "--out DIR is needed"),
        (["evaluate", "--out", str(tmp_path / "x")], "give the run folder"),
        (["evaluate", "--table", str(tmp_path)], "no robustness card"),
        (["evaluate", "--table", str(tmp_path), "--eps", "0.2"], "--table only reads cards"),
        (["evaluate", "--out", str(tmp_path / "nothing"), "--resume"], "holds no evaluation"),
    ]:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("ensdiv: error:") and match in err, (args, err)
        assert len(err.strip().splitlines()) == 1


def test_read_card_refuses_a_foreign_json(tmp_path):
    (tmp_path / "card.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(EnsdivError, match="not an ensdiv robustness card"):
        read_card(tmp_path)


def test_the_plain_surrogate_is_trained_once_and_cached(runs, tmp_path, monkeypatch):
    trained = []
    real = ev.train

    def counting(config, data, **kw):
        trained.append(config)
        return real(config, data, **kw)

    monkeypatch.setattr(ev, "train", counting)
    cache = tmp_path / "cache"
    a = write_card(tiny(runs / "plain", surrogate="plain"), tmp_path / "a", cache=cache,
                   log=lambda s: None)
    b = write_card(tiny(runs / "other", surrogate="plain"), tmp_path / "b", cache=cache,
                   log=lambda s: None)
    assert len(trained) == 1  # the second card reuses it
    cfg = trained[0]
    assert (cfg.dataset, cfg.arch, cfg.members, cfg.epochs, cfg.diversity, cfg.seed) == (
        "digits", "mlp", 2, 2, "none", ev.SURROGATE_SEED)
    assert a.surrogate["weights"] == b.surrogate["weights"] and a.surrogate["given"] == "plain"
    assert a.evaluations[0]["surrogate"]["total"] > 0


def test_card_table_counts_what_mora_and_square_added():
    ev_ = {"aggregation": "vote", "clean_acc": 0.9, "robust_acc": 0.2, "robust_acc_se": 0.02,
           "averaged_output_robust_acc": 0.3, "averaged_output_robust_acc_se": 0.02,
           "warnings": ["w"], "surrogate": {"rate": 0.25},
           "attacks": {"mora": {"broke_first": 4}, "square": None}}
    card = Card(name="g", dataset="mnist5k", eps=0.3, n=10, aggregation="vote", clean_acc=0.9,
                robust_acc=0.2, robust_acc_se=0.02, gdr=None, transfer={"mean": math.nan},
                evaluations=[ev_])
    row = card_table([card]).splitlines()[-1]
    assert row == ("| g | mnist5k | 0.3 | vote | 0.900 | 0.200 ± 0.020 | 0.300 ± 0.020 | "
                   "4 + — | — | 0.250 | — | 1 |")


def test_a_cached_surrogate_killed_mid_training_is_finished_before_any_card_uses_it(tmp_path):
    import dataclasses

    from ensdiv.data import load_dataset
    from ensdiv.loop import finished_epochs
    from ensdiv.training import train

    config = TrainConfig(dataset="digits", arch="mlp", members=2, epochs=2,
                         seed=ev.SURROGATE_SEED).validate()
    name = ev.plain_surrogate(config, cache=tmp_path / "full", log=lambda s: None).name
    killed = tmp_path / "killed" / "surrogates" / name
    # what a training killed after its first epoch leaves: ensemble.pt of epoch 1 of 2
    train(dataclasses.replace(config, epochs=1), load_dataset("digits"), out_dir=killed,
          progress=False)
    assert (killed / "ensemble.pt").is_file() and finished_epochs(killed) == 1
    folder = ev.plain_surrogate(config, cache=tmp_path / "killed", log=lambda s: None)
    assert folder == killed and finished_epochs(killed) == 2


def test_a_card_of_an_unfinished_run_says_so(tmp_path):
    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    config = TrainConfig(dataset="digits", arch="mlp", members=2, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, out_dir=tmp_path / "run", progress=False,
                  on_epoch_end=stop_after_first)
    card = write_card(tiny(tmp_path / "run"), tmp_path / "card", log=lambda s: None)
    assert card.training["epochs"] == 1 and card.training["epochs_planned"] == 3
    assert "the run finished 1 of its 3 epochs" in card.warnings[0]
    assert "the run finished 1 of its 3 epochs" in (tmp_path / "card" / "card.md").read_text()
