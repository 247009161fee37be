"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019) for members and whole ensembles.

The smoothed classifier g(x) = argmax_c P(f(x + ε) = c), ε ~ N(0, σ²I), is constant within the
ℓ2 ball of radius σ·Φ⁻¹(p_A) around x when its top class has probability at least p_A > ½.
:class:`Smooth` estimates that probability by Monte Carlo and bounds it from below:

- :meth:`Smooth.predict` — Cohen's PREDICT: the top class, or :data:`ABSTAIN` unless a two-sided
  binomial test on the top two counts rejects a tie at level α;
- :meth:`Smooth.certify` — Cohen's CERTIFY: the class picked from n0 samples, its probability
  bounded from n **fresh** samples (one-sided Clopper–Pearson at level α), the radius
  σ·Φ⁻¹(p_A_lower), or abstain if the bound is ≤ ½;
- :meth:`Smooth.certify_radius` — "is x certified at radius r?" with staged sampling
  (Horváth et al. 2022): far fewer samples for the same guarantee.

For an :class:`~ensdiv.ensemble.Ensemble` every member sees the **same** noise draw (one pass
per noise batch) and the base prediction is the argmax of the mean member softmax (``vote=True``:
the members' majority). ``x`` is one input ``[C, H, W]`` in [0, 1]; σ is in pixel units.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> sm = Smooth(net, num_classes=2, sigma=0.25)
    >>> cls, radius = sm.certify(torch.rand(1, 2, 2), n0=10, n=200, alpha=0.01, batch_size=100)
    >>> cls in (0, 1, ABSTAIN) and radius >= 0
    True
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence

import torch
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm
from torch import Tensor, nn

from ensdiv.ensemble import Ensemble, majority_vote
from ensdiv.errors import EnsdivError, EnsdivWarning, check_input, check_int, check_real

ABSTAIN = -1
"""The class :class:`Smooth` returns when it cannot decide or certify."""


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper–Pearson lower bound on a binomial proportion at level ``alpha``:
    P(p < bound) ≤ alpha. ``beta.ppf(alpha, k, n − k + 1)``, 0 when k = 0.

    Example:
        >>> round(lower_confidence_bound(100, 100, 0.001), 4)   # α^(1/n)
        0.9333
    """
    return 0.0 if k == 0 else float(beta_dist.ppf(alpha, k, n - k + 1))


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper–Pearson upper bound at level ``alpha``: P(p > bound) ≤ alpha.

    Example:
        >>> round(upper_confidence_bound(0, 100, 0.001), 4)     # 1 − α^(1/n)
        0.0667
    """
    return 1.0 if k == n else float(beta_dist.ppf(1 - alpha, k + 1, n - k))


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius any input can get from n samples at level α: σ·Φ⁻¹(α^{1/n})
    (every sample on the top class).

    Example:
        >>> round(max_certifiable_radius(1.0, 100_000, 0.001), 2)
        3.81
    """
    return sigma * float(norm.ppf(alpha ** (1.0 / n)))


def _check_alpha(alpha: float) -> None:
    check_real("alpha", alpha, minimum=0)
    if not 0 < alpha < 1:
        raise EnsdivError(f"alpha must be in (0, 1); got {alpha!r}")


class Smooth:
    """A Gaussian-smoothed classifier around any logits model, a member or an ensemble.

    Args:
        base: module mapping [B, C, H, W] in [0, 1] to logits [B, K] (an
            :class:`~ensdiv.ensemble.Ensemble` gives log mean softmax, whose argmax is the
            ensemble's class).
        num_classes: K.
        sigma: noise standard deviation in pixel units (> 0); certify at the σ the members
            were trained with.
        vote: for an ensemble, the base prediction is the members' majority vote instead of the
            mean softmax's argmax.
        generator: a ``torch.Generator`` for the noise (on the CPU or the model's device), or
            None for a fresh one on the model's device seeded with ``seed`` (the same seed
            gives the same noise on CPU runs; a GPU's stream differs from the CPU's).
        seed: seed of that fresh generator.
        amp: run the noisy forward passes under bfloat16 autocast (GPUs). The certificate's
            statistics are exact counts either way; only the base classifier changes (slightly).
        channels_last: classify with a **copy** of ``base`` whose 4-D weights are in the
            channels-last memory format (values unchanged): noisy forward passes of the shipped
            cnn then run about 1.5× faster on CPU (``benchmarks/bench_smoothing.py``; ``ensdiv
            certify`` turns it on). ``base`` itself is never changed, so it can go on training
            (its GroupNorm double backward is slower in that format) — but the copy does not
            see later changes to ``base``. Off by default: the smoothed classifier then holds
            ``base`` itself.

    Throughput also depends on ``batch_size``: on CPU, batches of about 100 noisy copies keep the
    activations in cache and ran about 2.4× faster than batches of 1,000 (cnn, 28×28).

    Example:
        >>> from ensdiv.ensemble import Ensemble
        >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
        >>> sm = Smooth(ens, num_classes=10, sigma=0.5)
        >>> sm.predict(torch.rand(1, 8, 8), n=100, alpha=0.001, batch_size=50) in range(-1, 10)
        True
    """

    def __init__(self, base: nn.Module, *, num_classes: int, sigma: float, vote: bool = False,
                 generator: torch.Generator | None = None, seed: int = 0,
                 channels_last: bool = False, amp: bool = False) -> None:
        if not isinstance(base, nn.Module):
            raise EnsdivError(f"base must be a torch.nn.Module; got {type(base).__name__}")
        check_int("num_classes", num_classes, minimum=2)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (
                math.isfinite(sigma) and sigma > 0):
            raise EnsdivError(f"sigma must be a finite number > 0; got {sigma!r}")
        if vote and not isinstance(base, Ensemble):
            raise EnsdivError("vote=True needs an Ensemble base (it votes over members)")
        check_int("seed", seed, minimum=0)
        if channels_last:  # a copy: a constructor never changes its argument
            base = copy.deepcopy(base).to(memory_format=torch.channels_last)
        self.base, self.num_classes, self.sigma, self.vote = base, num_classes, float(sigma), vote
        self.amp = bool(amp)
        # noise is drawn where the model is: no host-to-device copy per batch
        self.generator = generator if generator is not None else \
            torch.Generator(device=self._device()).manual_seed(seed)

    # ------------------------------------------------------------------ sampling
    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise EnsdivError(f"x must be one input [C, H, W] without a batch dimension; got "
                              f"{shape}")
        check_input(self.base, x[None])

    def _device(self) -> torch.device:
        p = next(self.base.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.inference_mode()
    def sample_counts(self, x: Tensor, num: int, batch_size: int) -> Tensor:
        """Class counts [K] (int64) of the base prediction on ``num`` fresh noisy copies of
        ``x``, evaluated ``batch_size`` at a time on the model's device."""
        check_int("number of samples", num, minimum=0)
        check_int("batch_size", batch_size)
        dev = self._device()
        x = x.to(dev)
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=dev)
        left = num
        while left > 0:
            b = min(batch_size, left)
            noise = torch.randn((b, *x.shape), generator=self.generator,
                                device=self.generator.device, dtype=x.dtype).to(dev)
            batch = x.unsqueeze(0) + noise * self.sigma
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
                if self.vote:
                    pred = majority_vote(self.base.member_logits(batch))
                else:
                    pred = self.base(batch).argmax(-1)
            counts += torch.bincount(pred, minlength=self.num_classes)[:self.num_classes]
            left -= b
        return counts.cpu()

    # ------------------------------------------------------------------ Cohen et al.
    def predict(self, x: Tensor, *, n: int, alpha: float, batch_size: int) -> int:
        """Cohen's PREDICT: the top class of n noisy samples, or :data:`ABSTAIN` unless the
        two-sided binomial test of its count against the runner-up's rejects equality at
        level α. Returns a wrong class with probability at most α (Cohen et al., Thm. 2)."""
        self._check_x(x)
        check_int("n", n)
        _check_alpha(alpha)
        counts = self.sample_counts(x, n, batch_size)
        top2 = counts.topk(2)
        n_a, n_b = int(top2.values[0]), int(top2.values[1])
        if n_a + n_b == 0 or binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2.indices[0])

    def certify(self, x: Tensor, *, n0: int, n: int, alpha: float,
                batch_size: int) -> tuple[int, float]:
        """Cohen's CERTIFY: ``(class, radius)`` or ``(ABSTAIN, 0.0)``.

        The class ĉ is the top class of ``n0`` samples; its probability p_A under noise is
        bounded below from ``n`` **separate** samples by the one-sided Clopper–Pearson bound
        at level α; the radius is σ·Φ⁻¹(p_A_lower), or abstain if p_A_lower ≤ ½.

        Guarantee: with probability at least 1 − α over the noise, if a class is returned then
        the smoothed classifier g predicts it at x and at every x' with ‖x' − x‖₂ < radius
        (Cohen et al., Thm. 1): ĉ is fixed before the n samples are drawn, so the bound is a
        valid level-α bound on P(f(x + ε) = ĉ).
        """
        self._check_x(x)
        check_int("n0", n0)
        check_int("n", n)
        _check_alpha(alpha)
        c_hat = int(self.sample_counts(x, n0, batch_size).argmax())
        n_a = int(self.sample_counts(x, n, batch_size)[c_hat])
        p_lower = lower_confidence_bound(n_a, n, alpha)
        if p_lower <= 0.5:
            return ABSTAIN, 0.0
        return c_hat, self.sigma * float(norm.ppf(p_lower))

    def certify_radius(self, x: Tensor, radius: float, *, alpha: float,
                       stages: Sequence[int] = (1_000, 10_000, 100_000), beta: float = 1e-4,
                       n0: int = 100, batch_size: int = 100) -> tuple[int, int]:
        """Is ``x`` certified at ``radius``? ``(class or ABSTAIN, noise samples used)``.

        Staged sampling (Horváth et al. 2022): ĉ from ``n0`` samples; then for each stage k of
        K, ``stages[k]`` **fresh** samples give a Clopper–Pearson lower bound at level α/K on
        p = P(f(x + ε) = ĉ); if it exceeds p* = Φ(radius/σ) (and ½), x is certified at
        ``radius``. Otherwise, if the upper bound at level ``beta`` is below p*, the radius is
        out of reach and the search stops early (abstain); the last stage abstains.

        Why the 1 − α guarantee holds: a false certificate needs some stage's level-α/K bound to
        exceed the true p; each stage uses fresh samples, so each such event has probability
        ≤ α/K and their union ≤ α (Bonferroni), whatever the stopping rule; early stops only
        ever abstain, so they cannot add false certificates (they only cost abstentions, with
        probability ≤ β on an input that would have certified).
        """
        self._check_x(x)
        check_real("radius", radius, minimum=0)
        _check_alpha(alpha)
        check_real("beta", beta, minimum=0)
        if not 0 < beta < 1:
            raise EnsdivError(f"beta must be in (0, 1); got {beta!r}")
        if not stages:
            raise EnsdivError("stages needs at least one sample size")
        for s in stages:
            check_int("stage size", s)
        check_int("n0", n0)
        k = len(stages)
        reach = max_certifiable_radius(self.sigma, max(stages), alpha / k)
        if radius >= reach:
            warnings.warn(f"radius {radius:g} is beyond the largest radius {reach:.3f} that "
                          f"{max(stages)} samples can certify at alpha/{k} (sigma "
                          f"{self.sigma:g}); every input will abstain", EnsdivWarning,
                          stacklevel=2)
        p_star = max(0.5, float(norm.cdf(radius / self.sigma)))
        c_hat = int(self.sample_counts(x, n0, batch_size).argmax())
        used = n0
        for size in stages:
            n_a = int(self.sample_counts(x, size, batch_size)[c_hat])
            used += size
            if lower_confidence_bound(n_a, size, alpha / k) > p_star:
                return c_hat, used
            if upper_confidence_bound(n_a, size, beta) <= p_star:
                break
        return ABSTAIN, used


def certified_accuracy(records: Sequence[dict], radii: Sequence[float]) -> list[float]:
    """Share of records whose prediction is correct with a certified radius ≥ r, per r
    (records as written by ``certify_dataset``: ``correct`` and ``radius``).

    Example:
        >>> recs = [{"correct": True, "radius": 0.6}, {"correct": True, "radius": 0.2},
        ...         {"correct": False, "radius": 0.9}, {"correct": False, "radius": 0.0}]
        >>> certified_accuracy(recs, [0.0, 0.5, 1.0])
        [0.5, 0.25, 0.0]
    """
    if not records:
        return [math.nan for _ in radii]
    return [sum(1 for r in records if r["correct"] and r["radius"] >= rad) / len(records)
            for rad in radii]


def average_certified_radius(records: Sequence[dict]) -> float:
    """ACR: the mean over records of the certified radius when correct, else 0.

    Example:
        >>> average_certified_radius([{"correct": True, "radius": 1.0},
        ...                           {"correct": False, "radius": 2.0}])
        0.5
    """
    if not records:
        return math.nan
    return sum(r["radius"] for r in records if r["correct"]) / len(records)
