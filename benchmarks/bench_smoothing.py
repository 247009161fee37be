"""Noisy samples per second through randomized smoothing: a member vs a whole ensemble.

One call of ``Smooth.sample_counts`` (the inner loop of ``certify``) draws 2,000 noisy copies
of one input and counts the base predictions, batch 1,000. The ensemble evaluates all members
on each noise batch in one pass; its cost relative to M separate members is the ratio of the
two groups' times divided by M. Run: ``make bench`` or
``pytest benchmarks/bench_smoothing.py --benchmark-enable``.
"""

import pytest
import torch

from ensdiv.ensemble import Ensemble
from ensdiv.smoothing import Smooth

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SAMPLES = 2_000


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,shape", [("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))])
@pytest.mark.parametrize("m", [1, 3, 5])
def test_noisy_samples(benchmark, device, arch, shape, m):
    if device == "cpu" and arch == "resnet20" and m == 5:
        pytest.skip("too slow for 2 CPU cores")
    torch.manual_seed(0)
    ens = Ensemble.build(arch, m, in_shape=shape, num_classes=10).to(device).eval()
    smooth = Smooth(ens, num_classes=10, sigma=0.5, seed=0)
    x = torch.rand(*shape, device=device)
    benchmark.group = f"{device} {arch} smoothing"
    benchmark.extra_info["samples"] = SAMPLES
    benchmark.extra_info["members"] = m

    def run():
        smooth.sample_counts(x, SAMPLES, 1_000)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
