"""How adversarial examples transfer between members, to the ensemble, and from a surrogate.

Attack success is always counted only over inputs the attacked model classifies correctly when
clean (a misclassified input is not "fooled" by the attack). Every rate is kept beside its
counts, so a reader can tell 1/2 from 500/1000.

An ``attack`` is any callable ``(model, x, y) -> x_adv``, for instance
``functools.partial(pgd, eps=0.03, steps=10)``.

Example:
    >>> import functools, torch
    >>> from ensdiv.attacks import fgsm
    >>> from ensdiv.ensemble import Ensemble
    >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10)
    >>> x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    >>> res = transfer_matrix(ens, x, y, attack=functools.partial(fgsm, eps=0.1))
    >>> res.matrix.shape
    torch.Size([3, 3])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ensdiv.ensemble import Ensemble, mean_log_softmax
from ensdiv.errors import EnsdivError, check_input

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Success:
    """An attack success rate with its counts: ``rate = fooled / total`` (NaN if total = 0)."""

    fooled: int
    total: int

    @property
    def rate(self) -> float:
        """fooled / total, NaN when no input counted."""
        return self.fooled / self.total if self.total else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"rate", "fooled", "total"}``."""
        return {"rate": self.rate, "fooled": self.fooled, "total": self.total}


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(-1)


def success_counts(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor,
                   mask: Tensor | None = None) -> Success:
    """Untargeted success of ``x_adv`` on ``model`` over the inputs it classifies correctly
    clean (and, if given, where ``mask`` [B] is true)."""
    check_input(model, x, y)
    check_input(model, x_adv)
    if x_adv.shape != x.shape:
        raise EnsdivError(f"x_adv must have x's shape {tuple(x.shape)}; got "
                          f"{tuple(x_adv.shape)}")
    clean_ok = _predict(model, x) == y
    if mask is not None:
        clean_ok &= mask
    fooled = (_predict(model, x_adv) != y) & clean_ok
    return Success(int(fooled.sum()), int(clean_ok.sum()))


def attack_success(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> float:
    """Fraction of the inputs ``model`` classifies correctly that ``x_adv`` misclassifies.

    Args:
        model: returns logits [B, K]; x, x_adv: [B, ...]; y: labels [B].

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> x = torch.rand(8, 2)
        >>> attack_success(lin, x, lin(x).argmax(-1), x)  # nothing changed: nothing fooled
        0.0
    """
    return success_counts(model, x, y, x_adv).rate


@dataclass(frozen=True)
class TransferResult:
    """Transferability within an ensemble of M members under one attack.

    Attributes:
        fooled, total: [M, M] counts; entry (i, j) is over inputs that members i and j both
            classify correctly, ``fooled`` those whose adversarial crafted on member i fools j.
        to_ensemble: per source member i, success of its adversarials on the whole ensemble
            (over inputs that member i and the ensemble both classify correctly).
        whitebox: success of the attack run on the ensemble itself (None if not run).
        member_acc, ensemble_acc: clean accuracies on the n inputs.
        n: number of inputs.
    """

    fooled: Tensor
    total: Tensor
    to_ensemble: tuple[Success, ...]
    whitebox: Success | None
    member_acc: tuple[float, ...]
    ensemble_acc: float
    n: int

    @property
    def matrix(self) -> Tensor:
        """[M, M] success rates (diagonal: white-box success per member); NaN where total = 0."""
        rates = self.fooled.double() / self.total.double()
        return torch.where(self.total > 0, rates, torch.full_like(rates, math.nan))

    @property
    def mean_transfer(self) -> float:
        """Pooled off-diagonal success: Σ_{i≠j} fooled / Σ_{i≠j} total."""
        off = ~torch.eye(self.fooled.shape[0], dtype=torch.bool)
        total = int(self.total[off].sum())
        return int(self.fooled[off].sum()) / total if total else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record of every rate and count."""
        return {"matrix": self.matrix.tolist(), "fooled": self.fooled.tolist(),
                "total": self.total.tolist(), "mean_transfer": self.mean_transfer,
                "to_ensemble": [s.to_dict() for s in self.to_ensemble],
                "whitebox": self.whitebox.to_dict() if self.whitebox else None,
                "member_acc": list(self.member_acc),
                "ensemble_acc": self.ensemble_acc, "n": self.n}


def transfer_matrix(ensemble: Ensemble, x: Tensor, y: Tensor, *,
                    attack: Attack, whitebox: bool = True) -> TransferResult:
    """Craft adversarials on each member and on the ensemble; measure where they transfer.

    Craft transfer examples at the full budget (``keep="last"``, see
    :mod:`ensdiv.attacks`); a first-success example is a minimal perturbation and answers a
    different question (how far the smallest fooling change carries).

    Args:
        ensemble: M members (each an ``nn.Module`` returning logits).
        x: inputs [B, ...] in [0, 1]; y: labels [B].
        attack: ``(model, x, y) -> x_adv``.
        whitebox: also run ``attack`` on the ensemble itself (``result.whitebox``; None if
            False, e.g. when white-box success is measured with other attacks).

    Returns:
        A :class:`TransferResult`; ``matrix[i, j]`` is the success on member j of adversarials
        crafted on member i, over inputs both classify correctly.

    Example:
        >>> import functools
        >>> from ensdiv.attacks import pgd
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
        >>> x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
        >>> r = transfer_matrix(ens, x, y, attack=functools.partial(pgd, eps=0.05, steps=2))
        >>> r.fooled.shape, r.total.shape
        (torch.Size([2, 2]), torch.Size([2, 2]))
    """
    check_input(ensemble, x, y)
    if len(y) == 0:
        raise EnsdivError("transfer_matrix needs at least one input; got an empty batch")
    members = list(ensemble.members)
    m = len(members)

    @torch.no_grad()
    def wrong(xx: Tensor) -> tuple[Tensor, Tensor]:
        """Members' [M, B] and the ensemble's [B] errors from one pass over the members."""
        logits = ensemble.member_logits(xx)
        return logits.argmax(-1) != y, mean_log_softmax(logits).argmax(-1) != y

    members_wrong, ens_wrong = wrong(x)
    correct, ens_correct = ~members_wrong, ~ens_wrong
    fooled = torch.zeros(m, m, dtype=torch.long)
    total = torch.zeros(m, m, dtype=torch.long)
    to_ensemble = []
    for i, source in enumerate(members):
        adv_members_wrong, adv_ens_wrong = wrong(attack(source, x, y))
        both = correct[i] & correct  # [M, B]
        fooled[i] = (adv_members_wrong & both).sum(1).cpu()
        total[i] = both.sum(1).cpu()
        counted = correct[i] & ens_correct
        to_ensemble.append(Success(int((adv_ens_wrong & counted).sum()), int(counted.sum())))
    white = None
    if whitebox:
        _, white_wrong = wrong(attack(ensemble, x, y))
        white = Success(int((white_wrong & ens_correct).sum()), int(ens_correct.sum()))
    return TransferResult(
        fooled=fooled, total=total, to_ensemble=tuple(to_ensemble), whitebox=white,
        member_acc=tuple(int(c.sum()) / len(y) for c in correct),
        ensemble_acc=int(ens_correct.sum()) / len(y), n=int(len(y)))


def surrogate_transfer(surrogate: nn.Module, target: nn.Module, x: Tensor, y: Tensor, *,
                       attack: Attack | None = None, x_adv: Tensor | None = None) -> Success:
    """Black-box success: adversarials crafted on ``surrogate`` (e.g. an independently trained
    ensemble), evaluated on ``target``, over inputs ``target`` classifies correctly.

    Pass precomputed ``x_adv`` to reuse one surrogate attack against many targets.

    Example:
        >>> import functools
        >>> from ensdiv.attacks import fgsm
        >>> a = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
        >>> b = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=1)
        >>> x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
        >>> s = surrogate_transfer(a, b, x, y, attack=functools.partial(fgsm, eps=0.1))
        >>> 0 <= s.fooled <= s.total
        True
    """
    check_input(surrogate, x, y)
    if x_adv is None:
        if attack is None:
            raise EnsdivError("surrogate_transfer needs an attack or precomputed x_adv")
        x_adv = attack(surrogate, x, y)
    return success_counts(target, x, y, x_adv)


@dataclass(frozen=True)
class WorstCase:
    """Success of a suite of attacks on one model, AutoAttack's rule: an input counts as broken
    if **any** attack breaks it; each attack's own rate stays beside the union.

    Attributes:
        union: inputs broken by some attack, over the inputs classified correctly clean.
        per_attack: each attack's own success over the same inputs.
        broken: [B] bool, correctly classified clean and broken by some attack.
        first_breaker: [B] int64, the index (in ``per_attack``'s order) of the first attack
            that broke each input, -1 where none did (or the input was broken by ``skip``).
        seconds: wall time each attack took.
    """

    union: Success
    per_attack: dict[str, Success]
    broken: Tensor
    first_breaker: Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def broken_first_by(self) -> dict[str, int]:
        """How many inputs each attack was the first to break (they sum to the union, less
        any inputs counted through ``skip``).

        Example:
            >>> wc = WorstCase(Success(2, 3), {"a": Success(1, 3), "b": Success(2, 3)},
            ...                torch.tensor([True, True, False]), torch.tensor([1, 0, -1]))
            >>> wc.broken_first_by()
            {'a': 1, 'b': 1}
        """
        names = list(self.per_attack)
        fb = self.first_breaker if self.first_breaker is not None else torch.empty(0)
        return {n: int((fb == i).sum()) for i, n in enumerate(names)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"rate", "fooled", "total", "attacks": {name: {...}}}``."""
        return {**self.union.to_dict(),
                "attacks": {k: v.to_dict() for k, v in self.per_attack.items()}}


@torch.no_grad()
def worst_case_success(model: nn.Module, x: Tensor, y: Tensor, *,
                       attacks: Mapping[str, Attack] | None = None,
                       x_adv: Mapping[str, Tensor] | None = None,
                       cascade: bool = False, skip: Tensor | None = None,
                       on_attack: Callable[[str, Success, float], None] | None = None,
                       ) -> WorstCase:
    """Per-sample worst case over several attacks (AutoAttack's rule, Croce & Hein 2020).

    Args:
        model: returns logits [B, K].
        x: inputs [B, ...] in [0, 1]; y: labels [B].
        attacks: name -> ``(model, x, y) -> x_adv``, each run on every input (in order).
        x_adv: name -> precomputed adversarial examples (instead of ``attacks``).
        cascade: AutoAttack's evaluation order: each attack runs only on the correctly
            classified inputs no earlier attack broke. The union is the same as running every
            attack on every input, at a fraction of the cost; each attack's rate is then over
            the inputs it was run on (``per_attack[a].total``).
        skip: [B] bool, inputs already broken elsewhere (e.g. by a cheaper stage): counted in
            the union, not attacked when ``cascade``.
        on_attack: called after each attack with its name, its :class:`Success` and its
            seconds (a long evaluation's progress).

    Returns:
        A :class:`WorstCase`; without ``cascade``, ``union.rate >= per_attack[a].rate`` for
        every attack ``a``.

    Example:
        >>> import functools
        >>> from ensdiv.attacks import fgsm, pgd
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x = torch.rand(8, 1, 8, 8)
        >>> y = net(x).argmax(-1)                     # every input correct clean
        >>> wc = worst_case_success(net, x, y, attacks={
        ...     "fgsm": functools.partial(fgsm, eps=0.1), "pgd": functools.partial(pgd, eps=0.1)})
        >>> wc.union.rate >= max(s.rate for s in wc.per_attack.values())
        True
    """
    if (attacks is None) == (x_adv is None):
        raise EnsdivError("worst_case_success needs attacks or precomputed x_adv (one of them)")
    if cascade and attacks is None:
        raise EnsdivError("cascade needs attacks to run, not precomputed x_adv")
    check_input(model, x, y)
    names = list(attacks if attacks is not None else x_adv)
    if not names:
        raise EnsdivError("worst_case_success needs at least one attack")
    correct = model(x).argmax(-1) == y
    total = int(correct.sum())
    broken = torch.zeros_like(correct) if skip is None else skip.to(correct.device) & correct
    per_attack = {}
    first_breaker = torch.full_like(y, -1, dtype=torch.int64)
    seconds: dict[str, float] = {}
    for i, name in enumerate(names):
        started = time.perf_counter()
        rows = (correct & ~broken) if cascade else correct
        idx = rows.nonzero().squeeze(1) if cascade else None
        if attacks is not None:
            if idx is not None and idx.numel() == 0:
                per_attack[name] = Success(0, 0)
                seconds[name] = 0.0
                if on_attack is not None:
                    on_attack(name, per_attack[name], 0.0)
                continue
            with torch.enable_grad():
                xa = attacks[name](model, x[idx], y[idx]) if idx is not None \
                    else attacks[name](model, x, y)
            yy = y[idx] if idx is not None else y
        else:
            xa, yy = x_adv[name], y
            check_input(model, xa)
            if xa.shape != x.shape:
                raise EnsdivError(f"x_adv[{name!r}] must have x's shape {tuple(x.shape)}; "
                                  f"got {tuple(xa.shape)}")
        fooled = model(xa).argmax(-1) != yy
        if idx is not None:
            hit = torch.zeros_like(correct)
            hit[idx] = fooled
        else:
            hit = fooled & correct
        per_attack[name] = Success(int((hit & rows).sum()), int(rows.sum()))
        first_breaker[hit & rows & ~broken] = i
        broken |= hit & rows
        seconds[name] = time.perf_counter() - started
        if on_attack is not None:
            on_attack(name, per_attack[name], seconds[name])
    return WorstCase(Success(int(broken.sum()), total), per_attack, broken, first_breaker,
                     seconds)


CONVERGENCE_GAP = 0.02
"""Largest rise in success from half to full budget of an attack that has converged."""


def convergence_warning(full: Success, half: Success, *, what: str,
                        gap: float = CONVERGENCE_GAP) -> str | None:
    """A warning if success at the full budget exceeds success at half the budget by more
    than ``gap`` (2 points): the attack had not converged, so its success is a lower bound;
    raise its steps or restarts. None if it had.

    Example:
        >>> w = convergence_warning(Success(60, 100), Success(50, 100), what="PGD at eps=0.1")
        >>> w[:64]
        'PGD at eps=0.1 had not converged: success rose from 0.500 at hal'
    """
    if not (full.total and half.total):
        return None
    if full.rate - half.rate > gap + 1e-12:  # exactly 2 points is still converged
        return (f"{what} had not converged: success rose from {half.rate:.3f} at half the "
                f"budget to {full.rate:.3f} at the full budget (raise steps or restarts; the "
                "rate is a lower bound)")
    return None
