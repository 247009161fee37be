"""Training recipes: what a :class:`TrainConfig` means, turned into an ensemble and a loss for
the training loop :func:`ensdiv.loop.fit`.

:func:`make_loss` maps a config to its objective (summed CE, a diversity term, adversarial
training, a teacher's students); :func:`train` builds the members and fits them, with the
per-epoch diversity metrics of :func:`make_epoch_hooks`. The run folder around a training
(``config.json``, a lock, the resume rules) is the driver's: :mod:`ensdiv.runs.train`.

The loop itself and its files are re-exported here (``from ensdiv.training import fit``).

Example:
    >>> cfg = TrainConfig(dataset="digits", arch="mlp", members=2, epochs=1)
    >>> cfg.validate().members
    2
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ensdiv import layers
from ensdiv.adp import ADP_ALPHA, check_adp
from ensdiv.augment import check_augment, compose, crop_flip, gaussian_noise
from ensdiv.data import DATASETS, DatasetInfo, validation_split
from ensdiv.dverge import DVERGE_EPS, DVERGE_STEPS, DvergeLoss, check_dverge
from ensdiv.ensemble import Ensemble, weights_fingerprint
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
    accuracies,
    finished_epochs,
    fit,
    read_checkpoint,
)
from ensdiv.models import ARCHS, LAYERS
from ensdiv.objective import (
    DIVERSITIES,
    OBJECTIVES,
    TransferLoss,
    adversarial_loss,
    ce_loss,
    ensemble_loss,
)
from ensdiv.optim import Optim
from ensdiv.recipes import recipe
from ensdiv.robust_transfer import DEFAULT_TRANSFER_WEIGHT, TRANSFERS, Teacher
from ensdiv.runtime import resolve_device
from ensdiv.trs import TRS_EPS, TRS_SMOOTH, TrsLoss, check_trs

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import ADVERSARIAL_ATTACKS as ADVERSARIAL_ATTACKS
from ensdiv.vocab import COMPILE_MIN_STEPS as COMPILE_MIN_STEPS
from ensdiv.vocab import DEFAULT_AT_STEPS as DEFAULT_AT_STEPS
from ensdiv.vocab import DEFAULT_LAM as DEFAULT_LAM
from ensdiv.vocab import DEFAULT_LR as DEFAULT_LR
from ensdiv.vocab import METHOD_LAM as METHOD_LAM

DIVERSITY_CHOICES: tuple[str, ...] = DIVERSITIES

OWN_OPTIONS: dict[str, tuple[str, ...]] = {
    "adp": ("adp_alpha",),
    "trs": ("trs_smooth", "trs_eps", "trs_eps_start"),
    "dverge": ("dverge_eps", "dverge_steps", "dverge_layer", "dverge_clean"),
}
"""Each method's own hyper-parameters (fields of :class:`TrainConfig`), None unless chosen."""

MAX_PLAUSIBLE_SIGMA = 1.0
"""Noise std above which training inputs (pixels in [0, 1]) are mostly clamped noise."""


@dataclasses.dataclass(frozen=True)
class TrainConfig(JsonConfig):
    r"""Everything that defines a training run (saved as ``config.json`` in the run folder).

    ``diversity``/``lam``/``noise_sigma`` select the objective (see :func:`make_loss`). ``lam``
    left as None means 0 without a diversity term and :data:`DEFAULT_LAM` with one;
    :meth:`validate` returns the config with that resolved, which is what a run records.

    ``objective="adversarial"`` trains every member on its own PGD examples (``attack``,
    ``eps``, ``steps``; :func:`ensdiv.objective.adversarial_loss`). ``teacher`` (a run folder
    or ensemble file of one model) with ``transfer`` ``"rrm"`` or ``"crt"`` trains every member
    as its student (:class:`ensdiv.robust_transfer.TransferLoss`, CE weight
    ``transfer_weight``); CRT needs ``noise_sigma`` > 0, the noise it transfers under.
    ``amp`` computes the loss under bfloat16 autocast (see :func:`fit`).

    The recipe (:meth:`optim`, :mod:`ensdiv.optim`): ``optimizer`` ``"adam"`` (the default, at a
    constant ``lr``) or ``"sgd"`` (``momentum``, ``nesterov``), ``weight_decay``, a
    ``schedule`` (``constant``, ``cosine``, ``step`` at ``milestones`` by ``gamma``) after
    ``warmup`` ``schedule_unit``\ s; ``augment`` ``"crop-flip"`` (:mod:`ensdiv.augment`,
    before any noise); ``val_fraction`` holds out a stratified part of the training split
    (seeded by ``val_seed``) whose accuracies each epoch records; ``init_from`` starts the
    members from a trained run's weights (``init_weights``: their fingerprint, which a resumed
    run checks); ``recipe`` names the published recipe the settings came from
    (:mod:`ensdiv.recipes`).
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
    trs_smooth: float | None = None
    trs_eps: float | None = None
    dverge_eps: float | None = None
    dverge_steps: int | None = None
    dverge_layer: int | None = None
    dverge_clean: float | None = None
    trs_eps_start: float | None = None
    # the recipe's optimizer and schedule: Optim's fields, flat for the command line and JSON
    optimizer: str = Optim.name
    momentum: float | None = Optim.momentum
    nesterov: bool = Optim.nesterov
    schedule: str = Optim.schedule
    warmup: int = Optim.warmup
    milestones: tuple[int, ...] = Optim.milestones
    gamma: float = Optim.gamma
    schedule_unit: str = Optim.unit
    augment: str = "none"
    val_fraction: float | None = None
    val_seed: int = 0
    init_from: str | None = None
    init_weights: str | None = None
    recipe: str | None = None
    recipe_overrides: tuple[str, ...] = ()

    KIND: ClassVar[str] = "run"

    def optim(self) -> Optim:
        """The optimizer and learning-rate schedule these settings give.

        Example:
            >>> TrainConfig(optimizer="sgd", lr=0.1).optim().validate().momentum
            0.9
        """
        return Optim(name=self.optimizer, lr=self.lr, weight_decay=self.weight_decay,
                     momentum=self.momentum, nesterov=self.nesterov, schedule=self.schedule,
                     warmup=self.warmup, milestones=tuple(self.milestones), gamma=self.gamma,
                     unit=self.schedule_unit)

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
        optim = self.optim().validate()
        check_augment(self.augment, self.dataset)
        if self.recipe is not None:
            recipe(self.recipe)  # a known name
        elif self.recipe_overrides:
            raise EnsdivError("recipe_overrides belong to a run started from a --recipe")
        if self.val_fraction is not None:
            val = check_real("--val-fraction", self.val_fraction, minimum=0, strict=True)
            if val >= 1:
                raise EnsdivError(f"--val-fraction must be in (0, 1) (the share of the training "
                                  f"split held out); got {val:g}")
        check_int("validation seed", self.val_seed, minimum=0)
        if self.init_weights is not None and self.init_from is None:
            raise EnsdivError("init_weights is the fingerprint of --init-from's weights; give "
                              "--init-from RUN")
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
            lam = METHOD_LAM.get(self.diversity, DEFAULT_LAM) if self.lam is None else \
                check_real("lam", self.lam, minimum=0)
            if self.members < 2:
                raise EnsdivError(f"diversity {self.diversity!r} needs at least 2 members; "
                                  f"got {self.members}")
        if self.diversity == "drt" and sigma == 0:
            warnings.warn("DRT (Yang et al. 2022) trains on Gaussian-noised inputs (σ 0.25 or "
                          "0.5) for randomized smoothing; without --noise-sigma this run "
                          "regularizes margin gradients on clean inputs only", EnsdivWarning,
                          stacklevel=1)
        eps, steps = self._validate_adversarial(sigma)
        weight = self._validate_transfer(sigma)
        own = self._validate_own(lam)
        return dataclasses.replace(self, lam=lam, lr=optim.lr, weight_decay=optim.weight_decay,
                                   momentum=optim.momentum, milestones=optim.milestones,
                                   gamma=optim.gamma, noise_sigma=sigma, eps=eps, steps=steps,
                                   transfer_weight=weight, **own)

    def _validate_own(self, lam: float) -> dict[str, Any]:
        """The chosen method's own hyper-parameters with their defaults; another method's given
        is an error naming the method it belongs to."""
        for method, fields in OWN_OPTIONS.items():
            if method == self.diversity:
                continue
            for f in fields:
                if getattr(self, f) is not None:
                    flag = "--" + f.replace("_", "-")
                    raise EnsdivError(f"{flag} is a hyper-parameter of {method.upper()}; add "
                                      f"--diversity {method} (or drop it)")
        if self.diversity not in OWN_OPTIONS:
            return {}
        if self.objective != "standard" or self.transfer != "none":
            raise EnsdivError(f"--diversity {self.diversity} trains with the standard objective "
                              "only (drop --objective adversarial / --teacher)")
        if self.diversity == "adp":
            alpha = ADP_ALPHA if self.adp_alpha is None else self.adp_alpha
            check_adp(alpha, 0.0)
            return {"adp_alpha": float(alpha)}
        if self.diversity == "trs":
            smooth = TRS_SMOOTH if self.trs_smooth is None else self.trs_smooth
            eps = TRS_EPS if self.trs_eps is None else self.trs_eps
            start = self.trs_eps_start
            check_trs(lam=lam, smooth=smooth, eps=eps, eps_start=start)
            return {"trs_smooth": float(smooth), "trs_eps": float(eps),
                    "trs_eps_start": None if start is None else float(start)}
        eps = DVERGE_EPS if self.dverge_eps is None else self.dverge_eps
        steps = DVERGE_STEPS if self.dverge_steps is None else self.dverge_steps
        clean = 0.0 if self.dverge_clean is None else self.dverge_clean
        check_dverge(eps=eps, steps=steps, lam=lam, clean_weight=clean, layer=self.dverge_layer)
        if self.dverge_layer is not None and self.dverge_layer > LAYERS[self.arch]:
            raise EnsdivError(f"--dverge-layer {self.dverge_layer} does not exist in {self.arch} "
                              f"(layers 1 to {LAYERS[self.arch]})")
        if self.batch_size < 2:
            raise EnsdivError("--diversity dverge pairs images within a batch: --batch-size "
                              "must be at least 2")
        return {"dverge_eps": float(eps), "dverge_steps": int(steps),
                "dverge_clean": float(clean)}

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
    if config.diversity == "trs":
        assert config.trs_smooth is not None and config.trs_eps is not None  # validate()
        return TrsLoss(lam=config.lam, smooth=config.trs_smooth, eps=config.trs_eps,
                       eps_start=config.trs_eps_start)
    if config.diversity == "dverge":
        if ensemble is None:
            raise EnsdivError("DVERGE's loss needs the ensemble (its layers)")
        assert config.dverge_eps is not None and config.dverge_steps is not None
        return DvergeLoss(ensemble, seed=config.seed, eps=config.dverge_eps,
                          steps=config.dverge_steps, lam=config.lam,
                          clean_weight=config.dverge_clean or 0.0, layer=config.dverge_layer)
    return functools.partial(ensemble_loss, diversity=config.diversity, lam=config.lam)


DOUBLE_BACKPROP: tuple[str, ...] = ("cos", "gal", "gdr", "drt", "trs")
"""Objectives that differentiate input gradients again: where a fused double backward helps."""


def compile_pays(ensemble: nn.Module, diversity: str, steps: int,
                 device: str | torch.device) -> bool:
    """``--compile auto``'s rule: fuse GroupNorm's double backward for a run of ``steps``
    optimizer steps on ``device`` when the members have GroupNorm, the objective is one of
    :data:`DOUBLE_BACKPROP`, the device is a CPU (the only one measured) and ``steps`` ≥
    :data:`COMPILE_MIN_STEPS`.

    Example:
        >>> from ensdiv.ensemble import Ensemble
        >>> ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10)
        >>> compile_pays(ens, "gal", 10_000, "cpu"), compile_pays(ens, "gal", 100, "cpu")
        (True, False)
    """
    return (torch.device(device).type == "cpu" and diversity in DOUBLE_BACKPROP
            and steps >= COMPILE_MIN_STEPS
            and any(isinstance(m, nn.GroupNorm) for m in ensemble.modules()))


@contextlib.contextmanager
def _compile_for_run(on: bool) -> Iterator[None]:
    """Under ``use_compiled_kernels("auto")``: this run's decision, undone afterwards."""
    if layers.compile_mode() != "auto":
        yield
        return
    layers.use_compiled_kernels(on)
    try:
        yield
    finally:
        layers.use_compiled_kernels("auto")


def _compile_hook(ensemble: Ensemble) -> dict[str, Any]:
    return {"compiled_kernels": True, "compile_seconds": round(layers.compile_seconds(), 2)}


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
    Under ``ensdiv.layers.use_compiled_kernels("auto")`` (the command line's default) the run
    fuses GroupNorm's double backward where :func:`compile_pays`; whenever the fused kernel is
    on, each epoch's record carries ``compiled_kernels`` and ``compile_seconds``.

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
    val_set = None
    if config.val_fraction is not None:
        train_set, val_set = validation_split(train_set, config.val_fraction,  # type: ignore
                                              seed=config.val_seed)
    init = None if config.init_from is None else load_init(config, info)
    torch.manual_seed(config.seed)
    ensemble = Ensemble.build(config.arch, config.members, in_shape=info.in_shape,
                              num_classes=info.num_classes, seed=config.seed, mean=info.mean,
                              std=info.std, config=config.to_dict()).to(device)
    if init is not None:
        ensemble.load_state_dict(init[0])
    loss_fn = make_loss(config, ensemble, teacher)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    steps = config.epochs * math.ceil(len(train_set) / config.batch_size)
    augment = compose(crop_flip() if config.augment == "crop-flip" else None,
                      gaussian_noise(config.noise_sigma))
    with _compile_for_run(compile_pays(ensemble, config.diversity, steps, device)):
        hooks = make_epoch_hooks(config, test_set, val_set)
        if layers.compiled_kernels_enabled():
            hooks.append(_compile_hook)
        records = fit(ensemble, train_set, test_set, epochs=config.epochs,
                      batch_size=config.batch_size, seed=config.seed, optim=config.optim(),
                      loss_fn=loss_fn, out_dir=out_dir, resume=resume, augment=augment,
                      epoch_hooks=hooks, progress=progress, on_epoch_end=on_epoch_end,
                      amp=config.amp)
    return ensemble.eval(), records


def load_init(config: TrainConfig, info: DatasetInfo) -> tuple[dict[str, Tensor], str]:
    """The weights ``config.init_from`` (a run folder or an ensemble file) holds, checked to fit
    the ensemble ``config`` describes on a data set of ``info`` (architecture, members, input
    shape, classes), and their fingerprint — which must be ``config.init_weights`` when that is
    set (a resumed run whose source was retrained since is refused).

    Example:
        >>> import tempfile, pathlib
        >>> from ensdiv.data import load_dataset
        >>> _, _, info = load_dataset("digits")
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "e.pt"
        >>> _ = Ensemble.build("mlp", 2, in_shape=info.in_shape, num_classes=10,
        ...                    config={"arch": "mlp"}).save(p)
        >>> len(load_init(TrainConfig(arch="mlp", members=2, init_from=str(p)), info)[1])
        16
    """
    assert config.init_from is not None
    path = Path(config.init_from)
    if path.is_dir():
        path = path / ENSEMBLE
    if not path.is_file():
        raise EnsdivError(f"--init-from {config.init_from}: no ensemble there (expected a run "
                          f"folder with {ENSEMBLE} or an ensemble file)")
    source = Ensemble.load(path, map_location="cpu")
    theirs = (source.config.get("arch"), source.num_members,
              None if source.in_shape is None else tuple(source.in_shape),
              getattr(source, "num_classes", None))
    ours = (config.arch, config.members, tuple(info.in_shape), info.num_classes)
    names = ("architecture", "members", "input shape", "classes")
    for name, a, b in zip(names, theirs, ours, strict=True):
        if a is not None and a != b:
            raise EnsdivError(f"--init-from {config.init_from} holds an ensemble of {name} "
                              f"{a}, this run trains {name} {b}: it can only start from an "
                              "ensemble of the same architecture, size and data shape")
    fingerprint = weights_fingerprint(source)
    if config.init_weights is not None and config.init_weights != fingerprint:
        raise EnsdivError(f"--init-from {config.init_from} holds other weights than this run "
                          f"started from ({fingerprint}, recorded {config.init_weights}); "
                          "restore them, or start the run anew in another --out")
    return source.state_dict(), fingerprint


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


def validation_hook(val_set: Dataset) -> EpochHook:
    """Epoch hook: the accuracies (:func:`ensdiv.loop.accuracies`) on the validation split,
    as ``val_acc`` (mean softmax), ``val_member_acc``, ``val_vote_acc`` and ``val_n``."""

    def hook(ensemble: Ensemble) -> dict[str, Any]:
        acc = accuracies(ensemble, val_set)
        return {"val_acc": acc["ensemble_acc"], "val_member_acc": acc["member_acc"],
                "val_vote_acc": acc["vote_acc"], "val_n": acc["n"]}

    return hook


def make_epoch_hooks(config: TrainConfig, test_set: Dataset,
                     val_set: Dataset | None = None) -> list[EpochHook]:
    """Per-epoch extra metrics for a config: validation accuracies when a validation split is
    held out, diversity metrics whenever M ≥ 2."""
    hooks = [] if val_set is None else [validation_hook(val_set)]
    return hooks + ([diversity_hook(test_set)] if config.members >= 2 else [])
