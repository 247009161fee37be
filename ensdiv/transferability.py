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
from collections.abc import Callable
from dataclasses import dataclass
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
        whitebox: success of the attack run on the ensemble itself.
        member_acc, ensemble_acc: clean accuracies on the n inputs.
        n: number of inputs.
    """

    fooled: Tensor
    total: Tensor
    to_ensemble: tuple[Success, ...]
    whitebox: Success
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
                "whitebox": self.whitebox.to_dict(), "member_acc": list(self.member_acc),
                "ensemble_acc": self.ensemble_acc, "n": self.n}


def transfer_matrix(ensemble: Ensemble, x: Tensor, y: Tensor, *,
                    attack: Attack) -> TransferResult:
    """Craft adversarials on each member and on the ensemble; measure where they transfer.

    Args:
        ensemble: M members (each an ``nn.Module`` returning logits).
        x: inputs [B, ...] in [0, 1]; y: labels [B].
        attack: ``(model, x, y) -> x_adv``.

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
    _, white_wrong = wrong(attack(ensemble, x, y))
    whitebox = Success(int((white_wrong & ens_correct).sum()), int(ens_correct.sum()))
    return TransferResult(
        fooled=fooled, total=total, to_ensemble=tuple(to_ensemble), whitebox=whitebox,
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
