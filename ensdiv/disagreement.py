"""Detecting adversarial inputs by member disagreement, and judging the detector honestly.

Members whose input gradients point apart tend to disagree on an input crafted against some of
them while agreeing on clean inputs (Bagnall et al. 2017; Feinman et al. 2017 report ROC-AUC
0.85-0.93 for uncertainty scores; Smith & Gal 2018 prefer mutual information). Every score maps
member logits ``[M, B, K]`` to ``[B]``, higher = more suspicious:

- :func:`vote_disagreement` — 1 − share of members voting for the majority class;
- :func:`mean_kl_to_mean` — mean KL of each member's softmax to the mean softmax, which is the
  ensemble's mutual information H(p̄) − mean H(pₘ) (equal to the generalized Jensen–Shannon
  divergence with equal weights);
- :func:`js_divergence` — mean Jensen–Shannon divergence over member pairs;
- :func:`prob_variance` — variance across members of the probability of the ensemble's class;
- :func:`max_prob_deficit` — 1 − the ensemble's top mean probability: the single-model
  confidence baseline every disagreement score must beat.

A :class:`DisagreementDetector` sets **one** threshold on clean held-out data (at a target
false-positive rate) and flags inputs scoring above it; :func:`evaluate_detector` reports AUROC,
the true-positive rate at that threshold, the realized false-positive rate, and the
detection-aware robust accuracy (an attack succeeds only if the input is misclassified **and**
not flagged). A detector must be judged against attacks that know it (Carlini & Wagner 2017;
Tramèr et al. 2020): see :mod:`ensdiv.adaptive`.

Example:
    >>> import torch
    >>> agree = torch.tensor([[[4.0, 0.0, 0.0]]] * 3)             # 3 members, 1 input, 3 classes
    >>> split = torch.tensor([[[4.0, 0, 0]], [[0, 4.0, 0]], [[0, 0, 4.0]]])
    >>> float(vote_disagreement(agree)), round(float(vote_disagreement(split)), 4)
    (0.0, 0.6667)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ensdiv.ensemble import Ensemble, mean_log_softmax, weights_fingerprint
from ensdiv.errors import EnsdivError, check_choice, check_input, check_int, check_real
from ensdiv.io import atomic_torch_save, read_torch

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import SCORE_NAMES as SCORE_NAMES
from ensdiv.vocab import Score as Score


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 3 or logits.shape[0] < 1 \
            or logits.shape[2] < 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise EnsdivError(f"scores need member logits of shape [M, B, K] with K >= 2; got {shape}")


def vote_disagreement(logits: Tensor) -> Tensor:
    """1 − (votes for the majority class) / M, [B]; 0 when all members agree, at most
    1 − 1/M. Not differentiable (argmax).

    Example:
        >>> float(vote_disagreement(torch.tensor([[[1.0, 0]], [[0, 1.0]]])))
        0.5
    """
    _check_logits(logits)
    m, _, k = logits.shape
    counts = torch.nn.functional.one_hot(logits.argmax(-1), k).sum(0)
    return 1.0 - counts.amax(-1).to(logits.dtype) / m


def mean_kl_to_mean(logits: Tensor) -> Tensor:
    """Mean over members of KL(pₘ ‖ p̄), p̄ the mean softmax, [B] (nats): the ensemble's mutual
    information. 0 when all members agree, at most log M (members certain of distinct classes).

    Example:
        >>> round(float(mean_kl_to_mean(torch.tensor([[[50.0, 0]], [[0, 50.0]]]))), 4)
        0.6931
    """
    _check_logits(logits)
    logp = torch.log_softmax(logits, -1)
    log_mean = torch.logsumexp(logp, 0) - math.log(logits.shape[0])
    return (logp.exp() * (logp - log_mean)).sum(-1).mean(0).clamp_min(0.0)


def js_divergence(logits: Tensor) -> Tensor:
    """Mean Jensen–Shannon divergence over the M(M−1)/2 member pairs, [B] (nats), in
    [0, log 2]; 0 for a single member. (The equal-weight JSD of all M members at once is
    :func:`mean_kl_to_mean`.)

    Example:
        >>> round(float(js_divergence(torch.tensor([[[50.0, 0]], [[0, 50.0]]]))), 4)
        0.6931
    """
    _check_logits(logits)
    m = logits.shape[0]
    if m < 2:
        return torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
    logp = torch.log_softmax(logits, -1)
    i, j = torch.triu_indices(m, m, 1, device=logits.device)
    a, b = logp[i], logp[j]  # [P, B, K]
    log_mid = torch.logaddexp(a, b) - math.log(2.0)
    kl_a = (a.exp() * (a - log_mid)).sum(-1)
    kl_b = (b.exp() * (b - log_mid)).sum(-1)
    return (0.5 * (kl_a + kl_b)).mean(0).clamp_min(0.0)


def prob_variance(logits: Tensor) -> Tensor:
    """Variance across members (population, ddof 0) of each member's probability for the
    ensemble's predicted class (argmax of the mean softmax), [B]; at most 1/4.

    Example:
        >>> float(prob_variance(torch.tensor([[[50.0, 0]], [[0, 50.0]]])))
        0.25
    """
    _check_logits(logits)
    p = torch.softmax(logits, -1)
    top = p.mean(0).argmax(-1)  # [B]
    pc = p.gather(-1, top[None, :, None].expand(p.shape[0], -1, 1)).squeeze(-1)  # [M, B]
    return pc.var(0, unbiased=False)


def max_prob_deficit(logits: Tensor) -> Tensor:
    """1 − max over classes of the mean softmax, [B]: the confidence baseline (what a single
    model's softmax would give), in [0, 1 − 1/K].

    Example:
        >>> round(float(max_prob_deficit(torch.zeros(2, 1, 4))), 4)
        0.75
    """
    _check_logits(logits)
    return 1.0 - torch.softmax(logits, -1).mean(0).amax(-1)


SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "vote_disagreement": vote_disagreement, "mean_kl_to_mean": mean_kl_to_mean,
    "js_divergence": js_divergence, "prob_variance": prob_variance,
    "max_prob_deficit": max_prob_deficit}
"""Every score by name (``Tensor[M, B, K] -> Tensor[B]``)."""

DIFFERENTIABLE_SCORES: tuple[str, ...] = tuple(s for s in SCORE_NAMES if s != "vote_disagreement")
"""Scores an adaptive attacker can descend (all but the vote count)."""


def auroc(clean_scores: Tensor | np.ndarray, adv_scores: Tensor | np.ndarray) -> float:
    """Area under the ROC curve of separating adversarial (positive) from clean (negative)
    inputs by score: the probability that a random adversarial input scores above a random clean
    one (ties count half). 0.5 = chance. ``sklearn.metrics.roc_auc_score``; NaN if either set is
    empty.

    Example:
        >>> auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.2]))
        0.875
    """
    c = np.asarray(torch.as_tensor(clean_scores).detach().cpu().double()).ravel()
    a = np.asarray(torch.as_tensor(adv_scores).detach().cpu().double()).ravel()
    if not (len(c) and len(a)):
        return math.nan
    if not (np.isfinite(c).all() and np.isfinite(a).all()):
        raise EnsdivError("auroc needs finite scores")
    labels = np.r_[np.zeros(len(c)), np.ones(len(a))]
    return float(roc_auc_score(labels, np.r_[c, a]))


def calibrate_threshold(clean_scores: Tensor, fpr: float) -> float:
    """The smallest threshold t whose false-positive rate on ``clean_scores`` (the share
    scoring strictly above t) is ≤ ``fpr``. With distinct scores the realized rate is within
    one sample of ``fpr``; ties can only lower it.

    Example:
        >>> calibrate_threshold(torch.arange(100.0), 0.05)   # 94 of 100 at or below 94
        94.0
    """
    check_real("fpr", fpr, minimum=0)
    if not fpr < 1:
        raise EnsdivError(f"fpr must be < 1; got {fpr!r}")
    s = torch.as_tensor(clean_scores).detach().double().flatten().cpu()
    if not len(s):
        raise EnsdivError("calibration needs at least one clean input")
    if not bool(torch.isfinite(s).all()):
        raise EnsdivError("calibration scores must be finite")
    u = torch.unique(s)  # sorted
    above = len(s) - torch.searchsorted(s.sort().values, u, right=True)  # count > u[i]
    ok = above <= fpr * len(s) + 1e-9
    return float(u[int(ok.nonzero()[0])])


DETECTOR_FORMAT = "ensdiv.detector/1"


class DisagreementDetector:
    """Flags inputs on which the ensemble's members disagree more than on clean data.

    One threshold, set on clean held-out data only (:meth:`fit`), serves every attack.

    Args:
        ensemble: the :class:`~ensdiv.ensemble.Ensemble` (any ``nn.Module`` with
            ``member_logits``) whose members are compared.
        score: one of :data:`SCORE_NAMES`.

    Example:
        >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
        >>> det = DisagreementDetector(ens, score="mean_kl_to_mean").fit(torch.rand(200, 1, 8, 8))
        >>> det.detect(torch.rand(5, 1, 8, 8)).shape
        torch.Size([5])
    """

    def __init__(self, ensemble: Ensemble, *, score: str = "mean_kl_to_mean") -> None:
        if not isinstance(ensemble, Ensemble):
            raise EnsdivError(f"DisagreementDetector needs an Ensemble; got "
                              f"{type(ensemble).__name__}")
        check_choice("score", score, SCORE_NAMES)
        self.ensemble = ensemble
        self.score_name = score
        self.threshold: float | None = None
        self.fpr: float | None = None
        self.n_calibration = 0

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`load`) has set the threshold."""
        return self.threshold is not None

    def score_logits(self, member_logits: Tensor) -> Tensor:
        """This detector's score of member logits [M, B, K] -> [B] (differentiable unless the
        score is ``vote_disagreement``)."""
        return SCORES[self.score_name](member_logits)

    @torch.no_grad()
    def score(self, x: Tensor | Dataset, *, batch_size: int = 512) -> Tensor:
        """Scores [B] of inputs ``x`` [B, C, H, W] in [0, 1] (or of a dataset's inputs), on
        the CPU. The ensemble's mode is left as found; score it in eval mode."""
        check_int("batch size", batch_size)
        dev = next(self.ensemble.parameters()).device
        loader = DataLoader(x if isinstance(x, Dataset) else TensorDataset(x),
                            batch_size=batch_size)
        out = []
        for i, batch in enumerate(loader):
            xb = batch[0].to(dev)
            if i == 0:
                check_input(self.ensemble, xb)
            out.append(self.score_logits(self.ensemble.member_logits(xb)).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def fit(self, clean: Tensor | Dataset, *, fpr: float = 0.05,
            batch_size: int = 512) -> DisagreementDetector:
        """Set the threshold on clean held-out inputs: the smallest one flagging at most
        ``fpr`` of them (:func:`calibrate_threshold`). Returns self."""
        check_real("fpr", fpr, minimum=0)
        if not 0 < fpr < 1:
            raise EnsdivError(f"fpr must be in (0, 1); got {fpr!r}")
        s = self.score(clean, batch_size=batch_size)
        self.threshold = calibrate_threshold(s, fpr)
        self.fpr, self.n_calibration = float(fpr), int(len(s))
        return self

    def _need_fit(self) -> float:
        if self.threshold is None:
            raise EnsdivError("the detector has no threshold yet: call fit(clean_x) on clean "
                              "held-out data first (or load a fitted one)")
        return self.threshold

    def flags(self, scores: Tensor) -> Tensor:
        """Bool [B]: which scores lie above the calibrated threshold."""
        return torch.as_tensor(scores) > self._need_fit()

    def detect(self, x: Tensor | Dataset, *, batch_size: int = 512) -> Tensor:
        """Bool [B]: which inputs are flagged as adversarial."""
        self._need_fit()
        return self.flags(self.score(x, batch_size=batch_size))

    def state(self) -> dict[str, Any]:
        """What :meth:`save` writes: score, threshold, fpr, calibration size, fingerprint."""
        self._need_fit()
        return {"format": DETECTOR_FORMAT, "score": self.score_name,
                "threshold": self.threshold, "fpr": self.fpr,
                "n_calibration": self.n_calibration, "ensemble": weights_fingerprint(self.ensemble)}

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector's state to ``path`` atomically (the ensemble is saved on
        its own; :meth:`load` checks that the same weights come back)."""
        atomic_torch_save(self.state(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, ensemble: Ensemble) -> DisagreementDetector:
        """A detector saved by :meth:`save`, attached to ``ensemble`` (which must hold the
        weights it was fitted on)."""
        fix = "fit the detector again and save it"
        st = read_torch(path, what="ensdiv detector file", fix=fix,
                        required=("format", "score", "threshold", "ensemble"))
        if st["format"] != DETECTOR_FORMAT:
            raise EnsdivError(f"{path} is not an ensdiv detector file ({DETECTOR_FORMAT}); {fix}")
        det = cls(ensemble, score=st["score"])
        if weights_fingerprint(ensemble) != st["ensemble"]:
            raise EnsdivError(f"{path} was fitted on a different ensemble (weights differ); "
                              f"{fix}")
        det.threshold, det.fpr = float(st["threshold"]), st.get("fpr")
        det.n_calibration = int(st.get("n_calibration", 0))
        return det


@dataclass(frozen=True)
class DetectionResult:
    """A detector against one set of adversarial inputs.

    Attributes:
        auroc: clean inputs the ensemble classifies correctly (negatives) vs their successful
            adversarial versions (positives); NaN if the attack never succeeded.
        tpr: share of successful adversarial inputs flagged at the calibrated threshold.
        fpr: share of all clean test inputs flagged (realized false-positive rate).
        clean_acc: ensemble accuracy on the clean inputs.
        robust_acc: share of inputs classified correctly clean and after the attack (no
            detector).
        detection_robust_acc: share of inputs classified correctly clean whose adversarial
            version is classified correctly **or** flagged (the attack succeeds only if the
            input is misclassified and not flagged).
        attack_success: successful adversarials / inputs correct clean (as everywhere).
        undetected_success: misclassified and not flagged / inputs correct clean.
        n, n_correct, n_success, n_flagged_success, n_flagged_clean: the counts.
    """

    auroc: float
    tpr: float
    fpr: float
    clean_acc: float
    robust_acc: float
    detection_robust_acc: float
    attack_success: float
    undetected_success: float
    n: int
    n_correct: int
    n_success: int
    n_flagged_success: int
    n_flagged_clean: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (NaN stays NaN; records turn it into null)."""
        return asdict(self)


def _rate(a: int, b: int) -> float:
    return a / b if b else math.nan


@torch.no_grad()
def evaluate_detector(detector: DisagreementDetector, clean_x: Tensor, y: Tensor,
                      adv_x: Tensor, *, batch_size: int = 512) -> DetectionResult:
    """Judge a fitted detector on clean test inputs and their adversarial versions.

    Args:
        detector: fitted on other (held-out) clean data.
        clean_x: [B, C, H, W] clean test inputs in [0, 1]; y: labels [B].
        adv_x: [B, C, H, W] the adversarial version of each input (any attack).

    Returns:
        A :class:`DetectionResult`.

    Example:
        >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=4, seed=0).eval()
        >>> det = DisagreementDetector(ens).fit(torch.rand(100, 1, 8, 8))
        >>> x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 4, (6,))
        >>> r = evaluate_detector(det, x, y, x)     # "attack" that changes nothing
        >>> r.attack_success, r.detection_robust_acc == r.clean_acc
        (0.0, True)
    """
    detector._need_fit()
    ens = detector.ensemble
    check_input(ens, clean_x, y)
    if not isinstance(adv_x, Tensor) or adv_x.shape != clean_x.shape:
        raise EnsdivError(f"adv_x must have clean_x's shape {tuple(clean_x.shape)}; got "
                          f"{tuple(adv_x.shape) if isinstance(adv_x, Tensor) else adv_x!r}")
    check_input(ens, adv_x)
    dev = next(ens.parameters()).device
    preds, scores = [], []
    for xs in (clean_x, adv_x):
        p, s = [], []
        for i in range(0, len(xs), batch_size):
            logits = ens.member_logits(xs[i:i + batch_size].to(dev))
            p.append(mean_log_softmax(logits).argmax(-1).cpu())
            s.append(detector.score_logits(logits).cpu())
        preds.append(torch.cat(p))
        scores.append(torch.cat(s))
    y = y.cpu()
    correct = preds[0] == y
    success = correct & (preds[1] != y)
    flag_clean, flag_adv = detector.flags(scores[0]), detector.flags(scores[1])
    n, n_correct, n_success = len(y), int(correct.sum()), int(success.sum())
    held = correct & ((preds[1] == y) | flag_adv)
    return DetectionResult(
        auroc=auroc(scores[0][correct], scores[1][success]),
        tpr=_rate(int((success & flag_adv).sum()), n_success),
        fpr=_rate(int(flag_clean.sum()), n),
        clean_acc=_rate(n_correct, n),
        robust_acc=_rate(int((correct & (preds[1] == y)).sum()), n),
        detection_robust_acc=_rate(int(held.sum()), n),
        attack_success=_rate(n_success, n_correct),
        undetected_success=_rate(int((success & ~flag_adv).sum()), n_correct),
        n=n, n_correct=n_correct, n_success=n_success,
        n_flagged_success=int((success & flag_adv).sum()), n_flagged_clean=int(flag_clean.sum()))
