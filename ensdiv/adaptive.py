"""Adaptive attacks on a disagreement detector: attackers who know it is there.

A detector is only as good as its result against an attacker who knows it (Carlini & Wagner
2017 broke dropout-uncertainty detection by attacking every stochastic copy at once; Tramèr et
al. 2020). Two such attackers, both PGD (:func:`ensdiv.attacks.pgd_objective`) in the L∞ or L2
ball:

- :func:`agreement_pgd` — drive **every member toward one common wrong class** (the sum of the
  members' cross-entropies to that target), so the members agree on the wrong answer and no
  disagreement score rises; the target is the ensemble's runner-up class, or every class with
  the best kept per input;
- :func:`penalized_pgd` — ascend the ensemble's (confidence-capped) margin minus κ · the
  detector's score, for each κ in a sweep, keeping per input the best.

Both count an input as broken when the ensemble misclassifies it **and** (given a fitted
detector) it is not flagged; :func:`select_worst` keeps, per input, the most successful of
several candidate adversarial inputs (AutoAttack's any-attack rule, applied to detection).

Example:
    >>> import torch
    >>> from ensdiv.ensemble import Ensemble
    >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=4, seed=0).eval()
    >>> x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 4, (5,))
    >>> agreement_pgd(ens, x, y, eps=0.1, steps=3).shape
    torch.Size([5, 1, 8, 8])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ensdiv.attacks import pgd_objective
from ensdiv.disagreement import DIFFERENTIABLE_SCORES, SCORES, DisagreementDetector
from ensdiv.ensemble import Ensemble, mean_log_softmax
from ensdiv.errors import EnsdivError, check_choice, check_input, check_real
from ensdiv.gradients import runner_up

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import AGREEMENT_TARGETS as AGREEMENT_TARGETS
from ensdiv.vocab import AgreementTarget as AgreementTarget

KAPPAS: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)
"""Default penalty weights of :func:`penalized_pgd` (the score is in nats, the margin capped at
``confidence`` nats, so these span "mostly fool" to "mostly hide")."""


def _check(ensemble: Ensemble, x: Tensor, y: Tensor,
           detector: DisagreementDetector | None) -> None:
    if not isinstance(ensemble, Ensemble):
        raise EnsdivError(f"adaptive attacks need an Ensemble; got {type(ensemble).__name__}")
    check_input(ensemble, x, y)
    if detector is not None:
        if not isinstance(detector, DisagreementDetector):
            raise EnsdivError(f"detector must be a DisagreementDetector; got "
                              f"{type(detector).__name__}")
        if detector.ensemble is not ensemble:
            raise EnsdivError("the detector watches a different ensemble than the one attacked")


def _broken(member_logits: Tensor, y: Tensor,
            detector: DisagreementDetector | None) -> Tensor:
    """Misclassified by the ensemble and (given a fitted detector) not flagged, [B]."""
    wrong = mean_log_softmax(member_logits).argmax(-1) != y
    if detector is None or not detector.fitted:
        return wrong
    return wrong & ~detector.flags(detector.score_logits(member_logits))


@torch.no_grad()
def select_worst(ensemble: Ensemble, x: Tensor, y: Tensor, candidates: Sequence[Tensor], *,
                 detector: DisagreementDetector | None = None,
                 score: str = "mean_kl_to_mean") -> Tensor:
    """Per input, the candidate adversarial input that is best for the attacker: first one
    misclassified and not flagged; else a misclassified one with the lowest score; else the
    lowest-scoring one. Scores come from ``detector`` if given, else the ``score`` named.

    Args:
        candidates: adversarial versions of ``x``, each [B, ...] like ``x``.

    Example:
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=3, seed=0).eval()
        >>> x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
        >>> torch.equal(select_worst(ens, x, y, [x, x]), x)
        True
    """
    if not candidates:
        raise EnsdivError("select_worst needs at least one candidate")
    best_x = candidates[0].clone()
    best_key = None
    for c in candidates:
        if c.shape != x.shape:
            raise EnsdivError(f"every candidate must have x's shape {tuple(x.shape)}; got "
                              f"{tuple(c.shape)}")
        logits = ensemble.member_logits(c)
        s = detector.score_logits(logits) if detector is not None else SCORES[score](logits)
        wrong = mean_log_softmax(logits).argmax(-1) != y
        hit = _broken(logits, y, detector)
        # lexicographic: broken, then misclassified, then lower score
        key = torch.stack([hit.to(s.dtype), wrong.to(s.dtype), -s], 1)
        if best_key is None:
            best_key = key
            continue
        better = torch.zeros_like(hit)
        decided = torch.zeros_like(hit)
        for j in range(key.shape[1]):
            gt, lt = key[:, j] > best_key[:, j], key[:, j] < best_key[:, j]
            better |= ~decided & gt
            decided |= gt | lt
        view = better.view(-1, *([1] * (x.ndim - 1)))
        best_x = torch.where(view, c, best_x)
        best_key = torch.where(better[:, None], key, best_key)
    return best_x


def agreement_pgd(ensemble: Ensemble, x: Tensor, y: Tensor, *, eps: float,
                  steps: int = 40, alpha: float | None = None, norm: str = "linf",
                  target: str = "runner_up", detector: DisagreementDetector | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Adaptive attack (c): PGD pushing **all members toward one common wrong class** t.

    Minimizes Σₘ CE(memberₘ(x'), t) over the ball, so the members agree on t and disagreement
    scores stay low. ``target="runner_up"``: t is the ensemble's second most likely class on
    the clean input; ``"all"``: one run per class t ≠ y, keeping per input the best result
    (:func:`select_worst`; K − 1 times the cost). Per run, the kept point is the first iterate
    that breaks the input (misclassified, and not flagged by ``detector`` if given), else the
    one with the most agreement.

    Args:
        ensemble: the attacked ensemble (eval mode); x: [B, C, H, W] in [0, 1]; y: labels [B].
        eps, steps, alpha, norm, generator: as in :func:`ensdiv.attacks.pgd`.
        detector: the fitted detector the attacker knows (only used to decide what counts as
            success; the loss never needs it).

    Returns:
        x_adv [B, C, H, W] in the ball and in [0, 1].
    """
    _check(ensemble, x, y, detector)
    check_choice("agreement target", target, AGREEMENT_TARGETS)
    k = ensemble.num_classes or int(ensemble(x[:1]).shape[-1])
    if target == "runner_up":
        targets = [runner_up(ensemble, x, y)]
    else:
        targets = [torch.full_like(y, t) for t in range(k)]

    runs = []
    for t in targets:
        def objective(xa: Tensor, t: Tensor = t) -> tuple[Tensor, Tensor]:
            logits = ensemble.member_logits(xa)
            m = logits.shape[0]
            ce = F.cross_entropy(logits.flatten(0, 1), t.repeat(m), reduction="none")
            return -ce.view(m, -1).sum(0), _broken(logits.detach(), y, detector)

        runs.append(pgd_objective(objective, x, eps=eps, steps=steps, alpha=alpha, norm=norm,
                                  generator=generator))
    if target == "all":
        # where t == y a run only pulls toward the truth; select_worst passes over it
        return select_worst(ensemble, x, y, runs, detector=detector)
    return runs[0]


def penalized_pgd(ensemble: Ensemble, x: Tensor, y: Tensor, *, eps: float,
                  detector: DisagreementDetector, kappas: Sequence[float] = KAPPAS,
                  steps: int = 40, alpha: float | None = None, norm: str = "linf",
                  confidence: float = 1.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """Adaptive attack (d): PGD on the ensemble's margin minus κ · the detector's score.

    Objective per input: min(margin, ``confidence``) − κ · score, with margin =
    max_{i≠y} log p̄ᵢ − log p̄_y on the ensemble's mean softmax (positive = misclassified); the
    cap stops the margin from outweighing the score once the input is misclassified with
    ``confidence`` nats to spare. A ``vote_disagreement`` detector (not differentiable) is
    descended through ``mean_kl_to_mean`` as a surrogate; success is always judged by the
    detector itself. One run per κ; per input the best run is kept (:func:`select_worst`).

    Args:
        detector: the fitted detector the attacker knows.
        kappas: penalty weights, each > 0 (0 would be the oblivious attack).
        confidence: margin cap in nats (> 0).
    """
    _check(ensemble, x, y, detector)
    if detector is None:
        raise EnsdivError("penalized_pgd needs the detector it penalizes")
    detector._need_fit()
    if not kappas:
        raise EnsdivError("kappas needs at least one value")
    for kappa in kappas:
        check_real("kappa", kappa, minimum=0)
    check_real("confidence", confidence, minimum=0)
    name = detector.score_name if detector.score_name in DIFFERENTIABLE_SCORES \
        else "mean_kl_to_mean"
    score_fn = SCORES[name]

    runs = []
    for kappa in kappas:
        def objective(xa: Tensor, kappa: float = kappa) -> tuple[Tensor, Tensor]:
            logits = ensemble.member_logits(xa)
            logp = mean_log_softmax(logits)
            true = logp.gather(1, y[:, None]).squeeze(1)
            other = logp.scatter(1, y[:, None], float("-inf")).amax(1)
            margin = (other - true).clamp(max=confidence)
            return margin - kappa * score_fn(logits), _broken(logits.detach(), y, detector)

        runs.append(pgd_objective(objective, x, eps=eps, steps=steps, alpha=alpha, norm=norm,
                                  generator=generator))
    return select_worst(ensemble, x, y, runs, detector=detector)
