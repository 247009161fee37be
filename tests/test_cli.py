import subprocess
import sys

import pytest

from ensdiv.cli import build_parser, main
from ensdiv.train import TrainConfig, train_run


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in build_parser()._subparsers._group_actions[0].choices:
        assert cmd in out


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'; choose one of: cifar10, digits"),
    (["--arch", "vgg"], "unknown arch 'vgg'; choose one of: cnn, mlp, resnet20"),
    (["--members", "0"], "members must be >= 1"),
    (["--epochs", "0"], "epochs must be positive"),
    (["--epochs", "-3"], "epochs must be positive"),
    (["--lr", "0"], "learning rate must be positive"),
    (["--lr", "-0.1"], "learning rate must be positive"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_train_bad_input_one_line(capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, "train", "--out", str(tmp_path / "r"), "--epochs", "1",
                             *argv)
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--members", "three", "--out", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value" in err


def test_out_folder_with_other_run_is_refused(capsys, tmp_path):
    train_run(TrainConfig(arch="mlp", members=2, epochs=1), out_dir=tmp_path, progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    code, _, err = run_cli(capsys, "train", "--arch", "mlp", "--members", "3", "--epochs", "1",
                           "--out", str(tmp_path), "--quiet")
    assert code == 2 and "holds a different run" in err and err.count("\n") == 1
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_train_then_info(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", "--arch", "mlp", "--members", "2", "--epochs", "1",
                           "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0 and "epoch   1" in out and "ensemble test accuracy" in out
    code, out, _ = run_cli(capsys, "info", str(tmp_path / "r"))
    assert code == 0 and '"arch": "mlp"' in out and "test accuracy on digits (n=360)" in out
    code, _, err = run_cli(capsys, "info", str(tmp_path / "nothing"))
    assert code == 2 and "no ensemble at" in err


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "ensdiv.cli", "info", "/nonexistent"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("ensdiv: error: no ensemble at")


def test_gal_train_then_gdr(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", "--arch", "mlp", "--members", "2", "--epochs", "1",
                           "--diversity", "gal", "--lam", "0.5", "--noise-sigma", "0.05",
                           "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0 and "mean_cos=" in out and "gdr=" in out
    code, out, _ = run_cli(capsys, "gdr", str(tmp_path / "r"), "--limit", "50")
    assert code == 0 and "GDR (loss gradients) on digits test" in out and "n=50" in out
    code, out, _ = run_cli(capsys, "gdr", str(tmp_path / "r"), "--limit", "20",
                           "--mode", "margin")
    assert code == 0 and "margin" in out
    code, _, err = run_cli(capsys, "gdr", str(tmp_path / "r"), "--mode", "logit")
    assert code == 2 and "choose one of: loss, margin" in err


def test_diversity_with_one_member_is_an_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--members", "1", "--diversity", "gal",
                           "--out", str(tmp_path / "r"))
    assert code == 2 and "needs at least 2 members" in err and err.count("\n") == 1
