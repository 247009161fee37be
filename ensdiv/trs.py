"""TRS: Transferability Reduced Smooth ensembles (Yang, Li, Xu, Kailkhura, Xie, Gunter & Li,
"TRS: Transferability Reduced Ensemble via Promoting Gradient Diversity and Model Smoothness",
NeurIPS 2021).

With g_i(x) = ∇ₓ CE(f_i(x), y) each member's per-sample input gradient:

    L = Σ_i mean_b CE(f_i(x_b), y_b) + λ_a · S + λ_b · R
    S = mean over pairs i < j and samples b of |cos(g_i(x_b), g_j(x_b))|     (similarity)
    R = mean over members i and points b of ‖g_i(x'_b)‖²₂                     (smoothness)

S is zero when the members' gradients are orthogonal — unlike GAL's smooth maximum it does not
reward opposite gradients, which the authors show keep transfer high — and R bounds how far a
small step can move a member's loss (their bound on transferability needs smooth members).
The points x' of R are the clean batch or, in the paper's "vanilla TRS" schedule (their
``--plus-adv``), its first half clean and its second half moved by a short PGD that *maximises*
the members' mean squared gradient norm inside an L∞ ball (6 sign steps of ε/3, random start),
ε growing linearly over the epochs from ``eps_start`` (default ε/2) to ``eps``. Both terms go
through ensdiv's batched input gradients with the graph kept (double backprop); the PGD needs a
third order of differentiation only with respect to the input.

Where ensdiv follows or departs from the authors' code (``AI-secure/Transferability-Reduced-
Smooth-Ensemble``, ``train/Empirical/trainer.py``):

- S as theirs (mean over pairs of the batch-mean |cos|), for any M ≥ 2 (theirs: M = 3 only).
- R as their code computes it — the *squared* norm (the paper writes the norm), averaged over
  members — but of **per-sample** gradients: their gradient is that of the batch-*mean* CE, so
  their term is 2/B² times ensdiv's and their λ_b depends on the batch size. ensdiv's default
  λ_b = 2·scale·λ / 128² = 1.22e-3 is their code's default (scale 5, λ 2) at their batch of 128;
  λ_a = scale·coeff = 10 is their default too. The PGD maximises the same quantity (their sign
  steps do not see the 1/B² factor).
- The PGD points are computed only for the second half of the batch and their gradients joined
  to the clean half's (theirs recomputes the clean half: the same numbers).
- Each PGD sign step follows the gradient at the current point. The authors' loop never
  clears ``adv.grad`` between steps, so their step follows the running sum of every gradient
  so far; ensdiv keeps the textbook step and says so here.
- ``TRS_LAM``, ``TRS_SMOOTH`` and ``TRS_EPS`` are their *script's* argparse defaults (flags it
  marks required, so never used as such); the CIFAR-10 values a maintainer gave in the
  repository's issue #1 (λ_a 40, λ_b 2.5, radius 0.01 → 0.03) are the ``trs-cifar10`` recipe
  (:mod:`ensdiv.recipes`; ``--trs-eps-start`` sets the first epoch's radius).
- The schedule uses the 1-based epoch e of ``epochs``: ε_e = eps_start + (eps − eps_start)·(e −
  1)/epochs, theirs with their 0-based epoch. ``eps=0`` evaluates R at the clean batch only.

Example:
    >>> import torch
    >>> from ensdiv.ensemble import Ensemble
    >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=0)
    >>> loss, stats = trs_loss(ens, torch.rand(4, 1, 8, 8), torch.arange(4), eps=0.0)
    >>> loss.backward(); sorted(stats)
    ['ce_0', 'ce_1', 'ce_2', 'reg', 'train_cos', 'trs_similarity', 'trs_smoothness']
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ensdiv.diversity import _check_grads, _pairs, cosine_loss, pairwise_cosine
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_int, check_real
from ensdiv.gradients import members_grad_and_value

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import TRS_LAM as TRS_LAM

TRS_SMOOTH = 2 * 5.0 * 2.0 / 128**2
"""λ_b, the weight of the smoothness in ensdiv's per-sample units: the authors' code default
(scale 5 · λ 2 on 2·‖∇ of the batch-mean CE‖²) at their batch size 128."""
TRS_EPS = 0.2
"""Final L∞ radius of the smoothness points (the authors' ``--adv-eps``)."""
TRS_EPS_START_RATIO = 0.5
"""Radius at the first epoch as a share of the final one (the authors' ``--init-eps`` 0.1 of
``--adv-eps`` 0.2)."""
TRS_STEPS = 6
"""Sign steps of the smoothness PGD, each of size ε/3 (the authors')."""


def check_trs(*, lam: float, smooth: float, eps: float, eps_start: float | None = None,
              steps: int = TRS_STEPS) -> None:
    """Raise one :class:`EnsdivError` line for a bad TRS hyper-parameter."""
    check_real("lam", lam, minimum=0)
    check_real("TRS smoothness weight", smooth, minimum=0)
    for name, value in (("TRS eps", eps), ("TRS eps start", eps_start)):
        if value is not None:
            check_real(name, value, minimum=0)
            if value > 1:
                raise EnsdivError(f"{name} must be at most 1 (pixels are in [0, 1]); "
                                  f"got {value:g}")
    if eps_start is not None and eps_start > eps:
        raise EnsdivError(f"TRS eps start {eps_start:g} is larger than TRS eps {eps:g}: the "
                          "radius grows over the epochs")
    check_int("TRS steps", steps)


def similarity(grads: Tensor) -> Tensor:
    """TRS's S: the mean over member pairs and samples of |cos| between input gradients.

    Args:
        grads: ``[M, B, *features]``, M ≥ 2.

    Example:
        >>> g = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]]])  # cos 0, -1, 0
        >>> similarity(g)
        tensor(0.3333)
    """
    _check_grads(grads)
    return _pairs(pairwise_cosine(grads)).abs().mean()


def smoothness(grads: Tensor) -> Tensor:
    """TRS's R: the mean over members and samples of the squared L2 norm of the gradient.

    Example:
        >>> smoothness(torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]]))  # (25 + 1) / 2
        tensor(13.)
    """
    if grads.dim() < 2:
        raise EnsdivError(f"grads must have shape [M, B, ...]; got shape {tuple(grads.shape)}")
    return grads.flatten(2).pow(2).sum(-1).mean()


def smoothness_pgd(ensemble: Ensemble, x: Tensor, y: Tensor, *, eps: float,
                   steps: int = TRS_STEPS, alpha: float | None = None) -> Tensor:
    """The points where TRS measures smoothness: an L∞ PGD from a uniform random start that
    *maximises* the members' mean squared input-gradient norm (:func:`smoothness`) within
    radius ``eps`` of ``x`` and [0, 1]; ``steps`` sign steps of ``alpha`` (default ε/3).
    Random start from the global RNG. Returns the points [B, C, H, W], detached.

    Example:
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
        >>> x = torch.rand(3, 1, 8, 8)
        >>> z = smoothness_pgd(ens, x, torch.arange(3), eps=0.1, steps=2)
        >>> bool((z - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    alpha = eps / 3 if alpha is None else alpha
    x0 = x.detach()
    z = (x0 + torch.empty_like(x0).uniform_(-eps, eps)).clamp(0.0, 1.0)
    for _ in range(steps):
        z.requires_grad_(True)
        with torch.enable_grad():
            total = z.new_zeros(())
            for member in ensemble.members:
                ce = F.cross_entropy(member(z), y, reduction="sum")
                (g,) = torch.autograd.grad(ce, z, create_graph=True)
                total = total + g.pow(2).sum()
            (step,) = torch.autograd.grad(total, z)
        with torch.no_grad():
            z = z.detach() + alpha * step.sign()
            z = torch.min(torch.max(z, x0 - eps), x0 + eps).clamp_(0.0, 1.0)
    return z.detach()


def trs_loss(ensemble: Ensemble, x: Tensor, y: Tensor, *, lam: float = TRS_LAM,
             smooth: float = TRS_SMOOTH, eps: float = 0.0, steps: int = TRS_STEPS,
             ce_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The TRS objective on a batch (see the module docstring): inputs ``x`` [B, C, H, W] in
    [0, 1], labels ``y`` [B]; ``eps`` > 0 evaluates the smoothness on the clean first half and
    the :func:`smoothness_pgd` points of the second half (radius ``eps``).

    Returns:
        ``(loss, stats)``: ``ce_i``, ``trs_similarity`` (S), ``trs_smoothness`` (R), ``reg``
        (λ_a·S + λ_b·R) and ``train_cos`` (the mean signed pairwise cosine, as the other
        regularizers report it).

    Example:
        >>> ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
        >>> loss, stats = trs_loss(ens, torch.rand(4, 1, 8, 8), torch.arange(4), eps=0.1,
        ...                        steps=1)
        >>> loss.backward()
    """
    if ensemble.num_members < 2:
        raise EnsdivError(f"TRS needs at least 2 members; got {ensemble.num_members}")
    check_trs(lam=lam, smooth=smooth, eps=eps, steps=steps)
    grads, ce_sums = members_grad_and_value(ensemble, x, y, mode="loss", create_graph=True)
    ce = ce_sums / x.shape[0]
    sim = similarity(grads)
    if eps > 0 and x.shape[0] >= 2:
        half = x.shape[0] // 2
        points = smoothness_pgd(ensemble, x[half:], y[half:], eps=eps, steps=steps)
        moved, _ = members_grad_and_value(ensemble, points, y[half:], mode="loss",
                                          create_graph=True)
        smooth_term = smoothness(torch.cat([grads[:, :half], moved], dim=1))
    else:
        smooth_term = smoothness(grads)
    reg = lam * sim + smooth * smooth_term
    loss = ce_weight * ce.sum() + reg
    stats = {f"ce_{i}": v for i, v in enumerate(ce.detach())}
    stats.update(reg=reg.detach(), trs_similarity=sim.detach(),
                 trs_smoothness=smooth_term.detach(), train_cos=cosine_loss(grads.detach()))
    return loss, stats


def trs_radius(epoch: int, epochs: int, *, eps: float = TRS_EPS,
               eps_start: float | None = None) -> float:
    """The smoothness radius of 1-based ``epoch`` of ``epochs``: linear from ``eps_start``
    (default half of ``eps``, the authors' ratio) towards ``eps``.

    Example:
        >>> [round(trs_radius(e, 4), 3) for e in (1, 2, 3, 4)]
        [0.1, 0.125, 0.15, 0.175]
    """
    start = TRS_EPS_START_RATIO * eps if eps_start is None else eps_start
    return start + (eps - start) * (epoch - 1) / epochs


class TrsLoss:
    """TRS as a :data:`ensdiv.loop.LossFn` with the "vanilla TRS" radius schedule: the loop calls
    :meth:`set_epoch` before each epoch and the radius follows :func:`trs_radius` (``eps`` = 0:
    smoothness at the clean batch only).

    Example:
        >>> loss_fn = TrsLoss(eps=0.2)  # from 0.1
        >>> loss_fn.set_epoch(2, 2); round(loss_fn.radius, 3)
        0.15
    """

    def __init__(self, *, lam: float = TRS_LAM, smooth: float = TRS_SMOOTH,
                 eps: float = TRS_EPS, eps_start: float | None = None,
                 steps: int = TRS_STEPS) -> None:
        check_trs(lam=lam, smooth=smooth, eps=eps, eps_start=eps_start, steps=steps)
        self.lam, self.smooth, self.eps, self.eps_start, self.steps = (lam, smooth, eps,
                                                                      eps_start, steps)
        self.radius = trs_radius(1, 1, eps=eps, eps_start=eps_start)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the loop before ``epoch`` (1-based) of ``epochs``."""
        self.radius = trs_radius(epoch, epochs, eps=self.eps, eps_start=self.eps_start)

    def __call__(self, ensemble: Ensemble, x: Tensor,
                 y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, stats = trs_loss(ensemble, x, y, lam=self.lam, smooth=self.smooth,
                               eps=self.radius, steps=self.steps)
        stats["trs_radius"] = torch.tensor(self.radius)
        return loss, stats
