"""The Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search"), L∞, untargeted.

Private: users import :func:`square` from :mod:`ensdiv.attacks` (or ``ensdiv.square``).

It never looks at a gradient, only at the model's scores, so it is the gradient-masking check of
AutoAttack: if Square fools inputs that the white-box attacks could not, the gradients lie.

Random search on the margin ``z_y − max_{k≠y} z_k``: start from vertical stripes of ±ε (one
sign per column and channel), then, per query, overwrite one random square window of the
perturbation with ±ε (one sign per channel; the official ``2ε`` step, clipped back into the
ball) and keep it if the margin fell. The window's side follows the paper's schedule:
``s = round(sqrt(p·H·W))`` with ``p`` halved at iterations 10, 50, 200, 500, 1000, 2000, 4000,
6000, 8000 of a 10,000-query budget (rescaled to ``queries``), from ``p_init`` = 0.8.
An input stops being attacked once it is fooled (argmax ≠ y).

Where ensdiv follows and departs from the authors' code and torchattacks' port: same loss,
start, step and ``p`` schedule; each input draws its own window position (their code draws one
per iteration for the whole batch — same distribution per input, independent across inputs) and
the window's corner ranges over every position, ``0 … H − s`` (theirs draws ``randint(0, H − s)``,
which stops one short, so the last row and column are only ever perturbed by the start: on
sklearn's 8×8 digits at ε = 0.1 and 300 queries that makes ensdiv's Square fool 38–40% of an MLP's
inputs against torchattacks' 28–31%, and 31% with their range — ``tests/test_square.py``); no
re-draw of windows that would not change the point (the official code re-draws; torchattacks
does not). Only L∞: the L2 variant's nested-square update is not implemented.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    >>> x_adv = square(model, x, y, eps=0.1, queries=50)
    >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ensdiv._attack_core import _check_count, _check_inputs, _clip01
from ensdiv.errors import EnsdivError

SQUARE_P_SCHEDULE: tuple[tuple[int, int], ...] = (
    (10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
    (8000, 256))
"""``(iteration of a 10,000-query run, divisor of p_init from the next iteration on)``."""


def square_p(it: int, queries: int, p_init: float = 0.8) -> float:
    """The share ``p`` of pixels the square covers at iteration ``it`` of ``queries``.

    Example:
        >>> square_p(0, 10000), square_p(11, 10000), square_p(9000, 10000)
        (0.8, 0.4, 0.0015625)
    """
    scaled = int(it / queries * 10000)
    divisor = 1
    for start, d in SQUARE_P_SCHEDULE:
        if scaled > start:
            divisor = 2 * d
    return p_init / divisor


def square(model: nn.Module, x: Tensor, y: Tensor, *, eps: float | Tensor, norm: str = "linf",
           queries: int = 5000, p_init: float = 0.8, seed: int = 0,
           return_queries: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Score-based Square attack, L∞ (Andriushchenko et al. 2020).

    Args:
        model: maps [B, C, H, W] in [0, 1] to scores [B, K]; only its outputs are used.
        x: images [B, C, H, W] in [0, 1]; y: true labels [B].
        eps: ball radius ≥ 0, a float or a per-sample tensor [B].
        norm: ``"linf"`` (the only one implemented).
        queries: model queries per input, ≥ 1 (the start counts as one, the look at the clean
            input is free; AutoAttack: 5000).
        p_init: the first iterations' share of pixels per square, in (0, 1].
        seed: seed of the random search (the global RNG is not touched).
        return_queries: also return the number of queries each input took to fall (0: it was
            misclassified already; -1: never).

    Returns:
        ``x_adv`` [B, C, H, W] within ``eps`` of ``x`` (L∞) and in [0, 1], detached: the fooling
        point, else the lowest-margin point found; with ``return_queries`` also [B] int64.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
        >>> _, q = square(model, x, y, eps=0.5, queries=100, return_queries=True)
        >>> q.shape
        torch.Size([2])
    """
    if norm != "linf":
        raise EnsdivError(f"square supports norm 'linf' only; got {norm!r}")
    _check_count("queries", queries)
    if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) \
            or not (0 < p_init <= 1):
        raise EnsdivError(f"p_init must be a number in (0, 1]; got {p_init!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EnsdivError(f"seed must be an integer >= 0; got {seed!r}")
    if isinstance(x, Tensor) and x.ndim != 4:
        raise EnsdivError(f"square attacks images [B, C, H, W]; got x of shape "
                          f"{tuple(x.shape)}")
    eps_t = _check_inputs(model, x, y, eps)
    x = x.detach()
    b, c, h, w = x.shape
    used = torch.full((b,), -1, dtype=torch.int64, device=x.device)
    if b == 0 or not bool(eps_t.any()):
        return (x.clone(), used) if return_queries else x.clone()
    gen = torch.Generator().manual_seed(seed)

    def signs(*shape: int) -> Tensor:
        return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(x.device, x.dtype)

    @torch.no_grad()
    def margin(point: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        z = model(point)
        z_y = z.gather(1, labels[:, None]).squeeze(1)
        others = z.scatter(1, labels[:, None], -math.inf).amax(1)
        return z_y - others, z.argmax(1) != labels

    _, fooled = margin(x, y)  # an input already misclassified is left as it is
    used[fooled] = 0
    start = _clip01(x + eps_t * signs(b, c, 1, w))
    x_best = torch.where(fooled[:, None, None, None], x, start)
    m_best, now = margin(x_best, y)
    used[now & ~fooled] = 1
    fooled |= now
    rows_h = torch.arange(h, device=x.device)
    rows_w = torch.arange(w, device=x.device)
    for it in range(queries - 1):
        active = (~fooled).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        n = active.numel()
        side = max(int(round(math.sqrt(square_p(it, queries, p_init) * h * w))), 1)
        side = min(side, h, w)
        top = torch.randint(0, h - side + 1, (n,), generator=gen).to(x.device)
        left = torch.randint(0, w - side + 1, (n,), generator=gen).to(x.device)
        in_h = (rows_h[None] >= top[:, None]) & (rows_h[None] < top[:, None] + side)
        in_w = (rows_w[None] >= left[:, None]) & (rows_w[None] < left[:, None] + side)
        window = (in_h[:, :, None] & in_w[:, None, :])[:, None]  # [n, 1, H, W]
        xa, ea = x[active], eps_t[active]
        step = 2 * ea * signs(n, c, 1, 1)
        cand = x_best[active] + window.to(x.dtype) * step
        cand = _clip01(torch.maximum(torch.minimum(cand, xa + ea), xa - ea))
        m_new, ok = margin(cand, y[active])
        better = (m_new < m_best[active]) | ok
        keep = active[better]
        x_best[keep] = cand[better]
        m_best[keep] = m_new[better]
        newly = active[ok]
        fooled[newly] = True
        used[newly] = it + 2
    return (x_best, used) if return_queries else x_best
