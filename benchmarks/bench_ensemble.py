"""Stacked (torch.func vmap) vs looped ensemble execution: forward+backward of summed CE.

Decides ``ensdiv.ensemble.MEASURED_DEFAULT_PATH``. Run: ``make bench`` or
``pytest benchmarks/bench_ensemble.py --benchmark-enable``.
"""

import pytest
import torch

from ensdiv.ensemble import Ensemble

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [3, 8])
@pytest.mark.parametrize("arch,shape", [("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))])
@pytest.mark.parametrize("path", ["loop", "stacked"])
def test_train_step(benchmark, device, m, arch, shape, path):
    if device == "cpu" and arch == "resnet20" and m == 8:
        pytest.skip("too slow for 2 CPU cores")
    torch.manual_seed(0)
    ens = Ensemble.build(arch, m, in_shape=shape, num_classes=10, path=path).to(device)
    x = torch.rand(128, *shape, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    benchmark.group = f"{device} {arch} M={m}"

    def step():
        ens.zero_grad(set_to_none=True)
        logits = ens.member_logits(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(m))
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
