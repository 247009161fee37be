"""The field's published training recipes by name: every setting of an ensemble method's
CIFAR-10 training as its paper or its authors' code runs it, in ensdiv's units.

``ensdiv train --recipe NAME`` fills every :class:`~ensdiv.training.TrainConfig` field a recipe
sets; a flag given on the command line overrides the recipe's value, and the run records the
recipe's name and which fields were overridden (``recipe_overrides``). ``ensdiv recipes``
lists them; docs/training.md shows the table :func:`recipes_table` makes, so it cannot drift.

Where a paper and its code disagree, or ensdiv cannot do exactly what they do, the recipe's
``departs`` says so. No CIFAR-10 and no GPU are on ensdiv's own machines: each recipe is tested
end to end for one step on a tiny CIFAR-format folder, never trained to the end here.

Example:
    >>> r = RECIPES["dverge-cifar10"]
    >>> r.settings["optimizer"], r.settings["milestones"], r.needs_init
    ('sgd', (100, 150), True)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ensdiv.errors import EnsdivError, check_choice

_BATCH_TRS = 128  # the TRS code's batch size: its λ_b multiplies 2‖∇ batch-mean CE‖²


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One published recipe: the :class:`~ensdiv.training.TrainConfig` fields it sets
    (``settings``), where they come from (``source``: paper and code), which of the two it
    follows where they differ (``follows``), where ensdiv departs (``departs``) and, where the
    method starts from a trained ensemble, ``needs_init`` (give ``--init-from``, e.g. a run of
    ``init_recipe``)."""

    name: str
    method: str
    settings: dict[str, Any]
    source: str
    follows: str
    departs: str = ""
    needs_init: bool = False
    init_recipe: str | None = None

    def config_fields(self) -> dict[str, Any]:
        """The settings with the recipe's name, as :class:`TrainConfig` keyword arguments."""
        return {**self.settings, "recipe": self.name}


_CIFAR = {"dataset": "cifar10", "arch": "resnet20", "members": 3, "batch_size": 128,
          "augment": "crop-flip"}
_SGD_200 = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
            "schedule": "step", "milestones": (100, 150), "gamma": 0.1,
            "schedule_unit": "epoch", "epochs": 200}
_ADAM_DVERGE = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "schedule": "step",
                "milestones": (100, 150), "gamma": 0.1, "schedule_unit": "epoch",
                "epochs": 200}
_ADAM_EPS = ("Adam's ε is torch's 1e-8, the authors' code uses 1e-7 (a shift of the "
             "denominator that matters only for weights whose gradients are ~1e-7)")

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        name="baseline-cifar10", method="none",
        settings={**_CIFAR, **_SGD_200, "diversity": "none"},
        source="DVERGE (Yang et al., NeurIPS 2020), appendix A; its code zjysteven/DVERGE "
               "(arguments.py, utils.get_optimizers/get_schedulers, train/train_baseline.py)",
        follows="code and paper agree",
        departs="members share one optimizer over their summed losses (the code keeps one "
                "SGD per member: the same steps, since no term couples the members)"),
    Recipe(
        name="dverge-cifar10", method="dverge",
        settings={**_CIFAR, **_SGD_200, "diversity": "dverge", "lam": 1.0,
                  "dverge_eps": 0.07, "dverge_steps": 10, "dverge_layer": None,
                  "dverge_clean": 0.0},
        source="DVERGE (Yang et al., NeurIPS 2020), appendix A; zjysteven/DVERGE "
               "(arguments.py: --distill-eps 0.07, --distill-alpha 0.007, --distill-steps 10, "
               "a layer drawn each epoch, --start-from baseline)",
        follows="code and paper agree",
        departs="ensdiv's step is ε/10 (= the code's 0.007); one optimizer over all members; "
                "layer 20 of resnet20 is ensdiv's pooled features, the code's logits",
        needs_init=True, init_recipe="baseline-cifar10"),
    Recipe(
        name="gal-cifar10", method="gal",
        settings={**_CIFAR, **_ADAM_DVERGE, "diversity": "gal", "lam": 0.5},
        source="GAL (Kariyappa & Qureshi 2019) as the DVERGE authors re-implemented and ran "
               "it as their baseline: zjysteven/DVERGE train/train_gal.py (--lambda 0.5)",
        follows="the DVERGE authors' code (GAL's own code is not public)",
        departs=_ADAM_EPS + "; the DVERGE paper notes GAL needs leaky ReLU, ensdiv's resnet20 "
                "keeps ReLU"),
    Recipe(
        name="adp-cifar10", method="adp",
        settings={**_CIFAR, **_ADAM_DVERGE, "diversity": "adp", "lam": 0.5,
                  "adp_alpha": 2.0},
        source="ADP (Pang et al., ICML 2019; α 2, β 0.5) as the DVERGE authors ran it: "
               "zjysteven/DVERGE train/train_adp.py",
        follows="the DVERGE authors' re-implementation (ADP's own Keras code trains with its "
                "own schedule)",
        departs=_ADAM_EPS + "; the log-det term normalises each member's non-true-class "
                "probabilities as ensdiv.adp does"),
    Recipe(
        name="trs-cifar10", method="trs",
        settings={**_CIFAR, "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4,
                  "schedule": "step", "milestones": (40, 80), "gamma": 0.1,
                  "schedule_unit": "epoch", "epochs": 120, "diversity": "trs", "lam": 40.0,
                  "trs_smooth": 2 * 2.5 / _BATCH_TRS**2, "trs_eps": 0.03,
                  "trs_eps_start": 0.01},
        source="TRS (Yang et al., NeurIPS 2021); AI-secure/Transferability-Reduced-Smooth-"
               "Ensemble train/Empirical/train_trs.py (Adam 1e-3, weight decay 1e-4, StepLR 40 "
               "× 0.1, 120 epochs, batch 128) with the CIFAR-10 weights a maintainer gave in "
               "the repository's issue #1 (λ_a 40, λ_b 2.5, radius 0.01 → 0.03)",
        follows="the maintainer's stated CIFAR-10 values over the script's argparse defaults "
                "(which its required flags never use)",
        departs=_ADAM_EPS + "; λ_b in ensdiv's per-sample units is 2·2.5/128² (the code "
                "weighs the squared gradient of the batch-mean CE); the smoothness PGD steps "
                "on the current gradient (the code's never clears it: a running sum)"),
    Recipe(
        name="drt-cifar10", method="drt",
        settings={**_CIFAR, "batch_size": 256, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                  "weight_decay": 1e-4, "schedule": "step", "milestones": (30, 60),
                  "gamma": 0.1, "schedule_unit": "epoch", "epochs": 90, "diversity": "drt",
                  "lam": 0.5, "noise_sigma": 0.25},
        source="DRT (Yang et al., ICLR 2022) trains on Gaussian-noised inputs (σ 0.25 or 0.5) "
               "for randomized smoothing; the optimizer and schedule are Cohen et al. 2019's "
               "(locuslab/smoothing code/train.py: SGD 0.1, momentum 0.9, weight decay 1e-4, "
               "90 epochs, StepLR 30 × 0.1, batch 256) that smoothing papers train with",
        follows="Cohen et al.'s code for the optimizer (DRT's own optimizer settings and "
                "code were not available to ensdiv)",
        departs="DRT weighs its two terms separately (ρ₁ GD, ρ₂ CM); ensdiv ties them to one "
                "λ, here its default 0.5; members are resnet20, DRT's ResNet-110"),
)}
"""Every recipe by name."""


def recipe(name: str) -> Recipe:
    """The recipe ``name``; an unknown name is one :class:`EnsdivError` listing the choices.

    Example:
        >>> recipe("trs-cifar10").settings["lam"]
        40.0
    """
    check_choice("recipe", name, tuple(RECIPES))
    return RECIPES[name]


def apply_recipe(name: str, given: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The :class:`TrainConfig` fields of recipe ``name`` with the ``given`` ones over them,
    and the recipe fields ``given`` overrides (sorted), which a run records.

    Example:
        >>> fields, over = apply_recipe("gal-cifar10", {"epochs": 1, "seed": 3})
        >>> fields["epochs"], fields["lr"], over
        (1, 0.001, ['epochs'])
    """
    r = recipe(name)
    if r.needs_init and not given.get("init_from"):
        raise EnsdivError(f"the {name} recipe starts from a trained plain ensemble: give "
                          f"--init-from RUN (e.g. a run of --recipe {r.init_recipe})")
    fields = r.config_fields()
    overrides = sorted(k for k in given if k in r.settings and given[k] != r.settings[k])
    return {**fields, **given}, overrides


def recipes_table() -> str:
    """Every recipe as a Markdown table: method, every setting, source, what it follows and
    where ensdiv departs (docs/training.md shows it; a test regenerates it).

    Example:
        >>> recipes_table().splitlines()[0].startswith("| recipe | method |")
        True
    """
    def show(v: Any) -> str:
        if isinstance(v, tuple):
            return ",".join(map(str, v)) or "—"
        if isinstance(v, float):
            return f"{v:g}"
        return "—" if v is None else str(v)

    lines = ["| recipe | method | settings | source | follows | departs |",
             "|---|---|---|---|---|---|"]
    for r in RECIPES.values():
        settings = ", ".join(f"{k} {show(v)}" for k, v in r.settings.items())
        if r.needs_init:
            settings += f", init-from a run of {r.init_recipe}"
        lines.append(f"| {r.name} | {r.method} | {settings} | {r.source} | {r.follows} | "
                     f"{r.departs or '—'} |")
    return "\n".join(lines)
