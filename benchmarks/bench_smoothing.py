"""Noisy samples per second through randomized smoothing: a member vs a whole ensemble.

One call of ``Smooth.sample_counts`` (the inner loop of ``certify``) draws 2,000 noisy copies
of one input and counts the base predictions, 100 per forward pass. The ensemble evaluates all
members on each noise batch; its cost relative to M separate members is the ratio of the two
groups' times divided by M. ``channels_last`` compares the two weight memory formats.

pytest-benchmark: ``make bench`` or ``pytest benchmarks/bench_smoothing.py --benchmark-enable``.
The README's table comes from ``python benchmarks/bench_smoothing.py --out FILE.json``: paired
repetitions (every M, weight format and batch size timed back to back in each), the FLOPs per
sample (convolutions and matmuls, ``torch.utils.flop_counter``) and the machine's ceiling
(measured float32 matmul rate) saved as JSON; :func:`table` makes the table from that file
(medians of samples/s and of the per-repetition ratios).
"""

import argparse
import datetime
import functools
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ensdiv.ensemble import Ensemble
from ensdiv.smoothing import Smooth

from _common import DEVICES, SMOKE, machine, matmul_gflops, paired_median, paired_times, sync

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

MODELS = [("cnn", (1, 28, 28), (1, 3, 5)), ("resnet20", (3, 32, 32), (1, 3))]


def paired(arch: str, shape: tuple[int, ...], ms: tuple[int, ...], *, device: str = "cpu",
           reps: int = 5) -> dict[tuple[int, bool, int], list[float]]:
    """Seconds per ``SAMPLES`` noisy samples for every (M, channels_last, batch), all timed
    back to back in each repetition."""
    smooths = {}
    for m in ms:
        for cl in (False, True):
            torch.manual_seed(0)
            ens = Ensemble.build(arch, m, in_shape=shape, num_classes=10).to(device).eval()
            smooths[(m, cl)] = Smooth(ens, num_classes=10, sigma=0.5, seed=0, channels_last=cl)
    x = torch.rand(*shape, device=device)
    return paired_times({(m, cl, batch): functools.partial(smooths[(m, cl)].sample_counts, x,
                                                           SAMPLES, batch)
                         for m in ms for cl, batch in SETTINGS}, device, reps)


def run(device: str = "cpu", reps: int = 5, models=MODELS) -> dict:
    """Every model's paired timings, as the JSON the README's table is made from."""
    out = {**machine(device), "ceiling_gflops": matmul_gflops(device), "samples": SAMPLES,
           "reps": reps, "date": datetime.date.today().isoformat(), "models": []}
    for arch, shape, ms in models:
        torch.manual_seed(0)
        flops = flops_per_sample(Ensemble.build(arch, 1, in_shape=shape, num_classes=10), shape)
        times = paired(arch, shape, ms, device=device, reps=reps)
        out["models"].append({"arch": arch, "shape": list(shape), "flops_per_sample": flops,
                              "times": [{"m": m, "channels_last": cl, "batch": b, "seconds": t}
                                        for (m, cl, b), t in times.items()]})
    return out


def table(data: dict) -> str:
    """The README's table: samples/s, GFLOP/s, speed-up over the old defaults (NCHW, batch
    1,000) and the ensemble's cost per member, each the median over the paired repetitions."""
    ceiling = data["ceiling_gflops"]
    lines = [f"device {data['device_name']}, torch {data['torch']}, {data['threads']} threads; "
             f"float32 matmul ceiling {ceiling:.0f} GFLOP/s; {data['samples']} samples per "
             f"call; median of {data['reps']} paired repetitions ({data['date']})", "",
             "| model | M | weights | batch | samples/s | GFLOP/s (share of ceiling) "
             "| speed-up vs NCHW, batch 1,000 | time / (M × member's) |",
             "|---|---|---|---|---|---|---|---|"]
    for model in data["models"]:
        flops = model["flops_per_sample"]
        t = {(r["m"], r["channels_last"], r["batch"]): r["seconds"] for r in model["times"]}
        for m in sorted({r["m"] for r in model["times"]}):
            old = t[(m, False, 1_000)]
            for cl, batch in SETTINGS:
                rate = data["samples"] / statistics.median(t[(m, cl, batch)])
                gf = rate * flops * m / 1e9
                lines.append(
                    f"| {model['arch']} ({flops / 1e6:.1f} MFLOP) | {m} | "
                    f"{'channels_last' if cl else 'NCHW'} | {batch:,} | {rate:,.0f} | "
                    f"{gf:.1f} ({gf / ceiling:.0%}) | {paired_median(old, t[(m, cl, batch)]):.2f} "
                    f"| {paired_median(t[(m, cl, batch)], t[(1, cl, batch)], m):.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="paired smoothing throughput for the README")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", help="write the JSON here (benchmarks/results/…)")
    args = parser.parse_args(argv)
    data = run(args.device, args.reps)
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


def test_the_readme_table_from_a_tiny_paired_run():
    data = json.loads(json.dumps(run(reps=1, models=[("cnn", (1, 8, 8), (1, 2))])))
    lines = table(data).splitlines()
    assert len(lines) == 4 + 2 * len(SETTINGS)
    assert lines[4].startswith("| cnn (") and lines[4].endswith("| 1.00 | 1.00 |")


if __name__ == "__main__":
    main(sys.argv[1:])

