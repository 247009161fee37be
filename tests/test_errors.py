"""The input contract and the shared argument checks, on every public entry point."""

import functools

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ensdiv.adaptive import agreement_pgd, penalized_pgd
from ensdiv.attacks import apgd, fgsm, mifgsm, pgd
from ensdiv.disagreement import DisagreementDetector, evaluate_detector
from ensdiv.ensemble import Ensemble
from ensdiv.errors import (
    EnsdivError,
    check_input,
    check_int,
    check_real,
    check_shape,
    check_unique,
)
from ensdiv.gdr import ensemble_gdr
from ensdiv.gradients import input_gradients
from ensdiv.loop import accuracies
from ensdiv.models import build_model
from ensdiv.transferability import (
    success_counts,
    surrogate_transfer,
    transfer_matrix,
    worst_case_success,
)


@pytest.mark.parametrize("value, words", [
    (float("nan"), "finite"), (float("inf"), "finite"), (-float("inf"), "finite"),
    (-0.5, "must be >= 0"), ("0.1", "must be a number"), (True, "must be a number"),
])
def test_check_real_refuses(value, words):
    with pytest.raises(EnsdivError, match=words):
        check_real("x", value, minimum=0)


def test_check_real_int_unique_accept():
    assert check_real("x", 0, minimum=0) == 0.0
    with pytest.raises(EnsdivError, match="x must be positive"):
        check_real("x", 0, minimum=0, strict=True)
    assert check_int("n", 3) == 3
    for bad in (0, -5, 1.5, True, "3"):
        with pytest.raises(EnsdivError, match="n must be"):
            check_int("n", bad)
    check_unique("eps", (0.1, 0.2))
    with pytest.raises(EnsdivError, match="eps lists 0.1 twice"):
        check_unique("eps", (0.1, 0.2, 0.1))


def test_check_shape_messages():
    check_shape(torch.rand(2, 1, 8, 8), (1, 8, 8), torch.float32)
    with pytest.raises(EnsdivError, match=r"\(2, 64\).*\(1, 8, 8\).*reshape flat inputs"):
        check_shape(torch.rand(2, 64), (1, 8, 8), torch.float32)
    with pytest.raises(EnsdivError, match="float64 but the model's weights are torch.float32"):
        check_shape(torch.rand(2, 1, 8, 8, dtype=torch.float64), (1, 8, 8), torch.float32)
    with pytest.raises(EnsdivError, match="floating-point"):
        check_shape(torch.zeros(2, 1, 8, 8, dtype=torch.long), (1, 8, 8), torch.float32)
    net = build_model("mlp", in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(EnsdivError, match=r"labels must lie in \[0, 10\)"):
        check_input(net, torch.rand(2, 1, 8, 8), torch.tensor([0, 10]))
    with pytest.raises(EnsdivError, match=r"must lie in \[0, 1\]"):
        check_input(net, torch.rand(2, 1, 8, 8) + 1)


ENS = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
CNN = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
Y = torch.tensor([1, 2, 3])


def _attack(fn):
    return lambda model, x, y: fn(model, x, y, eps=0.1, **({} if fn is fgsm else {"steps": 2}))


ENTRY_POINTS = {
    "fgsm": lambda ens, x: fgsm(ens, x, Y, eps=0.1),
    "pgd": lambda ens, x: pgd(ens, x, Y, eps=0.1, steps=2),
    "mifgsm": lambda ens, x: mifgsm(ens, x, Y, eps=0.1, steps=2),
    "fgsm on a member": lambda ens, x: fgsm(ens.members[0], x, Y, eps=0.1),
    "input_gradients": lambda ens, x: input_gradients(ens, x, Y),
    "ensemble_gdr": lambda ens, x: ensemble_gdr(ens, TensorDataset(x, Y[: len(x)])),
    "accuracies": lambda ens, x: accuracies(ens, TensorDataset(x, Y[: len(x)])),
    "transfer_matrix": lambda ens, x: transfer_matrix(
        ens, x, Y, attack=functools.partial(fgsm, eps=0.1)),
    "success_counts": lambda ens, x: success_counts(ens, x, Y, x),
    "surrogate_transfer": lambda ens, x: surrogate_transfer(
        ens, ens, x, Y, attack=functools.partial(fgsm, eps=0.1)),
    "forward": lambda ens, x: ens(x),
    "member forward": lambda ens, x: ens.members[1](x),
    "predict": lambda ens, x: ens.predict(x),
    "apgd": lambda ens, x: apgd(ens, x, Y, eps=0.1, steps=2),
    "worst_case_success": lambda ens, x: worst_case_success(
        ens, x, Y, attacks={"fgsm": functools.partial(fgsm, eps=0.1)}),
    "detector fit": lambda ens, x: DisagreementDetector(ens).fit(x),
    "detector detect": lambda ens, x: _fitted(ens).detect(x),
    "evaluate_detector": lambda ens, x: evaluate_detector(_fitted(ens), x, Y[: len(x)], x),
    "agreement_pgd": lambda ens, x: agreement_pgd(ens, x, Y, eps=0.1, steps=2),
    "penalized_pgd": lambda ens, x: penalized_pgd(ens, x, Y, eps=0.1, steps=2, kappas=(1.0,),
                                                  detector=_fitted(ens)),
}


def _fitted(ens):
    return DisagreementDetector(ens).fit(torch.rand(20, 1, 8, 8))

BAD_INPUTS = {
    "28x28 images for an 8x8 model": (torch.rand(3, 1, 28, 28), r"\(3, 1, 28, 28\).*\(1, 8, 8\)"),
    "3 channels for 1": (torch.rand(3, 3, 8, 8), r"\(3, 3, 8, 8\).*\(1, 8, 8\)"),
    "flat inputs": (torch.rand(3, 64), "reshape flat inputs"),
    "no batch dimension": (torch.rand(1, 8, 8), r"\(1, 8, 8\).*\[B, C, H, W\]"),
    "float64": (torch.rand(3, 1, 8, 8, dtype=torch.float64), "float64"),
}


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("bad", list(BAD_INPUTS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses_inputs_that_break_the_contract(entry, bad, arch):
    x, words = BAD_INPUTS[bad]
    with pytest.raises(EnsdivError, match=words):
        ENTRY_POINTS[entry](ENS if arch == "mlp" else CNN, x)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_accepts_the_contract(entry):
    ENTRY_POINTS[entry](CNN, torch.rand(3, 1, 8, 8))


def test_input_gradients_wraps_a_plain_module_as_one_member():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    g = input_gradients(net, x, y)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(nn.functional.cross_entropy(net(xr), y, reduction="sum"), xr)
    assert g.shape == (1, 4, 1, 8, 8)
    torch.testing.assert_close(g[0], ref)
    with pytest.raises(EnsdivError, match=r"labels must lie in \[0, 10\)"):
        input_gradients(net, x, torch.tensor([0, 1, 2, 12]))
    with pytest.raises(EnsdivError, match="expected an Ensemble or a torch.nn.Module"):
        input_gradients(lambda v: v, x, y)
