"""The machinery the attacks share: argument checks, the ball geometry (projection, ascent,
random starts), the per-sample record of the best point (:class:`_Best`) and the APGD loop.

Private to :mod:`ensdiv.attacks`, :mod:`ensdiv._mora` and :mod:`ensdiv._square`; users import
the attacks, ``apgd_checkpoints`` and ``dlr_loss`` from :mod:`ensdiv.attacks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ensdiv.errors import EnsdivError, check_batch, check_input

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = get_args(Norm)

Keep = Literal["success", "last"]
"""What an iterative attack returns per sample: the first iterate that succeeds (to count
white-box success) or the full-budget final iterate (to craft examples that transfer)."""
KEEPS: tuple[str, ...] = get_args(Keep)

# Floor for norms we divide by: a zero gradient (or zero perturbation) must give a zero step,
# not NaN.
_TINY = 1e-12


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


def _apgd_run(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps: Tensor, norm: str,
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
