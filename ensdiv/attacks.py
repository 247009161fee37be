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

from ensdiv.errors import EnsdivError, check_batch, check_choice, check_input

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = get_args(Norm)

Keep = Literal["success", "last"]
"""What an iterative attack returns per sample: the first iterate that succeeds (to count
white-box success) or the full-budget final iterate (to craft examples that transfer)."""
KEEPS: tuple[str, ...] = get_args(Keep)

# Floor for norms we divide by: a zero gradient (or zero perturbation) must give a zero step,
# not NaN.
_TINY = 1e-12


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


class _Best:
    """Per sample, the attack's best point so far and the step at which it first succeeded.

    ``success`` rule: a success is never replaced (the first wins); a failure yields to a
    success or to a higher loss. With ``first=False`` a success yields to a later success with a
    higher loss. ``first_step`` is -1 until the sample succeeds.
    """

    def __init__(self, x: Tensor, loss: Tensor, ok: Tensor, *, first: bool = True) -> None:
        self.x, self.loss, self.ok = x.clone(), loss.clone(), ok.clone()
        self.first_step = torch.where(ok, 0, -1)
        self.first = first  # False: among successes too, the higher loss wins

    def offer(self, x_cand: Tensor, loss: Tensor, ok: Tensor, step: int,
              rows: Tensor | None = None) -> None:
        """Score candidates (for the samples ``rows`` if given) found after ``step`` steps."""
        idx = slice(None) if rows is None else rows
        best_ok, best_loss = self.ok[idx], self.loss[idx]
        if self.first:
            better = ~best_ok & (ok | (loss > best_loss))
        else:
            better = (ok & ~best_ok) | ((ok == best_ok) & (loss > best_loss))
        view = _per_sample_view(better, x_cand)
        self.x[idx] = torch.where(view, x_cand, self.x[idx])
        self.loss[idx] = torch.where(better, loss, best_loss)
        first = self.first_step[idx]
        self.first_step[idx] = torch.where(ok & (first < 0), step, first)
        self.ok[idx] = best_ok | ok


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

_APGD_MOMENTUM = 0.75  # α in Croce & Hein (2020), Eq. 2
_APGD_RHO = 0.75  # ρ: the share of improving steps below which the step size is halved


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step size (Croce & Hein 2020, §3.2):
    ``w_j = ceil(p_j · steps)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``.

    Example:
        >>> apgd_checkpoints(100)
        [22, 41, 57, 70, 80, 87, 93, 99]
    """
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    out = sorted({math.ceil(q * steps - 1e-9) for q in p[1:]})
    return [w for w in out if 0 < w <= steps]


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020), per sample, higher = closer to fooled:
    ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3)`` with ``z_π`` the logits sorted descending.
    Invariant to shifting and scaling the logits; needs K ≥ 3 classes.

    Example:
        >>> dlr_loss(torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0]))
        tensor([-0.6667])
    """
    top = logits.topk(3, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -math.inf).amax(1)
    return -(z_y - others) / (top[:, 0] - top[:, 2] + _TINY)


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


def _apgd_run(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, norm: str,
              score: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], steps: int,
              checkpoints: list[int], gen: torch.Generator, best: _Best, rows: Tensor,
              offset: int) -> None:
    """One APGD run from a random start, reporting every iterate to ``best`` (for ``rows``)."""

    def evaluate(point: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.enable_grad():
            point = point.detach().requires_grad_(True)
            value, ok = score(model(point), y)
            (grad,) = torch.autograd.grad(value.sum(), point)
        return value.detach(), ok, grad

    start = _rand_like(x, gen, normal=norm == "l2")
    if norm == "linf":  # a random point on the surface (AutoAttack's start)
        start = 2 * start - 1
        start = start / start.flatten(1).abs().amax(1).clamp_min(_TINY).view_as(eps)
    else:
        start = start / _l2(start).clamp_min(_TINY)
    x_cur = _clip01(x + eps * start)
    f_cur, ok, g = evaluate(x_cur)
    best.offer(x_cur, f_cur, ok, offset, rows)
    x_max, f_max, g_max = x_cur.clone(), f_cur.clone(), g.clone()
    eta = 2 * eps
    x_prev = x_cur
    rises = torch.zeros_like(f_cur)
    eta_ckpt, f_max_ckpt, last_ckpt = eta.clone(), f_max.clone(), 0
    for k in range(steps):
        z = _project(x, _ascent(x_cur, g, eta, norm), eps, norm)
        a = 1.0 if k == 0 else _APGD_MOMENTUM
        x_new = _project(x, x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), eps, norm)
        f_new, ok, g_new = evaluate(x_new)
        best.offer(x_new, f_new, ok, offset + k + 1, rows)
        rises += (f_new > f_cur).to(rises.dtype)
        up = f_new > f_max
        x_max = torch.where(_per_sample_view(up, x), x_new, x_max)
        g_max = torch.where(_per_sample_view(up, x), g_new, g_max)
        f_max = torch.where(up, f_new, f_max)
        x_prev, x_cur, f_cur, g = x_cur, x_new, f_new, g_new
        if k + 1 in checkpoints:
            stalled = rises < _APGD_RHO * (k + 1 - last_ckpt)
            stuck = (eta_ckpt.flatten() == eta.flatten()) & (f_max_ckpt == f_max)
            halve = stalled | stuck
            view = _per_sample_view(halve, x)
            eta = torch.where(view, eta / 2, eta)
            # restart the halved samples from their best point, without momentum
            x_cur = torch.where(view, x_max, x_cur)
            x_prev = torch.where(view, x_max, x_prev)
            g = torch.where(view, g_max, g)
            f_cur = torch.where(halve, f_max, f_cur)
            rises.zero_()
            eta_ckpt, f_max_ckpt, last_ckpt = eta.clone(), f_max.clone(), k + 1


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


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EnsdivError(f"{name} must be an integer >= 1; got {value!r}")


def _check_alpha(alpha: float, eps: Tensor) -> Tensor:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
            math.isfinite(alpha) and alpha > 0):
        raise EnsdivError(f"alpha (step size) must be a finite number > 0; got {alpha!r}")
    return torch.full_like(eps, float(alpha))


def _check_inputs(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> Tensor:
    """Validate ``x``, ``y`` (against the model's declared input shape and dtype, and one
    forward pass) and ``eps``; return eps as [B, 1, ...]."""
    if not isinstance(model, nn.Module):
        raise EnsdivError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    check_input(model, x, y)
    b = x.shape[0]
    eps_t = _check_eps(eps, x)
    if b > 0:
        with torch.no_grad():
            logits = model(x.detach())
        if logits.ndim != 2 or logits.shape[0] != b:
            raise EnsdivError(f"the model must return logits of shape ({b}, K); got "
                              f"{tuple(logits.shape)}")
        check_batch(x, y, num_classes=logits.shape[1])
    return eps_t


def _check_eps(eps: float | Tensor, x: Tensor) -> Tensor:
    b = x.shape[0]
    if isinstance(eps, Tensor):
        if eps.is_complex() or eps.dtype == torch.bool or eps.ndim > 1 or (
                eps.ndim == 1 and eps.shape[0] != b):
            raise EnsdivError(f"eps must be a number or a real tensor of shape ({b},); got "
                              f"eps of dtype {eps.dtype} and shape {tuple(eps.shape)}")
        eps_t = eps.detach().to(device=x.device, dtype=x.dtype).expand(b)
    elif isinstance(eps, (int, float)) and not isinstance(eps, bool):
        eps_t = torch.full((b,), float(eps), dtype=x.dtype, device=x.device)
    else:
        raise EnsdivError(f"eps must be a number or a tensor of shape ({b},); got {eps!r}")
    if not bool((torch.isfinite(eps_t) & (eps_t >= 0)).all()):
        raise EnsdivError(f"eps must be finite and >= 0; got {eps!r}")
    return _per_sample_view(eps_t, x)


def _per_sample_view(v: Tensor, x: Tensor) -> Tensor:
    """Reshape [B] to [B, 1, ..., 1] so it broadcasts over x's non-batch dims."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _l2(v: Tensor) -> Tensor:
    """Per-sample L2 norm of [B, ...] as [B, 1, ..., 1]."""
    return _per_sample_view(v.flatten(1).norm(dim=1), v)


def _clip01(x: Tensor) -> Tensor:
    return x.clamp(0.0, 1.0).detach()


def _loss_and_success(logits: Tensor, y: Tensor, targeted: bool) -> tuple[Tensor, Tensor]:
    """Per-sample attack loss (higher is better for the attacker) and success, both [B]."""
    ce = F.cross_entropy(logits, y, reduction="none")
    hit = logits.argmax(dim=1) == y
    return (-ce, hit) if targeted else (ce, ~hit)


def _loss_and_grad(model: nn.Module, x: Tensor, y: Tensor,
                   targeted: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Attack loss [B], success [B] and input gradient of the loss at ``x``."""
    # enable_grad: the attack must work when the caller evaluates under torch.no_grad().
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss, ok = _loss_and_success(model(x), y, targeted)
        # The batch-summed loss has per-sample gradients (samples do not interact), and
        # autograd.grad w.r.t. x only leaves parameters' .grad untouched.
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), ok, grad


def _rand_like(x: Tensor, generator: torch.Generator | None, *, normal: bool = False,
               shape: tuple[int, ...] | None = None) -> Tensor:
    """Uniform [0, 1) (or standard normal) numbers shaped like ``x`` (or ``shape``), drawn on the
    generator's device and moved to ``x``'s, so a CPU generator serves a GPU attack."""
    shape = tuple(x.shape) if shape is None else shape
    dev = generator.device if generator is not None else x.device
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, dtype=x.dtype, device=dev).to(x.device)


def _random_in_ball(x: Tensor, eps: Tensor, norm: str,
                    generator: torch.Generator | None) -> Tensor:
    """A uniform random point of the eps ball (per sample) in the given norm, shaped like x."""
    if norm == "linf":
        return (2 * _rand_like(x, generator) - 1) * eps
    direction = _rand_like(x, generator, normal=True)
    direction = direction / _l2(direction).clamp_min(_TINY)
    d = x[0].numel()
    # Radius ~ eps * U^(1/d) makes the point uniform in the volume, not just on the sphere.
    u = _rand_like(x, generator, shape=(x.shape[0],))
    return direction * _per_sample_view(u ** (1.0 / d), x) * eps


def _ascent(x: Tensor, grad: Tensor, step: Tensor, norm: str) -> Tensor:
    """One step of size ``step`` up the gradient: its sign (L∞) or direction (L2)."""
    if norm == "linf":
        return x + step * grad.sign()
    return x + step * grad / _l2(grad).clamp_min(_TINY)


def _project(x: Tensor, x_new: Tensor, eps: Tensor, norm: str) -> Tensor:
    """``x_new`` moved into the eps ball around ``x``, then clipped to [0, 1] (clipping after
    projecting only shrinks each coordinate of the perturbation: it stays in the ball)."""
    delta = x_new - x
    if norm == "linf":
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    else:
        delta = delta * torch.clamp(eps / _l2(delta).clamp_min(_TINY), max=1.0)
    return _clip01(x + delta)


def _result(x_adv: Tensor, best: _Best,
            return_steps: bool) -> Tensor | tuple[Tensor, Tensor]:
    return (x_adv, best.first_step) if return_steps else x_adv
