import json

from ensdiv.cli import main
from ensdiv.ensemble import Ensemble
from ensdiv.runs.train import train_run
from ensdiv.training import TrainConfig


def test_cli_certify_member_and_ensemble_resume_plot_and_errors(tmp_path, capsys):
    run = tmp_path / "run"
    train_run(TrainConfig(dataset="digits", arch="mlp", members=2, epochs=1, noise_sigma=0.25,
                          seed=0), out_dir=run, progress=False)
    base = ["certify", str(run), "--n", "100", "--n0", "10", "--max", "4", "--quiet",
            "--threads", "1"]
    assert main([*base, "--sigma", "0.25", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "no radius above 0.375" in out and "| run | 0.25 | 100 | 0.001 | 4 |" in out
    cfg = json.loads((tmp_path / "e" / "certify.json").read_text())
    assert cfg["trained_sigma"] == 0.25 and cfg["member"] is None
    assert main([*base, "--sigma", "0.25", "--member", "1", "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main([*base, "--sigma", "0.5", "--out", str(tmp_path / "w")]) == 0
    assert "trained with noise sigma 0.25" in capsys.readouterr().err
    assert main([*base, "--sigma", "0.25", "--out", str(tmp_path / "e")]) == 2
    assert "holds this certification run already" in capsys.readouterr().err
    assert main([*base, "--sigma", "0.25", "--out", str(tmp_path / "e"), "--resume"]) == 0
    capsys.readouterr()
    # the folder alone resumes: the settings come from certify.json
    assert main(["certify", str(run), "--out", str(tmp_path / "e"), "--resume", "--quiet"]) == 0
    assert "| run | 0.25 | 100 | 0.001 | 4 |" in capsys.readouterr().out
    assert main(["certify", str(run), "--out", str(tmp_path / "e"), "--resume", "--n", "200",
                 "--quiet"]) == 2
    assert "differs in n (saved 100, given 200)" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "nosigma")]) == 2
    assert "--sigma is needed" in capsys.readouterr().err
    assert main(["plot", "certified", str(tmp_path / "e"), str(tmp_path / "m"), "--out-dir",
                 str(tmp_path / "fig"), "--table"]) == 0
    assert "| m | 0.25 | 100 | 0.001 | 4 |" in capsys.readouterr().out
    assert (tmp_path / "fig" / "certified.png").stat().st_size > 5_000
    assert main([*base, "--sigma", "0.25", "--radius", "0.1", "--stages", "50,200",
                 "--out", str(tmp_path / "s")]) == 0
    assert "stages 50,200, alpha=0.001: no radius above 0.446" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "s" / "certify.json").read_text())
    assert cfg["stages"] == [50, 200] and cfg["radius"] == 0.1
    for line in (tmp_path / "s" / "records.jsonl").read_text().splitlines():
        assert json.loads(line)["samples"] in (60, 260)
    for extra, message in [(["--sigma", "0"], "--sigma must be a finite number > 0"),
                           (["--sigma", "0.25", "--radius", "0.1", "--stages", "10,x"],
                            "--stages must be comma-separated"),
                           (["--sigma", "0.25", "--radius", "0.1", "--stages", "10,0"],
                            "--stages size must be"),
                           (["--sigma", "0.25", "--alpha", "1"], "--alpha must be in (0, 1)"),
                           (["--sigma", "0.25", "--member", "2"], "--member 2 does not exist"),
                           (["--sigma", "0.25", "--n", "0"], "--n must be")]:
        assert main([*base, *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    assert main(["plot", "certified", str(tmp_path / "none")]) == 2
    assert "no certification records" in capsys.readouterr().err


def test_resume_takes_the_data_set_from_the_folder(tmp_path, capsys):
    """An ensemble that records no data set needs --dataset once; resuming needs only --out."""
    path = tmp_path / "ens.pt"
    Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).save(path)
    base = ["certify", str(path), "--out", str(tmp_path / "c"), "--quiet", "--threads", "1"]
    assert main([*base, "--sigma", "0.5", "--n", "50", "--n0", "10", "--max", "2"]) == 2
    assert "records no dataset; pass --dataset" in capsys.readouterr().err
    assert main([*base, "--sigma", "0.5", "--n", "50", "--n0", "10", "--max", "2",
                 "--dataset", "digits"]) == 0
    capsys.readouterr()
    assert main([*base, "--resume"]) == 0
    assert "2 records in" in capsys.readouterr().out
