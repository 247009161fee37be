import argparse
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from ensdiv import io as eio
from ensdiv.cli import build_parser, main
from ensdiv.errors import EnsdivError
from ensdiv.loop import CHECKPOINT, ENSEMBLE, METRICS
from ensdiv.runs.rundir import CONFIG
from ensdiv.runs.train import train_run
from ensdiv.training import TrainConfig

NO_GPU = not torch.cuda.is_available()


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    assert err.startswith("ensdiv: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in build_parser()._subparsers._group_actions[0].choices:
        assert cmd in out


def test_no_command_prints_usage_and_the_commands(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2 and out.startswith("usage: ensdiv")
    for cmd in ("train", "sweep", "detect", "plot", "gdr", "info", "demo"):
        assert f"    {cmd} " in out


def test_help_shows_every_default_and_every_closed_vocabulary():
    sub = build_parser()._subparsers._group_actions[0].choices
    for name, parser in sub.items():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction,
                                                                argparse._StoreTrueAction)):
                continue
            if action.required:
                continue
            text = parser.formatter_class("x")._get_help_string(action)
            assert "default" in text, (name, action.dest, text)
    helps = {n: p.format_help() for n, p in sub.items()}
    assert "{digits,mnist5k,mnist,fashion-mnist,cifar10}" in helps["sweep"]
    assert "{mlp,cnn,cnn-nf,resnet20,resnet20-fixup}" in helps["sweep"]
    assert "{cos,gal,gdr,drt,adp,trs,dverge}" in helps["sweep"]
    assert "fgsm, mifgsm, pgd" in helps["sweep"]
    assert "{none,cos,gal,gdr,drt,adp,trs,dverge}" in helps["train"]
    assert "{loss,margin}" in helps["gdr"]
    assert "(default: 0.003)" in helps["train"] and "(default: 0.003)" in helps["sweep"]


def test_help_and_usage_errors_answer_before_torch_loads():
    """`ensdiv --help` and a mistyped option never wait for torch (~2 s of the ~6 s a command
    took to start); a command's own --help loads its config's defaults, and so the library."""
    probe = ("import sys\n"
             "from ensdiv.cli import main\n"
             "for argv in (['--help'], ['train', '--epochs', 'x'], ['nope'], ['sweep', '--bad']):\n"
             "    try:\n"
             "        main(argv)\n"
             "    except SystemExit:\n"
             "        pass\n"
             "heavy = sorted(m for m in ('torch', 'numpy', 'sklearn', 'matplotlib')\n"
             "               if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "invalid int value: 'x'" in proc.stderr and "invalid choice: 'nope'" in proc.stderr


def test_one_default_learning_rate():
    from ensdiv.runs.sweep import SweepConfig
    from ensdiv.training import DEFAULT_LR

    assert TrainConfig().lr == SweepConfig().lr == DEFAULT_LR
    import inspect

    from ensdiv.runs.demo import demo_report
    assert "lr" not in inspect.signature(demo_report).parameters  # demo uses TrainConfig's


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A trained run, a finished tiny sweep and damaged copies of their files."""
    root = tmp_path_factory.mktemp("cli")
    run = root / "run"
    train_run(TrainConfig(arch="mlp", members=2, epochs=1), out_dir=run, progress=False)
    sweep = root / "sweep"
    assert main(["sweep", "--dataset", "digits", "--arch", "mlp", "--members", "2",
                 "--lams", "0,1", "--seeds", "1", "--epochs", "1", "--n-eval", "20",
                 "--attacks", "fgsm", "--eps", "0.1", "--out", str(sweep), "--quiet"]) == 0
    damaged = {}
    for name, src, cut in (("ens-trunc", run / ENSEMBLE, 400), ("ens-empty", run / ENSEMBLE, 0),
                           ("ckpt-trunc", run / CHECKPOINT, 400),
                           ("ckpt-empty", run / CHECKPOINT, 0),
                           ("metrics-trunc", run / METRICS, 60),
                           ("config-trunc", run / CONFIG, 30),
                           ("records-trunc", sweep / "records.jsonl", 100)):
        d = root / name
        d.mkdir()
        for f in run.iterdir():
            if f.is_file():
                (d / f.name).write_bytes(f.read_bytes())
        (d / src.name).write_bytes(src.read_bytes()[:cut])
        damaged[name] = d
    wrong = root / "ckpt-wrong-kind"
    wrong.mkdir()
    for f in run.iterdir():
        if f.is_file():
            (wrong / f.name).write_bytes(f.read_bytes())
    (wrong / CHECKPOINT).write_bytes((run / ENSEMBLE).read_bytes())
    damaged["ckpt-wrong-kind"] = wrong
    records_wrong = root / "records-wrong-kind"
    records_wrong.mkdir()
    (records_wrong / "records.jsonl").write_bytes((run / METRICS).read_bytes())
    damaged["records-wrong-kind"] = records_wrong
    (damaged["records-trunc"] / "records.jsonl").write_bytes(
        (sweep / "records.jsonl").read_bytes()[:100])
    return {"root": root, "run": run, "sweep": sweep, **damaged}


T = ["train", "--arch", "mlp", "--members", "2", "--epochs", "1", "--quiet"]
S = ["sweep", "--dataset", "digits", "--arch", "mlp", "--members", "2", "--epochs", "1",
     "--seeds", "1", "--quiet"]

# (argv with {root}/{run}/... placeholders, words the one-line message must hold)
BAD_CLI = [
    (T + ["--dataset", "imagenet"], ["unknown dataset 'imagenet'; choose one of: cifar10"]),
    (T + ["--arch", "vgg"], ["unknown arch 'vgg'; choose one of: cnn, cnn-nf, mlp, resnet20, "
                                  "resnet20-fixup"]),
    (T + ["--members", "0"], ["members must be >= 1"]),
    (T + ["--epochs", "0"], ["epochs must be >= 1"]),
    (T + ["--epochs", "-3"], ["epochs must be >= 1"]),
    (T + ["--batch-size", "0"], ["batch size must be >= 1"]),
    (T + ["--lr", "0"], ["learning rate must be positive"]),
    (T + ["--optimizer", "rmsprop"], ["unknown optimizer 'rmsprop'; choose one of: adam, sgd"]),
    (T + ["--schedule", "linear"], ["unknown schedule 'linear'; choose one of: constant"]),
    (T + ["--schedule", "step", "--milestones", "5,3"], ["milestones must be in increasing"]),
    (T + ["--momentum", "0.9"], ["--momentum and --nesterov are SGD's"]),
    (T + ["--val-fraction", "0"], ["--val-fraction must be positive"]),
    (T + ["--val-fraction", "1"], ["--val-fraction must be in (0, 1)"]),
    (T + ["--augment", "crop-flip"], ["refused on digits"]),
    (T + ["--recipe", "nope"], ["unknown recipe 'nope'; choose one of: adp-cifar10"]),
    (T + ["--init-from", "{root}/nothing"], ["--init-from {root}/nothing: no ensemble there"]),
    (T + ["--lr", "-0.1"], ["learning rate must be positive"]),
    (T + ["--lr", "nan"], ["learning rate must be a finite number"]),
    (T + ["--weight-decay", "nan"], ["weight decay must be a finite number; got nan"]),
    (T + ["--weight-decay", "inf"], ["weight decay must be a finite number; got inf"]),
    (T + ["--weight-decay", "-1"], ["weight decay must be >= 0"]),
    (T + ["--diversity", "gal", "--lam", "inf"], ["lam must be a finite number; got inf"]),
    (T + ["--diversity", "gal", "--lam", "-1"], ["lam must be >= 0"]),
    (T + ["--lam", "1"], ["has no effect without a diversity term"]),
    (T + ["--noise-sigma", "inf"], ["noise sigma must be a finite number; got inf"]),
    (T + ["--noise-sigma", "nan"], ["noise sigma must be a finite number"]),
    (T + ["--noise-sigma", "-0.1"], ["noise sigma must be >= 0"]),
    (T + ["--diversity", "dverg"],
     ["unknown diversity 'dverg'; choose one of: adp, cos, drt, dverge, gal, gdr, none, trs"]),
    (T + ["--trs-eps", "0.1"], ["--trs-eps is a hyper-parameter of TRS; add --diversity trs"]),
    (T + ["--diversity", "dverge", "--dverge-layer", "4"],
     ["--dverge-layer 4 does not exist in mlp (layers 1 to 2)"]),
    (["train", "--members", "1", "--diversity", "gal"], ["needs at least 2 members"]),
    (T + ["--seed", "-1"], ["seed must be >= 0"]),
    (T + ["--device", "tpu"], ["unknown device 'tpu'"]),
    (T + ["--threads", "0"], ["--threads must be >= 1"]),
    (T + ["--resume", "--overwrite"], ["--resume and --overwrite exclude each other"]),
    (["train", "--resume"], ["holds no run to resume", "ensdiv train --out"]),
    (T + ["--seed", "5", "--out", "{run}"], ["holds a different run", "--resume"]),
    (T + ["--out", "{run}"], ["holds this run already", "ensdiv train --out {run} --resume"]),
    (["train", "--lr", "0.1", "--seed", "4", "--resume", "--out", "{run}"],
     ["differs in lr (saved 0.003, given 0.1), seed (saved 0, given 4)",
      "ensdiv train --out {run} --resume` without those options"]),
    (["train", "--epochs", "0", "--resume", "--out", "{run}"], ["epochs must be >= 1"]),
    (["train", "--resume", "--out", "{ckpt-trunc}", "--epochs", "2"],
     ["checkpoint.pt is not a readable training checkpoint", "restore the file"]),
    (["train", "--resume", "--out", "{ckpt-empty}", "--epochs", "2"],
     ["checkpoint.pt is empty (0 bytes)"]),
    (["train", "--resume", "--out", "{ckpt-wrong-kind}", "--epochs", "2"],
     ["checkpoint.pt is not a training checkpoint (it lacks epoch, ensemble, optimizer)"]),
    (["train", "--resume", "--out", "{metrics-trunc}", "--epochs", "2"],
     ["metrics.jsonl line 1 is not valid JSON"]),
    (["train", "--resume", "--out", "{config-trunc}"],
     ["config.json is not a valid run config (truncated or not JSON"]),
    (S + ["--diversity", "none", "--lams", "0,1"], ["sweep over lam needs a diversity term"]),
    (S + ["--lams", "inf"], ["lams must be a finite number; got inf"]),
    (S + ["--lams", "0,0.1,0.1"], ["lams lists 0.1 twice"]),
    (S + ["--lams", ""], ["lams needs at least one value"]),
    (S + ["--lams", "-1"], ["lams must be >= 0"]),
    (S + ["--lams", "-1,1"], ["lams must be >= 0"]),  # argparse took "-1,1" for an option
    (S + ["--eps", "0,0.1"], ["--eps must be a number in (0, 1]"]),
    (S + ["--eps", "2"], ["--eps must be a number in (0, 1]"]),
    (S + ["--eps", "0.1,0.1"], ["eps lists 0.1 twice"]),
    (S + ["--eps", "inf"], ["--eps must be a number in (0, 1]"]),
    (S + ["--eps", "-0.1"], ["--eps must be a number in (0, 1]"]),
    (S + ["--attacks", ""], ["attacks needs at least one of: fgsm, mifgsm, pgd"]),
    (S + ["--attacks", "cw"], ["unknown attack 'cw'; choose one of: fgsm, mifgsm, pgd"]),
    (S + ["--attacks", "fgsm,fgsm"], ["attacks lists 'fgsm' twice"]),
    (S + ["--members", "1"], ["a diversity sweep needs at least 2 members"]),
    (S + ["--seeds", "0"], ["seeds must be >= 1"]),
    (S + ["--steps", "0"], ["steps must be >= 1"]),
    (S + ["--n-eval", "0"], ["n_eval must be >= 1"]),
    (S + ["--noise-sigma", "inf"], ["noise sigma must be a finite number"]),
    (S + ["--lr", "nan"], ["learning rate must be a finite number"]),
    (S + ["--device", "tpu"], ["unknown device"]),
    (["sweep", "--resume"], ["holds no sweep to resume", "ensdiv sweep --out"]),
    (S + ["--out", "{sweep}"], ["holds a different sweep", "ensdiv sweep --out {sweep} --resume"]),
    (["sweep", "--seeds", "2", "--resume", "--out", "{sweep}"],
     ["differs in seeds (saved 1, given 2)"]),
    (["gdr", "{run}", "--batch-size", "0"], ["--batch-size must be >= 1; got 0"]),
    (["gdr", "{run}", "--batch-size", "-5"], ["--batch-size must be >= 1; got -5"]),
    (["gdr", "{run}", "--limit", "0"], ["--limit must be >= 1"]),
    (["gdr", "{run}", "--mode", "logit"], ["choose one of: loss, margin"]),
    (["gdr", "{run}", "--dataset", "mnist5k"],
     ["takes inputs of shape (1, 8, 8), but mnist5k has (1, 28, 28); it was trained on digits"]),
    (["gdr", "{run}", "--dataset", "imagenet"], ["unknown dataset 'imagenet'"]),
    (["gdr", "{root}/nothing"], ["no ensemble at"]),
    (["gdr", "{ens-trunc}"], ["ensemble.pt is not a readable ensdiv ensemble file",
                              "ensdiv train --out {ens-trunc} --resume"]),
    (["gdr", "{ens-empty}"], ["ensemble.pt is empty"]),
    (["gdr", "{run}/checkpoint.pt"], ["is not an ensdiv ensemble file"]),
    (["info", "{root}/nothing"], ["no ensemble at"]),
    (["info", "{metrics-trunc}"], ["metrics.jsonl line 1 is not valid JSON"]),
    (["info", "{run}", "--threads", "-1"], ["--threads must be >= 1"]),
    (["plot", "gdr-vs-attack", "{sweep}", "--attack", "foo"],
     ["unknown attack (in these records) 'foo'; choose one of: fgsm"]),
    (["plot", "gdr-vs-attack", "{sweep}", "--eps", "0.5"],
     ["the records hold no eps 0.5; choose one of: 0.1"]),
    (["plot", "gdr-vs-attack", "{root}/nothing"], ["no sweep records at"]),
    (["plot", "gdr-vs-attack", "{records-trunc}"], ["records.jsonl line 1 is not valid JSON"]),
    (["plot", "gdr-vs-attack", "{records-wrong-kind}"],
     ["line 1 has no lam, seed, attacks, so the file is not a sweep records file"]),
]
if NO_GPU:
    BAD_CLI += [(T + ["--device", "cuda"], ["no usable CUDA GPU; use --device cpu"]),
                (["gdr", "{run}", "--device", "cuda"], ["no usable CUDA GPU"]),
                (["info", "{run}", "--device", "cuda:0"], ["no usable CUDA GPU"])]


@pytest.mark.parametrize("argv, words", BAD_CLI, ids=[" ".join(a[:1] + a[-2:])
                                                      for a, _ in BAD_CLI])
def test_bad_input_is_one_line_and_exit_2(capsys, made, argv, words):
    fill = {k: str(v) for k, v in made.items()}
    argv = [a.format(**fill) for a in argv]
    if argv[0] in ("train", "sweep") and "--out" not in argv:
        argv += ["--out", str(made["root"] / "fresh")]
    before = {p: p.stat().st_mtime_ns for p in made["root"].rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *[w.format(**fill) for w in words])
    after = {p: p.stat().st_mtime_ns for p in made["root"].rglob("*") if p.is_file()}
    changed = [p for p in after if before.get(p) != after[p] and p.name != ".ensdiv.lock"]
    assert not changed, changed  # nothing written, nothing lost
    assert not (made["root"] / "fresh" / CHECKPOINT).exists()


# The same mistakes through the Python API: one EnsdivError with the same words.
def _api_cases():
    from torch.utils.data import TensorDataset

    from ensdiv.data import load_dataset
    from ensdiv.ensemble import Ensemble
    from ensdiv.gdr import ensemble_gdr
    from ensdiv.runs.plots import check_plot_options
    from ensdiv.runs.sweep import SweepConfig
    from ensdiv.runtime import resolve_device
    from ensdiv.training import read_checkpoint

    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
    data = TensorDataset(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    mnist = load_dataset("mnist5k")[1]
    sweep = SweepConfig(dataset="digits", arch="mlp", members=2, epochs=1, seeds=1)
    rec = [{"gdr": 0.1, "attacks": [{"attack": "fgsm", "eps": 0.1}]}]
    return [
        (lambda: TrainConfig(weight_decay=float("nan")).validate(), "weight decay must be a fin"),
        (lambda: TrainConfig(diversity="gal", lam=float("inf")).validate(), "lam must be a fin"),
        (lambda: TrainConfig(noise_sigma=float("inf")).validate(), "noise sigma must be a fin"),
        (lambda: TrainConfig(lam=1.0).validate(), "no effect without a diversity term"),
        (lambda: sweep.__class__(**{**sweep.__dict__, "diversity": "none", "lams": (0.0, 1.0)}
                                 ).validate(), "needs a diversity term"),
        (lambda: sweep.__class__(**{**sweep.__dict__, "eps": (0.1, 0.1)}).validate(), "twice"),
        (lambda: sweep.__class__(**{**sweep.__dict__, "lams": (float("inf"),)}).validate(),
         "lams must be a finite number"),
        (lambda: sweep.__class__(**{**sweep.__dict__, "attacks": ()}).validate(),
         "attacks needs at least one"),
        (lambda: ensemble_gdr(ens, data, batch_size=0), "batch size must be >= 1"),
        (lambda: ensemble_gdr(ens, mnist), "(256, 1, 28, 28), but the model takes"),
        (lambda: resolve_device("tpu"), "unknown device"),
        (lambda: read_checkpoint("/nonexistent/checkpoint.pt"), "no training checkpoint at"),
        (lambda: check_plot_options(rec, attack="foo", eps=None), "unknown attack"),
        (lambda: check_plot_options(rec, attack="fgsm", eps=0.3), "no eps 0.3"),
    ]


def test_api_twins_raise_one_clear_error():
    for call, words in _api_cases():
        with pytest.raises(EnsdivError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value), (words, str(e.value))


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
    assert_one_line_error(code, err, "holds a different run")
    assert "--overwrite" not in err
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_train_then_info(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", "--arch", "mlp", "--members", "2", "--epochs", "2",
                           "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0 and "epoch   1" in out and "ensemble test accuracy" in out
    code, out, _ = run_cli(capsys, "info", str(tmp_path / "r"))
    assert code == 0 and '"arch": "mlp"' in out and "test accuracy on digits (n=360)" in out
    assert "epochs trained: 2 of 2" in out
    last = json.loads(out.split("last metrics: ")[1].splitlines()[0])
    assert last["epoch"] == 2 and last["time"].endswith("Z")


def test_python_dash_m_ensdiv():
    proc = subprocess.run([sys.executable, "-m", "ensdiv", "info", "/nonexistent"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("ensdiv: error: no ensemble at")
    proc = subprocess.run([sys.executable, "-m", "ensdiv", "--version"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ensdiv ")


def test_gal_train_then_gdr(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", "--arch", "mlp", "--members", "2", "--epochs", "1",
                           "--diversity", "gal", "--lam", "0.5", "--noise-sigma", "0.05",
                           "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0 and "mean_cos=" in out and "gdr=" in out
    code, out, _ = run_cli(capsys, "gdr", str(tmp_path / "r"), "--limit", "50")
    assert code == 0 and "GDR (loss gradients) on digits test" in out and "n=50" in out
    code, out, _ = run_cli(capsys, "gdr", str(tmp_path / "r"), "--limit", "20",
                           "--mode", "margin", "--threads", "1")
    assert code == 0 and "margin" in out


def test_noise_sigma_warning_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, *T, "--noise-sigma", "5", "--out", tmp_path / "r")
    assert code == 0
    assert err.count("ensdiv: warning: noise sigma 5 is larger than the whole pixel range") == 1


def test_full_disk_and_read_only_folder_are_one_line(capsys, tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(eio.os, "write", full)
    code, _, err = run_cli(capsys, *T, "--out", tmp_path / "r")
    assert_one_line_error(code, err, "cannot write", "No space left on device", "--resume")
    monkeypatch.undo()

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(eio.os, "open", read_only)
    code, _, err = run_cli(capsys, *T, "--out", tmp_path / "ro")
    assert_one_line_error(code, err, "cannot write", "Read-only file system", "--out")


def _wait_for(path, proc, timeout=120):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.02)


def test_killed_run_resumes_from_out_alone_bit_for_bit(tmp_path):
    # 60 epochs: a wide window for the kill to land mid-run, even on a loaded machine
    argv = ["train", "--arch", "mlp", "--members", "2", "--epochs", "60", "--seed", "3",
            "--noise-sigma", "0.05", "--threads", "1", "--quiet"]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ensdiv", *argv, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(run / CHECKPOINT, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(run / CHECKPOINT, weights_only=True)["epoch"]
    assert 1 <= done < 60
    for f in (CONFIG, METRICS, ENSEMBLE):
        assert (run / f).stat().st_size > 0
    proc = subprocess.run([sys.executable, "-m", "ensdiv", "train", "--out", str(run),
                           "--resume", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"epoch {done + 1:>3}" in proc.stdout and f"epoch {done:>3}" not in proc.stdout
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref)]) == 0
    a = torch.load(run / CHECKPOINT, weights_only=True)["ensemble"]
    b = torch.load(ref / CHECKPOINT, weights_only=True)["ensemble"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(s) for s in (run / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 61))


def test_ctrl_c_says_how_to_continue(tmp_path):
    run = tmp_path / "r"
    # A suite started in the background of a non-interactive shell (`make test &`) inherits
    # SIGINT ignored, and so would the run, which then never hears the signal: the child gets
    # the default disposition back, as a terminal's Ctrl-C finds it. Far more epochs than any
    # machine finishes, so only the signal ends the run.
    proc = subprocess.Popen([sys.executable, "-m", "ensdiv", *T[:-3], "--epochs", "100000",
                             "--threads", "1", "--quiet", "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(run / CHECKPOINT, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip() == f"ensdiv: interrupted; continue with: ensdiv train --out {run} --resume"
    assert torch.load(run / CHECKPOINT, weights_only=True)["epoch"] >= 1


def test_a_reader_that_leaves_stops_the_cli_quietly(tmp_path):
    # `ensdiv train ... | head -1`: no traceback and no error line, exit 141 like SIGPIPE.
    proc = subprocess.Popen([sys.executable, "-m", "ensdiv", "train", "--arch", "mlp",
                             "--members", "2", "--epochs", "30", "--quiet", "--threads", "1",
                             "--out", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("training")
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == ""


def test_compile_option_is_auto_by_default_on_alone_and_closed(capsys):
    from ensdiv import layers

    parser = build_parser()
    for cmd in ("train", "sweep"):
        base = [cmd, "--out", "x"] + (["--diversity", "gal"] if cmd == "sweep" else [])
        assert parser.parse_args(base).compile == "auto"
        assert parser.parse_args(base + ["--compile"]).compile == "on"
        assert parser.parse_args(base + ["--compile", "off"]).compile == "off"
    with pytest.raises(SystemExit) as err:
        main(["train", "--out", "x", "--compile", "sometimes"])
    assert err.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("ensdiv train: error: argument --compile") and "auto" in line
    assert layers.compile_mode() == "off"  # refused before anything was set


def test_help_states_every_default_and_what_each_figure_takes(capsys):
    def help_of(*cmd):
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        return " ".join(capsys.readouterr().out.split())

    assert "(default: gal)" in help_of("sweep")  # "at its defaults" once hid it
    assert "TRS's λ_a 10 and DVERGE's 1 with theirs" in help_of("train")
    assert "certified: one or more certification folders" in help_of("plot")


def test_suggested_commands_are_shell_quoted_and_keep_the_data_root(tmp_path, capsys):
    import argparse
    import shlex

    from ensdiv.cli import _hint

    out = tmp_path / "my runs" / "r"
    args = ["train", "--dataset", "digits", "--arch", "mlp", "--members", "2", "--epochs", "1",
            "--quiet", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    assert main(args) == 2  # a finished run: continue it with --resume
    err = capsys.readouterr().err
    suggested = err.split("`")[1]
    assert shlex.split(suggested) == ["ensdiv", "train", "--out", str(out), "--resume"]
    hint = _hint(argparse.Namespace(out=str(out), data_root="/d a/t"), "detect", "run x")
    assert shlex.split(hint) == ["ensdiv", "detect", "run x", "--out", str(out), "--resume",
                                 "--data-root", "/d a/t"]


def test_train_tuned_reads_the_tunings_choice_or_its_stated_fallback(capsys, tmp_path):
    tuned = tmp_path / "tune"
    tuned.mkdir()
    (tuned / "chosen.json").write_text(json.dumps({
        "chosen": {"gal": {"point": "gal-2", "settings": {"diversity": "gal", "lam": 2.0}}},
        "rejected": {"drt": "no grid point keeps validation accuracy within 0.01 of plain"},
        "fallback": {"drt": {"point": "drt-0", "settings": {"diversity": "drt", "lam": 0.1,
                                                            "noise_sigma": 0.25}}}}))
    base = ("train", "--arch", "mlp", "--members", "2", "--epochs", "1", "--quiet",
            "--tuned", str(tuned))
    code, _, err = run_cli(capsys, *base, "--diversity", "gal", "--out", tmp_path / "g")
    assert code == 0 and not err
    assert json.loads((tmp_path / "g" / CONFIG).read_text())["lam"] == 2.0
    code, _, err = run_cli(capsys, *base, "--diversity", "drt", "--lam", "0.3",
                           "--out", tmp_path / "d")  # a flag given overrides the tuning
    saved = json.loads((tmp_path / "d" / CONFIG).read_text())
    assert code == 0 and (saved["lam"], saved["noise_sigma"]) == (0.3, 0.25)
    assert err.count("ensdiv: warning: the tuning rule chose no drt setting") == 1
    for extra, words in ((("--out", tmp_path / "x"), "--tuned needs --diversity"),
                         (("--diversity", "trs", "--out", tmp_path / "x"),
                          "holds no setting for trs; it tuned: drt, gal"),
                         (("--diversity", "dverge", "--out", tmp_path / "x"),
                          "trained dverge from its trained plain ensemble.*--init-from"),
                         (("--diversity", "gal", "--recipe", "gal-cifar10", "--out",
                           tmp_path / "x"), "--recipe .* or --tuned .*, not both")):
        code, _, err = run_cli(capsys, *base, *extra)
        assert code == 2 and re.search(words, err) and not (tmp_path / "x").exists()
    code, _, err = run_cli(capsys, "train", "--tuned", str(tmp_path), "--diversity", "gal",
                           "--out", tmp_path / "x")
    assert code == 2 and "chosen.json" in err and "ensdiv tune" in err


def test_certificate_settings_without_sigma_are_refused_not_ignored(capsys, tmp_path):
    code, _, _ = run_cli(capsys, *T, "--out", tmp_path / "r")
    for extra, words in ((("--radii", "-1"), "--radii sets the certificates, which only --sigma"),
                         (("--radii", "0.5", "--cert-n", "10"), "--radii, --cert-n set the"),
                         (("--sigma", "0.25", "--radii", "-1"), "radius must be >= 0; got -1")):
        code, _, err = run_cli(capsys, "evaluate", tmp_path / "r", *extra, "--out",
                               tmp_path / "c")
        assert code == 2 and words in err and not (tmp_path / "c").exists()
