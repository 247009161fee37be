"""Per-member input gradients alone (no double backprop): ``ensdiv.gradients.input_gradients``
on the stacked torch.func path (one ``vmap`` over the members' stacked parameters) and on the
per-member loop, against the loop a user writes with ``torch.autograd.grad``.

``extra_info["ratio_to_autograd"]`` is the median of per-round ratios to that reference, timed
in pairs. The GPU target: the stacked path faster than the loop for M ≥ 5.
"""

import pytest
import torch
from torch import nn

from ensdiv.gradients import input_gradients

from _common import DEVICES, SMOKE, batch, machine, make_ensemble, paired_rounds

PATHS = ["stacked", "loop", "autograd"]


def cases():
    if SMOKE:
        return [("cpu", "cnn", (1, 8, 8), 2, 8)]
    out = [("cpu", "cnn", (1, 28, 28), m, 128) for m in (2, 5, 8)]
    if "cuda" in DEVICES:
        out += [("cuda", arch, shape, m, 256) for arch, shape in
                [("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))] for m in (2, 5, 8, 16)]
    return out


def autograd_gradients(ens, x, y):
    """The reference: one ``torch.autograd.grad`` per member."""
    out = []
    for member in ens.members:
        xx = x.clone().requires_grad_(True)
        ce = nn.functional.cross_entropy(member(xx), y, reduction="sum")
        out.append(torch.autograd.grad(ce, xx)[0])
    return torch.stack(out)


def gradient_fn(path, device, arch, shape, m, size):
    x, y = batch(shape, size, device)
    ens = make_ensemble(arch, m, shape, device, path="loop" if path == "autograd" else path)
    if path == "autograd":
        return lambda: autograd_gradients(ens, x, y)
    return lambda: input_gradients(ens, x, y)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device,arch,shape,m,size", cases())
def test_input_gradients(benchmark, device, arch, shape, m, size, path):
    fn = gradient_fn(path, device, arch, shape, m, size)
    ref = gradient_fn("autograd", device, arch, shape, m, size)
    torch.testing.assert_close(fn(), ref(), rtol=1e-4, atol=1e-6)  # same numbers first
    benchmark.group = f"{device} {arch} input gradients M={m}"
    benchmark.extra_info.update(machine(device), bench="input_gradients", arch=arch,
                                shape=list(shape), m=m, batch=size, path=path)
    benchmark.extra_info["ratio_to_autograd"] = paired_rounds(benchmark, fn, ref, device)
