"""Training recipes: what a :class:`TrainConfig` means, turned into an ensemble and a loss for
the training loop :func:`ensdiv.loop.fit`.

:func:`make_loss` maps a config to its objective (summed CE, a diversity term, adversarial
training, a teacher's students); :func:`train` builds the members and fits them, with the
per-epoch diversity metrics of :func:`make_epoch_hooks`. The run folder around a training
(``config.json``, a lock, the resume rules) is the driver's: :mod:`ensdiv.runs.train`.

The loop itself and its files are re-exported here (``from ensdiv.train import fit``).

Example:
    >>> cfg = TrainConfig(dataset="digits", arch="mlp", members=2, epochs=1)
    >>> cfg.validate().members
    2
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ensdiv.adp import ADP_ALPHA, check_adp
from ensdiv.data import DATASETS, DatasetInfo
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, EnsdivWarning, check_choice, check_int, check_real
from ensdiv.gdr import gradient_diversity
from ensdiv.gradients import input_gradients
from ensdiv.io import JsonConfig
from ensdiv.loop import (  # noqa: F401 - the loop's public names, re-exported
    CHECKPOINT,
    ENSEMBLE,
    METRICS,
    EpochHook,
    LossFn,
    TrainingDiverged,
    evaluate,
    finished_epochs,
    fit,
    gaussian_noise,
    read_checkpoint,
)
from ensdiv.models import ARCHS
from ensdiv.objective import (
    DIVERSITIES,
    OBJECTIVES,
    TransferLoss,
    adversarial_loss,
    ce_loss,
    ensemble_loss,
)
from ensdiv.robust_transfer import DEFAULT_TRANSFER_WEIGHT, TRANSFERS, Teacher
from ensdiv.runtime import resolve_device

DIVERSITY_CHOICES: tuple[str, ...] = DIVERSITIES

DEFAULT_LR = 3e-3
"""The one default Adam learning rate of ``train``, ``demo`` and ``sweep``."""

DEFAULT_LAM = 0.5
"""Default regularizer weight λ when a diversity term is chosen (GAL's authors' value)."""

DEFAULT_AT_STEPS = 7
"""PGD steps of adversarial training when ``--steps`` is not given (Madry et al.'s CIFAR-10
setting; step size 2.5·eps/steps)."""

ADVERSARIAL_ATTACKS: tuple[str, ...] = ("pgd",)
"""Attacks adversarial training can use."""

MAX_PLAUSIBLE_SIGMA = 1.0
"""Noise std above which training inputs (pixels in [0, 1]) are mostly clamped noise."""


@dataclasses.dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """Everything that defines a training run (saved as ``config.json`` in the run folder).

    ``diversity``/``lam``/``noise_sigma`` select the objective (see :func:`make_loss`). ``lam``
    left as None means 0 without a diversity term and :data:`DEFAULT_LAM` with one;
    :meth:`validate` returns the config with that resolved, which is what a run records.

    ``objective="adversarial"`` trains every member on its own PGD examples (``attack``,
    ``eps``, ``steps``; :func:`ensdiv.objective.adversarial_loss`). ``teacher`` (a run folder
    or ensemble file of one model) with ``transfer`` ``"rrm"`` or ``"crt"`` trains every member
    as its student (:class:`ensdiv.robust_transfer.TransferLoss`, CE weight
    ``transfer_weight``); CRT needs ``noise_sigma`` > 0, the noise it transfers under.
    ``amp`` computes the loss under bfloat16 autocast (see :func:`fit`).
    """

    dataset: str = "digits"
    arch: str = "cnn"
    members: int = 3
    epochs: int = 10
    batch_size: int = 128
    lr: float = DEFAULT_LR
    weight_decay: float = 0.0
    seed: int = 0
    diversity: str = "none"
    lam: float | None = None
    noise_sigma: float = 0.0
    objective: str = "standard"
    attack: str = "pgd"
    eps: float | None = None
    steps: int | None = None
    teacher: str | None = None
    transfer: str = "none"
    transfer_weight: float | None = None
    amp: bool = False
    adp_alpha: float | None = None

    KIND: ClassVar[str] = "run"

    def validate(self) -> TrainConfig:
        """Check every field and return the config with ``lam`` resolved; raise
        :class:`EnsdivError` with one clear message if a field is bad. Warns
        (:class:`EnsdivWarning`) about a noise sigma above 1."""
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("arch", self.arch, ARCHS)
        check_choice("diversity", self.diversity, DIVERSITY_CHOICES)
        check_int("members", self.members)
        check_int("epochs", self.epochs)
        check_int("batch size", self.batch_size)
        check_int("seed", self.seed, minimum=0)
        check_real("learning rate", self.lr, minimum=0, strict=True)
        check_real("weight decay", self.weight_decay, minimum=0)
        if not isinstance(self.amp, bool):
            raise EnsdivError(f"amp must be true or false; got {self.amp!r}")
        sigma = check_real("noise sigma", self.noise_sigma, minimum=0)
        if sigma > MAX_PLAUSIBLE_SIGMA:
            warnings.warn(f"noise sigma {sigma:g} is larger than the whole pixel range [0, 1]; "
                          "the training inputs will be mostly clamped noise", EnsdivWarning,
                          stacklevel=1)  # one place: shown once however often validated
        if self.diversity == "none":
            if self.lam is not None and check_real("lam", self.lam) != 0:
                raise EnsdivError(f"lam {self.lam:g} has no effect without a diversity term; "
                                  "choose a --diversity term (or drop --lam)")
            lam = 0.0
        else:
            lam = DEFAULT_LAM if self.lam is None else check_real("lam", self.lam, minimum=0)
            if self.members < 2:
                raise EnsdivError(f"diversity {self.diversity!r} needs at least 2 members; "
                                  f"got {self.members}")
        eps, steps = self._validate_adversarial(sigma)
        weight = self._validate_transfer(sigma)
        adp_alpha = self._validate_adp()
        return dataclasses.replace(self, lam=lam, lr=float(self.lr), adp_alpha=adp_alpha,
                                   weight_decay=float(self.weight_decay), noise_sigma=sigma,
                                   eps=eps, steps=steps, transfer_weight=weight)

    def _validate_adp(self) -> float | None:
        if self.diversity != "adp":
            if self.adp_alpha is not None:
                raise EnsdivError("--adp-alpha sets ADP's entropy weight; add --diversity adp "
                                  "(or drop it)")
            return None
        if self.objective != "standard" or self.transfer != "none":
            raise EnsdivError("--diversity adp trains with the standard objective only (drop "
                              "--objective adversarial / --teacher)")
        alpha = ADP_ALPHA if self.adp_alpha is None else self.adp_alpha
        check_adp(alpha, 0.0)
        return float(alpha)

    def _validate_adversarial(self, sigma: float) -> tuple[float | None, int | None]:
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("attack", self.attack, ADVERSARIAL_ATTACKS)
        if self.objective != "adversarial":
            for name, value in (("eps", self.eps), ("steps", self.steps)):
                if value is not None:
                    raise EnsdivError(f"--{name} sets adversarial training; add --objective "
                                      "adversarial (or drop it)")
            return None, None
        if self.eps is None:
            raise EnsdivError("--objective adversarial needs --eps (the L∞ radius, e.g. 0.1)")
        eps = check_real("eps", self.eps, minimum=0, strict=True)
        if eps > 1:
            raise EnsdivError(f"eps must be at most 1 (pixels are in [0, 1]); got {eps:g}")
        steps = DEFAULT_AT_STEPS if self.steps is None else self.steps
        check_int("steps", steps)
        if sigma > 0:
            raise EnsdivError("choose adversarial training or Gaussian noise training, not "
                              "both (drop --noise-sigma or --objective adversarial)")
        if self.transfer != "none":
            raise EnsdivError("transfer students are trained on clean or noisy inputs, never "
                              "adversarial ones: drop --objective adversarial or --transfer")
        return float(eps), int(steps)

    def _validate_transfer(self, sigma: float) -> float | None:
        check_choice("transfer", self.transfer, TRANSFERS)
        if self.transfer == "none":
            if self.teacher is not None:
                raise EnsdivError("--teacher needs --transfer rrm or crt (how to learn from it)")
            if self.transfer_weight is not None:
                raise EnsdivError("--transfer-weight needs --transfer rrm or crt")
            return None
        if self.teacher is None:
            raise EnsdivError(f"--transfer {self.transfer} needs --teacher RUN (a trained "
                              "robust model)")
        if self.transfer == "crt" and sigma == 0:
            raise EnsdivError("--transfer crt trains on Gaussian-noisy inputs: give "
                              "--noise-sigma (the teacher's training sigma)")
        if self.transfer == "rrm" and sigma > 0:
            raise EnsdivError("--transfer rrm matches representations on clean inputs: drop "
                              "--noise-sigma (or use --transfer crt)")
        if self.transfer_weight is None:
            return DEFAULT_TRANSFER_WEIGHT[self.transfer]
        return float(check_real("transfer weight", self.transfer_weight, minimum=0))


def make_loss(config: TrainConfig, ensemble: Ensemble | None = None,
              teacher: Teacher | None = None) -> LossFn:
    """The objective a config asks for: summed CE plus λ·regularizer (:func:`ensemble_loss`),
    PGD adversarial training (:func:`adversarial_loss`), or a teacher's students
    (:class:`TransferLoss`, which needs the student ``ensemble`` and the ``teacher``)."""
    config = config.validate()
    if config.transfer != "none":
        if ensemble is None or teacher is None:
            raise EnsdivError("a transfer objective needs the student ensemble and the teacher")
        return TransferLoss(teacher, ensemble, config.transfer, weight=config.transfer_weight,
                            diversity=config.diversity, lam=config.lam)
    if config.objective == "adversarial":
        return functools.partial(adversarial_loss, eps=config.eps, steps=config.steps,
                                 diversity=config.diversity, lam=config.lam)
    if config.diversity == "none":
        return ce_loss
    if config.diversity == "adp":
        return functools.partial(ensemble_loss, diversity="adp", lam=config.lam,
                                 adp_alpha=config.adp_alpha)
    return functools.partial(ensemble_loss, diversity=config.diversity, lam=config.lam)


def train(config: TrainConfig, data: tuple[Dataset, Dataset, DatasetInfo], *,
          device: str | torch.device | None = None, out_dir: str | os.PathLike | None = None,
          resume: bool = False, teacher: Teacher | None = None, progress: bool = True,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
          ) -> tuple[Ensemble, list[dict[str, Any]]]:
    """Build the ensemble a :class:`TrainConfig` describes and :func:`fit` it on ``data``
    (``load_dataset``'s ``(train, test, info)``); returns it in eval mode with the records.

    ``out_dir``/``resume`` are :func:`fit`'s: the folder receives metrics, checkpoint and
    ensemble (``ensdiv train`` adds the config, a lock and the resume rules:
    :func:`ensdiv.runs.train.train_run`). A transfer objective needs the frozen ``teacher``.

    Example:
        >>> from ensdiv.data import load_dataset
        >>> cfg = TrainConfig(arch="mlp", members=2, epochs=1)
        >>> ens, recs = train(cfg, load_dataset("digits"), progress=False)
        >>> 0.5 < recs[-1]["ensemble_acc"] <= 1
        True
    """
    config = config.validate()
    device = resolve_device(device)
    train_set, test_set, info = data
    torch.manual_seed(config.seed)
    ensemble = Ensemble.build(config.arch, config.members, in_shape=info.in_shape,
                              num_classes=info.num_classes, seed=config.seed, mean=info.mean,
                              std=info.std, config=config.to_dict()).to(device)
    loss_fn = make_loss(config, ensemble, teacher)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    records = fit(ensemble, train_set, test_set, epochs=config.epochs,
                  batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                  weight_decay=config.weight_decay, loss_fn=loss_fn, out_dir=out_dir,
                  resume=resume, augment=gaussian_noise(config.noise_sigma),
                  epoch_hooks=make_epoch_hooks(config, test_set),
                  progress=progress, on_epoch_end=on_epoch_end, amp=config.amp)
    return ensemble.eval(), records


HELD_OUT = 256
"""Size of the fixed held-out batch (the first test samples) for per-epoch diversity metrics."""


def diversity_hook(test_set: Dataset, n: int = HELD_OUT) -> EpochHook:
    """Epoch hook: mean pairwise input-gradient cosine and ensemble GDR on a fixed held-out
    batch (the first ``n`` test samples), so plain and diverse runs are comparable."""
    x, y = next(iter(DataLoader(test_set, batch_size=n)))

    def hook(ensemble: Ensemble) -> dict[str, Any]:
        device = next(ensemble.parameters()).device
        was_training = ensemble.training
        ensemble.eval()
        grads = input_gradients(ensemble, x.to(device), y.to(device))
        ensemble.train(was_training)
        return gradient_diversity(grads)

    return hook


def make_epoch_hooks(config: TrainConfig, test_set: Dataset) -> list[EpochHook]:
    """Per-epoch extra metrics for a config: diversity metrics whenever M ≥ 2."""
    return [diversity_hook(test_set)] if config.members >= 2 else []
