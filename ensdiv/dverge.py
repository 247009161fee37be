"""DVERGE: Diversifying Vulnerabilities for Enhanced Robust Generation of Ensembles (Yang, Zhang,
Dong, Chen, Wang, Li & Chen, NeurIPS 2020).

DVERGE trains each member on the *other* members' non-robust features. For a batch of target
images x and an independently drawn batch of source images (x_s, y_s), and a hidden layer l:

    z_i = argmin_{‖z − x_s‖∞ ≤ ε}  ‖f_i^l(z) − f_i^l(x)‖²          (feature distillation)
    L   = Σ_j Σ_{i ≠ j} CE(f_j(z_i), y_s)                            (cross-adversarial training)

z_i looks like x_s (and carries its label) but member i's layer-l features say x: it holds
member i's non-robust features of x. Training member j to classify z_i as y_s makes j ignore
exactly the features i is vulnerable through, so an attack on one member transfers less.

Where ensdiv follows the authors' code (``zjysteven/DVERGE``, ``distillation.py``,
``train/train_dverge.py``) and where it departs:

- **Distillation** as theirs: start at x_s (no random start), ``steps`` = 10 sign steps of size
  ε/10 (their 0.007 for ε = 0.07) with momentum μ = 1 on L1-normalised gradients (their
  default), projection onto the ε-ball around x_s and [0, 1]; the feature distance is the mean
  squared error; members are in the mode the loop put them in (train mode; ensdiv's members have
  no batch statistics, so this changes nothing).
- **The layer** is drawn anew every epoch, uniformly from 1 … ``num_layers`` of the
  architecture (:meth:`ensdiv.models.Member.layer_features`: their ResNet-20 numbering for
  ``resnet20``'s layers 1–19; ensdiv's layer 20 is the pooled features, where the authors'
  ``get_features`` returns the logits — a departure). (The TRS repository's DVERGE baseline
  once forgot to re-draw the layer; it was fixed there in 2022.) ensdiv draws it from the run's
  seed and the epoch (theirs: Python's unseeded ``random``), so a resumed run
  repeats it; ``layer=`` fixes it (their ``--distill-fixed-layer``).
- **The source batch.** Theirs pairs the training loader with a second, independently shuffled
  pass over the same data. ensdiv's loss sees one batch, so it pairs each image with another
  image of the same batch (a random permutation shifted by one, so never with itself): every
  image is a source once and a target once per step, as often as in theirs per epoch.
- **Optimizers.** Theirs gives every member its own SGD optimizer; ensdiv sums the members'
  losses under one optimizer — the same per-parameter update, since member j's loss depends on
  j's weights only (the distilled points are constants).
- ``lam`` weighs the cross-training term (their objective is λ = 1 and nothing else);
  ``clean_weight`` > 0 adds Σ_j CE(f_j(x), y) (their ``--plus-adv`` adds PGD adversarial
  training instead, not offered here). Any M ≥ 2 and every ensdiv architecture (theirs:
  ResNet-20 with M = 3 in their scripts).

A step costs about M·(steps + 1) forward and M·steps backward passes for the distillation plus
M·(M − 1) forward/backward passes of training: DVERGE is the most expensive baseline.

Example:
    >>> import torch
    >>> from ensdiv.ensemble import Ensemble
    >>> ens = Ensemble.build("cnn", 3, in_shape=(1, 8, 8), num_classes=10, seed=0)
    >>> loss, stats = dverge_loss(ens, torch.rand(4, 1, 8, 8), torch.arange(4), layer=2, steps=2)
    >>> loss.backward(); sorted(stats)[:3]
    ['ce_0', 'ce_1', 'ce_2']
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor

from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_int, check_real
from ensdiv.models import Member

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import DVERGE_LAM as DVERGE_LAM

DVERGE_EPS = 0.07
"""L∞ radius of the feature distillation (the authors' CIFAR-10 value)."""
DVERGE_STEPS = 10
"""Sign steps of the feature distillation (the authors')."""


def check_dverge(*, eps: float, steps: int, lam: float = DVERGE_LAM, clean_weight: float = 0.0,
                 layer: int | None = None) -> None:
    """Raise one :class:`EnsdivError` line for a bad DVERGE hyper-parameter."""
    eps = check_real("DVERGE eps", eps, minimum=0, strict=True)
    if eps > 1:
        raise EnsdivError(f"DVERGE eps must be at most 1 (pixels are in [0, 1]); got {eps:g}")
    check_int("DVERGE steps", steps)
    check_real("lam", lam, minimum=0)
    check_real("DVERGE clean weight", clean_weight, minimum=0)
    if layer is not None:
        check_int("DVERGE layer", layer)


def feature_distance(member: Member, z: Tensor, target: Tensor, layer: int) -> Tensor:
    """Per-sample mean squared distance [B] between ``member``'s layer-``layer`` features of
    ``z`` and the given ``target`` features (those of the target images)."""
    return (member.layer_features(z, layer) - target).pow(2).flatten(1).mean(1)


def distill(member: Member, source: Tensor, target: Tensor, *, layer: int,
            eps: float = DVERGE_EPS, steps: int = DVERGE_STEPS, alpha: float | None = None,
            momentum: float = 1.0) -> Tensor:
    """DVERGE's feature distillation: a point z in the L∞ ball of radius ``eps`` around each
    ``source`` image (and in [0, 1]) whose layer-``layer`` features under ``member`` are close
    to those of the matching ``target`` image. Shapes: ``source``, ``target`` [B, C, H, W];
    returns z [B, C, H, W], detached.

    MI-FGSM-style descent on the mean squared feature distance (:func:`feature_distance`):
    ``steps`` sign steps of size ``alpha`` (default ``eps / 10``) on the momentum of
    L1-normalised gradients, starting at ``source``.

    Example:
        >>> from ensdiv.models import build_model
        >>> net = build_model("mlp", in_shape=(1, 8, 8), num_classes=10)
        >>> s, t = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
        >>> z = distill(net, s, t, layer=1, eps=0.1, steps=3)
        >>> bool((z - s).abs().max() <= 0.1 + 1e-6)
        True
    """
    with torch.no_grad():
        goal = member.layer_features(target, layer)
    return _distill_to(member, source, goal, layer=layer, eps=eps, steps=steps, alpha=alpha,
                       momentum=momentum)


def _distill_to(member: Member, source: Tensor, goal: Tensor, *, layer: int, eps: float,
                steps: int, alpha: float | None = None, momentum: float = 1.0) -> Tensor:
    """:func:`distill` towards given target features ``goal`` (computed once by the caller)."""
    alpha = eps / 10 if alpha is None else alpha
    x0 = source.detach()
    z = x0.clone()
    g = torch.zeros_like(z)
    for _ in range(steps):
        z.requires_grad_(True)
        with torch.enable_grad():
            loss = feature_distance(member, z, goal, layer).sum()
            (grad,) = torch.autograd.grad(loss, z)
        with torch.no_grad():
            l1 = grad.flatten(1).abs().sum(1).clamp_min(1e-12)
            g = momentum * g + grad / l1.view(-1, *([1] * (grad.dim() - 1)))
            z = z.detach() - alpha * g.sign()
            z = torch.min(torch.max(z, x0 - eps), x0 + eps).clamp_(0.0, 1.0)
    return z.detach()


def source_permutation(batch: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Which image of the batch each image's source is: a random permutation shifted by one, so
    no image is its own source (for ``batch`` ≥ 2)."""
    perm = torch.randperm(batch, generator=generator)
    src = torch.empty_like(perm)
    src[perm] = perm.roll(1)
    return src


def dverge_loss(ensemble: Ensemble, x: Tensor, y: Tensor, *, layer: int,
                eps: float = DVERGE_EPS, steps: int = DVERGE_STEPS, lam: float = DVERGE_LAM,
                clean_weight: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The DVERGE objective on a batch (see the module docstring): targets ``x`` [B, C, H, W],
    sources the same batch permuted (:func:`source_permutation`, global RNG), labels ``y`` [B].

    Returns:
        ``(loss, stats)``: ``ce_j`` — member j's mean CE on the other members' distilled points
        (the cross-training term, per member), ``reg`` (the same, summed over members),
        ``feature_gap`` (mean relative feature distance left after distillation: 0 would be a
        perfect copy of the target's features) and, with ``clean_weight`` > 0, ``clean_ce_j``.

    Example:
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
        >>> loss, stats = dverge_loss(ens, torch.rand(4, 1, 8, 8), torch.arange(4), layer=1,
        ...                           steps=2)
        >>> sorted(stats)
        ['ce_0', 'ce_1', 'feature_gap', 'reg']
    """
    if ensemble.num_members < 2:
        raise EnsdivError(f"DVERGE needs at least 2 members; got {ensemble.num_members}")
    check_dverge(eps=eps, steps=steps, lam=lam, clean_weight=clean_weight, layer=layer)
    if x.shape[0] < 2:
        raise EnsdivError("DVERGE pairs every image with another one of its batch: give "
                          f"batches of at least 2 images; got {x.shape[0]}")
    members = list(ensemble.members)
    for m in members:
        if not 1 <= layer <= m.num_layers:
            raise EnsdivError(f"DVERGE layer {layer} does not exist in {m.arch} (layers 1 to "
                              f"{m.num_layers})")
    src = source_permutation(x.shape[0]).to(x.device)
    xs, ys = x[src].detach(), y[src]
    distilled, gaps = [], []
    for m in members:
        with torch.no_grad():
            goal = m.layer_features(x, layer)
        z = _distill_to(m, xs, goal, layer=layer, eps=eps, steps=steps)
        with torch.no_grad():
            start = feature_distance(m, xs, goal, layer).mean()
            gaps.append(feature_distance(m, z, goal, layer).mean() / start.clamp_min(1e-12))
        distilled.append(z)
    ces = []
    for j, m in enumerate(members):
        others = torch.cat([z for i, z in enumerate(distilled) if i != j])
        ces.append(F.cross_entropy(m(others), ys.repeat(len(members) - 1)) *
                   (len(members) - 1))
    ce = torch.stack(ces)
    loss = lam * ce.sum()
    stats = {f"ce_{j}": v / (len(members) - 1) for j, v in enumerate(ce.detach())}
    stats["reg"] = ce.detach().sum()
    stats["feature_gap"] = torch.stack(gaps).mean()
    if clean_weight > 0:
        clean = torch.stack([F.cross_entropy(m(x), y) for m in members])
        loss = loss + clean_weight * clean.sum()
        stats.update({f"clean_ce_{j}": v for j, v in enumerate(clean.detach())})
    return loss, stats


class DvergeLoss:
    """DVERGE as a :data:`ensdiv.loop.LossFn` that re-draws its layer every epoch: the loop
    calls :meth:`set_epoch` before each epoch; the layer is a function of ``seed`` and the epoch
    (uniform over the first member's layers), unless ``layer`` fixes it.

    Example:
        >>> ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
        >>> loss_fn = DvergeLoss(ens, seed=0, steps=2)
        >>> loss_fn.set_epoch(1, 3); 1 <= loss_fn.layer <= 3
        True
    """

    def __init__(self, ensemble: Ensemble, *, seed: int, eps: float = DVERGE_EPS,
                 steps: int = DVERGE_STEPS, lam: float = DVERGE_LAM, clean_weight: float = 0.0,
                 layer: int | None = None) -> None:
        check_dverge(eps=eps, steps=steps, lam=lam, clean_weight=clean_weight, layer=layer)
        self.num_layers = min(m.num_layers for m in ensemble.members)
        if layer is not None and layer > self.num_layers:
            raise EnsdivError(f"DVERGE layer {layer} does not exist in "
                              f"{ensemble.members[0].arch} (layers 1 to {self.num_layers})")
        self.seed, self.eps, self.steps, self.lam = seed, eps, steps, lam
        self.clean_weight, self.fixed = clean_weight, layer
        self.layer = layer if layer is not None else self.draw(1)

    def draw(self, epoch: int) -> int:
        """The layer of ``epoch`` (1-based) when none is fixed."""
        return random.Random(self.seed * 1_000_003 + epoch).randint(1, self.num_layers)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the loop before ``epoch`` (1-based) of ``epochs``."""
        self.layer = self.fixed if self.fixed is not None else self.draw(epoch)

    def __call__(self, ensemble: Ensemble, x: Tensor,
                 y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, stats = dverge_loss(ensemble, x, y, layer=self.layer, eps=self.eps,
                                  steps=self.steps, lam=self.lam, clean_weight=self.clean_weight)
        stats["layer"] = torch.tensor(float(self.layer))
        return loss, stats
