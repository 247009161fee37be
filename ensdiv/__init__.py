"""ensdiv: ensembles whose members disagree where it matters.

Inputs are float images in [0, 1], NCHW; every model normalizes inside itself. The names
below are the ones a user reaches for first; each lives in a small library module (shown in
brackets). ``import ensdiv`` is quick: each name loads its module on first use (the first
one waits for torch), never the drivers or matplotlib.

Data and models
    load_dataset [data]          (train, test, info) of digits, mnist5k, mnist, fashion-mnist
    build_model [models]         one member: mlp, cnn, cnn-nf, resnet20, resnet20-fixup
    Ensemble [ensemble]          M members; mean softmax, votes, save/load
Training
    TrainConfig [training]       everything that defines a run; ensdiv.training.train builds
                                 the ensemble it describes and fits it
    fit [loop]                   the training loop (any loss, checkpoints, exact resume);
                                 ensdiv.loop.accuracies: members', mean softmax's, vote's
    Optim [optim]                Adam or SGD with a constant, cosine or step learning rate;
                                 ensdiv.augment.crop_flip; the papers' recipes: ensdiv.recipes
    ensemble_loss [objective]    CE + λ · diversity term (cos, gal, gdr, drt; adp), double backprop;
                                 the baselines TRS and DVERGE: ensdiv.trs, ensdiv.dverge
    TransferLoss [objective]     a robust teacher's students (RRM, CRT)
Gradients and diversity
    input_gradients [gradients]  per-member, per-sample input gradients [M, B, C, H, W]
    ensemble_gdr [gdr]           Gradient Diversity Rating of an ensemble on a data set, with
                                 its standard error (ensdiv.gdr.gdr: of a batch of gradients)
Attacks and transfer
    fgsm, pgd, mifgsm, apgd [attacks]
    mora, square [attacks]       member-aware (MORA) and score-based (Square) attacks
    transfer_matrix [transferability]   member → member attack transfer
    whitebox_entry [attack_suite]       worst case over PGD, APGD-CE, APGD-DLR with a
                                        convergence check
    robustness_card [card]       every robustness number of an ensemble in one typed Card:
                                 the APGD/MORA/Square cascade per rule, members, transfer, GDR
Detection and certification
    DisagreementDetector [disagreement] flag inputs the members disagree on
    agreement_pgd, penalized_pgd [adaptive]   adaptive attacks on that detector
    Smooth [smoothing]           randomized smoothing: predict, certify (Cohen et al. 2019)
Errors
    EnsdivError [errors]         every bad input, one line

No top-level name shadows a module: ``ensdiv.training`` and ``ensdiv.gdr`` are the modules (their
functions ``train`` and ``gdr`` are inside them).

Commands and everything that owns a run folder (train, sweep, detect, certify, compare,
evaluate, demo, tables, figures) live in :mod:`ensdiv.runs`; ``ensdiv --help`` lists the
commands.

Example:
    >>> import ensdiv, torch
    >>> ens = ensdiv.Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
    >>> ensdiv.input_gradients(ens, ensdiv.load_dataset("digits")[1].tensors[0][:4],
    ...                        torch.arange(4)).shape
    torch.Size([2, 4, 1, 8, 8])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ensdiv._version import __version__

_HOMES: dict[str, str] = {
    "agreement_pgd": "adaptive", "penalized_pgd": "adaptive", "whitebox_entry": "attack_suite",
    "apgd": "attacks", "fgsm": "attacks", "mifgsm": "attacks", "mora": "attacks",
    "pgd": "attacks", "square": "attacks", "Card": "card", "robustness_card": "card_stages",
    "load_dataset": "data", "DisagreementDetector": "disagreement", "Ensemble": "ensemble",
    "EnsdivError": "errors", "ensemble_gdr": "gdr", "input_gradients": "gradients",
    "fit": "loop", "build_model": "models", "TransferLoss": "objective",
    "ensemble_loss": "objective", "Optim": "optim", "Smooth": "smoothing",
    "TrainConfig": "training", "transfer_matrix": "transferability",
}
"""Each top-level name's module: loaded on first use (PEP 562), so ``import ensdiv`` and the
command line's argument parsing do not wait for torch."""

__all__ = [
    "__version__", "load_dataset", "build_model", "Ensemble", "TrainConfig", "fit", "Optim",
    "ensemble_loss", "TransferLoss", "input_gradients", "ensemble_gdr", "fgsm", "pgd",
    "mifgsm", "apgd", "mora", "square", "transfer_matrix", "whitebox_entry", "robustness_card",
    "Card", "DisagreementDetector",
    "agreement_pgd", "penalized_pgd", "Smooth", "EnsdivError",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ensdiv' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ensdiv.{home}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from ensdiv.adaptive import agreement_pgd, penalized_pgd
    from ensdiv.attack_suite import whitebox_entry
    from ensdiv.attacks import apgd, fgsm, mifgsm, mora, pgd, square
    from ensdiv.card import Card
    from ensdiv.card_stages import robustness_card
    from ensdiv.data import load_dataset
    from ensdiv.disagreement import DisagreementDetector
    from ensdiv.ensemble import Ensemble
    from ensdiv.errors import EnsdivError
    from ensdiv.gdr import ensemble_gdr
    from ensdiv.gradients import input_gradients
    from ensdiv.loop import fit
    from ensdiv.models import build_model
    from ensdiv.objective import TransferLoss, ensemble_loss
    from ensdiv.optim import Optim
    from ensdiv.smoothing import Smooth
    from ensdiv.training import TrainConfig
    from ensdiv.transferability import transfer_matrix
