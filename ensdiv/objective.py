"""Training objectives for :func:`ensdiv.loop.fit`: summed cross-entropy (:func:`ce_loss`), plus a
diversity term; adversarial training; a robust teacher's students (:class:`TransferLoss`).

``ensemble_loss`` is the whole objective of gradient-diversity training:

    L = Σ_m mean_b CE(f_m(x_b), y_b) + λ · R(g),   g[m, b] = ∇ₓ CE(f_m(x_b), y_b)

with R one of ``cos`` (mean pairwise cosine), ``gal`` (Kariyappa & Qureshi 2019) or ``gdr``
(a differentiable Gradient Diversity Rating, Adam & Speciel 2020); ``drt`` (Yang et al. 2022)
regularizes the gradients of the members' confidence margins instead (:func:`drt_loss`). The
cross-entropies and the input gradients come from the same forward pass
(``torch.func.grad_and_value``), and the graph is kept so ``L.backward()`` differentiates
through the gradients (double backprop).

Example:
    >>> import torch
    >>> from ensdiv.ensemble import Ensemble
    >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10)
    >>> loss, stats = ensemble_loss(ens, torch.rand(4, 1, 8, 8), torch.arange(4))
    >>> sorted(stats)
    ['ce_0', 'ce_1', 'ce_2', 'reg', 'train_cos']
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad_and_value

from ensdiv.adp import ADP_ALPHA, adp_loss
from ensdiv.attacks import pgd
from ensdiv.diversity import DIVERSITY_LOSSES, cosine_loss
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_choice, check_real
from ensdiv.gradients import members_grad_and_value
from ensdiv.loop import ce_loss
from ensdiv.robust_transfer import (
    DEFAULT_TRANSFER_WEIGHT,
    TRANSFERS,
    Teacher,
    crt_loss,
    rrm_loss,
)

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import DIVERSITIES as DIVERSITIES
from ensdiv.vocab import OBJECTIVES as OBJECTIVES
from ensdiv.vocab import Diversity as Diversity
from ensdiv.vocab import TrainingObjective as TrainingObjective


def ensemble_loss(ensemble: Ensemble, x: Tensor, y: Tensor, *, diversity: str = "gal",
                  lam: float = 0.5, ce_weight: float = 1.0,
                  adp_alpha: float = ADP_ALPHA) -> tuple[Tensor, dict[str, Tensor]]:
    """The gradient-diversity training objective and its detached parts.

    Args:
        ensemble: M ≥ 2 members for any diversity term (M = 1 is an error, not a no-op).
        x: inputs [B, C, H, W] in [0, 1]; y: labels [B].
        diversity: one of ``DIVERSITIES``; ``"none"`` is plain summed cross-entropy.
        lam: weight λ ≥ 0 of the regularizer (GAL's authors used 0.5); for ``"adp"`` (Pang et
            al. 2019, :func:`ensdiv.adp.adp_loss`, no input gradients) λ is β, the weight of
            the log ensemble diversity (the authors' 0.5). ``"trs"`` and ``"dverge"`` are whole
            objectives with their own schedules, not terms: :func:`ensdiv.trs.trs_loss` /
            :class:`ensdiv.trs.TrsLoss`, :func:`ensdiv.dverge.dverge_loss` /
            :class:`ensdiv.dverge.DvergeLoss`.
        ce_weight: weight of the summed cross-entropy (a transfer loss may lower it).
        adp_alpha: ADP's weight α of the ensemble entropy (the authors' 2).

    Returns:
        ``(loss, stats)``: a scalar to backpropagate, and detached 0-dim tensors ``ce_i``
        (each member's batch-mean CE), ``reg`` (the regularizer) and ``train_cos`` (mean
        pairwise cosine on the batch), left on the device: reading them is a GPU sync, which
        :func:`ensdiv.training.fit` does once per epoch.

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
        ce, stats = ce_loss(ensemble, x, y)
        return ce_weight * ce, stats
    if ensemble.num_members < 2:
        raise EnsdivError(f"diversity {diversity!r} needs at least 2 members; "
                          f"got {ensemble.num_members}")
    if diversity == "drt":
        return drt_loss(ensemble, x, y, lam=lam, ce_weight=ce_weight)
    if diversity == "adp":
        return adp_loss(ensemble, x, y, alpha=adp_alpha, beta=lam, ce_weight=ce_weight)
    if diversity in ("trs", "dverge"):
        raise EnsdivError(f"{diversity.upper()} is a whole objective with its own schedule, not "
                          f"a term added to a loss: use ensdiv.{diversity}.{diversity}_loss (or "
                          f"{'TrsLoss' if diversity == 'trs' else 'DvergeLoss'} for training)")
    grads, ce_sums = members_grad_and_value(ensemble, x, y, mode="loss", create_graph=True)
    ce = ce_sums / x.shape[0]
    reg = DIVERSITY_LOSSES[diversity](grads)
    loss = ce_weight * ce.sum() + lam * reg
    stats = {f"ce_{i}": v for i, v in enumerate(ce.detach())}
    stats["reg"] = reg.detach()
    stats["train_cos"] = cosine_loss(grads.detach())  # the mean pairwise cosine
    return loss, stats


def _margin_and_logits(member: torch.nn.Module) -> Callable[[Tensor], tuple[Tensor, tuple]]:
    def f(xx: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        logits = member(xx)
        top2 = torch.softmax(logits, -1).topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        return margin.sum(), (logits, margin)
    return f


def drt_loss(ensemble: Ensemble, x: Tensor, y: Tensor, *,
             lam: float = 0.5, ce_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Diversity-Regularized Training (Yang et al., ICLR 2022, "On the certified robustness for
    ensemble models and beyond") on a batch, usually Gaussian-noised inputs.

    With mₖ(x) = p₁ − p₂ member k's confidence margin (its top two softmax probabilities) and
    gₖ = ∇ₓ mₖ:

        L = Σₖ mean CE(fₖ(x), y) + λ · (GD − CM)
        GD = mean over pairs i < j and samples both classify correctly of ‖gᵢ + gⱼ‖²
        CM = mean over members and samples it classifies correctly of mₖ

    GD pushes the members' margin gradients apart (opposite, ideally), CM rewards confident
    members; both only count where the members are right, as in the paper. DRT weighs the
    two terms separately (ρ₁, ρ₂); ensdiv ties them to one λ.

    Returns:
        ``(loss, stats)`` with ``ce_i``, ``reg`` (GD − CM), ``drt_gd``, ``drt_cm`` and
        ``train_cos`` (mean pairwise cosine of the margin gradients).

    Example:
        >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=0)
        >>> loss, stats = drt_loss(ens, torch.rand(4, 1, 8, 8), torch.arange(4))
        >>> loss.backward(); sorted(stats)[:2]
        ['ce_0', 'ce_1']
    """
    x = x.detach()
    grads, logits, margins = [], [], []
    with torch.enable_grad():
        for member in ensemble.members:
            g, (_, (z, mg)) = grad_and_value(_margin_and_logits(member), has_aux=True)(x)
            grads.append(g.flatten(1))
            logits.append(z)
            margins.append(mg)
    m = len(grads)
    ce = torch.stack([torch.nn.functional.cross_entropy(z, y) for z in logits])
    correct = [(z.argmax(-1) == y).to(x.dtype).detach() for z in logits]
    gd = x.new_zeros(())
    pairs = x.new_zeros(())
    for i in range(m):
        for j in range(i + 1, m):
            both = correct[i] * correct[j]
            gd = gd + (both * (grads[i] + grads[j]).pow(2).sum(1)).sum()
            pairs = pairs + both.sum()
    gd = gd / pairs.clamp_min(1.0)
    right = torch.stack(correct)
    cm = (right * torch.stack(margins)).sum() / right.sum().clamp_min(1.0)
    reg = gd - cm
    loss = ce_weight * ce.sum() + lam * reg
    stats = {f"ce_{i}": v for i, v in enumerate(ce.detach())}
    stats.update(reg=reg.detach(), drt_gd=gd.detach(), drt_cm=cm.detach())
    stats["train_cos"] = cosine_loss(torch.stack(grads).detach())
    return loss, stats


def adversarial_loss(ensemble: Ensemble, x: Tensor, y: Tensor, *, eps: float, steps: int = 7,
                     alpha: float | None = None, diversity: str = "none",
                     lam: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """PGD adversarial training of every member (Madry et al. 2018, "Towards Deep Learning
    Models Resistant to Adversarial Attacks"), optionally with a diversity term.

    Each member m gets its own L∞ PGD examples x'ₘ (random start, ``steps`` steps of size
    ``alpha``, default 2.5·eps/steps, the final iterate), crafted without building a graph
    through the weights; the loss is ``Σₘ mean CE(fₘ(x'ₘ), y)`` — M independently robust
    members — plus ``lam``·R on the clean batch when ``diversity`` is not ``"none"``. A step
    costs about ``steps + 3`` forward passes and ``steps + 1`` backward passes per member.
    The random starts use the global RNG (:func:`ensdiv.training.fit` seeds it per batch).

    Returns:
        ``(loss, stats)`` with ``ce_i`` (adversarial CE per member) and ``adv_acc_i`` (each
        member's accuracy on its own PGD examples), plus ``reg`` and ``train_cos`` with a
        diversity term.

    Example:
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
        >>> loss, stats = adversarial_loss(ens, torch.rand(4, 1, 8, 8), torch.arange(4),
        ...                                eps=0.1, steps=2)
        >>> loss.backward(); sorted(stats)
        ['adv_acc_0', 'adv_acc_1', 'ce_0', 'ce_1']
    """
    ces, accs = [], []
    for member in ensemble.members:
        x_adv = pgd(member, x, y, eps=eps, steps=steps, alpha=alpha, keep="last")
        logits = member(x_adv)
        ces.append(torch.nn.functional.cross_entropy(logits, y))
        accs.append((logits.argmax(-1) == y).float().mean().detach())
    ce = torch.stack(ces)
    loss = ce.sum()
    stats = {f"ce_{i}": v for i, v in enumerate(ce.detach())}
    stats.update({f"adv_acc_{i}": a for i, a in enumerate(accs)})
    if diversity != "none":
        div, div_stats = ensemble_loss(ensemble, x, y, diversity=diversity, lam=lam,
                                       ce_weight=0.0)
        loss = loss + div
        stats.update(reg=div_stats["reg"], train_cos=div_stats["train_cos"])
    return loss, stats


class TransferLoss(nn.Module):
    """The student objective of an ensemble trained from one teacher (a :data:`LossFn` of
    :func:`ensdiv.training.fit`): per member, the transfer distance plus ``weight``·CE, summed
    over members, plus ``lam``·(diversity regularizer) from :func:`ensemble_loss`.

    - ``rrm``: ``Σₘ weight·CE(Sₘ(x), y) + rrm_loss(Pₘ gₘ(x), g_T(x))`` on the batch as given
      (clean inputs). Pₘ is a trainable linear map when the student's feature width differs
      from the teacher's, else the identity.
    - ``crt``: ``Σₘ crt_loss(Sₘ(x), T(x)) + weight·CE(Sₘ(x), y)`` on the batch as given —
      Gaussian-noisy inputs (``--noise-sigma``).

    Args:
        teacher: the frozen :class:`Teacher`.
        student: the ensemble to train (for the member count and feature widths).
        transfer: ``"rrm"`` or ``"crt"``.
        weight: CE weight ≥ 0; None for :data:`DEFAULT_TRANSFER_WEIGHT`.
        diversity, lam: as in :func:`ensemble_loss` (``"none"``: no term).

    Example:
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
        >>> t = Teacher(Ensemble.build("cnn", 1, in_shape=(1, 8, 8), num_classes=10))
        >>> loss_fn = TransferLoss(t, ens, "rrm", diversity="gal", lam=0.5)
        >>> loss, stats = loss_fn(ens, torch.rand(4, 1, 8, 8), torch.arange(4))
        >>> sorted(stats)
        ['ce_0', 'ce_1', 'reg', 'train_cos', 'transfer_0', 'transfer_1']
    """

    def __init__(self, teacher: Teacher, student: Ensemble, transfer: str, *,
                 weight: float | None = None, diversity: str = "none",
                 lam: float = 0.0) -> None:
        super().__init__()
        check_choice("transfer", transfer, TRANSFERS[1:])
        teacher.check_student(student)
        self.teacher, self.transfer = teacher, transfer
        self.weight = DEFAULT_TRANSFER_WEIGHT[transfer] if weight is None else \
            check_real("transfer weight", weight, minimum=0)
        self.diversity = check_choice("diversity", diversity, DIVERSITIES)
        self.lam = check_real("lam", lam, minimum=0)
        if diversity != "none" and student.num_members < 2:
            raise EnsdivError(f"diversity {diversity!r} needs at least 2 members; got "
                              f"{student.num_members}")
        widths = [int(m.head.in_features) for m in student.members]
        self.project = nn.ModuleList(
            nn.Linear(w, teacher.feature_dim, bias=False) if transfer == "rrm" and
            w != teacher.feature_dim else nn.Identity() for w in widths)

    def forward(self, ensemble: Ensemble, x: Tensor,
                y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, stats)`` with stats ``transfer_i``, ``ce_i`` (and ``reg``, ``train_cos``
        with a diversity term)."""
        target = self.teacher.features(x) if self.transfer == "rrm" else self.teacher.logits(x)
        dists, ces = [], []
        for member, proj in zip(ensemble.members, self.project, strict=True):
            feats = member.features(x)
            logits = member.head(feats)
            if self.transfer == "rrm":
                dists.append(rrm_loss(proj(feats), target))
            else:
                dists.append(crt_loss(logits, target))
            if self.diversity == "none":
                ces.append(nn.functional.cross_entropy(logits, y))
        dist = torch.stack(dists)
        stats = {f"transfer_{i}": v for i, v in enumerate(dist.detach())}
        if self.diversity == "none":
            ce = torch.stack(ces)
            loss = dist.sum() + self.weight * ce.sum()
            stats.update({f"ce_{i}": v for i, v in enumerate(ce.detach())})
            return loss, stats
        # The diversity term's own pass gives the CE too (same value); it carries the weight.
        div, div_stats = ensemble_loss(ensemble, x, y, diversity=self.diversity, lam=self.lam,
                                       ce_weight=self.weight)
        return dist.sum() + div, {**stats, **div_stats}
