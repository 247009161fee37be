"""Noisy samples per second through randomized smoothing: a member vs a whole ensemble.

One call of ``Smooth.sample_counts`` (the inner loop of ``certify``) draws 2,000 noisy copies
of one input and counts the base predictions, 100 per forward pass. The ensemble evaluates all
members on each noise batch; its cost relative to M separate members is the ratio of the two
groups' times divided by M. ``channels_last`` compares the two weight memory formats.

pytest-benchmark: ``make bench`` or ``pytest benchmarks/bench_smoothing.py --benchmark-enable``.
The README's figures come from ``python benchmarks/bench_smoothing.py``: paired repetitions
(every M, weight format and batch size timed back to back in each), medians of samples/s and of
the per-repetition ratios, the FLOPs per sample (convolutions and matmuls,
``torch.utils.flop_counter``) and the machine's ceiling (measured float32 matmul rate).
"""

import statistics
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ensdiv.ensemble import Ensemble
from ensdiv.smoothing import Smooth

from _common import DEVICES, SMOKE, device_name, machine, matmul_gflops, sync

SAMPLES = 200 if SMOKE else 2_000
BATCH = 100


def flops_per_sample(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Forward FLOPs of one input (convolutions and matmuls; elementwise ops not counted)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(8, *shape, device=next(model.parameters()).device))
    return counter.get_total_flops() / 8


def cases():
    if SMOKE:
        return [("cpu", "cnn", (1, 8, 8), m, True) for m in (1, 2)]
    out = [("cpu", arch, shape, m, cl) for arch, shape, ms in
           [("cnn", (1, 28, 28), (1, 3, 5)), ("resnet20", (3, 32, 32), (1, 3))]
           for m in ms for cl in (True, False)]
    if "cuda" in DEVICES:
        out += [("cuda", arch, shape, m, cl) for arch, shape in
                [("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))]
                for m in (1, 3, 5, 8) for cl in (True, False)]
    return out


@pytest.mark.parametrize("device,arch,shape,m,channels_last", cases())
def test_noisy_samples(benchmark, device, arch, shape, m, channels_last):
    torch.manual_seed(0)
    ens = Ensemble.build(arch, m, in_shape=shape, num_classes=10).to(device).eval()
    smooth = Smooth(ens, num_classes=10, sigma=0.5, seed=0, channels_last=channels_last)
    x = torch.rand(*shape, device=device)
    batch = 1_000 if device == "cuda" else BATCH

    def run():
        smooth.sample_counts(x, SAMPLES, batch)
        sync(device)

    benchmark.group = f"{device} {arch} smoothing"
    benchmark.pedantic(run, rounds=1 if SMOKE else 3, warmup_rounds=0 if SMOKE else 1)
    seconds = benchmark.stats.stats.median if benchmark.stats else float("nan")
    flops = flops_per_sample(ens, shape)
    benchmark.extra_info.update(machine(device), bench="certify", arch=arch, shape=list(shape),
                                m=m, samples=SAMPLES, batch=batch, channels_last=channels_last,
                                flops_per_sample=flops, samples_per_s=SAMPLES / seconds,
                                gflops=SAMPLES * flops / seconds / 1e9,
                                ceiling_gflops=matmul_gflops(device))


SETTINGS = [(False, 1_000), (False, BATCH), (True, 1_000), (True, BATCH)]
"""(channels_last, batch) pairs: the old defaults first, then each change alone and both."""


def paired(arch: str, shape: tuple[int, ...], ms: tuple[int, ...], *, device: str = "cpu",
           reps: int = 5) -> dict[tuple[int, bool, int], list[float]]:
    """Seconds per ``SAMPLES`` noisy samples for every (M, channels_last, batch), all timed
    back to back in each repetition (so the machine's drift hits them alike)."""
    smooths = {}
    for m in ms:
        for cl in (False, True):
            torch.manual_seed(0)
            ens = Ensemble.build(arch, m, in_shape=shape, num_classes=10).to(device).eval()
            smooths[(m, cl)] = Smooth(ens, num_classes=10, sigma=0.5, seed=0, channels_last=cl)
    x = torch.rand(*shape, device=device)
    keys = [(m, cl, batch) for m in ms for cl, batch in SETTINGS]
    times: dict[tuple[int, bool, int], list[float]] = {k: [] for k in keys}
    for rep in range(reps + 1):
        for m, cl, batch in keys:
            t = time.perf_counter()
            smooths[(m, cl)].sample_counts(x, SAMPLES, batch)
            sync(device)
            if rep:  # the first repetition warms up
                times[(m, cl, batch)].append(time.perf_counter() - t)
    return times


def main() -> None:
    device = "cuda" if "--cuda" in sys.argv else "cpu"
    ceiling = matmul_gflops(device)
    print(f"device {device_name(device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; float32 matmul ceiling {ceiling:.0f} GFLOP/s; "
          f"{SAMPLES} samples per call; median of 5 paired repetitions\n")
    print("| model | M | weights | batch | samples/s | GFLOP/s (share of ceiling) "
          "| speed-up vs NCHW, batch 1,000 | time / (M × member's) |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, shape, ms in [("cnn", (1, 28, 28), (1, 3, 5)), ("resnet20", (3, 32, 32), (1, 3))]:
        torch.manual_seed(0)
        flops = flops_per_sample(Ensemble.build(arch, 1, in_shape=shape, num_classes=10), shape)
        times = paired(arch, shape, ms, device=device)
        for m in ms:
            old = times[(m, False, 1_000)]
            for cl, batch in SETTINGS:
                t = times[(m, cl, batch)]
                rate = SAMPLES / statistics.median(t)
                gf = rate * flops * m / 1e9
                speed = statistics.median(a / b for a, b in zip(old, t, strict=True))
                per = statistics.median(a / (m * b) for a, b in
                                        zip(t, times[(1, cl, batch)], strict=True))
                print(f"| {arch} ({flops / 1e6:.1f} MFLOP) | {m} | "
                      f"{'channels_last' if cl else 'NCHW'} | {batch:,} | {rate:,.0f} | "
                      f"{gf:.1f} ({gf / ceiling:.0%}) | {speed:.2f} | {per:.2f} |", flush=True)


if __name__ == "__main__":
    main()
