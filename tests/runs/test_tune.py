"""ensdiv tune: the grid trained and judged on the validation split only, resumable, and the
rule's choice written."""

import json

import pytest
import torch

from ensdiv.cli import main
from ensdiv.data import load_dataset, validation_split
from ensdiv.io import atomic_write_jsonl, read_jsonl
from ensdiv.runs import tune
from ensdiv.runs.tune import TuneConfig, read_chosen, tune_into
from ensdiv.tuning import select

TINY = dict(dataset="digits", arch="mlp", members=2, methods=("gal", "dverge"), epochs=1,
            n=30, transfer_steps=2, apgd_steps=3)


def test_the_grid_is_judged_on_held_out_training_images_and_the_rule_is_applied(
        tmp_path, monkeypatch, one_thread):
    seen = []
    real = tune.card_transfer
    monkeypatch.setattr(tune, "card_transfer",
                        lambda ens, x, y, **kw: seen.append(x.clone()) or real(ens, x, y, **kw))
    chosen = tune_into(TuneConfig(**TINY), tmp_path / "t", log=lambda s: None)
    records = read_jsonl(tmp_path / "t" / "records.jsonl")
    assert [r["point"] for r in records] == ["plain", "gal-0", "gal-1", "gal-2", "gal-3",
                                             "dverge-0", "dverge-1", "dverge-2"]
    data = load_dataset("digits")
    val = validation_split(data[0], 0.1, seed=0)[1].tensors[0][:30]
    assert all(torch.equal(x, val) for x in seen)  # never a test image
    assert not any(torch.equal(x, data[1].tensors[0][:30]) for x in seen)
    for r in records:
        assert r["n"] == 30 and r["eps"] == 0.1 and 0 <= r["whitebox_acc"] <= r["val_acc"] + 1
        assert r["val_n"] == len(validation_split(data[0], 0.1, seed=0)[1])
    again = select(records, tolerance=0.01)
    assert {m: r["point"] for m, r in again["chosen"].items()} == \
        {m: c["point"] for m, c in chosen["chosen"].items()}
    assert read_chosen(tmp_path / "t") == json.loads(json.dumps(chosen))
    assert set(chosen["chosen"]) | set(chosen["rejected"]) == {"gal", "dverge"}
    assert set(chosen["fallback"]) == set(chosen["rejected"])  # each with its best point
    # the trained grid points are ordinary run folders with their validation split recorded
    saved = json.loads((tmp_path / "t" / "gal-1" / "config.json").read_text())
    assert saved["lam"] == 0.5 and saved["val_fraction"] == 0.1
    assert saved["init_from"] is None and records[1]["init"] is None
    # DVERGE fine-tunes the trained plain ensemble, as its paper does, not a fresh one
    saved = json.loads((tmp_path / "t" / "dverge-0" / "config.json").read_text())
    assert saved["init_from"] == str(tmp_path / "t" / "plain") and saved["init_weights"]
    assert records[5]["init"] == "plain"


def test_a_killed_tuning_resumes_with_the_points_it_lacks(tmp_path, monkeypatch, one_thread):
    config = TuneConfig(**{**TINY, "methods": ("gal",)})
    tune_into(config, tmp_path / "t", log=lambda s: None)
    path = tmp_path / "t" / "records.jsonl"
    records = read_jsonl(path)
    atomic_write_jsonl(path, records[:-1])  # killed before the last point's record
    trained = []
    real = tune.train
    monkeypatch.setattr(tune, "train", lambda c, *a, **kw: trained.append(c) or real(c, *a, **kw))
    with pytest.raises(Exception, match="--resume"):
        tune_into(config, tmp_path / "t", log=lambda s: None)
    tune_into(config, tmp_path / "t", resume=True, log=lambda s: None)
    assert [c.lam for c in trained] == [8.0]  # the last point only
    redone = read_jsonl(path)
    assert len(redone) == len(records)
    assert redone[-1]["val_acc"] == records[-1]["val_acc"]  # resumed from its finished run


@pytest.mark.parametrize("extra, match", [
    (["--methods", "dropout"], "unknown method 'dropout'"),
    (["--eps", "0"], "--eps must be a number in"),
    (["--val-fraction", "1"], "--val-fraction must be in"),
    (["--members", "1"], "at least 2 members"),
    (["--tolerance", "-0.1"], "--tolerance"),
])
def test_bad_settings_are_one_line_before_any_work(tmp_path, capsys, extra, match):
    assert main(["tune", "--dataset", "digits", "--out", str(tmp_path / "t"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ensdiv: error:") and match in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_the_command_prints_each_choice_and_each_rejected_methods_fallback(tmp_path, capsys,
                                                                          one_thread):
    args = ["tune", "--dataset", "digits", "--arch", "mlp", "--members", "2", "--methods",
            "gal", "--epochs", "1", "--n", "20", "--transfer-steps", "2", "--apgd-steps", "2",
            "--quiet", "--out", str(tmp_path / "t")]
    assert main([*args, "--tolerance", "0"]) == 0
    out = capsys.readouterr().out
    chosen = read_chosen(tmp_path / "t")
    for method, c in chosen["chosen"].items():
        assert f"  {method}: {c['point']} " in out
    for method, why in chosen["rejected"].items():
        assert f"  {method}: none chosen — {why}; fallback " \
               f"{chosen['fallback'][method]['point']}" in out


def test_an_undefined_proxy_is_said_not_a_crash():
    # a grid point whose members classify no validation pair right has no transfer (null)
    assert tune._num(None) == tune._num(float("nan")) == "undefined"
    assert tune._num(0.12345) == "0.123"
