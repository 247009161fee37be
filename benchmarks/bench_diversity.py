"""One training step (forward, regularizer, backward, Adam) for plain / cos / gal / gdr.

The baseline ``plain`` is what a user writes in standard PyTorch: a loop over the M member
modules, summed cross-entropies, backward. ``gal-stacked`` forces the torch.func vmap path,
``gal-autograd`` is the loop reference with ``torch.autograd.grad(create_graph=True)``.
Ratios to ``plain`` within one run: ``python benchmarks/report.py .benchmarks/diversity.json``.
"""

import pytest
import torch
from torch import nn

from ensdiv.diversity import gal_loss
from ensdiv.ensemble import Ensemble
from ensdiv.objective import ensemble_loss

CPU_CASES = [("cnn", (1, 28, 28), m) for m in (3, 5, 8)]
GPU_CASES = [("cnn", (1, 28, 28), m) for m in (3, 5, 8)] + [
    ("resnet20", (3, 32, 32), m) for m in (3, 5, 8)]
CASES = [("cpu", *c) for c in CPU_CASES] + (
    [("cuda", *c) for c in GPU_CASES] if torch.cuda.is_available() else [])
METHODS = ["plain", "cos", "gal", "gdr", "gal-stacked", "gal-autograd"]


def plain_step_loss(ens, x, y):
    return sum(nn.functional.cross_entropy(member(x), y) for member in ens.members)


def autograd_gal_loss(ens, x, y):
    ces, grads = [], []
    for member in ens.members:
        xx = x.clone().requires_grad_(True)
        logits = member(xx)
        ce = nn.functional.cross_entropy(logits, y, reduction="sum")
        (g,) = torch.autograd.grad(ce, xx, create_graph=True)
        ces.append(ce / len(y))
        grads.append(g)
    return sum(ces) + 0.5 * gal_loss(torch.stack(grads))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device,arch,shape,m", CASES)
def test_step(benchmark, device, arch, shape, m, method):
    torch.manual_seed(0)
    path = "stacked" if method == "gal-stacked" else "auto"
    ens = Ensemble.build(arch, m, in_shape=shape, num_classes=10, path=path).to(device)
    opt = torch.optim.Adam(ens.parameters(), lr=1e-3)
    x = torch.rand(128, *shape, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    if method == "plain":
        loss_fn = plain_step_loss
    elif method == "gal-autograd":
        loss_fn = autograd_gal_loss
    else:
        div = "gal" if method.startswith("gal") else method
        def loss_fn(e, xx, yy):
            return ensemble_loss(e, xx, yy, diversity=div, lam=0.5)[0]
    benchmark.group = f"{device} {arch} M={m}"
    benchmark.extra_info.update(device=device, arch=arch, m=m, method=method,
                                device_name=(torch.cuda.get_device_name(0)
                                             if device == "cuda" else "cpu"))

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(ens, x, y).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
