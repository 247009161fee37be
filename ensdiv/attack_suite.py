"""Evaluation recipes shared by every experiment: which attacks, with which budgets, make one
number of robustness, and the checks that say when that number cannot be trusted.

- :class:`AttackSpec` — one attack exactly as a record states it (name, eps, steps, keep-rule,
  seed), crafted through the :data:`ensdiv.attacks.ATTACKS` registry.
- :func:`whitebox_suite` / :func:`whitebox_entry` — the worst case over PGD, APGD-CE and
  APGD-DLR on the correctly classified inputs, AutoAttack-style (Croce & Hein 2020), with the
  half-budget convergence check.
- :func:`transfer_spec` — the full-budget attack that crafts transfer examples.
- :func:`sanity_warnings` — the field's gradient-masking checks (zero gradients, unbounded
  attack not reaching ~100%, black-box beating white-box).

Example:
    >>> from types import SimpleNamespace
    >>> budget = SimpleNamespace(steps=10, apgd_steps=50, eval_seed=0)  # a sweep's settings, say
    >>> [s.name for s in whitebox_suite("pgd", 0.1, budget)]
    ['pgd', 'apgd-ce', 'apgd-dlr']
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ensdiv.attacks import ATTACKS, default_step_size, mifgsm
from ensdiv.ensemble import Ensemble
from ensdiv.transferability import (
    Success,
    convergence_warning,
    worst_case_success,
)

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import TRANSFER_ATTACKS as TRANSFER_ATTACKS

HUGE_EPS = 1.0
"""L∞ radius of the sanity attack: at eps = 1 every input can become any image."""


class AttackBudget(Protocol):
    """What a white-box suite needs to know: PGD/MI-FGSM ``steps``, APGD's ``apgd_steps`` and
    the seed of the random starts (a sweep's or a comparison's settings)."""

    @property
    def steps(self) -> int: ...  # noqa: D102
    @property
    def apgd_steps(self) -> int: ...  # noqa: D102
    @property
    def eval_seed(self) -> int: ...  # noqa: D102


def _default(fn: Callable[..., Any], name: str) -> Any:
    """The default of ``fn``'s keyword ``name`` (so records state it without restating it)."""
    return inspect.signature(fn).parameters[name].default


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack configuration, exactly as a record states it (L∞, one restart).

    ``name`` is one of fgsm, pgd, mifgsm, apgd-ce, apgd-dlr; ``keep`` the keep-rule of
    :mod:`ensdiv.attacks`; ``seed`` seeds PGD's and APGD's random starts.
    """

    name: str
    eps: float
    steps: int
    keep: str
    seed: int

    @property
    def budget(self) -> int:
        """Gradient steps the attack may spend per sample."""
        return 1 if self.name == "fgsm" else self.steps

    def craft(self, model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """This attack's adversarial examples for ``model`` (an ``Attack`` callable), made by
        the function :data:`ensdiv.attacks.ATTACKS` registers under its family name."""
        family = "apgd" if self.name.startswith("apgd") else self.name
        return ATTACKS[family](model, x, y, eps=self.eps, **self._arguments())

    def _arguments(self) -> dict[str, Any]:
        """The attack function's arguments besides model, x, y and eps; the rest are its
        defaults (which :meth:`to_dict` states)."""
        if self.name == "fgsm":
            return {}
        if self.name == "pgd":
            return {"steps": self.steps, "keep": self.keep,
                    "generator": torch.Generator().manual_seed(self.seed)}
        if self.name == "mifgsm":
            return {"steps": self.steps, "keep": self.keep}
        return {"steps": self.steps, "loss": self.name[5:], "seed": self.seed}

    def halved(self) -> AttackSpec:
        """The same attack with half the steps (at least 1)."""
        return dataclasses.replace(self, steps=max(1, self.steps // 2))

    def to_dict(self) -> dict[str, Any]:
        """What a record says about this attack: name, norm, eps, steps, step size, keep-rule,
        restarts and seed."""
        d: dict[str, Any] = {"attack": self.name, "norm": "linf", "eps": self.eps,
                             "steps": self.budget, "restarts": 1}
        if self.name == "fgsm":
            d.update(keep="last")  # one step: there is only one iterate to keep
        elif self.name == "pgd":
            d.update(alpha=default_step_size("pgd", self.eps, self.steps), random_start=True,
                     keep=self.keep, seed=self.seed)
        elif self.name == "mifgsm":
            d.update(alpha=default_step_size("mifgsm", self.eps, self.steps),
                     decay=_default(mifgsm, "decay"), keep=self.keep)
        elif self.name.startswith("apgd"):
            d.update(keep="success", seed=self.seed)
        return d


def whitebox_suite(name: str, eps: float, config: AttackBudget) -> list[AttackSpec]:
    """The white-box attacks behind one (attack, eps) entry: FGSM alone, MI-FGSM alone, and for
    PGD the worst case over PGD, APGD-CE and APGD-DLR; all keep the first success."""
    if name == "pgd":
        return [AttackSpec("pgd", eps, config.steps, "success", config.eval_seed),
                AttackSpec("apgd-ce", eps, config.apgd_steps, "success", config.eval_seed),
                AttackSpec("apgd-dlr", eps, config.apgd_steps, "success", config.eval_seed)]
    return [AttackSpec(name, eps, config.steps, "success", config.eval_seed)]


def transfer_spec(name: str, eps: float, config: AttackBudget,
                  keep: str = "last") -> AttackSpec:
    """The attack that crafts transfer examples (full budget unless ``keep="success"``)."""
    return AttackSpec(name, eps, config.steps, keep, config.eval_seed)


def sanity_warnings(zero_grad_fraction: float, huge_eps_success: float,
                    attacks: Sequence[dict[str, Any]]) -> list[str]:
    """The gradient-masking checks of the field (AutoAttack's habits) as messages, plus the
    convergence warnings the white-box entries carry."""
    out = []
    if zero_grad_fraction > 0.05:
        out.append(f"{zero_grad_fraction:.1%} of inputs have a zero input gradient for some "
                   "member (gradient masking?)")
    if not huge_eps_success >= 0.99:
        out.append(f"L∞ PGD at eps={HUGE_EPS} fooled only {huge_eps_success:.1%} of the "
                   "ensemble's correct inputs (should be ~100%: gradient masking or a bug)")
    for a in attacks:
        if a["blackbox"]["rate"] > a["whitebox"]["rate"]:
            out.append(f"black-box {a['attack']} at eps={a['eps']} beats white-box "
                       f"({a['blackbox']['rate']:.3f} > {a['whitebox']['rate']:.3f})")
        if a["whitebox"].get("warning"):
            out.append(a["whitebox"]["warning"])
    return out


def whitebox_entry(ensemble: Ensemble, x: Tensor, y: Tensor,
                   specs: Sequence[AttackSpec]) -> dict[str, Any]:
    """Worst-case white-box success of ``specs`` on the ensemble, with a convergence check.

    AutoAttack's cascade in two stages. Stage one runs every attack at **half** its steps, each
    on the correctly classified inputs no earlier attack broke. Stage two runs the first attack
    (the cheap one, PGD) at its full steps on **every** correctly classified input, so its own
    full-budget rate stands beside the worst case, then every other attack at its full steps
    on the inputs nothing has broken yet. The full-budget success is the union of both stages;
    the half-budget success is stage one's. If the full budget breaks more than 2 points more
    inputs, the entry carries a convergence warning (the rate is then a lower bound).

    Returns:
        ``{"rate", "fooled", "total", "attacks": {name: {..., "setup"}}, "half_budget": {...},
        "warning"}``; each attack's ``fooled``/``total`` count the inputs it was run on.
    """
    half_specs = [s.halved() for s in specs]
    half = worst_case_success(ensemble, x, y, cascade=True,
                              attacks={s.name: s.craft for s in half_specs})
    first = worst_case_success(ensemble, x, y, attacks={specs[0].name: specs[0].craft})
    broken = half.broken | first.broken
    rest = specs[1:]
    if rest:
        full = worst_case_success(ensemble, x, y, cascade=True, skip=broken,
                                  attacks={s.name: s.craft for s in rest})
        union, per_attack = full.union, {**first.per_attack, **full.per_attack}
    else:
        union = Success(int(broken.sum()), first.union.total)
        per_attack = first.per_attack
    entry: dict[str, Any] = {**union.to_dict(),
                             "attacks": {k: v.to_dict() for k, v in per_attack.items()},
                             "half_budget": half.to_dict()}
    for s, h in zip(specs, half_specs, strict=True):
        entry["attacks"][s.name]["setup"] = s.to_dict()
        entry["half_budget"]["attacks"][s.name]["setup"] = h.to_dict()
    entry["warning"] = convergence_warning(
        union, half.union,
        what=f"white-box {' + '.join(s.name for s in specs)} at eps={specs[0].eps:g}")
    return entry
