"""Robustness transfer from one frozen robust teacher to every ensemble member.

- **RRM** (Vaishnavi, Eykholt & Rahmati 2022, "Transferring Adversarial Robustness Through
  Robust Representation Matching"): the student matches the teacher's penultimate
  representation on clean inputs, ``λ·CE(S(x), y) + d(P g_S(x), g_T(x))`` with d the cosine
  distance (:func:`rrm_loss`) and P a trainable linear projection when the widths differ.
- **CRT** (same authors, NeurIPS 2022, "Accelerating Certified Robustness Training via
  Knowledge Transfer"): on a Gaussian-noisy input x + δ the student matches the teacher's
  logits, ``‖S(x + δ) − T(x + δ)‖₂`` (:func:`crt_loss`), optionally mixed with CE.

:class:`Teacher` runs the frozen teacher in eval mode under ``torch.no_grad`` (no graph, no
parameter gradient). The whole student objective of an ensemble, with a gradient-diversity term
on top, is :class:`ensdiv.objective.TransferLoss`, beside the other training objectives.

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

import torch
from torch import Tensor, nn

from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import DEFAULT_TRANSFER_WEIGHT as DEFAULT_TRANSFER_WEIGHT
from ensdiv.vocab import TRANSFERS as TRANSFERS
from ensdiv.vocab import Transfer as Transfer


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
