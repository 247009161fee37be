"""One training step (forward, loss, backward, Adam) with each gradient-diversity regularizer,
against a plain step of the same model: the headline cost of diversity training.

Methods (λ = 0.5): ``plain`` — what a user writes: a loop over the members, summed
cross-entropies, backward; ``cos``, ``gal``, ``gdr``, ``drt`` — ``ensdiv.objective
.ensemble_loss`` (torch.func per-member path); ``gal-stacked`` — the same through the stacked
``vmap`` path; ``gal-compiled`` — with ``ensdiv.layers.use_compiled_kernels`` (CPU, not in the
smoke run; compiled once per activation shape before the timed rounds); ``gal-torch.nn`` and
``plain-torch.nn`` — the same model built from plain ``torch.nn`` layers (before
ensdiv.layers); ``gal-autograd`` — the reference a user writes in plain PyTorch:
``torch.autograd.grad(create_graph=True)`` per member on the ``torch.nn`` model.

Each case is timed by pytest-benchmark and, round by round, paired with a plain step of the
shipped model (run in the round's setup, untimed by pytest-benchmark): ``extra_info
["ratio_to_plain"]`` is the median of those per-round ratios. ``make bench`` then
``python benchmarks/report.py .benchmarks/latest.json``.
"""

import functools

import pytest
from torch import nn

from ensdiv import layers
from ensdiv.objective import ensemble_loss

from _common import (
    DEVICES,
    SMOKE,
    autograd_gal_loss,
    batch,
    machine,
    make_ensemble,
    make_step,
    paired_rounds,
)

METHODS = ["plain", "cos", "gal", "gdr", "drt", "gal-stacked", "gal-compiled", "gal-torch.nn",
           "plain-torch.nn", "gal-autograd"]


def cases():
    if SMOKE:
        return [("cpu", "cnn", (1, 8, 8), 2, 8)]
    out = [("cpu", "cnn", (1, 28, 28), m, 128) for m in (3, 5, 8)]
    out.append(("cpu", "cnn", (1, 28, 28), 3, 32))
    if "cuda" in DEVICES:
        out += [("cuda", arch, shape, m, b) for arch, shape in
                [("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))]
                for m in (3, 5, 8) for b in (128, 512)]
    return out


def plain_loss(ens, x, y):
    """Summed member cross-entropies, as a user writes it."""
    return sum(nn.functional.cross_entropy(member(x), y) for member in ens.members)


def method_step(method, device, arch, shape, m, size):
    """(step closure, ensemble) for one method."""
    x, y = batch(shape, size, device)
    native = method.endswith("torch.nn") or method == "gal-autograd"
    ens = make_ensemble(arch, m, shape, device, native=native,
                        path="stacked" if method == "gal-stacked" else "auto")
    if method.startswith("plain"):
        loss_fn = plain_loss
    elif method == "gal-autograd":
        loss_fn = autograd_gal_loss
    else:
        div = method.split("-")[0]
        loss_fn = functools.partial(ensemble_loss, diversity=div, lam=0.5)
    return make_step(ens, loss_fn, x, y, device)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device,arch,shape,m,size", cases())
def test_step(benchmark, device, arch, shape, m, size, method):
    if method == "gal-compiled" and (SMOKE or device != "cpu"):
        pytest.skip("compiles (tens of seconds per activation shape): not a smoke test; on a "
                    "GPU, triton kernels are a separate measurement")
    step = method_step(method, device, arch, shape, m, size)
    base = method_step("plain", device, arch, shape, m, size)
    if method == "gal-compiled":
        layers.use_compiled_kernels(True)
        for _ in range(2):  # compile outside the timed rounds
            step()
    try:
        benchmark.group = f"{device} {arch} M={m} batch={size}"
        benchmark.extra_info.update(machine(device), bench="step", arch=arch,
                                    shape=list(shape), m=m, batch=size, method=method)
        ratio = paired_rounds(benchmark, step, base, device, rounds=5)
        benchmark.extra_info["ratio_to_plain"] = ratio
    finally:
        layers.use_compiled_kernels(False)
