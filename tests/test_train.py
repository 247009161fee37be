import functools
import json

import pytest
import torch

from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError
from ensdiv.loop import CHECKPOINT, ENSEMBLE, METRICS, evaluate, fit, gaussian_noise
from ensdiv.runs.rundir import CONFIG
from ensdiv.runs.train import train_run
from ensdiv.train import TrainConfig


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
    assert evaluate(loaded, test)["ensemble_acc"] == pytest.approx(last["ensemble_acc"])
    assert loaded.config["members"] == 3


class Interrupt(Exception):
    pass


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


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": "imagenet"}, "cifar10, digits, fashion-mnist, mnist, mnist5k"),
    ({"arch": "vgg"}, "cnn, mlp, resnet20"),
    ({"members": 0}, "members must be >= 1"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"lr": 0.0}, "learning rate must be positive"),
    ({"lr": -1.0}, "learning rate must be positive"),
    ({"batch_size": 0}, "batch size"),
    ({"noise_sigma": -0.1}, "noise sigma"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(EnsdivError, match=message):
        TrainConfig(**kwargs).validate()


def test_gaussian_noise_augment():
    assert gaussian_noise(0.0) is None
    aug = gaussian_noise(0.1)
    x = torch.full((100, 1, 8, 8), 0.98)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.max() > 1  # not clipped: smoothing certifies under unclipped noise
    assert (out - x).std().item() == pytest.approx(0.1, rel=0.05)
    assert (out - x).mean().item() == pytest.approx(0.0, abs=0.01)
    again = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_gal_training_lowers_cosine_and_gdr_at_comparable_accuracy():
    from ensdiv.data import load_dataset
    from ensdiv.gdr import ensemble_gdr

    _, test, _ = load_dataset("digits")
    results = {}
    for diversity in ("none", "gal"):
        cfg = TrainConfig(dataset="digits", arch="cnn", members=3, epochs=6, lr=3e-3, seed=0,
                          diversity=diversity, lam=0.5 if diversity == "gal" else None)
        ens, recs = train_run(cfg, progress=False)
        results[diversity] = (recs[-1], ensemble_gdr(ens, test))
    (plain, plain_gdr), (gal, gal_gdr) = results["none"], results["gal"]
    assert gal["mean_cos"] < plain["mean_cos"] - 0.3
    assert gal_gdr.mean < plain_gdr.mean - 0.05
    assert gal_gdr.mean + 3 * gal_gdr.sem < plain_gdr.mean - 3 * plain_gdr.sem
    assert gal["ensemble_acc"] > plain["ensemble_acc"] - 0.03
    assert {"gdr", "gdr_sem", "gdr_n", "gdr_excluded", "reg"} <= set(gal)


def test_diversity_needs_two_members():
    with pytest.raises(EnsdivError, match="at least 2 members"):
        TrainConfig(members=1, diversity="gal").validate()
    with pytest.raises(EnsdivError, match="cos, drt, gal, gdr, none"):
        TrainConfig(diversity="trs").validate()
    with pytest.raises(EnsdivError, match="lam"):
        TrainConfig(diversity="gal", lam=-1).validate()


@pytest.mark.slow
def test_gal_on_mnist5k_real_data():
    """Real-data check (minutes): GAL on mnist5k keeps accuracy and lowers GDR."""
    from ensdiv.data import load_dataset
    from ensdiv.gdr import ensemble_gdr

    _, test, _ = load_dataset("mnist5k")
    out = {}
    for diversity in ("none", "gal"):
        cfg = TrainConfig(dataset="mnist5k", arch="cnn", members=3, epochs=3, lr=3e-3,
                          diversity=diversity)
        ens, recs = train_run(cfg, progress=False)
        out[diversity] = (recs[-1]["ensemble_acc"], ensemble_gdr(ens, test).mean)
    assert out["none"][0] > 0.9 and out["gal"][0] > out["none"][0] - 0.03
    assert out["gal"][1] < out["none"][1] - 0.05


def test_plain_runs_record_the_lam_they_used():
    assert TrainConfig().validate().lam == 0.0
    assert TrainConfig(diversity="gal").validate().lam == 0.5
    assert TrainConfig(diversity="cos", lam=2.0).validate().lam == 2.0
    assert TrainConfig(lam=0.0).validate().lam == 0.0
    with pytest.raises(EnsdivError, match="lam 1 has no effect without a diversity term"):
        TrainConfig(lam=1.0).validate()


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": float("nan")}, "learning rate must be a finite number"),
    ({"lr": float("inf")}, "learning rate must be a finite number"),
    ({"weight_decay": float("nan")}, "weight decay must be a finite number"),
    ({"weight_decay": float("inf")}, "weight decay must be a finite number"),
    ({"diversity": "gal", "lam": float("inf")}, "lam must be a finite number"),
    ({"noise_sigma": float("inf")}, "noise sigma must be a finite number"),
    ({"noise_sigma": float("nan")}, "noise sigma must be a finite number"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"members": 2.5}, "members must be an integer"),
])
def test_non_finite_and_non_integer_settings_are_errors(kwargs, message):
    with pytest.raises(EnsdivError, match=message):
        TrainConfig(**kwargs).validate()


def test_implausible_noise_sigma_warns():
    from ensdiv.errors import EnsdivWarning

    with pytest.warns(EnsdivWarning, match="noise sigma 1e\\+06 is larger than the whole pixel"):
        TrainConfig(noise_sigma=1e6).validate()


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


def test_non_finite_loss_stops_with_the_epoch_and_parts(tmp_path):
    from ensdiv.data import load_dataset
    from ensdiv.objective import ce_loss
    from ensdiv.train import TrainingDiverged, fit

    train, test, info = load_dataset("digits")
    ens = Ensemble.build("mlp", 2, in_shape=info.in_shape, num_classes=10)
    calls = []

    def explode(e, x, y):
        calls.append(1)
        loss, stats = ce_loss(e, x, y)
        if len(calls) > 14:  # epoch 2 (12 batches per epoch), batch 3
            return loss * float("nan"), {**stats, "ce_1": float("nan")}
        return loss, stats

    with pytest.raises(TrainingDiverged) as err:
        fit(ens, train, test, epochs=3, batch_size=128, lr=1e-3, seed=0, loss_fn=explode,
            out_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "epoch 2, batch 3" in msg and "ce_1=nan" in msg
    assert "keeps epoch 1" in msg
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("kwargs,message", [
    ({"eps": 0.1}, "--eps sets adversarial training; add --objective adversarial"),
    ({"steps": 3}, "--steps sets adversarial training"),
    ({"objective": "adversarial"}, "needs --eps"),
    ({"objective": "adversarial", "eps": 2.0}, "eps must be at most 1"),
    ({"objective": "adversarial", "eps": 0.1, "steps": 0}, "steps must be >= 1"),
    ({"objective": "adversarial", "eps": 0.1, "noise_sigma": 0.5}, "not both"),
    ({"objective": "fast"}, "unknown objective 'fast'; choose one of: adversarial, standard"),
    ({"attack": "fgsm"}, "unknown attack 'fgsm'; choose one of: pgd"),
    ({"teacher": "runs/t"}, "--teacher needs --transfer rrm or crt"),
    ({"transfer_weight": 0.5}, "--transfer-weight needs --transfer"),
    ({"transfer": "rrm"}, "--transfer rrm needs --teacher RUN"),
    ({"transfer": "crt", "teacher": "t"}, "--transfer crt trains on Gaussian-noisy inputs"),
    ({"transfer": "rrm", "teacher": "t", "noise_sigma": 0.5}, "drop --noise-sigma"),
    ({"transfer": "rrm", "teacher": "t", "objective": "adversarial", "eps": 0.1},
     "never adversarial ones"),
    ({"transfer": "kd", "teacher": "t"}, "unknown transfer 'kd'"),
])
def test_adversarial_and_transfer_config_validation(kwargs, message):
    with pytest.raises(EnsdivError, match=message):
        TrainConfig(**kwargs).validate()


def test_adversarial_and_transfer_defaults_are_recorded():
    at = TrainConfig(objective="adversarial", eps=0.1).validate()
    assert at.steps == 7 and at.eps == 0.1 and at.transfer_weight is None
    rrm = TrainConfig(teacher="t", transfer="rrm").validate()
    assert rrm.transfer_weight == 0.01 and rrm.steps is None
    crt = TrainConfig(teacher="t", transfer="crt", noise_sigma=0.25).validate()
    assert crt.transfer_weight == 0.0


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


def _reads_back(monkeypatch, calls):
    """Count where ensdiv's own code brings a tensor's value back to Python (each a GPU sync
    on CUDA); torch's optimizer and data loader read host-side tensors and are not counted."""
    import sys

    for name in ("__float__", "__bool__", "__int__", "item", "tolist"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name):
            caller = sys._getframe(1).f_code.co_filename
            if "/ensdiv/" in caller:
                calls.append((_name, caller, sys._getframe(1).f_lineno))
            return _orig(self, *a)

        monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("diversity", ["none", "gal"])
def test_fit_reads_nothing_back_per_batch_between_sync_points(monkeypatch, diversity):
    """The hot loop keeps loss and stats on the device: with the GPU policy (read back every
    SYNC_EVERY batches) the number of read-backs per epoch does not grow with the batches."""
    from torch.utils.data import TensorDataset

    from ensdiv import loop as train_mod
    from ensdiv.objective import ensemble_loss

    monkeypatch.setattr(train_mod, "_sync_every", lambda device: 10_000)
    loss_fn = functools.partial(ensemble_loss, diversity=diversity, lam=0.5)
    counts = []
    for n_batches in (3, 9):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.rand(8 * n_batches, 1, 8, 8, generator=g),
                             torch.randint(0, 10, (8 * n_batches,), generator=g))
        test = TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
        ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
        calls = []
        with monkeypatch.context() as mp:
            _reads_back(mp, calls)
            fit(ens, data, test, epochs=1, batch_size=8, lr=1e-3, seed=0, progress=False,
                loss_fn=loss_fn)
        counts.append(len(calls))
    assert counts[0] == counts[1], counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_and_certification_do_not_synchronize_per_batch():
    """torch.cuda.set_sync_debug_mode counts synchronizing calls: one training epoch and one
    sample_counts call make as many with 3 batches as with 9."""
    import warnings

    from torch.utils.data import TensorDataset

    from ensdiv import loop as train_mod
    from ensdiv.smoothing import Smooth

    def syncs(fn):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return len(caught)

    old = train_mod._sync_every
    train_mod._sync_every = lambda device: 10_000
    try:
        counts = []
        for n_batches in (3, 9):
            data = TensorDataset(torch.rand(8 * n_batches, 1, 8, 8),
                                 torch.randint(0, 10, (8 * n_batches,)))
            ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).cuda()
            counts.append(syncs(functools.partial(fit, ens, data, data, epochs=1, batch_size=8,
                                                  lr=1e-3, seed=0, progress=False)))
        assert counts[0] == counts[1], counts
    finally:
        train_mod._sync_every = old
    ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).cuda().eval()
    smooth = Smooth(ens, num_classes=10, sigma=0.5)
    x = torch.rand(1, 8, 8, device="cuda")
    assert syncs(lambda: smooth.sample_counts(x, 300, 100)) == \
        syncs(lambda: smooth.sample_counts(x, 900, 100))
