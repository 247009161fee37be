"""Stacked (torch.func vmap) vs looped ensemble execution: forward + backward of summed CE.

Decides ``ensdiv.ensemble.MEASURED_DEFAULT_PATH``. ``extra_info["ratio_to_loop"]``: the
median of per-round ratios to the loop path, timed in pairs. Run: ``make bench``.
"""

import pytest
import torch

from _common import DEVICES, SMOKE, batch, machine, make_ensemble, paired_rounds, sync


def cases():
    if SMOKE:
        return [("cpu", "cnn", (1, 8, 8), 2, 8)]
    out = [("cpu", "cnn", (1, 28, 28), m, 128) for m in (3, 8)]
    out.append(("cpu", "resnet20", (3, 32, 32), 3, 128))
    if "cuda" in DEVICES:
        out += [("cuda", arch, shape, m, 512) for arch, shape in
                [("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))] for m in (3, 8, 16)]
    return out


def train_step(path, device, arch, shape, m, size):
    ens = make_ensemble(arch, m, shape, device, path=path)
    x, y = batch(shape, size, device)

    def step():
        ens.zero_grad(set_to_none=True)
        logits = ens.member_logits(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(m))
        loss.backward()
        sync(device)

    return step


@pytest.mark.parametrize("path", ["loop", "stacked"])
@pytest.mark.parametrize("device,arch,shape,m,size", cases())
def test_train_step(benchmark, device, arch, shape, m, size, path):
    step = train_step(path, device, arch, shape, m, size)
    base = train_step("loop", device, arch, shape, m, size)
    benchmark.group = f"{device} {arch} M={m}"
    benchmark.extra_info.update(machine(device), bench="ensemble", arch=arch, shape=list(shape),
                                m=m, batch=size, path=path)
    benchmark.extra_info["ratio_to_loop"] = paired_rounds(benchmark, step, base, device)
