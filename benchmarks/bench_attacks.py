"""Attack throughput on the ensemble: PGD and APGD iterations per second on one batch.

Each iteration is a forward and an input-gradient backward of every member (the ensemble's
mean log-softmax). The labels are the ensemble's own predictions, so every input is attacked
(attacks leave misclassified inputs alone, and an untrained model misclassifies most).
``extra_info``: ``steps_per_s`` (iterations of the whole batch per second),
``sample_steps_per_s`` (× batch), and achieved GFLOP/s (3 × forward FLOPs per sample-step,
convolutions and matmuls) against the machine's float32 matmul ceiling.
"""

import pytest
import torch

from ensdiv.attacks import apgd, pgd

from _common import DEVICES, SMOKE, batch, machine, make_ensemble, matmul_gflops, sync
from bench_smoothing import flops_per_sample

ATTACKS = ["pgd", "apgd-ce", "apgd-dlr"]


def cases():
    if SMOKE:
        return [("cpu", "cnn", (1, 8, 8), 2, 8, 2)]
    out = [("cpu", "cnn", (1, 28, 28), 3, 128, 10)]
    if "cuda" in DEVICES:
        out += [("cuda", arch, shape, m, 512, 20) for arch, shape in
                [("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))] for m in (3, 8)]
    return out


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("device,arch,shape,m,size,steps", cases())
def test_attack(benchmark, device, arch, shape, m, size, steps, attack):
    ens = make_ensemble(arch, m, shape, device).eval()
    x, _ = batch(shape, size, device)
    with torch.no_grad():  # labels the ensemble gets right: attacks skip misclassified inputs
        y = ens(x).argmax(-1)
    g = torch.Generator(device=device).manual_seed(0)

    def run():
        if attack == "pgd":
            pgd(ens, x, y, eps=0.1, steps=steps, generator=g)
        else:
            apgd(ens, x, y, eps=0.1, steps=steps, loss=attack.split("-")[1])
        sync(device)

    benchmark.group = f"{device} {arch} attacks M={m}"
    benchmark.pedantic(run, rounds=1 if SMOKE else 3, warmup_rounds=0 if SMOKE else 1)
    seconds = benchmark.stats.stats.median if benchmark.stats else float("nan")
    flops = 3 * flops_per_sample(ens, shape) * size * steps
    benchmark.extra_info.update(machine(device), bench="attack", arch=arch, shape=list(shape),
                                m=m, batch=size, steps=steps, attack=attack,
                                steps_per_s=steps / seconds,
                                sample_steps_per_s=steps * size / seconds,
                                gflops=flops / seconds / 1e9,
                                ceiling_gflops=matmul_gflops(device))
