"""ensdiv.optim against torch.optim and torch's own schedulers; fit's exact resume mid-schedule."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ensdiv.augment import compose, crop_flip, gaussian_noise
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError
from ensdiv.loop import ce_loss, fit
from ensdiv.optim import Optim


def _lrs(sched_factory, steps, per_step=True, steps_per_epoch=1):
    """The learning rate before each of ``steps`` optimizer steps under a torch scheduler."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = sched_factory(opt)
    out = []
    for k in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if per_step or (k + 1) % steps_per_epoch == 0:
            sched.step()
    return out


def _ours(optim, steps_per_epoch, epochs):
    p = nn.Parameter(torch.zeros(1))
    opt, sched = optim.build([p], steps_per_epoch=steps_per_epoch, epochs=epochs)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_schedules_are_torchs(unit):
    spe, epochs = 3, 8
    per_step = unit == "step"
    total = epochs * spe if per_step else epochs
    lr = torch.optim.lr_scheduler
    cases = [
        (Optim(lr=1.0, schedule="cosine", unit=unit),
         lambda o: lr.CosineAnnealingLR(o, T_max=total)),
        (Optim(lr=1.0, schedule="step", milestones=(2, 5), gamma=0.3, unit=unit),
         lambda o: lr.MultiStepLR(o, milestones=[2, 5], gamma=0.3)),
        (Optim(lr=1.0, schedule="cosine", warmup=2, unit=unit),
         lambda o: lr.SequentialLR(o, [lr.LinearLR(o, start_factor=1 / 2, total_iters=1),
                                       lr.CosineAnnealingLR(o, T_max=total - 2)],
                                   milestones=[2])),
        (Optim(lr=1.0, unit=unit), lambda o: lr.ConstantLR(o, factor=1.0)),
    ]
    for ours, theirs in cases:
        ref = _lrs(theirs, spe * epochs, per_step=per_step, steps_per_epoch=spe)
        got = _ours(ours, spe, epochs)
        # torch's cosine is a recurrence: its rates agree with the closed form to round-off
        assert got == pytest.approx(ref, rel=1e-12, abs=1e-15), ours


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,),
                                                                            generator=g))


@pytest.mark.parametrize("optim, reference", [
    (Optim(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
           schedule="step", milestones=(1,), gamma=0.1),
     lambda ps: (torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
                 lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [1], 0.1))),
    (Optim(name="adam", lr=1e-2, weight_decay=1e-4),
     lambda ps: (torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-4), None)),
])
def test_fit_steps_like_a_hand_written_torch_loop(optim, reference, one_thread):
    train, test = _data(), _data(10)
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
    ref = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
    batches = []  # fit's batches, replayed by the reference loop

    def recording(e, x, y):
        batches.append((x.clone(), y.clone()))
        return ce_loss(e, x, y)

    fit(ens, train, test, epochs=2, batch_size=16, seed=3, optim=optim, loss_fn=recording,
        progress=False)
    opt, make_sched = reference(list(ref.parameters()))
    sched = make_sched(opt) if make_sched else None
    ref.train()
    steps_per_epoch = 3  # ceil(40 / 16)
    for k, (x, y) in enumerate(batches, 1):
        loss, _ = ce_loss(ref, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched and k % steps_per_epoch == 0:  # the papers' per-epoch MultiStepLR
            sched.step()
    assert len(batches) == 2 * steps_per_epoch
    for a, b in zip(ens.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)  # the same float operations in the same order


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_a_run_killed_mid_schedule_and_augmented_resumes_to_the_same_weights(
        tmp_path, schedule, one_thread):
    train, test = _data(), _data(10)
    optim = Optim(name="sgd", lr=0.05, schedule=schedule, warmup=1,
                  milestones=(2,) if schedule == "step" else (), unit="epoch")

    def run(out, stop_after=None):
        ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10, seed=1)

        def stop(record):
            if record["epoch"] == stop_after:
                raise KeyboardInterrupt

        try:
            recs = fit(ens, train, test, epochs=4, batch_size=16, seed=2, optim=optim,
                       out_dir=out, resume=True, progress=False, on_epoch_end=stop,
                       augment=compose(crop_flip(pad=2), gaussian_noise(0.05)))
        except KeyboardInterrupt:
            return None, None
        return ens, recs

    whole, recs = run(tmp_path / "whole")
    assert run(tmp_path / "killed", stop_after=2) == (None, None)
    resumed, recs2 = run(tmp_path / "killed")
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(),
                                                  resumed.state_dict().values(), strict=True))
    assert [r["lr"] for r in recs2] == [r["lr"] for r in recs]
    assert recs[0]["lr"] == pytest.approx(0.05) and recs[-1]["lr"] < 0.05


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "rmsprop"}, "unknown optimizer 'rmsprop'; choose one of: adam, sgd"),
    ({"schedule": "linear"}, "unknown schedule 'linear'; choose one of: constant, cosine"),
    ({"schedule": "step"}, "needs --milestones"),
    ({"schedule": "step", "milestones": (5, 3)}, "increasing order; got 5,3"),
    ({"schedule": "step", "milestones": (3, 3)}, "increasing order"),
    ({"milestones": (3,)}, "belong to the step schedule"),
    ({"schedule": "step", "milestones": (2,), "gamma": 2.0}, "gamma must be in"),
    ({"momentum": 0.9}, "SGD's; add --optimizer sgd"),
    ({"name": "sgd", "momentum": 1.0}, "momentum must be in"),
    ({"name": "sgd", "momentum": 0.0, "nesterov": True}, "Nesterov momentum needs"),
    ({"lr": 0.0}, "learning rate"),
    ({"warmup": -1}, "warm-up"),
    ({"unit": "batch"}, "unknown schedule unit"),
])
def test_bad_settings_are_one_line(kwargs, match):
    with pytest.raises(EnsdivError, match=match):
        Optim(**kwargs).validate()


def test_the_warmup_must_fit_the_run():
    p = [nn.Parameter(torch.zeros(1))]
    Optim(schedule="step", milestones=(5,)).build(p, steps_per_epoch=2, epochs=4)  # never hit
    with pytest.raises(EnsdivError, match="warm-up of 4 epochs does not fit"):
        Optim(warmup=4).build(p, steps_per_epoch=2, epochs=4)


def test_cosine_closed_form():
    o = Optim(schedule="cosine")
    assert [o.factor(t, 4) for t in range(4)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)])
