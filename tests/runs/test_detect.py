import json

import pytest

from ensdiv.cli import main
from ensdiv.data import load_dataset
from ensdiv.errors import EnsdivError
from ensdiv.runs.detect import ADVERSARIES, DetectConfig, run_detection
from ensdiv.runs.train import train_run
from ensdiv.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gal")
    ens, _ = train_run(TrainConfig(dataset="digits", arch="mlp", members=3, epochs=6,
                                   diversity="gal", lam=1.0, seed=0), out_dir=out,
                       progress=False)
    return out, ens.eval()


@pytest.fixture(scope="module")
def digits_records(gal_run):
    _, ens = gal_run
    _, test, _ = load_dataset("digits")
    x, y = test.tensors
    cfg = DetectConfig(eps=0.3, steps=10, scores=("mean_kl_to_mean", "max_prob_deficit"),
                       kappas=(1.0, 10.0), n_eval=150, n_calib=150)
    return run_detection(ens, x, y, cfg, log=lambda s: None)


def test_records_cover_every_score_and_adversary(digits_records):
    recs = digits_records
    assert [(r["score"], r["adversary"]) for r in recs] == [
        (s, a) for s in ("mean_kl_to_mean", "max_prob_deficit") for a in ADVERSARIES]
    for r in recs:
        assert r["n"] == 150 and r["n_calib"] == 150 and r["fpr_target"] == 0.05
        assert r["attack"]["eps"] == 0.3 and r["attack"]["steps"] == 10
        assert r["attack"]["seed"] == 0 and "keep" in r["attack"]
        assert 0 <= r["detection_robust_acc"] <= r["clean_acc"]
        assert r["robust_acc"] <= r["detection_robust_acc"]
        assert r["roc"]["fpr"][0] == 0 and r["roc"]["tpr"][-1] == 1
    assert recs[3]["attack"]["kappas"] == [1.0, 10.0]
    json.dumps(recs)  # JSON-able


def test_disagreement_beats_confidence_on_transfer_and_agreement_is_adaptive(digits_records):
    by = {(r["score"], r["adversary"]): r for r in digits_records}
    # GAL members disagree on what fools one of them: the disagreement score separates
    # transferred examples better than the ensemble's own confidence does.
    assert by[("mean_kl_to_mean", "transfer")]["auroc"] > \
        by[("max_prob_deficit", "transfer")]["auroc"] + 0.01
    for score in ("mean_kl_to_mean", "max_prob_deficit"):
        white, agree = by[(score, "whitebox")], by[(score, "agreement")]
        assert agree["auroc"] < white["auroc"] - 0.2  # the agreement attack is really adaptive
        worst = by[(score, "adaptive")]
        assert worst["detection_robust_acc"] <= min(
            agree["detection_robust_acc"], by[(score, "penalized")]["detection_robust_acc"])


def test_config_validation():
    with pytest.raises(EnsdivError, match="unknown score 'entropy'"):
        DetectConfig(scores=("entropy",)).validate()
    with pytest.raises(EnsdivError, match="scores lists 'js_divergence' twice"):
        DetectConfig(scores=("js_divergence", "js_divergence")).validate()
    for eps in (float("nan"), 0.0, 2.0):  # detect --eps 0 once ran to the end (AUROC nan)
        with pytest.raises(EnsdivError, match=r"--eps must be a number in \(0, 1\]"):
            DetectConfig(eps=eps).validate()
    with pytest.raises(EnsdivError, match=r"fpr must be in \(0, 1\)"):
        DetectConfig(fpr=1.0).validate()
    with pytest.raises(EnsdivError, match="unknown agreement target"):
        DetectConfig(agreement_target="best").validate()
    with pytest.raises(EnsdivError, match="unknown detection settings: foo"):
        DetectConfig.from_dict({"foo": 1})


def test_cli_detect_resume_plot_and_errors(gal_run, tmp_path, capsys):
    run, _ = gal_run
    argv = ["detect", str(run), "--out", str(tmp_path / "d"), "--n-eval", "40", "--n-calib",
            "40", "--steps", "3", "--scores", "vote_disagreement,js_divergence", "--kappas", "1",
            "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| vote_disagreement | **adaptive, worst of the two** |" in out
    assert "10 records in" in out
    saved = json.loads((tmp_path / "d" / "detect.json").read_text())
    assert saved["scores"] == ["vote_disagreement", "js_divergence"] and len(saved["weights"]) == 16
    lines = (tmp_path / "d" / "records.jsonl").read_text().splitlines()
    (tmp_path / "d" / "records.jsonl").write_text("\n".join(lines[:5]) + "\n")  # killed mid-run
    assert main(["detect", str(run), "--out", str(tmp_path / "d"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "js_divergence: AUROC" in out and "vote_disagreement: AUROC" not in out
    assert len((tmp_path / "d" / "records.jsonl").read_text().splitlines()) == 10
    assert main(argv) == 2
    assert "holds this detection run already" in capsys.readouterr().err
    assert main(["plot", "detection", str(tmp_path / "d"), str(tmp_path / "d"), "--out-dir",
                 str(tmp_path / "fig"), "--table"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "fig" / "detection_roc.png").stat().st_size > 10_000
    assert "| gal λ = 1.0 | js_divergence |" in out
    for bad, message in [
        (["detect", str(run), "--out", str(tmp_path / "e"), "--n-eval", "300"],
         "n_eval + n_calib = 800 exceeds the 360 test images"),
        (["detect", str(run), "--out", str(tmp_path / "e"), "--scores", "entropy"],
         "unknown score 'entropy'; choose one of: js_divergence, max_prob_deficit"),
        (["detect", str(run), "--out", str(tmp_path / "e"), "--resume"],
         "holds no detection run to resume"),
        (["detect", str(tmp_path / "none"), "--out", str(tmp_path / "e")], "no ensemble at"),
        (["detect", str(run), "--out", str(tmp_path / "e"), "--dataset", "mnist5k"],
         "takes inputs of shape (1, 8, 8), but mnist5k has (1, 28, 28)"),
        (["plot", "detection", str(tmp_path / "none")], "no detection records at"),
        (["plot", "gdr-vs-attack", str(tmp_path / "d"), str(tmp_path / "d")],
         "a sweep folder is listed twice"),
        (["plot", "gdr-vs-attack", str(tmp_path / "d")],
         "has no gdr, attacks, so the file is not a sweep records file"),
    ]:
        assert main(bad) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("ensdiv: error: ") and message in err, (bad, err)
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()
