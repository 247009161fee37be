"""The stages of a robustness card (:class:`ensdiv.card.Card`): every number that says how robust
an ensemble is, from one evaluation, with the attack setup beside each.

The white-box part is AutoAttack's cascade (Croce & Hein 2020) made ensemble-aware (Yu et al.
2022): APGD-CE, APGD-DLR, MORA and Square run in that order on the inputs the ensemble still
classifies correctly under the rule and no earlier attack broke, so the robust accuracy is the
per-input worst case over all four, and the card can say which attack broke each input first.
Because the averaged-output attacks run first, the same cascade gives both the robust accuracy
an averaged-output evaluation reports (APGD-CE + APGD-DLR) and the member-aware one (all four):
their gap is what MORA and Square add. Square is score-based: whatever it breaks after the
gradient attacks is the gradient-masking flag.

Around it: clean accuracy (ensemble under the rule, each member), each member's robust accuracy
under APGD-CE alone, the member → member transfer matrix (full-budget PGD), transfer from an
independent surrogate when one is given, GDR and the mean gradient cosine, and AutoAttack's
sanity checks (zero input gradients, PGD at ε = 1 → ~100%, Square beating the white-box
attacks, APGD-CE at half vs full budget). Each stage is a function of its own;
:func:`robustness_card` runs them all.

Example:
    >>> import torch
    >>> from ensdiv.ensemble import Ensemble
    >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
    >>> x = torch.rand(8, 1, 8, 8); y = ens.predict(x)
    >>> card = robustness_card(ens, x, y, eps=0.1, budget=CardBudget(apgd_steps=4, mora_steps=2,
    ...                        square_queries=10, transfer_steps=2))
    >>> card.clean_acc, card.robust_acc <= card.evaluations[0]["averaged_output_robust_acc"]
    (1.0, True)
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ensdiv.aggregation import AGGREGATIONS, Aggregated
from ensdiv.attack_suite import HUGE_EPS
from ensdiv.attacks import MORA_MIX, apgd, mora, pgd, square
from ensdiv.card import (
    AVERAGED_OUTPUT_ATTACKS,
    CARD_ATTACKS,
    Card,
    CardBudget,
    assemble_card,
    describe_surrogate,
)
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_choice, check_eps, check_input
from ensdiv.gdr import gradient_diversity
from ensdiv.gradients import input_gradients
from ensdiv.io import strict_json
from ensdiv.stats import binomial_se
from ensdiv.transferability import (
    Success,
    convergence_warning,
    surrogate_transfer,
    transfer_matrix,
    worst_case_success,
)


def robustness_card(ensemble: Ensemble, x: Tensor, y: Tensor, *, eps: float,
                    aggregations: str | Sequence[str] = ("softmax",),
                    budget: CardBudget = CardBudget(), surrogate: nn.Module | None = None,
                    name: str = "ensemble") -> Card:
    """Evaluate one ensemble at L∞ radius ``eps`` under each aggregation rule: the stages
    :func:`card_gradients`, :func:`card_members`, :func:`card_transfer`, one
    :func:`card_whitebox` per rule and :func:`card_surrogate`, in one :class:`Card`
    (``ensdiv evaluate`` runs the same stages one by one, saving each).

    Args:
        ensemble: M ≥ 2 members, in eval mode.
        x: test inputs [n, C, H, W] in [0, 1]; y: labels [n].
        eps: L∞ radius, > 0.
        aggregations: ``"softmax"``, ``"logits"`` and/or ``"vote"`` (attacked through the mean
            softmax, judged on the vote); the first is the card's headline.
        budget: attack budgets and seed (:class:`CardBudget`).
        surrogate: an independently trained model to craft black-box transfer examples on.

    Returns:
        The :class:`Card` (its ``evaluations`` in the order of ``aggregations``).

    Raises:
        EnsdivError: fewer than 2 members, ``eps`` ≤ 0, an unknown rule, a bad budget or bad
            inputs — before any attack runs.
    """
    rules = (aggregations,) if isinstance(aggregations, str) else tuple(aggregations)
    check_card_inputs(ensemble, x, y, eps=eps, aggregations=rules, budget=budget)
    seconds: dict[str, float] = {}

    def timed(stage: str, compute: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = compute()
        seconds[stage] = time.perf_counter() - t0
        return value

    grads = timed("gradients", lambda: card_gradients(ensemble, x, y))
    members = timed("members", lambda: card_members(ensemble, x, y, eps=eps, budget=budget))
    transfer = timed("transfer", lambda: card_transfer(ensemble, x, y, eps=eps, budget=budget))
    white = {rule: timed(f"whitebox-{rule}", lambda rule=rule: card_whitebox(
        ensemble, x, y, eps=eps, aggregation=rule, budget=budget)) for rule in rules}
    black = None if surrogate is None else timed("surrogate", lambda: card_surrogate(
        surrogate, ensemble, x, y, eps=eps, aggregations=rules, budget=budget))
    return assemble_card(ensemble, eps=eps, n=x.shape[0], budget=budget, whitebox=white,
                         members=members, transfer=transfer, gradients=grads,
                         surrogate_transfer=black,
                         surrogate=None if surrogate is None else describe_surrogate(surrogate),
                         seconds=seconds, name=name)


def check_card_inputs(ensemble: Ensemble, x: Tensor, y: Tensor, *, eps: float,
                      aggregations: tuple[str, ...], budget: CardBudget,
                      min_members: int = 2) -> None:
    """Everything a card checks before any attack runs; one :class:`EnsdivError` for the first
    bad argument (an ensemble of fewer than ``min_members``, ``eps`` outside (0, 1], an unknown
    aggregation rule, a bad budget, inputs that are not [n, C, H, W] with labels [n])."""
    if not isinstance(ensemble, Ensemble) or ensemble.num_members < min_members:
        raise EnsdivError(f"a robustness card needs an ensemble of at least {min_members} "
                          "members; got " + (f"{ensemble.num_members} member"
                                             if isinstance(ensemble, Ensemble)
                                             else type(ensemble).__name__))
    check_eps("eps", eps)
    if not aggregations:
        raise EnsdivError(f"give at least one aggregation rule of {', '.join(AGGREGATIONS)}")
    for rule in aggregations:
        check_choice("aggregation rule", rule, AGGREGATIONS)
    budget.validate()
    check_input(ensemble, x, y)
    if x.ndim != 4:
        raise EnsdivError(f"a robustness card attacks images [n, C, H, W]; got {tuple(x.shape)}")


def card_whitebox(ensemble: Ensemble, x: Tensor, y: Tensor, *, eps: float,
                  aggregation: str = "softmax",
                  budget: CardBudget = CardBudget(),
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The white-box part of a card for one aggregation rule: the cascade of
    :data:`CARD_ATTACKS` on the aggregated ensemble, and its sanity checks (PGD at
    ε = :data:`~ensdiv.attack_suite.HUGE_EPS`, APGD-CE at half vs full budget, Square breaking
    what the gradient attacks could not).

    A single network (M = 1, e.g. a teacher in ``ensdiv compare``) is allowed here: MORA is then
    APGD-CE with restarts, so it is left out (its entry is None). ``log`` gets one line per
    attack as it finishes (the cascade can run for many minutes).

    Returns:
        ``n, eps, norm, aggregation, stand_in, number_forward_passes, members_count,
        clean_acc, robust_acc(_se), averaged_output_robust_acc(_se), attacks, cascade, seed,
        sanity, warnings`` (strict JSON).

    Example:
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
        >>> x = torch.rand(6, 1, 8, 8); y = ens.predict(x)
        >>> w = card_whitebox(ens, x, y, eps=0.1, budget=CardBudget(apgd_steps=2, mora_steps=1,
        ...                   square_queries=5, transfer_steps=1))
        >>> w["clean_acc"], sorted(w["attacks"]) == sorted(CARD_ATTACKS)
        (1.0, True)
    """
    check_card_inputs(ensemble, x, y, eps=eps, aggregations=(aggregation,), budget=budget,
                      min_members=1)
    model = Aggregated(ensemble, aggregation)
    x, y = x.detach(), y.detach()
    n = x.shape[0]
    seed = budget.seed
    setups = {
        "apgd-ce": {"attack": "apgd", "loss": "ce", "steps": budget.apgd_steps, "restarts": 1},
        "apgd-dlr": {"attack": "apgd", "loss": "dlr", "steps": budget.apgd_steps,
                     "restarts": 1},
        "mora": {"attack": "mora", "steps_per_mix": budget.mora_steps,
                 "mix": list(MORA_MIX)},
        "square": {"attack": "square", "queries": budget.square_queries, "p_init": 0.8},
    }
    attacks = {
        "apgd-ce": functools.partial(apgd, eps=eps, loss="ce", steps=budget.apgd_steps,
                                     seed=seed),
        "apgd-dlr": functools.partial(apgd, eps=eps, loss="dlr", steps=budget.apgd_steps,
                                      seed=seed),
        "mora": lambda _model, xx, yy: mora(ensemble, xx, yy, eps=eps, aggregation=aggregation,
                                            steps=budget.mora_steps, seed=seed),
        "square": functools.partial(square, eps=eps, queries=budget.square_queries, seed=seed),
    }
    if ensemble.num_members < 2:
        del attacks["mora"]
    def progress(name: str, s: Any, seconds: float) -> None:
        if log is not None:
            log(f"    {name}: {s.fooled} of the {s.total} inputs left broken ({seconds:.0f}s)")

    wc = worst_case_success(model, x, y, attacks=attacks, cascade=True, on_attack=progress)
    total = wc.union.total  # correct clean under the rule
    first = wc.broken_first_by()
    robust = (total - wc.union.fooled) / n if n else float("nan")
    averaged = (total - sum(first[a] for a in AVERAGED_OUTPUT_ATTACKS)) / n if n else math.nan
    card: dict[str, Any] = {
        "n": n, "eps": eps, "norm": "linf", "aggregation": aggregation,
        "stand_in": "softmax" if aggregation == "vote" else None,
        "number_forward_passes": ensemble.num_members, "members_count": ensemble.num_members,
        "clean_acc": total / n if n else math.nan,
        "robust_acc": robust, "robust_acc_se": binomial_se(robust, n),
        "averaged_output_robust_acc": averaged,
        "averaged_output_robust_acc_se": binomial_se(averaged, n),
        "attacks": {name: None if name not in attacks else {
            **wc.per_attack[name].to_dict(), "broke_first": first[name],
            "seconds": wc.seconds[name], "setup": {**setups[name], "eps": eps, "seed": seed}}
            for name in CARD_ATTACKS},
        "cascade": "each attack runs on the inputs correct under the rule that no earlier "
                   "attack broke; success counted over those inputs",
        "seed": seed,
    }
    card["sanity"], card["warnings"] = _sanity(model, x, y, eps, budget, wc.per_attack,
                                               list(attacks)[:-1])
    return strict_json(card)


def card_members(ensemble: Ensemble, x: Tensor, y: Tensor, *, eps: float,
                 budget: CardBudget = CardBudget()) -> list[dict[str, Any]]:
    """Each member's clean accuracy and robust accuracy under APGD-CE alone, over all n.

    Example:
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
        >>> x = torch.rand(4, 1, 8, 8); y = ens.predict(x)
        >>> [m["member"] for m in card_members(ens, x, y, eps=0.1, budget=CardBudget(
        ...     apgd_steps=2))]
        [0, 1]
    """
    out = []
    for i, member in enumerate(ensemble.members):
        with torch.no_grad():
            correct = member(x).argmax(1) == y
        rows = correct.nonzero().squeeze(1)
        fooled = 0
        if rows.numel():
            adv = apgd(member, x[rows], y[rows], eps=eps, loss="ce", steps=budget.apgd_steps,
                       seed=budget.seed)
            with torch.no_grad():
                fooled = int((member(adv).argmax(1) != y[rows]).sum())
        n = x.shape[0]
        out.append({"member": i, "clean_acc": int(correct.sum()) / n if n else math.nan,
                    "robust_acc": (int(correct.sum()) - fooled) / n if n else math.nan,
                    "attack": "apgd-ce", "steps": budget.apgd_steps, "eps": eps,
                    "seed": budget.seed})
    return strict_json(out)


def card_transfer(ensemble: Ensemble, x: Tensor, y: Tensor, *, eps: float,
                  budget: CardBudget = CardBudget()) -> dict[str, Any]:
    """The member → member transfer matrix of full-budget PGD examples (``keep="last"``,
    ``budget.transfer_steps``), with its mean and wall time.

    Example:
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
        >>> x = torch.rand(4, 1, 8, 8); y = ens.predict(x)
        >>> len(card_transfer(ens, x, y, eps=0.1, budget=CardBudget(transfer_steps=1))["fooled"])
        2
    """
    started = time.perf_counter()
    tm = transfer_matrix(ensemble, x, y, whitebox=False, attack=_transfer_attack(eps, budget))
    return strict_json({**tm.to_dict(), "mean": tm.mean_transfer,
                        "crafted_with": _transfer_setup(eps, budget),
                        "seconds": time.perf_counter() - started})


def card_surrogate(surrogate: nn.Module, ensemble: Ensemble, x: Tensor, y: Tensor, *,
                   eps: float, aggregations: tuple[str, ...] = ("softmax",),
                   budget: CardBudget = CardBudget()) -> dict[str, dict[str, Any]]:
    """Black-box transfer: full-budget PGD examples crafted once on ``surrogate`` (an
    independently trained model), success on the ensemble under each rule (over the inputs
    it classifies correctly under that rule).

    Example:
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
        >>> other = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=1).eval()
        >>> x = torch.rand(4, 1, 8, 8); y = ens.predict(x)
        >>> sorted(card_surrogate(other, ens, x, y, eps=0.1, aggregations=("softmax", "vote"),
        ...                       budget=CardBudget(transfer_steps=1)))
        ['softmax', 'vote']
    """
    started = time.perf_counter()
    adv = _transfer_attack(eps, budget)(surrogate, x, y)
    seconds = time.perf_counter() - started
    setup = {**_transfer_setup(eps, budget), "on": "surrogate"}
    return strict_json({rule: {**surrogate_transfer(surrogate, Aggregated(ensemble, rule), x, y,
                                                    x_adv=adv).to_dict(),
                               "crafted_with": setup, "seconds": seconds}
                        for rule in aggregations})


def card_gradients(ensemble: Ensemble, x: Tensor, y: Tensor) -> dict[str, Any]:
    """GDR, mean gradient cosine and friends (:func:`ensdiv.gdr.gradient_diversity`) of the
    members' input gradients at the clean inputs, and ``zero_grad_fraction``: the share of
    inputs where some member's input gradient is exactly zero (AutoAttack's masking check).

    Example:
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
        >>> x = torch.rand(4, 1, 8, 8)
        >>> card_gradients(ens, x, ens.predict(x))["zero_grad_fraction"]
        0.0
    """
    grads = input_gradients(ensemble, x, y)
    n = x.shape[0]
    zero = float((grads.flatten(2).abs().amax(-1) == 0).any(0).float().mean()) if n else 0.0
    return strict_json({**gradient_diversity(grads), "zero_grad_fraction": zero})


def _transfer_attack(eps: float, budget: CardBudget) -> Callable[..., Tensor]:
    return functools.partial(pgd, eps=eps, steps=budget.transfer_steps, keep="last",
                             generator=torch.Generator().manual_seed(budget.seed))


def _transfer_setup(eps: float, budget: CardBudget) -> dict[str, Any]:
    return {"attack": "pgd", "eps": eps, "keep": "last", "steps": budget.transfer_steps,
            "seed": budget.seed}


def _sanity(model: nn.Module, x: Tensor, y: Tensor, eps: float, budget: CardBudget,
            per_attack: dict[str, Success],
            gradient_attacks: list[str]) -> tuple[dict[str, Any], list[str]]:
    """AutoAttack's habits as values and messages."""
    huge = worst_case_success(model, x, y, attacks={"pgd": functools.partial(
        pgd, eps=HUGE_EPS, steps=budget.transfer_steps,
        generator=torch.Generator().manual_seed(budget.seed))}).union
    half_steps = max(budget.apgd_steps // 2, 1)
    half = worst_case_success(model, x, y, attacks={"apgd-ce": functools.partial(
        apgd, eps=eps, loss="ce", steps=half_steps, seed=budget.seed)}).union
    full = per_attack["apgd-ce"]  # the cascade's first attack ran on every correct input
    square_after = per_attack["square"].fooled
    values = {"huge_eps_pgd": huge.to_dict(),
              "apgd_ce_half_budget": half.to_dict(), "apgd_ce_full_budget": full.to_dict(),
              "square_broke_after_gradient_attacks": square_after}
    warnings = []
    if huge.total and huge.rate < 0.99:
        warnings.append(f"L∞ PGD at eps={HUGE_EPS:g} fooled only {huge.rate:.1%} of the correct "
                        "inputs (should be ~100%: gradient masking or a bug)")
    if square_after:
        names = [{"apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "mora": "MORA"}[a]
                 for a in gradient_attacks]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        warnings.append(f"Square (no gradients) broke {square_after} input(s) that {listed} "
                        "could not: the gradients may be masked")
    stalled = convergence_warning(full, half, what=f"APGD-CE ({half_steps} → "
                                  f"{budget.apgd_steps} steps) at eps={eps:g}")
    if stalled:
        warnings.append(stalled)
    return values, warnings
