"""The double-backprop step on each member architecture, with and without normalization layers
(issue 23): every gradient regularizer's step ÷ the plain step of the same members, and the
absolute step time, for the GroupNorm models (``cnn``, ``resnet20``) and their
normalization-free counterparts (``cnn-nf``; ``resnet20-fixup``, Fixup-initialized).

Cases: cnn on 1×28×28 and resnet20 on 3×32×32, M = 3, batch 32 and 128, Adam. Methods, each at
λ = 0.5: ``plain`` (summed cross-entropies), ``cos``, ``gal``, ``gdr``, ``drt`` (ensdiv's
torch.func double backprop), ``trs-clean`` (TRS with its smoothness term at the clean batch:
the same double backprop; the "vanilla" schedule's extra PGD points multiply its cost, see
``bench_baselines.py``) and ``gal-autograd`` — GAL written with
``torch.autograd.grad(create_graph=True)`` per member on the same architecture built from
plain ``torch.nn`` layers, what a user writes.

    python benchmarks/bench_archs.py --reps 5 --out benchmarks/results/archs-cpu-DATE.json

times every (architecture, method) step of a case back to back in each repetition and saves
the times; :func:`table` prints the median step time, the median per-repetition ratio to the
plain step of the same architecture, and to the plain step of the GroupNorm architecture (a
faster plain step is a gain too). pytest-benchmark: ``pytest benchmarks/bench_archs.py
--benchmark-enable``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import pytest

from ensdiv.objective import ce_loss, ensemble_loss
from ensdiv.trs import TrsLoss

from _common import (
    SMOKE,
    autograd_gal_loss,
    batch,
    machine,
    make_ensemble,
    make_step,
    paired_median,
    paired_rounds,
    paired_times,
    step_main,
)

FAMILIES = {"cnn": ("cnn", "cnn-nf"), "resnet20": ("resnet20", "resnet20-fixup")}
SHAPES = {"cnn": (1, 28, 28), "resnet20": (3, 32, 32)}
M = 3
CASES = ([("cnn", (1, 8, 8), 8), ("resnet20", (3, 8, 8), 4)] if SMOKE else
         [(f, SHAPES[f], b) for f in ("cnn", "resnet20") for b in (32, 128)])
METHODS = ["plain", "cos", "gal", "gdr", "drt", "trs-clean", "gal-autograd"]


def method_step(arch: str, method: str, shape: tuple[int, ...], size: int,
                device: str = "cpu") -> Callable[[], None]:
    """A closure running one optimizer step of ``method`` on ``arch`` members, fixed batch."""
    ens = make_ensemble(arch, M, shape, device, native=method == "gal-autograd")
    x, y = batch(shape, size, device)
    if method == "plain":
        loss_fn = ce_loss
    elif method == "gal-autograd":
        loss_fn = autograd_gal_loss
    elif method == "trs-clean":
        loss_fn = TrsLoss(eps=0.0)
    else:
        loss_fn = functools.partial(ensemble_loss, diversity=method, lam=0.5)
    return make_step(ens, loss_fn, x, y, device)


def run_case(family: str, shape: tuple[int, ...], size: int, reps: int) -> dict:
    """Every (architecture, method) step of one case, timed back to back per repetition."""
    steps = {f"{arch} {method}": method_step(arch, method, shape, size)
             for arch in FAMILIES[family] for method in METHODS}
    return {"family": family, "shape": list(shape), "batch": size, "m": M,
            "seconds": paired_times(steps, "cpu", reps)}


def run(reps: int = 5, cases: list | None = None) -> dict:
    """All cases, as the committed JSON."""
    import datetime

    return {**machine("cpu"), "reps": reps, "date": datetime.date.today().isoformat(),
            "cases": [run_case(f, s, b, reps) for f, s, b in (cases or CASES)]}


def ratios(case: dict) -> dict[str, tuple[float, float]]:
    """Per step: (÷ plain step of its own architecture, ÷ plain step of the GroupNorm one),
    each the median over the paired repetitions."""
    t = case["seconds"]
    gn = FAMILIES[case["family"]][0]
    out = {}
    for key, times in t.items():
        arch = key.split()[0]
        out[key] = (paired_median(times, t[f"{arch} plain"]),
                    paired_median(times, t[f"{gn} plain"]))
    return out


def agreement(first: dict, second: dict) -> float:
    """The largest difference between two runs' ratios to their own plain step (same cases)."""
    return max(abs(a[0] - b[0]) for ca, cb in zip(first["cases"], second["cases"], strict=True)
               for a, b in zip(ratios(ca).values(), ratios(cb).values(), strict=True))


def table(data: dict) -> str:
    """One markdown table per case: step (ms), ÷ own plain step, ÷ the GroupNorm plain step."""
    import statistics

    out = [f"M = {M}, {data['device_name']}, torch {data['torch']}, {data['threads']} threads; "
           f"median of {data['reps']} paired repetitions ({data['date']})"]
    for case in data["cases"]:
        r = ratios(case)
        h, w = case["shape"][1:]
        out += ["", f"**{case['family']}, {case['shape'][0]}×{h}×{w}, batch {case['batch']}**",
                "", "| members | method | step (ms) | ÷ its plain step | ÷ GroupNorm plain step |",
                "|---|---|---|---|---|"]
        for key, times in case["seconds"].items():
            arch, method = key.split()
            out.append(f"| {arch} | {method} | {statistics.median(times) * 1000:.0f} | "
                       f"{r[key][0]:.2f} | {r[key][1]:.2f} |")
    return "\n".join(out)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["cnn-nf", "resnet20-fixup"])
def test_step(benchmark, arch, method):
    family = arch.split("-")[0]
    shape, size = (SHAPES[family], 32) if not SMOKE else next(
        (s, b) for f, s, b in CASES if f == family)
    step, base = method_step(arch, method, shape, size), method_step(arch, "plain", shape, size)
    benchmark.group = f"cpu {arch} M={M} batch={size}"
    benchmark.extra_info.update(machine("cpu"), bench="arch", arch=arch, method=method, m=M,
                                batch=size, shape=list(shape))
    benchmark.extra_info["ratio_to_plain"] = paired_rounds(benchmark, step, base, "cpu",
                                                           rounds=3)


def test_the_table_from_a_tiny_paired_run():
    data = run(reps=1, cases=[("cnn", (1, 8, 8), 4)])
    lines = table(data).splitlines()
    assert len(lines) == 1 + 5 + 2 * len(METHODS)
    assert lines[6].startswith("| cnn | plain |") and lines[6].endswith("| 1.00 | 1.00 |")
    nf_plain = lines[6 + len(METHODS)]
    assert nf_plain.startswith("| cnn-nf | plain |") and "| 1.00 |" in nf_plain


def main(argv: list[str]) -> None:
    step_main(argv, run, "paired double-backprop steps per architecture, for the docs")


if __name__ == "__main__":
    main(sys.argv[1:])
