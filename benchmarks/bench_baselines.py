"""What one training step of each method costs — ensdiv's regularizers and the field's
baselines — relative to a plain step, all measured together (the baseline comparison's column).

cnn members on 28×28 inputs, M = 3, batch 128, Adam, each method at ensdiv's defaults (the
authors'): cos, GAL, GDR and DRT (λ = 0.5, ensdiv's double backprop), ADP (α = 2, β = 0.5; no
input gradients),
TRS with its smoothness at the clean batch (``trs-clean``) and with the "vanilla TRS" points of
a 6-step PGD at the first epoch's radius 0.1 (``trs``), DVERGE (10 distillation steps, a fixed
middle layer, layer 2 of 3). ``python benchmarks/bench_baselines.py --out FILE.json`` times them
back to back in each of several repetitions and saves the times; :func:`table` prints the median
time and the median of the per-repetition ratios to the plain step (the machine is noisy; ratios
measured together are what holds). pytest-benchmark:
``pytest benchmarks/bench_baselines.py --benchmark-enable``.
"""

import functools
import json
import sys

import pytest

from ensdiv.dverge import DvergeLoss
from ensdiv.objective import ce_loss, ensemble_loss
from ensdiv.trs import TrsLoss

from _common import (
    SMOKE,
    batch,
    machine,
    make_ensemble,
    make_step,
    paired_median,
    paired_rounds,
    step_main,
    step_record,
    step_table,
)

SHAPE, M, BATCH = ((1, 8, 8), 2, 8) if SMOKE else ((1, 28, 28), 3, 128)
METHODS = ["plain", "cos", "gal", "gdr", "drt", "adp", "trs-clean", "trs", "dverge"]


def method_step(name: str, device: str = "cpu"):
    """A closure running one optimizer step of method ``name`` on a fixed batch."""
    ens = make_ensemble("cnn", M, SHAPE, device)
    x, y = batch(SHAPE, BATCH, device)
    if name == "plain":
        loss_fn = ce_loss
    elif name in ("cos", "gal", "gdr", "drt", "adp"):
        loss_fn = functools.partial(ensemble_loss, diversity=name, lam=0.5)
    elif name == "trs-clean":
        loss_fn = TrsLoss(eps=0.0)
    elif name == "trs":
        loss_fn = TrsLoss()  # radius 0.1 before the loop's first set_epoch
    else:
        loss_fn = DvergeLoss(ens, seed=0, layer=2)
    return make_step(ens, loss_fn, x, y, device)


@pytest.mark.parametrize("name", METHODS)
def test_step(benchmark, name):
    step, base = method_step(name), method_step("plain")
    benchmark.group = "cpu cnn M=3 baselines"
    benchmark.extra_info.update(machine("cpu"), bench="baseline", method=name, arch="cnn",
                                m=M, batch=BATCH, shape=list(SHAPE))
    benchmark.extra_info["ratio_to_plain"] = paired_rounds(benchmark, step, base, "cpu",
                                                           rounds=3)


def run(reps: int = 5, methods: list[str] = METHODS) -> dict:
    """Every method's step timed back to back in each repetition, as the docs' JSON."""
    return step_record({name: method_step(name) for name in methods}, reps, arch="cnn", m=M,
                       batch=BATCH, shape=SHAPE)


def table(data: dict) -> str:
    """Median step time and median per-repetition ratio to the plain step, per method."""
    return step_table(data, "method")


def step_costs(data: dict) -> dict[str, float]:
    """Each training method's step ÷ plain step (median of the paired repetitions), keyed by
    its ``--diversity`` name; TRS is its default, "vanilla" schedule (``trs``)."""
    t = data["seconds"]
    return {name: paired_median(t[name], t["plain"]) for name in t if name != "trs-clean"}


def test_the_docs_table_from_a_tiny_paired_run():
    data = json.loads(json.dumps(run(reps=1, methods=["plain", "adp"])))
    lines = table(data).splitlines()
    assert len(lines) == 6 and lines[4].startswith("| plain |") and lines[4].endswith("| 1.00 |")


def main(argv: list[str]) -> None:
    step_main(argv, run, "paired baseline steps for the docs")


if __name__ == "__main__":
    main(sys.argv[1:])
