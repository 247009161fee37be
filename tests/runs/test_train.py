"""ensdiv train's run folders: files, exact resume, the folder rules, teachers."""

import json

import pytest
import torch

from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError
from ensdiv.loop import CHECKPOINT, ENSEMBLE, METRICS, accuracies
from ensdiv.runs.rundir import CONFIG
from ensdiv.runs.train import train_run
from ensdiv.training import TrainConfig


class Interrupt(Exception):
    pass


def test_two_epochs_on_digits_beats_chance(tmp_path):
    cfg = TrainConfig(dataset="digits", arch="cnn", members=3, epochs=2, lr=3e-3, seed=0)
    ens, recs = train_run(cfg, out_dir=tmp_path / "run", progress=False)
    assert [r["epoch"] for r in recs] == [1, 2]
    last = recs[-1]
    assert last["ensemble_acc"] > 0.8
    assert len(last["member_acc"]) == 3 and all(a > 0.5 for a in last["member_acc"])
    assert last["loss"] < recs[0]["loss"]
    for name in (CHECKPOINT, ENSEMBLE, METRICS, CONFIG):
        assert (tmp_path / "run" / name).exists()
    lines = (tmp_path / "run" / METRICS).read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2]
    assert json.loads((tmp_path / "run" / CONFIG).read_text()) == cfg.validate().to_dict()
    # the saved ensemble reproduces the evaluation
    loaded = Ensemble.load(tmp_path / "run" / ENSEMBLE)
    from ensdiv.data import load_dataset
    _, test, _ = load_dataset("digits")
    assert accuracies(loaded, test)["ensemble_acc"] == pytest.approx(last["ensemble_acc"])
    assert loaded.config["members"] == 3


def test_resume_continues_bit_for_bit(tmp_path):
    cfg = TrainConfig(dataset="digits", arch="mlp", members=2, epochs=3, seed=1,
                      noise_sigma=0.05)
    full, full_recs = train_run(cfg, out_dir=tmp_path / "a", progress=False)

    def stop_after_first(rec):
        if rec["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_run(cfg, out_dir=tmp_path / "b", progress=False, on_epoch_end=stop_after_first)
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["epoch"] == 1
    seen = []
    resumed, recs = train_run(cfg, out_dir=tmp_path / "b", resume=True, progress=False,
                              on_epoch_end=lambda r: seen.append(r["epoch"]))
    assert seen == [2, 3]  # epoch 1 was not retrained
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    for pa, pb in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert recs[-1]["ensemble_acc"] == full_recs[-1]["ensemble_acc"]
    # resuming a finished run trains nothing; extending epochs continues it
    seen.clear()
    train_run(cfg, out_dir=tmp_path / "b", resume=True, progress=False,
              on_epoch_end=lambda r: seen.append(r["epoch"]))
    assert seen == []


def test_run_folder_guards(tmp_path):
    cfg = TrainConfig(arch="mlp", members=2, epochs=1)
    train_run(cfg, out_dir=tmp_path, progress=False)
    with pytest.raises(EnsdivError, match="holds this run already"):
        train_run(cfg, out_dir=tmp_path, progress=False)
    other = TrainConfig(arch="mlp", members=3, epochs=1)
    with pytest.raises(EnsdivError, match="holds a different run"):
        train_run(other, out_dir=tmp_path, progress=False)
    with pytest.raises(EnsdivError, match=r"differs in members \(saved 2, given 3\)"):
        train_run(other, out_dir=tmp_path, resume=True, progress=False)
    _, recs = train_run(other, out_dir=tmp_path, overwrite=True, progress=False)
    assert len(recs[-1]["member_acc"]) == 3
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "x.txt").write_text("mine")
    with pytest.raises(EnsdivError, match="holds no ensdiv run"):
        train_run(cfg, out_dir=tmp_path / "stray", progress=False)
    assert (tmp_path / "stray" / "x.txt").read_text() == "mine"


def test_records_are_rounded_and_timestamped(tmp_path):
    _, recs = train_run(TrainConfig(arch="mlp", members=2, epochs=1), out_dir=tmp_path,
                        progress=False)
    rec = json.loads((tmp_path / METRICS).read_text().splitlines()[0])
    assert rec == recs[0]
    for v in [*rec["member_acc"], rec["ensemble_acc"], rec["loss"], rec["ce_0"]]:
        assert v == float(f"{v:.6g}")
    assert rec["ensemble_acc"] * rec["n"] == pytest.approx(round(rec["ensemble_acc"] * rec["n"]),
                                                          abs=1e-3)
    assert rec["time"].endswith("Z") and rec["time"][:2] == "20"


def test_resume_may_extend_but_not_shrink_epochs(tmp_path):
    cfg = TrainConfig(arch="mlp", members=2, epochs=2)
    train_run(cfg, out_dir=tmp_path, progress=False)
    saved = (tmp_path / CONFIG).read_text()
    with pytest.raises(EnsdivError, match="holds 2 finished epochs; --epochs 1 cannot shrink"):
        train_run(TrainConfig(arch="mlp", members=2, epochs=1), out_dir=tmp_path, resume=True,
                  progress=False)
    assert (tmp_path / CONFIG).read_text() == saved
    _, recs = train_run(TrainConfig(arch="mlp", members=2, epochs=3), out_dir=tmp_path,
                        resume=True, progress=False)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert json.loads((tmp_path / CONFIG).read_text())["epochs"] == 3


def test_a_run_that_failed_before_its_first_epoch_starts_again(tmp_path):
    cfg = TrainConfig(dataset="mnist", arch="mlp", members=2, epochs=1)
    for _ in range(2):  # the identical rerun gets the same, real error
        with pytest.raises(EnsdivError, match="mnist not found"):
            train_run(cfg, out_dir=tmp_path / "r", data_root=str(tmp_path / "nodata"),
                      progress=False)
    assert not (tmp_path / "r").exists()  # the data set is checked before the folder is made
    # a run killed during its first epoch leaves its config and no checkpoint: it starts again
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / CONFIG).write_text(json.dumps(cfg.validate().to_dict()))
    _, recs = train_run(TrainConfig(arch="mlp", members=2, epochs=1), out_dir=tmp_path / "r",
                        progress=False)
    assert len(recs) == 1


def test_a_locked_run_folder_is_refused(tmp_path):
    from ensdiv.runs.rundir import run_lock

    with run_lock(tmp_path):
        with pytest.raises(EnsdivError, match="is in use by process"):
            train_run(TrainConfig(arch="mlp", members=2, epochs=1), out_dir=tmp_path,
                      progress=False)
    assert not (tmp_path / CONFIG).exists()


def test_teacher_problems_stop_before_the_run_folder_is_made(tmp_path):
    with pytest.raises(EnsdivError, match="no ensemble at"):
        train_run(TrainConfig(teacher=str(tmp_path / "none"), transfer="rrm"),
                  out_dir=tmp_path / "s", progress=False)
    teacher, _ = train_run(TrainConfig(arch="mlp", members=2, epochs=1), out_dir=tmp_path / "t",
                           progress=False)
    with pytest.raises(EnsdivError, match="a teacher is one model"):
        train_run(TrainConfig(teacher=str(tmp_path / "t"), transfer="rrm"),
                  out_dir=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_adversarial_and_rrm_runs_resume_bit_for_bit(tmp_path):
    train_run(TrainConfig(arch="mlp", members=1, epochs=1, seed=2), out_dir=tmp_path / "t",
              progress=False)
    for name, cfg in [
        ("at", TrainConfig(arch="mlp", members=2, epochs=2, seed=1, objective="adversarial",
                           eps=0.1, steps=2)),
        # a cnn student of an mlp teacher: a trainable projection 128 -> 256, checkpointed
        ("rrm", TrainConfig(arch="cnn", members=2, epochs=2, seed=1,
                            teacher=str(tmp_path / "t"), transfer="rrm", diversity="gal")),
    ]:
        full, recs = train_run(cfg, out_dir=tmp_path / f"{name}-a", progress=False)

        def stop(rec):
            if rec["epoch"] == 1:
                raise Interrupt

        with pytest.raises(Interrupt):
            train_run(cfg, out_dir=tmp_path / f"{name}-b", progress=False, on_epoch_end=stop)
        again, recs_b = train_run(cfg, out_dir=tmp_path / f"{name}-b", resume=True,
                                  progress=False)
        for a, b in zip(full.state_dict().values(), again.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        assert recs_b[-1]["loss"] == recs[-1]["loss"]
        ckpt = torch.load(tmp_path / f"{name}-b" / CHECKPOINT, weights_only=True)
        if name == "rrm":
            assert {k for k in ckpt["loss"]} == {"project.0.weight", "project.1.weight"}
        else:
            assert ckpt["loss"] is None


def test_a_teacher_for_other_data_is_refused_before_the_run_folder(tmp_path):
    train_run(TrainConfig(arch="mlp", members=1, epochs=1), out_dir=tmp_path / "t",
              progress=False)  # digits, 8x8
    with pytest.raises(EnsdivError, match="teacher takes inputs of shape \\[1, 8, 8\\] but data "
                                          "set mnist5k has inputs of shape \\[1, 28, 28\\]"):
        train_run(TrainConfig(dataset="mnist5k", teacher=str(tmp_path / "t"), transfer="rrm"),
                  out_dir=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kwargs", [
    {"diversity": "adp", "lam": 0.5},
    {"diversity": "trs", "trs_eps": 0.1, "batch_size": 512},  # the radius grows per epoch
    {"diversity": "dverge", "dverge_steps": 2, "batch_size": 512},  # the layer is re-drawn
], ids=["adp", "trs", "dverge"])
def test_baselines_resume_bit_for_bit(tmp_path, kwargs):
    cfg = TrainConfig(dataset="digits", arch="mlp", members=3, epochs=2, seed=2, **kwargs)
    full, _ = train_run(cfg, out_dir=tmp_path / "a", progress=False)

    def stop_after_first(rec):
        if rec["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_run(cfg, out_dir=tmp_path / "b", progress=False, on_epoch_end=stop_after_first)
    resumed, _ = train_run(cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    for pa, pb in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb)
