"""Training objectives for :func:`ensdiv.train.fit`: summed cross-entropy, plus a diversity term.

``ensemble_loss`` is the whole objective of gradient-diversity training:

    L = Σ_m mean_b CE(f_m(x_b), y_b) + λ · R(g),   g[m, b] = ∇ₓ CE(f_m(x_b), y_b)

with R one of ``cos`` (mean pairwise cosine), ``gal`` (Kariyappa & Qureshi 2019) or ``gdr``
(a differentiable Gradient Diversity Rating, Adam & Speciel 2020). The cross-entropies and the
input gradients come from the same forward pass (``torch.func.grad_and_value``), and the graph is
kept so ``L.backward()`` differentiates through the gradients (double backprop).

Example:
    >>> import torch
    >>> from ensdiv.ensemble import Ensemble
    >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10)
    >>> loss, stats = ensemble_loss(ens, torch.rand(4, 1, 8, 8), torch.arange(4))
    >>> sorted(stats)
    ['ce_0', 'ce_1', 'ce_2', 'reg', 'train_cos']
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from ensdiv.diversity import DIVERSITY_LOSSES, cosine_loss
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_choice
from ensdiv.gradients import members_grad_and_value

Diversity = Literal["none", "cos", "gal", "gdr"]
DIVERSITIES: tuple[str, ...] = get_args(Diversity)


def ce_loss(ensemble: Ensemble, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Sum over members of each member's batch-mean cross-entropy (independent training).

    Example:
        >>> from ensdiv.ensemble import Ensemble
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
        >>> loss, stats = ce_loss(ens, torch.rand(4, 1, 8, 8), torch.arange(4))
        >>> sorted(stats)
        ['ce_0', 'ce_1']
    """
    logits = ensemble.member_logits(x)  # [M, B, K]
    m, b, k = logits.shape
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(m * b, k), y.repeat(m), reduction="none").view(m, b).mean(1)
    return ce.sum(), {f"ce_{i}": float(v) for i, v in enumerate(ce.detach())}


def ensemble_loss(ensemble: Ensemble, x: Tensor, y: Tensor, *, diversity: str = "gal",
                  lam: float = 0.5) -> tuple[Tensor, dict[str, float]]:
    """The gradient-diversity training objective and its detached parts.

    Args:
        ensemble: M ≥ 2 members for any diversity term (M = 1 is an error, not a no-op).
        x: inputs [B, C, H, W] in [0, 1]; y: labels [B].
        diversity: one of ``DIVERSITIES``; ``"none"`` is plain summed cross-entropy.
        lam: weight λ ≥ 0 of the regularizer (GAL's authors used 0.5).

    Returns:
        ``(loss, stats)``: a scalar to backpropagate, and floats ``ce_i`` (each member's
        batch-mean CE), ``reg`` (the regularizer) and ``train_cos`` (mean pairwise cosine on
        the batch).

    Example:
        >>> from ensdiv.ensemble import Ensemble
        >>> ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10)
        >>> loss, stats = ensemble_loss(ens, torch.rand(4, 1, 8, 8), torch.arange(4),
        ...                             diversity="cos", lam=1.0)
        >>> loss.backward()
    """
    check_choice("diversity", diversity, DIVERSITIES)
    if not lam >= 0:
        raise EnsdivError(f"lam must be >= 0; got {lam}")
    if diversity == "none":
        return ce_loss(ensemble, x, y)
    if ensemble.num_members < 2:
        raise EnsdivError(f"diversity {diversity!r} needs at least 2 members; "
                          f"got {ensemble.num_members}")
    grads, ce_sums = members_grad_and_value(ensemble, x, y, mode="loss", create_graph=True)
    ce = ce_sums / x.shape[0]
    reg = DIVERSITY_LOSSES[diversity](grads)
    loss = ce.sum() + lam * reg
    stats = {f"ce_{i}": float(v) for i, v in enumerate(ce.detach())}
    stats["reg"] = float(reg.detach())
    stats["train_cos"] = float(cosine_loss(grads.detach()))  # the mean pairwise cosine
    return loss, stats
