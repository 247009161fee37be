import json

import pytest

from ensdiv.card import CARD_ATTACKS
from ensdiv.cli import main
from ensdiv.errors import EnsdivError
from ensdiv.runs.compare import CompareConfig
from ensdiv.runs.records import train_cost
from ensdiv.runs.train import train_run
from ensdiv.training import TrainConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("cmp")
    train_run(TrainConfig(dataset="digits", arch="mlp", members=1, epochs=2, seed=3,
                          noise_sigma=0.25), out_dir=root / "teacher", progress=False)
    train_run(TrainConfig(dataset="digits", arch="mlp", members=2, epochs=2),
              out_dir=root / "plain", progress=False)
    train_run(TrainConfig(dataset="digits", arch="mlp", members=2, epochs=2, noise_sigma=0.25,
                          teacher=str(root / "teacher"), transfer="crt"),
              out_dir=root / "crt", progress=False)
    return root


def test_compare_records_every_number_and_resumes(runs, tmp_path, capsys):
    args = ["compare", str(runs / "plain"), str(runs / "crt"), str(runs / "teacher"),
            "--n-eval", "40", "--steps", "4", "--apgd-steps", "4", "--mora-steps", "2",
            "--square-queries", "20", "--cert-n", "60",
            "--cert-points", "5", "--radii", "0.1,0.2", "--sigma", "0.25", "--quiet",
            "--out", str(tmp_path / "c")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| run | M | train min | teacher | clean acc | robust acc (ε = 0.1) |" in out
    assert "| crt | 2 |" in out and "| teacher | 0." in out.split("| crt | 2 |")[1]
    recs = [json.loads(x) for x in (tmp_path / "c" / "records.jsonl").read_text().splitlines()]
    assert [r["label"] for r in recs] == ["plain", "crt", "teacher"]
    plain, crt, teacher = recs
    assert crt["teacher"]["train_seconds"] == train_cost(runs / "teacher")["train_seconds"] > 0
    assert "teacher" not in plain and plain["epochs"] == 2
    for r in recs:
        wb = r["whitebox"]  # the robustness card's cascade, the code ensdiv evaluate runs
        assert r["robust_acc"] == wb["robust_acc"] and wb["n"] == 40 and wb["eps"] == 0.1
        assert r["robust_acc"] <= r["clean_acc"] == wb["clean_acc"]
        assert set(wb["attacks"]) == set(CARD_ATTACKS)
        broken = sum(a["broke_first"] for a in wb["attacks"].values() if a)
        assert r["robust_acc"] == pytest.approx(r["clean_acc"] - broken / 40)
        assert (wb["attacks"]["mora"] is None) == (r["members"] == 1)  # MORA needs members
        assert r["certified"]["points"] == 5 and len(r["certified"]["accuracy"]) == 2
    assert 0 <= plain["transfer_mean"] <= 1 and "gdr" in plain
    assert "transfer_mean" not in teacher  # one model: no members to transfer between
    assert (tmp_path / "c" / "certify-crt.jsonl").exists()
    # a rerun with --resume finds every run recorded and recomputes nothing
    assert main([*args, "--resume"]) == 0
    again = [json.loads(x) for x in (tmp_path / "c" / "records.jsonl").read_text().splitlines()]
    assert again == recs
    # --resume needs only the runs and --out: the settings come from compare.json
    assert main([*args[:4], "--quiet", "--out", str(tmp_path / "c"), "--resume"]) == 0
    assert [json.loads(x) for x in (tmp_path / "c" / "records.jsonl").read_text().splitlines()
            ] == recs
    # a label already recorded for another run is refused
    assert main([*args[:2], str(runs / "crt"), *args[4:], "--labels", "plain,teacher",
                 "--resume"]) == 2
    assert "holds 'teacher' for" in capsys.readouterr().err
    # a damaged compare.json is named, with what to do
    saved = json.loads((tmp_path / "c" / "compare.json").read_text())
    (tmp_path / "c" / "compare.json").write_text(json.dumps({**saved, "epz": 1}))
    assert main([*args[:4], "--out", str(tmp_path / "c"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "compare.json is not a valid comparison config" in err and "restore it" in err


@pytest.mark.parametrize("extra,message", [
    (["--eps", "0"], "--eps must be a number in (0, 1]"),
    (["--eps", "2"], "--eps must be a number in (0, 1]"),
    (["--radii", "-1"], "radius must be"),
    (["--labels", "a"], "--labels names 1 runs but 2 were given"),
    (["--labels", "a,a"], "labels must differ"),
])
def test_bad_settings_are_one_line_errors(runs, tmp_path, capsys, extra, message):
    args = ["compare", str(runs / "plain"), str(runs / "crt"), "--out", str(tmp_path / "x")]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_runs_of_different_data_sets_are_refused(runs, tmp_path, capsys):
    train_run(TrainConfig(dataset="mnist5k", arch="mlp", members=2, epochs=1),
              out_dir=tmp_path / "m5k", progress=False)
    assert main(["compare", str(runs / "plain"), str(tmp_path / "m5k"), "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "trained on different data sets: digits: plain; mnist5k: m5k" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_config_validation():
    with pytest.raises(EnsdivError, match="alpha must be in"):
        CompareConfig(alpha=1.0).validate()
    with pytest.raises(EnsdivError, match="radii needs at least one"):
        CompareConfig(radii=()).validate()
