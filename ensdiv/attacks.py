"""White-box evasion attacks on any module that maps inputs in [0, 1] to logits.

Three gradient attacks, written as pure functions so the same code attacks a single member, an
:class:`~ensdiv.ensemble.Ensemble` (whose ``forward`` returns log-mean-softmax, usable as logits)
or any other classifier:

- :func:`fgsm` — Fast Gradient Sign Method (Goodfellow et al. 2015), one L∞ step;
- :func:`pgd` — Projected Gradient Descent (Madry et al. 2018), L∞ or L2, random restarts;
- :func:`mifgsm` — Momentum Iterative FGSM (Dong et al. 2018), L∞.

Contract shared by all three: ``x`` is [B, ...] in [0, 1], ``y`` is integer [B] (the true label,
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


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float | Tensor,
        alpha: float | None = None, steps: int = 10, norm: str = "linf",
        random_start: bool = True, restarts: int = 1, targeted: bool = False,
        generator: torch.Generator | None = None) -> Tensor:
    """Projected Gradient Descent (Madry et al. 2018) in the L∞ or L2 ball, with restarts.

    Each restart starts at ``x`` plus a uniform random point of the ball (``random_start``)
    and takes ``steps`` ascent steps on the cross-entropy — ``alpha * sign(g)`` for L∞,
    ``alpha * g / ‖g‖₂`` for L2 — each followed by projection onto the ball and clipping to
    [0, 1]. The clean ``x`` and every iterate (start and end points included) of every restart
    are scored, and per sample the best is returned: the first one that succeeds (misclassified,
    or classified as the target when ``targeted``), else the one with the highest attack loss.
    So ``restarts`` and extra ``steps`` never make the result weaker on the attacked model, and
    a sample that already succeeds on the clean input is returned unchanged.

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
        restarts: independent runs, ≥ 1; the best per sample is kept.
        targeted: minimize the cross-entropy toward ``y`` instead of maximizing it.
        generator: source of the random starts (reproducible runs); default the global RNG.

    Returns:
        ``x_adv`` [B, ...], same dtype as ``x``, detached, within ``eps`` of ``x`` in ``norm``,
        in [0, 1].

    Raises:
        EnsdivError: bad ``eps``, ``alpha``, ``steps``, ``restarts``, ``norm``, ``x`` or ``y``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(3, 1, 8, 8), torch.tensor([1, 2, 3])
        >>> g = torch.Generator().manual_seed(0)
        >>> x_adv = pgd(model, x, y, eps=0.5, norm="l2", restarts=2, generator=g)
        >>> bool((x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5)
        True
    """
    check_choice("norm", norm, NORMS)
    _check_count("steps", steps)
    _check_count("restarts", restarts)
    eps_t = _check_inputs(model, x, y, eps)
    alpha_t = 2.5 * eps_t / steps if alpha is None else _check_alpha(alpha, eps_t)
    x = x.detach()
    if not bool(eps_t.any()):
        return x.clone()

    with torch.no_grad():
        best_loss, best_ok = _loss_and_success(model(x), y, targeted)
    best = x.clone()

    def keep_better(x_cand: Tensor, loss: Tensor, ok: Tensor) -> None:
        nonlocal best_loss, best_ok
        # A success is never replaced (first one wins); a failure yields to a success or to a
        # higher loss.
        better = ~best_ok & (ok | (loss > best_loss))
        best.copy_(torch.where(_per_sample_view(better, x), x_cand, best))
        best_loss = torch.where(better, loss, best_loss)
        best_ok = best_ok | ok

    for _ in range(restarts if random_start else 1):
        if random_start:
            x_adv = _clip01(x + _random_in_ball(x, eps_t, norm, generator))
        else:
            x_adv = x.clone()
        for _ in range(steps):
            loss, ok, grad = _loss_and_grad(model, x_adv, y, targeted)
            keep_better(x_adv, loss, ok)
            if norm == "linf":
                x_adv = x_adv + alpha_t * grad.sign()
                delta = torch.maximum(torch.minimum(x_adv - x, eps_t), -eps_t)
            else:
                x_adv = x_adv + alpha_t * grad / _l2(grad).clamp_min(_TINY)
                delta = x_adv - x
                delta = delta * torch.clamp(eps_t / _l2(delta).clamp_min(_TINY), max=1.0)
            # Clipping after projecting only shrinks |delta| coordinate-wise: still in the ball.
            x_adv = _clip01(x + delta)
        with torch.no_grad():
            loss, ok = _loss_and_success(model(x_adv), y, targeted)
        keep_better(x_adv, loss, ok)
        if bool(best_ok.all()):
            break
    return best


def mifgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float | Tensor,
           alpha: float | None = None, steps: int = 10, decay: float = 1.0,
           targeted: bool = False) -> Tensor:
    """Momentum Iterative FGSM (Dong et al. 2018), L∞.

    ``g ← decay * g + ∇ / mean|∇|`` (the gradient normalized by its per-sample L1 mean),
    ``x ← clip(Π_eps(x + alpha * sign(g)), 0, 1)``, for ``steps`` steps from ``x`` itself.
    The final iterate is returned, as in the paper: MI-FGSM is meant for transfer, where
    stopping at the first success on the source model would only weaken the example.

    Args:
        model: maps [B, ...] in [0, 1] to logits [B, K].
        x: inputs [B, ...], floating point, in [0, 1].
        y: integer labels [B] in [0, K) — true labels, or targets when ``targeted``.
        eps: L∞ radius ≥ 0, a float or a per-sample tensor [B].
        alpha: step size > 0; default ``eps / steps`` (the paper's choice).
        steps: number of iterations, ≥ 1.
        decay: momentum decay factor μ ≥ 0 (``0`` gives I-FGSM).
        targeted: minimize the cross-entropy toward ``y`` instead of maximizing it.

    Returns:
        ``x_adv`` [B, ...], same dtype as ``x``, detached, ``|x_adv - x|∞ ≤ eps``, in [0, 1].

    Raises:
        EnsdivError: bad ``eps``, ``alpha``, ``steps``, ``decay``, ``x`` or ``y``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(3, 1, 8, 8), torch.tensor([1, 2, 3])
        >>> x_adv = mifgsm(model, x, y, eps=0.05, steps=5)
        >>> bool((x_adv - x).abs().max() <= 0.05 + 1e-6)
        True
    """
    _check_count("steps", steps)
    if not (isinstance(decay, (int, float)) and math.isfinite(decay) and decay >= 0):
        raise EnsdivError(f"decay must be a finite number >= 0; got {decay!r}")
    eps_t = _check_inputs(model, x, y, eps)
    alpha_t = eps_t / steps if alpha is None else _check_alpha(alpha, eps_t)
    x = x.detach()
    if not bool(eps_t.any()):
        return x.clone()

    x_adv = x.clone()
    momentum = torch.zeros_like(x)
    for _ in range(steps):
        _, _, grad = _loss_and_grad(model, x_adv, y, targeted)
        l1_mean = grad.abs().flatten(1).mean(dim=1).clamp_min(_TINY)
        momentum = decay * momentum + grad / _per_sample_view(l1_mean, x)
        x_adv = x_adv + alpha_t * momentum.sign()
        x_adv = _clip01(x + torch.maximum(torch.minimum(x_adv - x, eps_t), -eps_t))
    return x_adv


ATTACKS: dict[str, Callable[..., Tensor]] = {"fgsm": fgsm, "pgd": pgd, "mifgsm": mifgsm}


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


def _random_in_ball(x: Tensor, eps: Tensor, norm: str,
                    generator: torch.Generator | None) -> Tensor:
    """A uniform random point of the eps ball (per sample) in the given norm, shaped like x."""
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return (2 * u - 1) * eps
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    direction = direction / _l2(direction).clamp_min(_TINY)
    d = x[0].numel()
    # Radius ~ eps * U^(1/d) makes the point uniform in the volume, not just on the sphere.
    u = torch.rand((x.shape[0],), generator=generator, dtype=x.dtype, device=x.device)
    return direction * _per_sample_view(u ** (1.0 / d), x) * eps
