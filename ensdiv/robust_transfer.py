"""Robustness transfer from one frozen robust teacher to every ensemble member.

- **RRM** (Vaishnavi, Eykholt & Rahmati 2022, "Transferring Adversarial Robustness Through
  Robust Representation Matching"): the student matches the teacher's penultimate
  representation on clean inputs, ``λ·CE(S(x), y) + d(P g_S(x), g_T(x))`` with d the cosine
  distance (:func:`rrm_loss`) and P a trainable linear projection when the widths differ.
- **CRT** (same authors, NeurIPS 2022, "Accelerating Certified Robustness Training via
  Knowledge Transfer"): on a Gaussian-noisy input x + δ the student matches the teacher's
  logits, ``‖S(x + δ) − T(x + δ)‖₂`` (:func:`crt_loss`), optionally mixed with CE.

:class:`Teacher` runs the frozen teacher in eval mode under ``torch.no_grad`` (no graph, no
parameter gradient). :class:`TransferLoss` is the whole student objective of an ensemble, with a
gradient-diversity term on top; it is a module only because RRM's projections are trainable.

Example:
    >>> import torch
    >>> s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> float(rrm_loss(s, s)), float(rrm_loss(s, -s))
    (0.0, 2.0)
    >>> float(crt_loss(torch.zeros(2, 3), torch.full((2, 3), 2.0)))   # ‖(2, 2, 2)‖₂
    3.464101552963257
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_choice, check_real
from ensdiv.objective import DIVERSITIES, ensemble_loss

Transfer = Literal["none", "rrm", "crt"]
TRANSFERS: tuple[str, ...] = get_args(Transfer)

DEFAULT_TRANSFER_WEIGHT = {"rrm": 0.01, "crt": 0.0}
"""Default CE weight of each transfer loss: RRM's λ (its authors used 0.005 on CIFAR-10; small
λ favours robustness — on digits, students with 0.01 resisted PGD better than with 0.05 or 0.1
at the same clean accuracy) and CRT's 1 − α (its public code uses α = 1: no CE). RRM needs
λ > 0: the students' heads learn only from the CE."""


def rrm_loss(student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
    """RRM's representation distance: the batch mean of 1 − cos(g_S(x), g_T(x)).

    Args:
        student_feats, teacher_feats: [B, F] (the student's already projected to F).

    Returns:
        A scalar in [0, 2]: 0 for identical directions, 2 for opposite ones.

    Example:
        >>> float(rrm_loss(torch.ones(3, 4), 2 * torch.ones(3, 4)))   # scale does not matter
        0.0
    """
    if student_feats.shape != teacher_feats.shape or student_feats.ndim != 2:
        raise EnsdivError(f"rrm_loss needs two [B, F] tensors of one shape; got "
                          f"{tuple(student_feats.shape)} and {tuple(teacher_feats.shape)}")
    cos = nn.functional.cosine_similarity(student_feats, teacher_feats, dim=1, eps=1e-8)
    return (1 - cos).mean()


def crt_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """CRT's logit distance: the batch mean of ‖S(x + δ) − T(x + δ)‖₂.

    Args:
        student_logits, teacher_logits: [B, K] on the same noisy inputs.

    Example:
        >>> float(crt_loss(torch.ones(2, 4), torch.ones(2, 4)))
        0.0
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise EnsdivError(f"crt_loss needs two [B, K] tensors of one shape; got "
                          f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    return (student_logits - teacher_logits).norm(dim=1).mean()


class Teacher:
    """A frozen teacher: one model (a member, or an ensemble of one), in eval mode, with
    ``requires_grad`` off, whose outputs are computed under ``torch.no_grad``.

    Deliberately not an ``nn.Module``, so its parameters never reach a student's optimizer.

    Args:
        model: a :class:`~ensdiv.models.Member` or a one-member :class:`Ensemble`.

    Example:
        >>> ens = Ensemble.build("mlp", 1, in_shape=(1, 8, 8), num_classes=10)
        >>> t = Teacher(ens)
        >>> t.features(torch.rand(2, 1, 8, 8)).shape, t.logits(torch.rand(2, 1, 8, 8)).shape
        (torch.Size([2, 256]), torch.Size([2, 10]))
    """

    def __init__(self, model: nn.Module) -> None:
        if isinstance(model, Ensemble):
            if model.num_members != 1:
                raise EnsdivError(f"a teacher is one model (a run trained with --members 1); "
                                  f"got an ensemble of {model.num_members}")
            model = model.members[0]
        for name in ("features", "head", "in_shape", "num_classes"):
            if not hasattr(model, name):
                raise EnsdivError(f"a teacher must be an ensdiv member (features, head, "
                                  f"in_shape, num_classes); {type(model).__name__} lacks {name}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.in_shape = tuple(model.in_shape)
        self.num_classes = int(model.num_classes)
        self.feature_dim = int(model.head.in_features)

    def check_student(self, student: Ensemble) -> None:
        """Raise one clear :class:`EnsdivError` if the student's input shape or class count
        differs from the teacher's."""
        member = student.members[0]
        self.check_data(member.in_shape, member.num_classes, who="the student ensemble")

    def check_data(self, in_shape: Sequence[int], num_classes: int, *,
                   who: str = "the data set") -> None:
        """Raise one clear :class:`EnsdivError` unless inputs of ``in_shape`` (C, H, W) with
        ``num_classes`` classes fit the teacher."""
        if tuple(in_shape) != self.in_shape:
            raise EnsdivError(f"the teacher takes inputs of shape {list(self.in_shape)} but "
                              f"{who} has inputs of shape {list(in_shape)}: train teacher and "
                              "students on the same data")
        if int(num_classes) != self.num_classes:
            raise EnsdivError(f"the teacher has {self.num_classes} classes but {who} has "
                              f"{num_classes}")

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Penultimate representation [B, F] of ``x`` [B, C, H, W] (no graph)."""
        return self.model.features(x)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Logits [B, K] of ``x`` [B, C, H, W] (no graph)."""
        return self.model(x)


class TransferLoss(nn.Module):
    """The student objective of an ensemble trained from one teacher (a :data:`LossFn` of
    :func:`ensdiv.train.fit`): per member, the transfer distance plus ``weight``·CE, summed
    over members, plus ``lam``·(diversity regularizer) from :func:`ensdiv.objective.ensemble_loss`.

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
        diversity, lam: as in :func:`ensdiv.objective.ensemble_loss` (``"none"``: no term).

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
