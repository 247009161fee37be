"""White-box evasion attacks on any module that maps inputs in [0, 1] to logits.

Gradient attacks, written as pure functions so the same code attacks a single member, an
:class:`~ensdiv.ensemble.Ensemble` (whose ``forward`` returns log-mean-softmax, usable as logits)
or any other classifier:

- :func:`fgsm` — Fast Gradient Sign Method (Goodfellow et al. 2015), one L∞ step;
- :func:`pgd` — Projected Gradient Descent (Madry et al. 2018), L∞ or L2, random restarts;
- :func:`mifgsm` — Momentum Iterative FGSM (Dong et al. 2018), L∞;
- :func:`apgd` — Auto-PGD (Croce & Hein 2020), L∞ or L2, CE or DLR loss;
- :func:`pgd_objective` — PGD on any per-sample objective (the engine of adaptive attacks).

Which example to keep: to **count white-box success** keep the first iterate that fools
(``keep="success"``, the default of ``pgd``; ``apgd`` always); to **craft examples that
transfer** to other models keep the full-budget final iterate (``keep="last"``, the default of
``mifgsm``) — a first-success example is a minimal perturbation and transfers far less often.

Contract shared by all: ``x`` is [B, ...] in [0, 1], ``y`` is integer [B] (the true label,
or the target class when ``targeted=True``); ``eps`` is a float or a per-sample tensor [B].
The result has ``x``'s shape and dtype, lies in the ``eps`` ball around ``x`` and in [0, 1], and
is detached. The model's train/eval mode is left as found (never switched: pass a model already
in the mode to attack) and parameters' ``.grad`` are never touched — gradients are taken with
``torch.autograd.grad`` with respect to the input only. Randomness (PGD's random start) comes
from an optional ``torch.Generator``, else the global RNG.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    >>> x_adv = ATTACKS["pgd"](model, x, y, eps=0.1)
    >>> x_adv.shape, bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
    (torch.Size([4, 1, 8, 8]), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ensdiv._attack_core import (
    _TINY,
    KEEPS,
    NORMS,
    Keep,
    Norm,
    _apgd_run,
    _ascent,
    _Best,
    _check_alpha,
    _check_count,
    _check_eps,
    _check_inputs,
    _clip01,
    _loss_and_grad,
    _loss_and_success,
    _per_sample_view,
    _project,
    _random_in_ball,
    _result,
    apgd_checkpoints,
    dlr_loss,
)
from ensdiv._mora import MORA_MIX, mora
from ensdiv._square import square
from ensdiv.errors import EnsdivError, check_choice

__all__ = ["ATTACKS", "APGD_LOSSES", "KEEPS", "NORMS", "AttackObjective", "ApgdLoss", "Keep",
           "Norm", "apgd", "apgd_checkpoints", "default_step_size", "dlr_loss", "fgsm",
           "mifgsm", "pgd", "pgd_objective", "MORA_MIX", "mora", "square"]


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float | Tensor,
         targeted: bool = False) -> Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one L∞ step of size ``eps``.

    ``x_adv = clip(x + eps * sign(∇ₓ CE(model(x), y)), 0, 1)``; for ``targeted=True`` the step
    descends the cross-entropy toward the target class ``y`` instead.

    Args:
        model: maps [B, ...] in [0, 1] to logits [B, K].
        x: inputs [B, ...], floating point, in [0, 1].
        y: integer labels [B] in [0, K) — true labels, or targets when ``targeted``.
        eps: L∞ radius ≥ 0, a float or a per-sample tensor [B].
        targeted: minimize the cross-entropy toward ``y`` instead of maximizing it.

    Returns:
        ``x_adv`` [B, ...], same dtype as ``x``, detached, ``|x_adv - x|∞ ≤ eps``, in [0, 1].

    Raises:
        EnsdivError: ``eps`` negative or non-finite, ``x`` outside [0, 1], ``y`` not integer, of
            the wrong shape or out of range for the model's K classes.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x = torch.full((2, 1, 8, 8), 0.5)
        >>> (fgsm(model, x, torch.tensor([3, 7]), eps=0.1) - x).abs().amax().item()
        0.10000002384185791
    """
    eps_t = _check_inputs(model, x, y, eps)
    x = x.detach()
    if not bool(eps_t.any()):
        return x.clone()
    _, _, grad = _loss_and_grad(model, x, y, targeted)
    return _clip01(x + eps_t * grad.sign())



def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float | Tensor,
        alpha: float | None = None, steps: int = 10, norm: str = "linf",
        random_start: bool = True, restarts: int = 1, targeted: bool = False,
        keep: str = "success", generator: torch.Generator | None = None,
        return_steps: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Projected Gradient Descent (Madry et al. 2018) in the L∞ or L2 ball, with restarts.

    Each restart starts at ``x`` plus a uniform random point of the ball (``random_start``)
    and takes ``steps`` ascent steps on the cross-entropy — ``alpha * sign(g)`` for L∞,
    ``alpha * g / ‖g‖₂`` for L2 — each followed by projection onto the ball and clipping to
    [0, 1]. What comes back per sample depends on ``keep``:

    - ``"success"`` (default; use it to **count white-box success**): the clean ``x`` and every
      iterate of every restart are scored, and the first point that succeeds (misclassified,
      or classified as the target when ``targeted``) is returned, else the one with the highest
      attack loss. Restarts and extra steps never make the result weaker on the attacked model;
      a sample already misclassified clean comes back unchanged. A sample is attacked only
      until it first succeeds, so its example is *minimal*, not full-strength.
    - ``"last"`` (use it to **craft examples that transfer** to other models, as torchattacks
      and the GAL/DVERGE/TRS evaluations do): the final iterate after the full budget of steps
      (with restarts: the final iterate of the restart that ends best — succeeding, else with
      the highest loss).

    Args:
        model: maps [B, ...] in [0, 1] to logits [B, K].
        x: inputs [B, ...], floating point, in [0, 1].
        y: integer labels [B] in [0, K) — true labels, or targets when ``targeted``.
        eps: ball radius ≥ 0 (per ``norm``), a float or a per-sample tensor [B].
        alpha: step size > 0; default ``2.5 * eps / steps`` (Madry et al.'s choice of a step
            budget 2.5x the radius, so any point of the ball is reachable from any start).
        steps: gradient steps per restart, ≥ 1.
        norm: ``"linf"`` or ``"l2"``.
        random_start: start each restart at a uniform random point of the ball; without it
            every restart would be the same, so only one is run.
        restarts: independent runs, ≥ 1.
        targeted: minimize the cross-entropy toward ``y`` instead of maximizing it.
        keep: ``"success"`` or ``"last"``, see above.
        generator: source of the random starts (reproducible runs); default the global RNG.
        return_steps: also return, per sample, the gradient steps spent (over all restarts)
            when it first succeeded, -1 if never: success at half the budget is
            ``0 <= steps <= restarts * steps / 2`` (a convergence check).

    Returns:
        ``x_adv`` [B, ...], same dtype as ``x``, detached, within ``eps`` of ``x`` in ``norm``,
        in [0, 1]; with ``return_steps``, ``(x_adv, first_success_step [B] int64)``.

    Raises:
        EnsdivError: bad ``eps``, ``alpha``, ``steps``, ``restarts``, ``norm``, ``keep``, ``x``
            or ``y``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(3, 1, 8, 8), torch.tensor([1, 2, 3])
        >>> g = torch.Generator().manual_seed(0)
        >>> x_adv = pgd(model, x, y, eps=0.5, norm="l2", restarts=2, generator=g, keep="last")
        >>> bool((x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5)
        True
    """
    check_choice("norm", norm, NORMS)
    check_choice("keep rule", keep, KEEPS)
    _check_count("steps", steps)
    _check_count("restarts", restarts)
    eps_t = _check_inputs(model, x, y, eps)
    alpha_t = default_step_size("pgd", eps_t, steps) if alpha is None \
        else _check_alpha(alpha, eps_t)
    x = x.detach()
    with torch.no_grad():
        clean_loss, clean_ok = _loss_and_success(model(x), y, targeted)
    best = _Best(x, clean_loss, clean_ok)
    if not bool(eps_t.any()):
        return _result(x.clone(), best, return_steps)
    last = _Best(x, torch.full_like(clean_loss, -math.inf), torch.zeros_like(clean_ok))

    for r in range(restarts if random_start else 1):
        x_adv = _clip01(x + _random_in_ball(x, eps_t, norm, generator)) if random_start \
            else x.clone()
        for t in range(steps):
            loss, ok, grad = _loss_and_grad(model, x_adv, y, targeted)
            best.offer(x_adv, loss, ok, r * steps + t)
            x_adv = _project(x, _ascent(x_adv, grad, alpha_t, norm), eps_t, norm)
        with torch.no_grad():
            loss, ok = _loss_and_success(model(x_adv), y, targeted)
        best.offer(x_adv, loss, ok, r * steps + steps)
        last.offer(x_adv, loss, ok, r * steps + steps)
        if keep == "success" and bool(best.ok.all()):
            break
    return _result(best.x if keep == "success" else last.x, best, return_steps)


def mifgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float | Tensor,
           alpha: float | None = None, steps: int = 10, decay: float = 1.0,
           targeted: bool = False, keep: str = "last",
           return_steps: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Momentum Iterative FGSM (Dong et al. 2018), L∞.

    ``g ← decay * g + ∇ / mean|∇|`` (the gradient normalized by its per-sample L1 mean),
    ``x ← clip(Π_eps(x + alpha * sign(g)), 0, 1)``, for ``steps`` steps from ``x`` itself.
    ``keep="last"`` (default, as in the paper: MI-FGSM is meant for transfer) returns the final
    iterate; ``keep="success"`` the first iterate that succeeds, else the one with the highest
    loss (for counting white-box success), as in :func:`pgd`.

    Args:
        model: maps [B, ...] in [0, 1] to logits [B, K].
        x: inputs [B, ...], floating point, in [0, 1].
        y: integer labels [B] in [0, K) — true labels, or targets when ``targeted``.
        eps: L∞ radius ≥ 0, a float or a per-sample tensor [B].
        alpha: step size > 0; default ``eps / steps`` (the paper's choice).
        steps: number of iterations, ≥ 1.
        decay: momentum decay factor μ ≥ 0 (``0`` gives I-FGSM).
        targeted: minimize the cross-entropy toward ``y`` instead of maximizing it.
        keep: ``"last"`` or ``"success"``.
        return_steps: also return the steps each sample took to first succeed (-1: never).

    Returns:
        ``x_adv`` [B, ...], same dtype as ``x``, detached, ``|x_adv - x|∞ ≤ eps``, in [0, 1];
        with ``return_steps``, ``(x_adv, first_success_step [B] int64)``.

    Raises:
        EnsdivError: bad ``eps``, ``alpha``, ``steps``, ``decay``, ``keep``, ``x`` or ``y``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(3, 1, 8, 8), torch.tensor([1, 2, 3])
        >>> x_adv = mifgsm(model, x, y, eps=0.05, steps=5)
        >>> bool((x_adv - x).abs().max() <= 0.05 + 1e-6)
        True
    """
    check_choice("keep rule", keep, KEEPS)
    _check_count("steps", steps)
    if not (isinstance(decay, (int, float)) and math.isfinite(decay) and decay >= 0):
        raise EnsdivError(f"decay must be a finite number >= 0; got {decay!r}")
    eps_t = _check_inputs(model, x, y, eps)
    alpha_t = default_step_size("mifgsm", eps_t, steps) if alpha is None \
        else _check_alpha(alpha, eps_t)
    x = x.detach()
    with torch.no_grad():
        clean_loss, clean_ok = _loss_and_success(model(x), y, targeted)
    best = _Best(x, clean_loss, clean_ok)
    if not bool(eps_t.any()):
        return _result(x.clone(), best, return_steps)

    x_adv = x.clone()
    momentum = torch.zeros_like(x)
    for t in range(steps):
        loss, ok, grad = _loss_and_grad(model, x_adv, y, targeted)
        best.offer(x_adv, loss, ok, t)
        l1_mean = grad.abs().flatten(1).mean(dim=1).clamp_min(_TINY)
        momentum = decay * momentum + grad / _per_sample_view(l1_mean, x)
        x_adv = _project(x, x_adv + alpha_t * momentum.sign(), eps_t, "linf")
    with torch.no_grad():
        loss, ok = _loss_and_success(model(x_adv), y, targeted)
    best.offer(x_adv, loss, ok, steps)
    return _result(best.x if keep == "success" else x_adv, best, return_steps)


ApgdLoss = Literal["ce", "dlr"]
APGD_LOSSES: tuple[str, ...] = get_args(ApgdLoss)

def apgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float | Tensor, norm: str = "linf",
         loss: str = "ce", steps: int = 100, restarts: int = 1, seed: int = 0,
         return_steps: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks"), untargeted, L∞ or L2.

    PGD without a step size to tune: it starts at 2·eps, takes momentum steps
    (``x ← Π(x + α(z − x) + (1 − α)(x − x_prev))``, ``z = Π(x + η·dir(∇))``, α = 0.75), and
    at the checkpoints :func:`apgd_checkpoints` halves a sample's step size — restarting it
    from its best point so far — when fewer than 75% of the steps since the last checkpoint
    raised its loss, or when neither its step size nor its best loss changed since then. The
    loss is the cross-entropy (``"ce"``) or the scale-invariant DLR (``"dlr"``,
    :func:`dlr_loss`), which defeats some gradient masking. Each restart starts at a random
    point on the ball's surface and attacks only the samples not yet fooled. Per sample it
    returns the first iterate that fools the model, else the highest-loss point found (the
    rule for counting success; AutoAttack's).

    Args:
        model: maps [B, ...] in [0, 1] to logits [B, K] (K ≥ 3 for ``"dlr"``).
        x: inputs [B, ...], floating point, in [0, 1]; y: true labels [B].
        eps: ball radius ≥ 0, a float or a per-sample tensor [B].
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"`` or ``"dlr"``.
        steps: iterations per restart, ≥ 1 (AutoAttack uses 100).
        restarts: runs from new random starts for the samples still unbroken, ≥ 1.
        seed: seed of the random starts (reproducible; the global RNG is not touched).
        return_steps: also return the iterations each sample took to first succeed (-1: never).

    Returns:
        ``x_adv`` [B, ...] within ``eps`` of ``x`` in ``norm`` and in [0, 1], detached; with
        ``return_steps``, ``(x_adv, first_success_step [B] int64)``.

    Raises:
        EnsdivError: bad ``eps``, ``norm``, ``loss``, ``steps``, ``restarts``, ``seed``, ``x``
            or ``y``, or ``"dlr"`` on a model with fewer than 3 classes.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(3, 1, 8, 8), torch.tensor([1, 2, 3])
        >>> x_adv = apgd(model, x, y, eps=0.05, loss="dlr", steps=20)
        >>> bool((x_adv - x).abs().max() <= 0.05 + 1e-6)
        True
    """
    check_choice("norm", norm, NORMS)
    check_choice("APGD loss", loss, APGD_LOSSES)
    _check_count("steps", steps)
    _check_count("restarts", restarts)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EnsdivError(f"seed must be an integer >= 0; got {seed!r}")
    eps_t = _check_inputs(model, x, y, eps)
    x = x.detach()

    def score(logits: Tensor, yy: Tensor) -> tuple[Tensor, Tensor]:
        if logits.shape[1] < 3 and loss == "dlr":
            raise EnsdivError(f"the DLR loss needs at least 3 classes; the model has "
                              f"{logits.shape[1]}")
        value = F.cross_entropy(logits, yy, reduction="none") if loss == "ce" \
            else dlr_loss(logits, yy)
        return value, logits.argmax(1) != yy

    with torch.no_grad():
        clean_loss, clean_ok = score(model(x), y)
    best = _Best(x, clean_loss, clean_ok)
    if not bool(eps_t.any()) or x.shape[0] == 0:
        return _result(x.clone(), best, return_steps)
    gen = torch.Generator().manual_seed(seed)
    checkpoints = apgd_checkpoints(steps)
    for r in range(restarts):
        rows = (~best.ok).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        _apgd_run(model, x[rows], y[rows], eps_t[rows], norm, score, steps, checkpoints, gen,
                  best, rows, r * steps)
    return _result(best.x, best, return_steps)


AttackObjective = Callable[[Tensor], tuple[Tensor, Tensor]]
"""``x_adv -> (value [B] to maximize, differentiable; success [B] bool)``."""


def pgd_objective(objective: AttackObjective, x: Tensor, *, eps: float | Tensor,
                  alpha: float | None = None, steps: int = 40, norm: str = "linf",
                  random_start: bool = True, keep: str = "best",
                  generator: torch.Generator | None = None) -> Tensor:
    """PGD on any per-sample objective: the engine of adaptive attacks (an attacker who knows
    the defence writes its loss; Tramèr et al. 2020).

    Same steps as :func:`pgd` (random start, ``alpha`` = 2.5·eps/steps by default, sign or
    normalized ascent, projection, clipping to [0, 1]), ascending ``objective`` instead of the
    cross-entropy. Per sample it keeps, among the points visited (clean input included): with
    ``keep="best"`` the successful one with the highest objective (an adaptive attacker wants
    success *and* the most of its secondary goal, e.g. agreement or a low detector score), with
    ``keep="success"`` the first successful one; else (never successful) the one with the
    highest objective; with ``keep="last"`` the final iterate.

    Args:
        objective: ``x_adv -> (value [B], success [B])``; ``value`` must be differentiable in
            ``x_adv`` and its samples independent (it is summed before the gradient).
        x: [B, ...] in [0, 1]; eps, alpha, steps, norm, random_start, generator: as in
            :func:`pgd`.
        keep: "best", "success" or "last".

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> x = torch.rand(4, 1, 4, 4)
        >>> def push_to_2(xa):
        ...     z = net(xa)
        ...     return z[:, 2] - z[:, :2].amax(1), z.argmax(1) == 2
        >>> x_adv = pgd_objective(push_to_2, x, eps=0.1, steps=5)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    check_choice("norm", norm, NORMS)
    check_choice("keep rule", keep, ("best", *KEEPS))
    _check_count("steps", steps)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise EnsdivError("x must be a floating-point tensor [B, ...]")
    eps_t = _check_eps(eps, x)
    alpha_t = default_step_size("pgd", eps_t, steps) if alpha is None \
        else _check_alpha(alpha, eps_t)
    x = x.detach()

    def value_and_grad(xa: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.enable_grad():
            xa = xa.detach().requires_grad_(True)
            val, ok = objective(xa)
            (grad,) = torch.autograd.grad(val.sum(), xa)
        return val.detach(), ok.detach(), grad

    with torch.no_grad():
        val, ok = objective(x)
    best = _Best(x, val.detach(), ok.detach(), first=keep == "success")
    if not bool(eps_t.any()):
        return x.clone()
    x_adv = _clip01(x + _random_in_ball(x, eps_t, norm, generator)) if random_start \
        else x.clone()
    for t in range(steps):
        val, ok, grad = value_and_grad(x_adv)
        best.offer(x_adv, val, ok, t)
        x_adv = _project(x, _ascent(x_adv, grad, alpha_t, norm), eps_t, norm)
    with torch.no_grad():
        val, ok = objective(x_adv)
    best.offer(x_adv, val.detach(), ok.detach(), steps)
    return x_adv if keep == "last" else best.x


def default_step_size(attack: str, eps: float | Tensor, steps: int) -> float | Tensor:
    """The step size ``alpha`` an attack takes when none is given: ``2.5 * eps / steps`` for
    ``pgd`` (and :func:`pgd_objective`; Madry et al.), ``eps / steps`` for ``mifgsm`` (Dong et
    al.). Records state it beside each attack.

    Example:
        >>> default_step_size("pgd", 0.1, 10), default_step_size("mifgsm", 0.1, 10)
        (0.025, 0.01)
    """
    factor = {"pgd": 2.5, "mifgsm": 1.0}[check_choice("attack", attack, ("pgd", "mifgsm"))]
    return factor * eps / steps


ATTACKS: dict[str, Callable[..., Tensor]] = {"fgsm": fgsm, "pgd": pgd, "mifgsm": mifgsm,
                                             "apgd": apgd}
"""The attacks on any classifier, by name (the member-aware :func:`mora` needs an ensemble and
:func:`square` images, so they are called by their own names)."""


