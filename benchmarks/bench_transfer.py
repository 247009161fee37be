"""What one training step costs with each robust objective, relative to a plain step.

cnn members on 28×28 inputs, M = 3, batch 128, Adam; the teacher is one cnn. Objectives: plain
(summed CE), GAL, PGD adversarial training of every member (7 steps), RRM and CRT students, with
and without GAL. ``python benchmarks/bench_transfer.py`` times them back to back in each of
several repetitions and prints the median time and the median of the per-repetition ratios to
the plain step (the machine is noisy; ratios measured together are what holds). pytest-benchmark:
``pytest benchmarks/bench_transfer.py --benchmark-enable``.
"""

import functools
import statistics
import sys
import time

import pytest
import torch

from ensdiv.ensemble import Ensemble
from ensdiv.objective import adversarial_loss, ce_loss, ensemble_loss
from ensdiv.robust_transfer import Teacher, TransferLoss

from _common import SMOKE, batch, machine, make_ensemble, make_step, paired_rounds

SHAPE, M, BATCH = ((1, 8, 8), 2, 8) if SMOKE else ((1, 28, 28), 3, 128)
OBJECTIVES = ["plain", "gal", "adversarial", "rrm", "rrm+gal", "crt", "crt+gal"]


def objective_step(name: str, device: str = "cpu"):
    """A closure running one optimizer step of objective ``name`` on a fixed batch."""
    ens = make_ensemble("cnn", M, SHAPE, device)
    teacher = Teacher(Ensemble.build("cnn", 1, in_shape=SHAPE, num_classes=10,
                                     seed=7).to(device))
    x, y = batch(SHAPE, BATCH, device)
    if name == "plain":
        loss_fn = ce_loss
    elif name == "gal":
        loss_fn = functools.partial(ensemble_loss, diversity="gal", lam=0.5)
    elif name == "adversarial":
        loss_fn = functools.partial(adversarial_loss, eps=0.1, steps=7)
    else:
        transfer, _, div = name.partition("+")
        loss_fn = TransferLoss(teacher, ens, transfer, diversity=div or "none", lam=0.5)
    extra = list(loss_fn.parameters()) if isinstance(loss_fn, torch.nn.Module) else []
    return make_step(ens, loss_fn, x, y, device, extra)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_step(benchmark, name):
    if SMOKE and name == "adversarial":
        pytest.skip("seven attack steps: not a smoke test")
    step, base = objective_step(name), objective_step("plain")
    benchmark.group = "cpu cnn M=3 robust objectives"
    benchmark.extra_info.update(machine("cpu"), bench="objective", objective=name, arch="cnn",
                                m=M, batch=BATCH, shape=list(SHAPE))
    benchmark.extra_info["ratio_to_plain"] = paired_rounds(benchmark, step, base, "cpu",
                                                           rounds=3)


def main(reps: int = 5) -> None:
    steps = {name: objective_step(name) for name in OBJECTIVES}
    times: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
    for rep in range(reps + 1):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            if rep:  # the first repetition warms up
                times[name].append(time.perf_counter() - t)
    print(f"cnn, M = {M}, batch {BATCH}, {SHAPE[1]}×{SHAPE[2]}, cpu, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {reps} paired repetitions\n")
    print("| objective | step (ms) | step / plain step |")
    print("|---|---|---|")
    for name in OBJECTIVES:
        ratio = statistics.median(a / b for a, b in zip(times[name], times["plain"],
                                                         strict=True))
        print(f"| {name} | {statistics.median(times[name]) * 1000:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
