"""What one training step costs with each robust objective, relative to a plain step.

cnn members on 28×28 inputs, M = 3, batch 128, Adam; the teacher is one cnn. Objectives: plain
(summed CE), GAL, PGD adversarial training of every member (7 steps), RRM and CRT students, with
and without GAL. ``python benchmarks/bench_transfer.py --out FILE.json`` times them back to back
in each of several repetitions and saves the times; :func:`table` prints the median time and the
median of the per-repetition ratios to the plain step (the machine is noisy; ratios measured
together are what holds). pytest-benchmark:
``pytest benchmarks/bench_transfer.py --benchmark-enable``.
"""

import functools
import json
import sys

import pytest
import torch

from ensdiv.ensemble import Ensemble
from ensdiv.objective import TransferLoss, adversarial_loss, ce_loss, ensemble_loss
from ensdiv.robust_transfer import Teacher

from _common import (
    SMOKE,
    batch,
    machine,
    make_ensemble,
    make_step,
    paired_rounds,
    step_main,
    step_record,
    step_table,
)

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


def run(reps: int = 5, objectives: list[str] = OBJECTIVES) -> dict:
    """Every objective's step timed back to back in each repetition, as the docs' JSON."""
    return step_record({name: objective_step(name) for name in objectives}, reps, arch="cnn", m=M,
                       batch=BATCH, shape=SHAPE)


def table(data: dict) -> str:
    """Median step time and median per-repetition ratio to the plain step, per objective."""
    return step_table(data, "objective")


def test_the_readme_table_from_a_tiny_paired_run():
    data = json.loads(json.dumps(run(reps=1, objectives=["plain", "rrm"])))
    lines = table(data).splitlines()
    assert len(lines) == 6 and lines[4].startswith("| plain |") and lines[4].endswith("| 1.00 |")


def main(argv: list[str]) -> None:
    step_main(argv, run, "paired robust-objective steps for the README")


if __name__ == "__main__":
    main(sys.argv[1:])
