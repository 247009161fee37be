"""How an ensemble turns its members' logits into one decision, and what an attacker climbs.

Three rules, the ones the ensemble-defence literature evaluates (Yu et al. 2022, MORA §5;
Tramèr et al. 2020 §6 for voting):

- ``"softmax"`` — the class of the mean member softmax; scores ``log mean_i softmax(z_i)``
  (what :class:`~ensdiv.ensemble.Ensemble` returns and trains with);
- ``"logits"`` — the class of the mean member logits; scores ``mean_i z_i``;
- ``"vote"`` — the majority of the members' classes. A vote has no gradient, so an attacker
  climbs a differentiable **stand-in** (``"softmax"``: the mean softmax, ``"logits"``: the
  softmax of the mean logits) while success is judged on the vote itself. The scores are
  ``votes + ½·stand-in probability``: the vote counts are integers and the stand-in adds less
  than 1, so their argmax *is* the vote (a tie goes to the stand-in's favourite, as in
  :func:`majority_vote` for the softmax stand-in), and their gradient is the
  stand-in's. Any attack that judges success by the argmax of its model's output — all of
  :mod:`ensdiv.attacks` — therefore attacks the stand-in and is judged on the vote.

Example:
    >>> import torch
    >>> z = torch.tensor([[[5.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0]]])
    >>> aggregate(z, "softmax").argmax(-1), aggregate(z, "vote").argmax(-1)
    (tensor([0]), tensor([1]))
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from ensdiv.errors import EnsdivError, check_choice

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import AGGREGATIONS as AGGREGATIONS
from ensdiv.vocab import Aggregation as Aggregation

StandIn = Literal["softmax", "logits"]
STAND_INS: tuple[str, ...] = get_args(StandIn)


def mean_log_softmax(member_logits: Tensor) -> Tensor:
    """log(mean over members of softmax), [B, K] from [M, B, K], computed stably.

    Example:
        >>> mean_log_softmax(torch.zeros(3, 1, 4)).exp()
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    m = member_logits.shape[0]
    return torch.logsumexp(torch.log_softmax(member_logits, -1), dim=0) - math.log(m)


def majority_vote(member_logits: Tensor) -> Tensor:
    """Majority vote [B] of the members' argmax classes from logits [M, B, K]; ties go to the
    class with the higher mean softmax.

    Example:
        >>> majority_vote(torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]], [[0.0, 1.0]]]))
        tensor([1])
    """
    k = member_logits.shape[-1]
    counts = nn.functional.one_hot(member_logits.argmax(-1), k).sum(0).to(member_logits.dtype)
    # the mean probability is < 1, so adding half of it only ever breaks ties
    return (counts + mean_log_softmax(member_logits).exp() * 0.5).argmax(-1)


def aggregate(member_logits: Tensor, rule: str = "softmax", *,
              stand_in: str = "softmax") -> Tensor:
    """The ensemble's scores [B, K] under ``rule`` from member logits [M, B, K]; their argmax is
    the ensemble's class and their gradient is what an attacker follows.

    Args:
        member_logits: [M, B, K] (M ≥ 1).
        rule: ``"softmax"``, ``"logits"`` or ``"vote"``.
        stand_in: for ``"vote"`` only, the differentiable rule whose gradient the scores carry.

    Example:
        >>> z = torch.randn(3, 4, 10)
        >>> bool((aggregate(z, "logits") == z.mean(0)).all())
        True
    """
    check_choice("aggregation rule", rule, AGGREGATIONS)
    check_choice("vote stand-in", stand_in, STAND_INS)
    if not isinstance(member_logits, Tensor) or member_logits.ndim != 3 \
            or member_logits.shape[0] < 1:
        raise EnsdivError("member logits must be a tensor [M, B, K] with M >= 1; got "
                          f"{getattr(member_logits, 'shape', type(member_logits).__name__)}")
    if rule == "softmax":
        return mean_log_softmax(member_logits)
    if rule == "logits":
        return member_logits.mean(0)
    k = member_logits.shape[-1]
    votes = nn.functional.one_hot(member_logits.argmax(-1), k).sum(0).to(member_logits.dtype)
    prob = mean_log_softmax(member_logits).exp() if stand_in == "softmax" \
        else member_logits.mean(0).softmax(-1)
    return votes + 0.5 * prob


class Aggregated(nn.Module):
    """An ensemble seen through one aggregation rule: ``forward`` returns :func:`aggregate` of
    its member logits, so every attack in :mod:`ensdiv.attacks` attacks (and judges success on)
    that rule. The ensemble itself is held, not changed.

    Args:
        ensemble: an :class:`~ensdiv.ensemble.Ensemble`, or any module with a
            ``member_logits(x) -> [M, B, K]`` method.
        rule: ``"softmax"``, ``"logits"`` or ``"vote"``.
        stand_in: for ``"vote"``, the stand-in whose gradient the attacker follows.

    Example:
        >>> from ensdiv.ensemble import Ensemble
        >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10)
        >>> voted = Aggregated(ens, "vote")
        >>> x = torch.rand(5, 1, 8, 8)
        >>> bool((voted(x).argmax(-1) == ens.vote(x)).all())
        True
    """

    def __init__(self, ensemble: nn.Module, rule: str = "softmax", *,
                 stand_in: str = "softmax") -> None:
        super().__init__()
        if not isinstance(ensemble, nn.Module) or not callable(
                getattr(ensemble, "member_logits", None)):
            raise EnsdivError(f"Aggregated needs an ensemble (an ensdiv Ensemble, or a module "
                              f"with member_logits); got {type(ensemble).__name__}")
        self.ensemble = ensemble
        self.rule = check_choice("aggregation rule", rule, AGGREGATIONS)
        self.stand_in = check_choice("vote stand-in", stand_in, STAND_INS)
        # attacks read the declared input shape and class count (ensdiv.errors.check_input)
        self.in_shape = getattr(ensemble, "in_shape", None)
        self.num_classes = getattr(ensemble, "num_classes", None)

    def forward(self, x: Tensor) -> Tensor:
        """Scores [B, K] of the rule for ``x`` [B, *in_shape]."""
        return aggregate(self.ensemble.member_logits(x), self.rule, stand_in=self.stand_in)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The ensemble's class [B] under the rule."""
        return self(x).argmax(-1)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}" + (f", stand_in={self.stand_in!r}"
                                        if self.rule == "vote" else "")

