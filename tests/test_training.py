"""Training recipes: what a TrainConfig accepts and means, and diversity training's effect."""

import dataclasses
import math

import pytest
import torch

from ensdiv.errors import EnsdivError
from ensdiv.runs.train import train_run
from ensdiv.training import TrainConfig


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": "imagenet"}, "cifar10, digits, fashion-mnist, mnist, mnist5k"),
    ({"arch": "vgg"}, "cnn, cnn-nf, mlp, resnet20, resnet20-fixup"),
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
    with pytest.raises(EnsdivError, match="cos, drt, dverge, gal, gdr, none, trs"):
        TrainConfig(diversity="tr").validate()
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


@pytest.mark.parametrize("kwargs,message", [
    ({"adp_alpha": 1.0}, "--adp-alpha is a hyper-parameter of ADP; add --diversity adp"),
    ({"diversity": "adp", "adp_alpha": -1.0}, "ADP alpha must be a finite number >= 0"),
    ({"diversity": "adp", "lam": -0.5}, "lam"),
    ({"diversity": "adp", "objective": "adversarial", "eps": 0.1}, "standard objective only"),
    ({"diversity": "adp", "members": 1}, "needs at least 2 members"),
])
def test_adp_config_validation(kwargs, message):
    with pytest.raises(EnsdivError, match=message):
        TrainConfig(**kwargs).validate()


@pytest.mark.parametrize("members", [2, 3, 5])
def test_adp_trains_any_m_with_its_defaults_recorded(members):
    import torch

    from ensdiv.adp import adp_loss
    from ensdiv.ensemble import Ensemble
    from ensdiv.training import make_loss

    cfg = TrainConfig(dataset="digits", arch="cnn", members=members, epochs=1,
                      diversity="adp").validate()
    assert (cfg.lam, cfg.adp_alpha) == (0.5, 2.0)  # the authors' β and α
    ens = Ensemble.build("cnn", members, in_shape=(1, 8, 8), num_classes=10, seed=0)
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    loss, _ = make_loss(TrainConfig(diversity="adp", lam=0.25, adp_alpha=1.5,
                                    members=members))(ens, x, y)
    assert torch.allclose(loss, adp_loss(ens, x, y, alpha=1.5, beta=0.25)[0])
    ens, recs = train_run(cfg, progress=False)  # trains (slowly: see the next test)
    assert ens.config["adp_alpha"] == 2.0 and math.isfinite(recs[-1]["reg"])
    assert recs[-1]["entropy"] <= math.log(10) + 1e-6


@pytest.mark.parametrize("kwargs,message", [
    ({"trs_eps": 0.1}, "--trs-eps is a hyper-parameter of TRS; add --diversity trs"),
    ({"dverge_steps": 3}, "--dverge-steps is a hyper-parameter of DVERGE"),
    ({"diversity": "trs", "adp_alpha": 1.0}, "--adp-alpha is a hyper-parameter of ADP"),
    ({"diversity": "trs", "trs_eps": 2.0}, "TRS eps must be at most 1"),
    ({"diversity": "trs", "trs_smooth": -1.0}, "TRS smoothness weight must be >= 0"),
    ({"diversity": "trs", "objective": "adversarial", "eps": 0.1}, "standard objective only"),
    ({"diversity": "dverge", "dverge_eps": 0.0}, "DVERGE eps must be positive"),
    ({"diversity": "dverge", "dverge_layer": 4}, "--dverge-layer 4 does not exist in cnn"),
    ({"diversity": "dverge", "arch": "resnet20", "dverge_layer": 21}, "layers 1 to 20"),
    ({"diversity": "dverge", "batch_size": 1}, "must be at least 2"),
    ({"diversity": "dverge", "members": 1}, "needs at least 2 members"),
    ({"diversity": "dverge", "teacher": "t", "transfer": "rrm"}, "standard objective only"),
])
def test_trs_and_dverge_config_validation(kwargs, message):
    with pytest.raises(EnsdivError, match=message):
        TrainConfig(**kwargs).validate()


def test_trs_and_dverge_defaults_are_the_authors_and_recorded():
    from ensdiv.trs import TRS_SMOOTH

    trs = TrainConfig(diversity="trs").validate()
    assert (trs.lam, trs.trs_smooth, trs.trs_eps) == (10.0, TRS_SMOOTH, 0.2)
    dv = TrainConfig(diversity="dverge").validate()
    assert (dv.lam, dv.dverge_eps, dv.dverge_steps, dv.dverge_layer, dv.dverge_clean) == \
        (1.0, 0.07, 10, None, 0.0)
    assert TrainConfig(diversity="gal").validate().trs_smooth is None
    # an old run's config (no TRS/DVERGE fields) still loads
    old = {k: v for k, v in TrainConfig(diversity="gal").validate().to_dict().items()
           if not k.startswith(("trs_", "dverge_"))}
    assert TrainConfig.from_dict(old).validate().lam == 0.5


@pytest.mark.parametrize("diversity", ["trs", "dverge"])
@pytest.mark.parametrize("arch,members", [("cnn", 2), ("cnn", 3), ("cnn", 5), ("resnet20", 2)])
def test_trs_and_dverge_train_any_m_and_arch(diversity, arch, members):
    import torch

    from ensdiv.dverge import DvergeLoss
    from ensdiv.ensemble import Ensemble
    from ensdiv.training import fit, make_loss
    from ensdiv.trs import TrsLoss

    shape = (1, 8, 8) if arch == "cnn" else (3, 8, 8)
    cfg = TrainConfig(arch=arch, members=members, diversity=diversity,
                      **({"trs_eps": 0.1} if diversity == "trs" else {"dverge_steps": 2}))
    ens = Ensemble.build(arch, members, in_shape=shape, num_classes=10, seed=0)
    loss_fn = make_loss(cfg, ens)
    assert isinstance(loss_fn, TrsLoss if diversity == "trs" else DvergeLoss)
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(*shape, generator=g), i % 10) for i in range(24)]
    before = [p.detach().clone() for p in ens.parameters()]
    recs = fit(ens, data, data[:8], epochs=1, batch_size=12, lr=1e-3, seed=0, loss_fn=loss_fn,
               progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in recs[-1].items()
               if isinstance(v, float))
    assert recs[-1]["reg"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, ens.parameters(), strict=True)
               if a.numel() > 1)


def test_adp_reaches_plain_accuracy_on_digits_mlps():
    # the entropy term (α = 2) holds small cnns near a uniform mean prediction for the first
    # epochs on digits (0.50 after 3 epochs, plain 0.97); MLPs train as fast as plain ones
    cfg = TrainConfig(dataset="digits", arch="mlp", members=3, epochs=3, diversity="adp")
    _, recs = train_run(cfg, progress=False)
    assert recs[-1]["ensemble_acc"] > 0.9 and recs[-1]["log_ed"] > -1


def test_compile_pays_only_for_long_cpu_double_backprop_runs_of_groupnorm_members():
    from ensdiv.ensemble import Ensemble
    from ensdiv.training import COMPILE_MIN_STEPS, DOUBLE_BACKPROP, compile_pays

    gn = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10)
    nf = Ensemble.build("cnn-nf", 2, in_shape=(1, 8, 8), num_classes=10)
    long = COMPILE_MIN_STEPS
    assert all(compile_pays(gn, d, long, "cpu") for d in DOUBLE_BACKPROP)
    assert not compile_pays(gn, "gal", long - 1, "cpu")
    assert not compile_pays(nf, "gal", long, "cpu")  # no GroupNorm: nothing to fuse
    for d in ("none", "adp", "dverge"):  # no second derivative of an input gradient
        assert not compile_pays(gn, d, long, "cpu")
    assert not compile_pays(gn, "gal", long, "cuda")  # unmeasured there: left to --compile


def test_auto_compile_is_decided_per_run_and_reported_per_epoch(monkeypatch):
    """Under "auto", a run long enough fuses GroupNorm's double backward for its own duration
    and records the compile time; a short one does not; the mode is "auto" again afterwards.
    (The fused kernel replaced by the eager function: no compiling in the test suite.)"""
    from ensdiv import layers
    from ensdiv import training as train_module
    from ensdiv.data import load_dataset

    monkeypatch.setitem(layers._COMPILED, "fn", layers._gn_double_backward)
    monkeypatch.setitem(layers._COMPILED, "seconds", 0.0)
    monkeypatch.setitem(layers._COMPILED, "shapes", set())
    data = load_dataset("digits")
    cfg = TrainConfig(arch="cnn", members=2, epochs=1, diversity="gal", batch_size=256)
    layers.use_compiled_kernels("auto")
    _, short = train_module.train(cfg, data, progress=False)
    assert "compiled_kernels" not in short[-1] and not layers._COMPILED["shapes"]
    monkeypatch.setattr(train_module, "COMPILE_MIN_STEPS", 6)  # 1437 images / 256: 6 steps
    seen = []
    _, long = train_module.train(cfg, data, progress=False,
                                 on_epoch_end=lambda r: seen.append(
                                     layers.compiled_kernels_enabled()))
    assert seen == [True] and long[-1]["compiled_kernels"] is True
    assert long[-1]["compile_seconds"] >= 0 and layers._COMPILED["shapes"]
    assert layers.compile_mode() == "auto" and not layers.compiled_kernels_enabled()
    layers.use_compiled_kernels("off")
    _, off = train_module.train(cfg, data, progress=False)
    assert "compiled_kernels" not in off[-1]


def test_a_validation_split_is_held_out_stratified_and_recorded(one_thread):
    from ensdiv.data import load_dataset, validation_split
    from ensdiv.training import TrainConfig, train

    data = load_dataset("digits")
    fit_on, val = validation_split(data[0], 0.2, seed=0)
    counts = [torch.bincount(d.tensors[1], minlength=10) for d in (data[0], val)]
    assert len(fit_on) + len(val) == len(data[0])
    assert len(val) == math.ceil(0.2 * len(data[0]))  # scikit-learn rounds the held-out part up
    assert ((counts[1] - 0.2 * counts[0]).abs() <= 1).all()  # stratified: each class 20 %
    again = validation_split(data[0], 0.2, seed=0)[1]
    assert torch.equal(again.tensors[0], val.tensors[0])
    assert not torch.equal(validation_split(data[0], 0.2, seed=1)[1].tensors[1], val.tensors[1])
    config = TrainConfig(arch="mlp", members=2, epochs=1, val_fraction=0.2)
    _, recs = train(config, data, progress=False)
    assert recs[0]["val_n"] == len(val) and 0 < recs[0]["val_acc"] <= 1
    assert len(recs[0]["val_member_acc"]) == 2


def test_init_from_starts_from_a_runs_weights_and_records_them(tmp_path, one_thread):
    from ensdiv.data import load_dataset
    from ensdiv.ensemble import Ensemble, weights_fingerprint
    from ensdiv.io import read_json
    from ensdiv.runs.train import train_run
    from ensdiv.training import TrainConfig

    base = TrainConfig(arch="mlp", members=2, epochs=1)
    source, _ = train_run(base, out_dir=tmp_path / "plain", progress=False)
    # a learning rate so small that one epoch leaves the weights where they started
    tuned = TrainConfig(arch="mlp", members=2, epochs=1, lr=1e-12, seed=5,
                        init_from=str(tmp_path / "plain"))
    ens, _ = train_run(tuned, out_dir=tmp_path / "tuned", progress=False)
    for a, b in zip(ens.state_dict().values(), source.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-9)
    saved = read_json(tmp_path / "tuned" / "config.json")
    assert saved["init_from"] == str(tmp_path / "plain")
    assert saved["init_weights"] == weights_fingerprint(source)
    # another architecture or size: one line, before the run folder is made
    for bad in (dict(members=3), dict(arch="cnn")):
        with pytest.raises(EnsdivError, match="can only start from an ensemble of the same"):
            train_run(TrainConfig(**{**dict(arch="mlp", members=2, epochs=1), **bad,
                                     "init_from": str(tmp_path / "plain")}),
                      out_dir=tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    # the source retrained since: a resume is refused
    Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=9,
                   config=base.to_dict()).save(tmp_path / "plain" / "ensemble.pt")
    with pytest.raises(EnsdivError, match="holds other weights than this run started from"):
        from ensdiv.training import load_init
        load_init(TrainConfig.from_dict(saved), load_dataset("digits")[2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(val_fraction=0.0), "--val-fraction must be"),
    (dict(val_fraction=1.0), "--val-fraction must be in \\(0, 1\\)"),
    (dict(augment="crop-flip"), "refused on digits"),
    (dict(schedule="step", milestones=(3, 2)), "increasing order"),
    (dict(optimizer="adagrad"), "unknown optimizer"),
    (dict(momentum=0.9), "SGD's"),
    (dict(trs_eps_start=0.1), "hyper-parameter of TRS"),
    (dict(diversity="trs", trs_eps=0.1, trs_eps_start=0.2), "larger than TRS eps"),
])
def test_recipe_settings_are_checked_with_one_line(kwargs, match):
    from ensdiv.training import TrainConfig

    with pytest.raises(EnsdivError, match=match):
        TrainConfig(**kwargs).validate()


def test_an_old_run_folder_without_the_recipe_settings_still_resumes(tmp_path, one_thread):
    from ensdiv.io import atomic_write_json, read_json
    from ensdiv.runs.train import train_run
    from ensdiv.training import TrainConfig

    config = TrainConfig(arch="mlp", members=2, epochs=1)
    train_run(config, out_dir=tmp_path / "old", progress=False)
    saved = read_json(tmp_path / "old" / "config.json")
    newer = ("optimizer", "momentum", "nesterov", "schedule", "warmup", "milestones", "gamma",
             "schedule_unit", "augment", "val_fraction", "val_seed", "init_from",
             "init_weights", "recipe", "trs_eps_start")
    atomic_write_json(tmp_path / "old" / "config.json",
                      {k: v for k, v in saved.items() if k not in newer})
    _, recs = train_run(dataclasses.replace(config, epochs=2), out_dir=tmp_path / "old",
                        resume=True, progress=False)
    assert [r["epoch"] for r in recs] == [1, 2]


def test_drt_without_its_noise_is_said_once():
    import warnings

    from ensdiv.errors import EnsdivWarning
    from ensdiv.training import TrainConfig

    with pytest.warns(EnsdivWarning, match="DRT .* trains on Gaussian-noised inputs"):
        TrainConfig(diversity="drt").validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error", EnsdivWarning)
        TrainConfig(diversity="drt", noise_sigma=0.25).validate()
