"""Noisy samples per second through randomized smoothing: a member vs a whole ensemble.

One call of ``Smooth.sample_counts`` (the inner loop of ``certify``) draws 2,000 noisy copies
of one input and counts the base predictions, 100 per forward pass. The ensemble evaluates all
members on each noise batch; its cost relative to M separate members is the ratio of the two
groups' times divided by M. ``channels_last`` compares the two weight memory formats.

pytest-benchmark: ``make bench`` or ``pytest benchmarks/bench_smoothing.py --benchmark-enable``.
The README's figures come from ``python benchmarks/bench_smoothing.py``: paired repetitions
(member, M = 3, M = 5 timed back to back in each), medians of samples/s and of the per-repetition
ratios, the FLOPs per sample (convolutions and matmuls, ``torch.utils.flop_counter``) and the
machine's ceiling (measured float32 matmul rate).
"""

import statistics
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ensdiv.ensemble import Ensemble
from ensdiv.smoothing import Smooth

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SAMPLES = 2_000
BATCH = 100


def flops_per_sample(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Forward FLOPs of one input (convolutions and matmuls; elementwise ops not counted)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(8, *shape, device=next(model.parameters()).device))
    return counter.get_total_flops() / 8


def matmul_gflops(device: str = "cpu", size: int = 1024, reps: int = 5) -> float:
    """The ceiling: the best of ``reps`` float32 ``size``×``size`` matmuls, in GFLOP/s."""
    a = torch.rand(size, size, device=device)
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        a @ a
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,shape", [("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))])
@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("channels_last", [True, False])
def test_noisy_samples(benchmark, device, arch, shape, m, channels_last):
    if device == "cpu" and arch == "resnet20" and m == 5:
        pytest.skip("too slow for 2 CPU cores")
    torch.manual_seed(0)
    ens = Ensemble.build(arch, m, in_shape=shape, num_classes=10).to(device).eval()
    smooth = Smooth(ens, num_classes=10, sigma=0.5, seed=0, channels_last=channels_last)
    x = torch.rand(*shape, device=device)
    benchmark.group = f"{device} {arch} smoothing"
    benchmark.extra_info.update(samples=SAMPLES, batch=BATCH, members=m,
                                channels_last=channels_last, device_name=_device_name(device),
                                flops_per_sample=flops_per_sample(ens, shape))

    def run():
        smooth.sample_counts(x, SAMPLES, BATCH)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def paired(arch: str, shape: tuple[int, ...], ms: tuple[int, ...], *, channels_last: bool,
           device: str = "cpu", reps: int = 5) -> dict[int, list[float]]:
    """Seconds per ``SAMPLES`` noisy samples for each M, measured back to back per repetition."""
    smooths = {}
    for m in ms:
        torch.manual_seed(0)
        ens = Ensemble.build(arch, m, in_shape=shape, num_classes=10).to(device).eval()
        smooths[m] = Smooth(ens, num_classes=10, sigma=0.5, seed=0, channels_last=channels_last)
    x = torch.rand(*shape, device=device)
    times: dict[int, list[float]] = {m: [] for m in ms}
    for rep in range(reps + 1):
        for m in ms:
            t = time.perf_counter()
            smooths[m].sample_counts(x, SAMPLES, BATCH)
            if device == "cuda":
                torch.cuda.synchronize()
            if rep:  # the first repetition warms up
                times[m].append(time.perf_counter() - t)
    return times


def main() -> None:
    device = "cuda" if "--cuda" in sys.argv else "cpu"
    ceiling = matmul_gflops(device)
    print(f"device {_device_name(device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; float32 matmul ceiling {ceiling:.0f} GFLOP/s; "
          f"{SAMPLES} samples per call, batch {BATCH}, median of 5 paired repetitions")
    print("| model | weights | M | samples/s | GFLOP/s (share of ceiling) | time / member's "
          "| / (M × member's) |")
    print("|---|---|---|---|---|---|---|")
    for arch, shape, ms in [("cnn", (1, 28, 28), (1, 3, 5)), ("resnet20", (3, 32, 32), (1, 3))]:
        torch.manual_seed(0)
        flops = flops_per_sample(Ensemble.build(arch, 1, in_shape=shape, num_classes=10), shape)
        for cl in (False, True):
            times = paired(arch, shape, ms, channels_last=cl, device=device)
            for m in ms:
                rate = SAMPLES / statistics.median(times[m])
                ratio = statistics.median(a / b for a, b in zip(times[m], times[1], strict=True))
                gf = rate * flops * m / 1e9
                print(f"| {arch} ({flops / 1e6:.1f} MFLOP) | "
                      f"{'channels_last' if cl else 'NCHW'} | {m} | {rate:,.0f} | "
                      f"{gf:.1f} ({gf / ceiling:.0%}) | {ratio:.2f} | {ratio / m:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
