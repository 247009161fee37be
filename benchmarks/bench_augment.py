"""What ``--augment crop-flip`` costs: the augmentation of one batch against one plain training
step of the cnn it feeds (3×32×32, batch 128, M = 3, Adam) — the goal is under 5 %.

``python benchmarks/bench_augment.py --reps 21 --out FILE.json`` times, back to back in each
repetition, the plain step (``plain``), crop-flip of the batch alone (``crop-flip``) and the step
on a freshly augmented batch (``plain+crop-flip``); :func:`table` prints the median times and the
median per-repetition ratios to the plain step. pytest-benchmark:
``pytest benchmarks/bench_augment.py --benchmark-enable``.
"""

import sys

import torch

from ensdiv.augment import crop_flip
from ensdiv.objective import ce_loss

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

SHAPE, M, BATCH = ((3, 8, 8), 2, 8) if SMOKE else ((3, 32, 32), 3, 128)


def steps() -> dict:
    """The three closures, each on its own fixed batch and generator."""
    ens = make_ensemble("cnn", M, SHAPE, "cpu")
    x, y = batch(SHAPE, BATCH, "cpu")
    plain = make_step(ens, ce_loss, x, y, "cpu")
    aug, gen = crop_flip(), torch.Generator().manual_seed(0)
    ens2 = make_ensemble("cnn", M, SHAPE, "cpu")
    holder = {"x": x}
    step2 = make_step(ens2, lambda e, _x, yy: ce_loss(e, holder["x"], yy), x, y, "cpu")

    def augment_only() -> None:
        aug(x, gen)

    def augmented_step() -> None:
        holder["x"] = aug(x, gen)
        step2()

    return {"plain": plain, "crop-flip": augment_only, "plain+crop-flip": augmented_step}


def test_crop_flip_against_a_plain_step(benchmark):
    s = steps()
    benchmark.group = "cpu crop-flip"
    benchmark.extra_info.update(machine("cpu"), bench="augment", arch="cnn", m=M, batch=BATCH,
                                shape=list(SHAPE))
    benchmark.extra_info["ratio_to_plain"] = paired_rounds(benchmark, s["crop-flip"],
                                                           s["plain"], "cpu", rounds=5)


def run(reps: int = 21) -> dict:
    """The closures timed back to back in each repetition, as the docs' JSON."""
    return step_record(steps(), reps, arch="cnn", m=M, batch=BATCH, shape=SHAPE)


def table(data: dict) -> str:
    """Median times and median per-repetition ratios to the plain step."""
    return step_table(data, "what")


if __name__ == "__main__":
    step_main(sys.argv[1:], run, __doc__.splitlines()[0])
