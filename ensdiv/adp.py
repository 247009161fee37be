"""ADP: the Adaptive Diversity Promoting regularizer (Pang, Xu, Du, Chen & Zhu, "Improving
Adversarial Robustness via Promoting Ensemble Diversity", ICML 2019).

ADP makes the members disagree on the *wrong* classes while agreeing on the right one, from
their predictions alone — no input gradients, so no double backprop: a cheap baseline beside
ensdiv's gradient regularizers. Per input, with member predictions p_i = softmax(f_i(x)):

    L_ADP = Σ_i CE(p_i, y) − α · H(p̄) − β · log ED,     p̄ = mean_i p_i,
    ED = det(P̃ᵀ P̃),  P̃ = [p̃_1, …, p̃_M],  p̃_i = p_i^{\\y} / ‖p_i^{\\y}‖₂

where p_i^{\\y} is member i's probability vector with the true class removed (its
"non-maximal prediction"), so ED is the squared volume the members' normalised non-maximal
predictions span: 1 when they are orthogonal, 0 when two coincide. H is the Shannon entropy of
the ensemble's mean prediction. Terms are averaged over the batch.

Where ensdiv follows or departs from the authors' code (Keras, ``P2333/Adaptive-Diversity-
Promoting``): the defaults α = 2, β = 0.5; a ridge ``det_offset`` = 1e-6 added to the Gram
matrix's diagonal before the log-determinant (their numerical safeguard; it also keeps ED
defined when M > K − 1) and ``log_offset`` = 1e-20 inside the entropy's log — both kept. The
log-determinant is ``torch.logdet`` of the (symmetric positive definite) ridged Gram matrix
rather than the log of a determinant, which is the same value without underflow for equal
predictions. The non-maximal predictions are normalised scale-free, from the logits
(:func:`non_maximal_directions`): the authors' raw norm underflows for confident members. The
authors train one network with M heads; ensdiv applies the loss to any
:class:`~ensdiv.ensemble.Ensemble` of M ≥ 2 members.

Example:
    >>> import torch
    >>> from ensdiv.ensemble import Ensemble
    >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=0)
    >>> loss, stats = adp_loss(ens, torch.rand(4, 1, 8, 8), torch.arange(4))
    >>> sorted(stats)
    ['ce_0', 'ce_1', 'ce_2', 'entropy', 'log_ed', 'reg']
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError

ADP_ALPHA = 2.0
"""Weight α of the ensemble entropy (the authors' default)."""
ADP_BETA = 0.5
"""Weight β of the log ensemble diversity (the authors' default)."""
DET_OFFSET = 1e-6
"""Ridge added to the Gram matrix's diagonal before the log-determinant (the authors')."""
LOG_OFFSET = 1e-20
"""Added inside the entropy's log (the authors')."""


def ensemble_entropy(probs: Tensor, *, log_offset: float = LOG_OFFSET) -> Tensor:
    """Shannon entropy (nats) of the mean prediction, per input.

    Args:
        probs: member probabilities [M, B, K] (each row sums to 1).

    Returns:
        [B].

    Example:
        >>> ensemble_entropy(torch.full((2, 1, 4), 0.25))  # uniform over 4 classes: log 4
        tensor([1.3863])
    """
    mean = probs.mean(0)
    return -(mean * torch.log(mean + log_offset)).sum(-1)


def non_maximal_directions(logits: Tensor, y: Tensor) -> Tensor:
    """Each member's non-maximal prediction p_i^{\\y} normalised to unit length, [M, B, K − 1],
    computed scale-free from the logits: p_i^{\\y} is softmax(f_i(x)) without the true class,
    the same direction as the softmax over the non-true logits alone, which never underflows.

    The authors divide the probabilities by their raw norm; in float32 those probabilities
    underflow to 0 once a member's margin over every wrong class passes ~100 logits (and their
    norm loses the direction well before: ensdiv's earlier clamp at 1e-12 did at ~29), so log
    ED and its gradient went wrong exactly for the confident members ADP trains.

    Example:
        >>> z = torch.tensor([[[300.0, 1.0, 0.0]]])  # class 0 certain: p^{\\y} underflows
        >>> non_maximal_directions(z, torch.tensor([0])).squeeze()
        tensor([0.9385, 0.3453])
    """
    m, b, k = logits.shape
    keep = torch.ones(b, k, dtype=torch.bool, device=logits.device)
    keep[torch.arange(b, device=logits.device), y] = False
    q = torch.softmax(logits[:, keep].reshape(m, b, k - 1), dim=-1)  # max entry ≥ 1/(K − 1)
    return q / q.norm(dim=-1, keepdim=True)


def log_ensemble_diversity(logits: Tensor, y: Tensor, *,
                           det_offset: float = DET_OFFSET) -> Tensor:
    """log ED per input: the log-determinant of the Gram matrix of the members' normalised
    non-maximal predictions (true class removed, :func:`non_maximal_directions`), ridged by
    ``det_offset``.

    Args:
        logits: member logits [M, B, K] (``torch.log`` of probabilities works too); y: [B].

    Returns:
        [B]; ≈ 0 (ED = 1) for orthonormal non-maximal predictions, very negative (ED → 0) when
        two members' coincide.

    Example:
        >>> p = torch.tensor([[[0.5, 0.5, 0.0]], [[0.5, 0.0, 0.5]]])  # true class 0
        >>> float(log_ensemble_diversity(p.log(), torch.tensor([0]))) < 1e-5
        True
    """
    unit = non_maximal_directions(logits, y)
    gram = torch.einsum("mbk,nbk->bmn", unit, unit)
    eye = torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device)
    return torch.logdet(gram + det_offset * eye)


def adp_regularizer(logits: Tensor, y: Tensor, *, alpha: float = ADP_ALPHA,
                    beta: float = ADP_BETA, det_offset: float = DET_OFFSET,
                    log_offset: float = LOG_OFFSET) -> tuple[Tensor, Tensor, Tensor]:
    """``−α·H(p̄) − β·log ED`` averaged over the batch, with the batch means of H and log ED,
    from the members' logits [M, B, K].

    Example:
        >>> logits = torch.randn(3, 5, 10)
        >>> reg, h, led = adp_regularizer(logits, torch.arange(5))
        >>> torch.allclose(reg, -2.0 * h - 0.5 * led)
        True
    """
    h = ensemble_entropy(torch.softmax(logits, -1), log_offset=log_offset).mean()
    led = log_ensemble_diversity(logits, y, det_offset=det_offset).mean()
    return -alpha * h - beta * led, h, led


def check_adp(alpha: float, beta: float) -> None:
    """One :class:`EnsdivError` for a bad α or β (each a finite number ≥ 0)."""
    for name, v in (("ADP alpha", alpha), ("ADP beta", beta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                v >= 0 and v != float("inf")):
            raise EnsdivError(f"{name} must be a finite number >= 0; got {v!r}")


def adp_loss(ensemble: Ensemble, x: Tensor, y: Tensor, *, alpha: float = ADP_ALPHA,
             beta: float = ADP_BETA, ce_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """ADP's training objective ``Σ_i mean_b CE_i − α·H − β·log ED`` and its detached parts.

    Args:
        ensemble: M ≥ 2 members.
        x: inputs [B, C, H, W] in [0, 1]; y: labels [B].
        alpha, beta: the weights (the authors' 2 and 0.5 by default).
        ce_weight: weight of the summed cross-entropy.

    Returns:
        ``(loss, stats)`` like :func:`ensdiv.objective.ensemble_loss`: ``ce_i``, ``reg``,
        ``entropy`` and ``log_ed`` (batch means), detached.
    """
    check_adp(alpha, beta)
    if ensemble.num_members < 2:
        raise EnsdivError(f"ADP needs at least 2 members; got {ensemble.num_members}")
    logits = ensemble.member_logits(x)  # [M, B, K]
    ce = torch.stack([F.cross_entropy(z, y) for z in logits])
    reg, h, led = adp_regularizer(logits, y, alpha=alpha, beta=beta)
    stats = {f"ce_{i}": v for i, v in enumerate(ce.detach())}
    stats.update(reg=reg.detach(), entropy=h.detach(), log_ed=led.detach())
    return ce_weight * ce.sum() + reg, stats
