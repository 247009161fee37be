"""The one run-folder module: locks, the resume rules, rank-0 writing."""

import subprocess
import sys
import textwrap

import pytest

from ensdiv.distributed import is_main as is_main_process
from ensdiv.errors import EnsdivError
from ensdiv.io import atomic_write_json
from ensdiv.runs.rundir import LOCK, prepare_run_dir, run_lock


def test_main_process_without_distributed():
    assert is_main_process()


def test_lock_refuses_a_second_writer_in_the_same_or_another_process(tmp_path):
    with run_lock(tmp_path / "run"):
        with pytest.raises(EnsdivError, match=r"run is in use by process \d+"):
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released on exit
        pass


def test_stale_lock_of_a_killed_process_does_not_block(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from ensdiv.runs.rundir import run_lock
        with run_lock({str(tmp_path / "run")!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(EnsdivError, match=f"in use by process {proc.pid}"):
            with run_lock(tmp_path / "run"):
                pass
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "run" / LOCK).exists()  # the file stays, the lock does not
    with run_lock(tmp_path / "run"):
        pass


def test_prepare_run_dir_rules(tmp_path):
    kw = {"config_name": "c.json", "resume": False, "overwrite": False}
    out = tmp_path / "r"
    assert prepare_run_dir(out, {"a": 1}, started=lambda p: False, **kw) is False
    out.mkdir()
    atomic_write_json(out / "c.json", {"a": 1})
    # nothing started: a different config simply starts again
    assert prepare_run_dir(out, {"a": 2}, started=lambda p: False, **kw) is False
    with pytest.raises(EnsdivError, match="holds this run already.*--resume"):
        prepare_run_dir(out, {"a": 1}, started=lambda p: True, **kw)
    assert prepare_run_dir(out, {"a": 1}, started=lambda p: True,
                           **{**kw, "resume": True}) is True
    with pytest.raises(EnsdivError, match=r"differs in a \(saved 1, given 2\)") as e:
        prepare_run_dir(out, {"a": 2}, started=lambda p: True, **{**kw, "resume": True})
    assert "--overwrite" not in str(e.value)
    with pytest.raises(EnsdivError, match="exclude each other"):
        prepare_run_dir(out, {"a": 1}, started=lambda p: True, **{**kw, "resume": True,
                                                                   "overwrite": True})
    with run_lock(out):
        (out / "sub").mkdir()
        assert prepare_run_dir(out, {"a": 2}, started=lambda p: True,
                               **{**kw, "overwrite": True}) is False
        assert [p.name for p in out.iterdir()] == [LOCK]  # emptied, the lock kept
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "mine.txt").write_text("x")
    with pytest.raises(EnsdivError, match="holds no ensdiv run"):
        prepare_run_dir(stray, {"a": 1}, started=lambda p: False, **kw)
    leftovers = tmp_path / "left"
    leftovers.mkdir()
    (leftovers / LOCK).write_text("")
    (leftovers / ".c.json.abc.tmp").write_text("")
    assert prepare_run_dir(leftovers, {"a": 1}, started=lambda p: False, **kw) is False


def test_resolve_config_takes_the_saved_settings_on_resume(tmp_path):
    from ensdiv.runs.rundir import CONFIG, resolve_config
    from ensdiv.training import TrainConfig

    out = tmp_path / "run"
    with pytest.raises(EnsdivError, match="holds no run to resume"):
        resolve_config(TrainConfig, {}, out, resume=True, config_name=CONFIG,
                       command="ensdiv train")
    atomic_write_json(out / CONFIG, TrainConfig(epochs=4, seed=2).to_dict())
    got = resolve_config(TrainConfig, {"epochs": 6}, out, resume=True, config_name=CONFIG,
                         command="ensdiv train")
    assert (got.epochs, got.seed) == (6, 2)  # given over saved over defaults
    assert resolve_config(TrainConfig, {}, out, resume=False, config_name=CONFIG,
                          command="ensdiv train") == TrainConfig()
    atomic_write_json(out / CONFIG, {"epochs": 1, "colour": "red"})
    with pytest.raises(EnsdivError, match="not a valid run config .*unknown run settings: colour"):
        resolve_config(TrainConfig, {}, out, resume=True, config_name=CONFIG,
                       command="ensdiv train")


@pytest.mark.parametrize("name", ["TrainConfig", "SweepConfig", "DetectConfig",
                                  "CompareConfig", "CertifyConfig"])
def test_every_config_round_trips_through_json(name):
    import importlib
    import json

    module = {"TrainConfig": "ensdiv.training", "SweepConfig": "ensdiv.runs.sweep",
              "DetectConfig": "ensdiv.runs.detect", "CompareConfig": "ensdiv.runs.compare",
              "CertifyConfig": "ensdiv.runs.certify"}[name]
    cls = getattr(importlib.import_module(module), name)
    config = cls()
    assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_load_run_checks_the_data_fits(tmp_path):
    from ensdiv.ensemble import Ensemble
    from ensdiv.runs.rundir import load_run

    path = tmp_path / "ensemble.pt"
    Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10,
                   config={"dataset": "digits"}).save(path)
    run = load_run(tmp_path)
    assert run.path == path and run.dataset == "digits" and not run.ensemble.training
    with pytest.raises(EnsdivError, match=r"takes inputs of shape \(1, 8, 8\), but mnist5k "
                                          r"has \(1, 28, 28\); it was trained on digits"):
        load_run(tmp_path, dataset="mnist5k")
    with pytest.raises(EnsdivError, match="unknown dataset 'imagenet'"):
        load_run(tmp_path, dataset="imagenet")


def test_overwrite_never_deletes_files_ensdiv_did_not_write(tmp_path):
    kw = {"config_name": "c.json", "resume": False}
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(EnsdivError, match="holds no ensdiv run") as e:
            prepare_run_dir(stray, {"a": 1}, started=lambda p: False, overwrite=overwrite, **kw)
        assert "pass --overwrite" not in str(e.value)  # never advised where it would delete
    assert (stray / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("command", [
    ["train", "--dataset", "digits", "--arch", "mlp", "--epochs", "1"],
    ["sweep", "--dataset", "digits"], ["tune", "--dataset", "digits"],
    ["compare", "RUN"], ["detect", "RUN"], ["certify", "RUN", "--sigma", "0.25"],
    ["evaluate", "RUN"]])
@pytest.mark.parametrize("out", ["", "  "])
def test_an_empty_out_is_refused_everywhere_and_touches_nothing(tmp_path, monkeypatch, capsys,
                                                                command, out):
    from ensdiv.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in command]
    for extra in ([], ["--overwrite"]):
        assert main([*argv, "--out", out, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ensdiv: error:") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]  # no lock, nothing gone


def test_an_out_that_is_a_file_is_named_as_one(tmp_path, capsys):
    from ensdiv.cli import main

    path = tmp_path / "notes.txt"
    path.write_text("x")
    assert main(["train", "--dataset", "digits", "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--out {path} is a file, not a folder" in err and "File exists" not in err
    assert path.read_text() == "x"
