"""MORA, the model-reweighing attack on ensembles (Yu, Gao & Xu, NeurIPS 2022, "MORA: Improving
Ensemble Robustness Evaluation with Model Reweighing Attack").

Private: users import :func:`mora` from :mod:`ensdiv.attacks` (or ``ensdiv.mora``); the
module's name leaves ``ensdiv.mora`` to the function, which loads on first use.

Why: an attack on the ensemble's averaged output follows the *sum* of the members' gradients,
and diversity training makes those gradients point in different directions, so they cancel and
the attack stalls although most members are easy to fool one at a time. MORA climbs a mix of
the averaged output and a per-input weighted average of the members, weighting most the members
that still hold the true class and are closest to giving it up.

Per input and iterate, with member logits ``z_i``, the ensemble's mean probability ``p̄``, the
true class ``y`` and the ensemble's runner-up ``c = argmax_{k≠y} p̄_k``:

- each member's weight ``w_i = p_i[c]·(p_i[y]/p̄[y] + (1 − p_i[c])/p̄[c])`` with
  ``p_i = softmax(T·z_i)`` (the paper's probability weight; ``T`` = ``temperature``), set to 0
  for members that already misclassify (rules ``"softmax"`` and ``"vote"``: a fooled member needs
  no more push), kept for all members under ``"logits"`` (a summed logit still moves with a
  fooled member), and treated as a constant (no gradient through the weights);
- with ``normalize`` each member's logits and the aggregated scores are divided by their own
  top-1 − top-2 margin (a constant per iterate), so members of different confidence pull with
  comparable force;
- the loss is ``CE((1 − s)·a + s·Σ_i w_i z_i / Σ_i w_i, y)`` with ``a`` the aggregated scores
  (log mean softmax, or mean logits for ``"logits"`` and the logits stand-in of a vote); an
  input whose members are all fooled falls back to ``a`` alone.

The mixing weight ``s`` runs through ``mix`` = (0.5, 0, 0.25, 0.75, 1) — one APGD run per value,
each only on the inputs no earlier run broke, from a fresh random start on the ball's surface.
Success is judged on the aggregation rule itself (the majority vote for ``"vote"``); per input
the first iterate that fools the ensemble is kept, else the highest-loss point (AutoAttack's
rule).

Where ensdiv follows and departs from the authors' code (lafeat/mora, ``mora_attack.py``):
follows the probability weight, the still-correct mask, the per-margin normalisation, the mix
order and momentum 0.75 from a 2ε step. Departs: (1) the step schedule is APGD's (halving at
checkpoints when progress stalls; Croce & Hein 2020) instead of their linear/cosine decay — the
issue asks for an APGD-style schedule, and it makes MORA on identical members *exactly* ensdiv's
APGD-CE (tested); (2) each member is divided by its own margin, not by one margin shared by all
members; (3) ``p̄`` averages all M members (their loop skips the last); (4) the runner-up is
``c`` with a plus sign (their code subtracts the runner-up's probability when the ensemble is
still right, which reads as a sign slip); (5) no extra targeted run and no EOT.

Example:
    >>> import torch
    >>> from ensdiv.ensemble import Ensemble
    >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=0)
    >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    >>> x_adv = mora(ens, x, y, eps=0.1, steps=5)
    >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ensdiv._attack_core import (
    NORMS,
    _apgd_run,
    _Best,
    _check_count,
    _check_inputs,
    _result,
    apgd_checkpoints,
)
from ensdiv.aggregation import AGGREGATIONS, STAND_INS, Aggregated, aggregate, mean_log_softmax
from ensdiv.errors import EnsdivError, check_choice

MORA_MIX: tuple[float, ...] = (0.5, 0.0, 0.25, 0.75, 1.0)
"""The mixing weights ``s`` MORA runs through, in the authors' order."""

# A margin below this is treated as this: an input on a decision boundary must not turn the
# normalised scores into infinities.
_MIN_MARGIN = 1e-6


def mora(ensemble: nn.Module, x: Tensor, y: Tensor, *, eps: float | Tensor, norm: str = "linf",
         steps: int = 100, aggregation: str = "softmax", stand_in: str = "softmax",
         mix: Sequence[float] = MORA_MIX, normalize: bool = True, temperature: float = 1.0,
         seed: int = 0, return_steps: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Member-aware, per-input reweighting attack on an ensemble (Yu et al. 2022), untargeted.

    Args:
        ensemble: an :class:`~ensdiv.ensemble.Ensemble` (or any module with
            ``member_logits(x) -> [M, B, K]``); a single network counts as one member.
        x: inputs [B, ...] in [0, 1]; y: true labels [B].
        eps: ball radius ≥ 0, a float or a per-sample tensor [B].
        norm: ``"linf"`` or ``"l2"``.
        steps: APGD iterations per mixing weight, ≥ 1 (the paper: 100).
        aggregation: the rule attacked and judged: ``"softmax"``, ``"logits"`` or ``"vote"``.
        stand_in: for ``"vote"``, the differentiable rule in the loss (``"softmax"`` or
            ``"logits"``).
        mix: the mixing weights ``s`` in [0, 1], one run each, in order.
        normalize: divide member and aggregated scores by their top-1 − top-2 margins.
        temperature: ``T`` > 0 of the members' softmax in the weights.
        seed: seed of the random starts (the global RNG is not touched).
        return_steps: also return the iteration at which each input first fell (counted over
            all runs; -1: never).

    Returns:
        ``x_adv`` [B, ...] within ``eps`` of ``x`` and in [0, 1], detached; with
        ``return_steps`` also the first-success iteration [B] (int64).

    Raises:
        EnsdivError: a bad argument, named with what it must be, before any work.

    Example:
        >>> from ensdiv.ensemble import Ensemble
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
        >>> x, y = torch.rand(3, 1, 8, 8), torch.tensor([1, 2, 3])
        >>> mora(ens, x, y, eps=0.05, steps=3, aggregation="vote").shape
        torch.Size([3, 1, 8, 8])
    """
    ens = ensemble if callable(getattr(ensemble, "member_logits", None)) \
        else _OneMember(ensemble)
    check_choice("norm", norm, NORMS)
    check_choice("aggregation rule", aggregation, AGGREGATIONS)
    check_choice("vote stand-in", stand_in, STAND_INS)
    _check_count("steps", steps)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EnsdivError(f"seed must be an integer >= 0; got {seed!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise EnsdivError(f"temperature must be a finite number > 0; got {temperature!r}")
    mix = _check_mix(mix)
    judged = Aggregated(ens, aggregation, stand_in=stand_in)
    eps_t = _check_inputs(judged, x, y, eps)
    x = x.detach()
    averaged = "softmax" if aggregation == "softmax" or (
        aggregation == "vote" and stand_in == "softmax") else "logits"

    def score_for(s: float) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        def score(member_logits: Tensor, yy: Tensor) -> tuple[Tensor, Tensor]:
            fooled = aggregate(member_logits, aggregation, stand_in=stand_in).argmax(1) != yy
            return mora_loss(member_logits, yy, s=s, averaged=averaged,
                             only_correct=aggregation != "logits", normalize=normalize,
                             temperature=temperature), fooled
        return score

    with torch.no_grad():
        z0 = ens.member_logits(x)
        first = score_for(mix[0])
        clean_loss, clean_ok = first(z0, y)
    best = _Best(x, clean_loss, clean_ok)
    if not bool(eps_t.any()) or x.shape[0] == 0:
        return _result(x.clone(), best, return_steps)
    gen = torch.Generator().manual_seed(seed)
    checkpoints = apgd_checkpoints(steps)
    for r, s in enumerate(mix):
        rows = (~best.ok).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        _apgd_run(ens.member_logits, x[rows], y[rows], eps_t[rows], norm, score_for(s), steps,
                  checkpoints, gen, best, rows, r * steps)
    return _result(best.x, best, return_steps)


def mora_loss(member_logits: Tensor, y: Tensor, *, s: float, averaged: str = "softmax",
              only_correct: bool = True, normalize: bool = True,
              temperature: float = 1.0) -> Tensor:
    """MORA's per-input loss [B] (higher = closer to fooling) from member logits [M, B, K].

    ``CE((1 − s)·a + s·Σ_i w_i z_i / Σ_i w_i, y)`` — see the module docstring for ``a``, ``w_i``
    and the normalisation; ``averaged`` is ``"softmax"`` (``a`` = log mean softmax) or
    ``"logits"`` (``a`` = mean logits); ``only_correct`` zeroes the weights of members that
    already misclassify.

    Example:
        >>> z = torch.randn(1, 4, 10).expand(3, 4, 10)  # three identical members
        >>> y = torch.tensor([0, 1, 2, 3])
        >>> a, b = mora_loss(z, y, s=0.0), mora_loss(z, y, s=1.0)
        >>> bool(torch.allclose(a, b, atol=1e-5))
        True
    """
    agg = mean_log_softmax(member_logits) if averaged == "softmax" else member_logits.mean(0)
    zs = member_logits
    if normalize:
        agg = agg / _margin(agg.detach())[:, None]
        zs = member_logits / _margin(member_logits.detach())[..., None]
    with torch.no_grad():
        w = member_weights(member_logits, y, temperature=temperature)
        if only_correct:
            w = w * (member_logits.argmax(-1) == y).to(w.dtype)
        total = w.sum(0)
    members = (w[..., None] * zs).sum(0) / total.clamp_min(torch.finfo(w.dtype).tiny)[:, None]
    members = torch.where((total > 0)[:, None], members, agg)
    return F.cross_entropy((1 - s) * agg + s * members, y, reduction="none")


def member_weights(member_logits: Tensor, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """MORA's probability weight of each member per input, [M, B] from logits [M, B, K]:
    ``w_i = p_i[c]·(p_i[y]/p̄[y] + (1 − p_i[c])/p̄[c])``, ``p_i = softmax(T·z_i)``, ``p̄`` the
    ensemble's mean softmax and ``c`` its most likely class other than ``y``.

    It is large for a member that still gives ``y`` much probability and already gives ``c``
    some: the member nearest to flipping toward the class the ensemble would fall to.

    Example:
        >>> z = torch.tensor([[[3.0, 2.5, 0.0]], [[3.0, -2.0, 0.0]]])
        >>> w = member_weights(z, torch.tensor([0]))
        >>> bool(w[0, 0] > w[1, 0])  # member 0 is nearer to class 1
        True
    """
    p = torch.softmax(temperature * member_logits, -1)
    p_bar = torch.softmax(member_logits, -1).mean(0)
    c = p_bar.scatter(1, y[:, None], -math.inf).argmax(1)
    idx_y = y[None, :, None].expand(p.shape[0], -1, 1)
    idx_c = c[None, :, None].expand(p.shape[0], -1, 1)
    p_y, p_c = p.gather(2, idx_y).squeeze(2), p.gather(2, idx_c).squeeze(2)
    tiny = torch.finfo(p.dtype).tiny
    bar_y = p_bar.gather(1, y[:, None]).squeeze(1).clamp_min(tiny)
    bar_c = p_bar.gather(1, c[:, None]).squeeze(1).clamp_min(tiny)
    return p_c * (p_y / bar_y + (1 - p_c) / bar_c)


class _OneMember(nn.Module):
    """A single network as a one-member ensemble."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise EnsdivError(f"mora attacks an ensemble or a torch.nn.Module; got "
                              f"{type(model).__name__}")
        self.model = model
        self.in_shape = getattr(model, "in_shape", None)
        self.num_classes = getattr(model, "num_classes", None)

    def member_logits(self, x: Tensor) -> Tensor:
        return self.model(x)[None]


def _margin(scores: Tensor) -> Tensor:
    """Top-1 minus top-2 score along the last axis, floored at ``_MIN_MARGIN``."""
    top = scores.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).clamp_min(_MIN_MARGIN)


def _check_mix(mix: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in mix)
    except (TypeError, ValueError):
        raise EnsdivError(f"mix must be a sequence of numbers in [0, 1]; got {mix!r}") from None
    if not values or any(not (0.0 <= s <= 1.0) for s in values):
        raise EnsdivError(f"mix must be a non-empty sequence of numbers in [0, 1]; got {mix!r}")
    return values
