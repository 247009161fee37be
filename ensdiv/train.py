"""One training loop for every ensdiv objective, with atomic checkpoints and exact resume.

The loop (:func:`fit`) knows nothing about the objective: it calls a :data:`LossFn`
``(ensemble, x, y) -> (loss, stats)`` on each batch. Plain training sums the members'
cross-entropies (:func:`ce_loss`); diversity, noise and teacher terms plug in as other loss
functions, never as copies of the loop.

Per epoch it writes, atomically and on rank 0 only, one JSON line of metrics
(``metrics.jsonl``: loss, the loss's stats, each member's and the ensemble's test accuracy,
seconds), the ensemble (``ensemble.pt``, loadable with :meth:`Ensemble.load`) and a training
checkpoint (``checkpoint.pt``: weights, optimizer, epoch). Shuffling and noise draw from
generators seeded by (seed, epoch), so a resumed run continues bit-for-bit like an
uninterrupted one.

Example:
    >>> cfg = TrainConfig(dataset="digits", arch="mlp", members=2, epochs=1)
    >>> cfg.validate().members
    2
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ensdiv.data import DATASETS, load_dataset
from ensdiv.distributed import (
    all_reduce_gradients,
    all_reduce_sum,
    broadcast_outcome,
    gather_objects,
    rank_and_world,
)
from ensdiv.ensemble import Ensemble, majority_vote, mean_log_softmax
from ensdiv.errors import (
    EnsdivError,
    EnsdivWarning,
    check_choice,
    check_input,
    check_int,
    check_real,
)
from ensdiv.gdr import gradient_diversity
from ensdiv.gradients import input_gradients
from ensdiv.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_jsonl,
    first_sentence,
    is_main_process,
    prepare_run_dir,
    read_json,
    read_jsonl,
    read_torch,
    round_floats,
    run_lock,
    utc_now,
)
from ensdiv.models import ARCHS
from ensdiv.objective import DIVERSITIES, OBJECTIVES, adversarial_loss, ce_loss, ensemble_loss
from ensdiv.robust_transfer import DEFAULT_TRANSFER_WEIGHT, TRANSFERS, Teacher, TransferLoss
from ensdiv.runtime import resolve_device

DIVERSITY_CHOICES: tuple[str, ...] = DIVERSITIES

LossFn = Callable[[Ensemble, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]
"""A training objective: ``(ensemble, x [B,C,H,W], y [B]) -> (scalar loss, stats)``, stats being
detached 0-dim tensors (or floats) on any device."""

EpochHook = Callable[[Ensemble], dict[str, Any]]
"""Extra per-epoch metrics computed on the trained ensemble (e.g. GDR on a held-out batch)."""

CHECKPOINT = "checkpoint.pt"
ENSEMBLE = "ensemble.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"

# Fields that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"epochs"})


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
class TrainConfig:
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
                                  "choose --diversity cos, gal or gdr (or drop --lam)")
            lam = 0.0
        else:
            lam = DEFAULT_LAM if self.lam is None else check_real("lam", self.lam, minimum=0)
            if self.members < 2:
                raise EnsdivError(f"diversity {self.diversity!r} needs at least 2 members; "
                                  f"got {self.members}")
        eps, steps = self._validate_adversarial(sigma)
        weight = self._validate_transfer(sigma)
        return dataclasses.replace(self, lam=lam, lr=float(self.lr),
                                   weight_decay=float(self.weight_decay), noise_sigma=sigma,
                                   eps=eps, steps=steps, transfer_weight=weight)

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise EnsdivError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)


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
    return functools.partial(ensemble_loss, diversity=config.diversity, lam=config.lam)


def ensemble_path(run: str | os.PathLike) -> Path:
    """The ensemble file of a run folder (``RUN/ensemble.pt``) or ``run`` itself if a file;
    a missing one is one :class:`EnsdivError`."""
    p = Path(run)
    if p.is_dir():
        p = p / ENSEMBLE
    if not p.is_file():
        raise EnsdivError(f"no ensemble at {run} (expected a run folder with {ENSEMBLE} "
                          "or an ensemble file)")
    return p


def load_teacher(run: str | os.PathLike, *, device: torch.device | str = "cpu",
                 noise_sigma: float = 0.0) -> Teacher:
    """The frozen :class:`Teacher` saved in ``run`` (one model). Warns when a CRT teacher was
    trained with another noise sigma than the students will see."""
    ens = Ensemble.load(ensemble_path(run), map_location=device)
    teacher = Teacher(ens)
    trained = float(ens.config.get("noise_sigma") or 0.0)
    if noise_sigma > 0 and abs(trained - noise_sigma) > 1e-12:
        warnings.warn(f"the students train with noise sigma {noise_sigma:g} but the teacher "
                      f"{run} was trained with {trained:g}", EnsdivWarning, stacklevel=2)
    return teacher


def gaussian_noise(sigma: float) -> Callable[[Tensor, torch.Generator], Tensor] | None:
    """Augmentation adding N(0, σ²) pixel noise, not clipped to [0, 1]; None for σ = 0.

    Unclipped because randomized smoothing (:mod:`ensdiv.smoothing`, Cohen et al. 2019)
    classifies x + ε with unclipped Gaussian ε: a member trained for smoothing must see that
    distribution (clipping would hide exactly the large deviations the certificate relies on).
    """
    if sigma <= 0:
        return None

    def augment(x: Tensor, gen: torch.Generator) -> Tensor:
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        return x + sigma * noise

    return augment


class TrainingDiverged(EnsdivError):
    """The loss became NaN or infinite; the message names the epoch, batch and loss parts."""


@torch.no_grad()
def evaluate(ensemble: Ensemble, dataset: Dataset, *, batch_size: int = 512,
             device: torch.device | str | None = None,
             distributed: bool = False) -> dict[str, Any]:
    """Test accuracies: each member's, the ensemble's (mean softmax) and the majority vote's.

    Returns ``{"member_acc": [M floats], "ensemble_acc": float, "vote_acc": float, "n": N}``,
    accuracies rounded to 6 significant digits. ``distributed``: under a process group, each
    rank counts every world-th example and the counts are summed over ranks. The ensemble's
    mode is restored afterwards.
    The first batch is checked against the ensemble's input contract (shape, dtype, [0, 1],
    labels) before anything is computed.

    Example:
        >>> from ensdiv.data import load_dataset
        >>> _, te, info = load_dataset("digits")
        >>> ens = Ensemble.build("mlp", 2, in_shape=info.in_shape, num_classes=10)
        >>> sorted(evaluate(ens, te))
        ['ensemble_acc', 'member_acc', 'n', 'vote_acc']
    """
    check_int("batch size", batch_size)
    device = device or next(ensemble.parameters()).device
    was_training = ensemble.training
    ensemble.eval()
    m = ensemble.num_members
    # counts stay on the device until the end: no GPU sync per batch
    correct = torch.zeros(m + 2, dtype=torch.long, device=device)  # members, mean, vote
    n = 0
    rank, world = rank_and_world() if distributed else (0, 1)
    if world > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world))
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if n == 0:
                check_input(ensemble, x, y)
            logits = ensemble.member_logits(x)  # one pass serves all three accuracies
            correct[:m] += (logits.argmax(-1) == y).sum(1)
            correct[m] += (mean_log_softmax(logits).argmax(-1) == y).sum()
            correct[m + 1] += (majority_vote(logits) == y).sum()
            n += len(y)
    finally:
        ensemble.train(was_training)
    if world > 1:
        totals = all_reduce_sum(torch.cat([correct, torch.tensor([n], device=device)]))
        correct, n = totals[:-1], int(totals[-1])
    counts = correct.tolist()
    correct_members, correct_ens, correct_vote = counts[:m], counts[m], counts[m + 1]
    if n == 0:
        raise EnsdivError("evaluate needs a non-empty dataset")
    return round_floats({"member_acc": [c / n for c in correct_members],
                         "ensemble_acc": correct_ens / n, "vote_acc": correct_vote / n, "n": n})


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))


_CHECKPOINT_FIX = ("the run cannot be resumed from it: restore the file, or start the run "
                   "anew in another --out")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training checkpoint (``{"epoch", "ensemble", "optimizer"}``) onto the CPU; a
    missing, damaged or foreign file is one :class:`EnsdivError` naming it.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "checkpoint.pt"
        >>> read_checkpoint(p)
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: no training checkpoint at ...
    """
    ckpt = read_torch(path, what="training checkpoint", fix=_CHECKPOINT_FIX,
                      required=("epoch", "ensemble", "optimizer"))
    if isinstance(ckpt["epoch"], bool) or not isinstance(ckpt["epoch"], int) \
            or ckpt["epoch"] < 1:
        raise EnsdivError(f"{path} is not a training checkpoint (epoch {ckpt['epoch']!r}); "
                          f"{_CHECKPOINT_FIX}")
    return ckpt


def finished_epochs(out_dir: str | os.PathLike) -> int:
    """Epochs a run folder holds a checkpoint for (0 if none).

    Example:
        >>> import tempfile
        >>> finished_epochs(tempfile.mkdtemp())
        0
    """
    path = Path(out_dir) / CHECKPOINT
    return int(read_checkpoint(path)["epoch"]) if path.exists() else 0


def _restore(ensemble: Ensemble, opt: torch.optim.Optimizer, out: Path,
             extra: nn.Module | None = None) -> tuple[int, list]:
    """Load the run's checkpoint into ``ensemble``/``opt`` (and a trainable loss's parts);
    its epoch and earlier records."""
    path = out / CHECKPOINT
    ckpt = read_checkpoint(path)
    try:
        ensemble.load_state_dict(ckpt["ensemble"])
        opt.load_state_dict(ckpt["optimizer"])
        if extra is not None:
            extra.load_state_dict(ckpt.get("loss") or {})
    except (RuntimeError, ValueError, KeyError) as e:
        raise EnsdivError(f"{path} does not fit this run's ensemble ({first_sentence(e)}); "
                          f"{_CHECKPOINT_FIX}") from None
    start = int(ckpt["epoch"])
    return start, [r for r in _read_metrics(out)
                   if isinstance(r["epoch"], int) and r["epoch"] <= start]


def _read_metrics(out: Path) -> list[dict[str, Any]]:
    return read_jsonl(out / METRICS, what="metrics file", required=("epoch",),
                      fix="restore it, or delete its damaged lines and resume again (their "
                          "epochs' metrics are then lost)")


def _saved_config(out: Path) -> dict[str, Any]:
    return read_json(out / CONFIG, what="run config",
                     fix="restore it, or start the run in another --out")


def fit(ensemble: Ensemble, train_set: Dataset, test_set: Dataset, *, epochs: int,
        batch_size: int, lr: float, seed: int, loss_fn: LossFn = ce_loss,
        weight_decay: float = 0.0, out_dir: str | os.PathLike | None = None,
        resume: bool = False,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        epoch_hooks: Sequence[EpochHook] = (), progress: bool = True,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        amp: bool = False, distributed: bool = True) -> list[dict[str, Any]]:
    """Train all members with ``loss_fn`` (Adam) and return the per-epoch metric records.

    Args:
        ensemble: the ensemble to train, already on its device.
        train_set, test_set: datasets of (x [C,H,W] in [0,1], int label).
        loss_fn: the objective, see :data:`LossFn`.
        out_dir: run folder for metrics/ensemble/checkpoint (nothing is written if None).
        resume: continue from ``out_dir/checkpoint.pt`` if present (and rewrite
            ``ensemble.pt`` from it, which repairs a damaged one).
        augment: ``(x, generator) -> x'`` applied to each training batch (e.g. noise).
        epoch_hooks: extra metrics merged into each epoch's record.
        on_epoch_end: called with each record after it is written (progress, interruption).
        amp: compute the loss under bfloat16 autocast (mixed precision; parameters, gradients
            and optimizer state stay float32). For GPUs; on CPU it is slower, not faster.
        distributed: under a ``torch.distributed`` process group (torchrun), train
            data-parallel: ``batch_size`` is the global batch; every rank draws the same
            shuffled global batch and noise (the single-process ones), computes on its slice
            (every world-th sample), and the gradients are averaged with one all-reduce
            (:mod:`ensdiv.distributed`), so the run does not depend on the number of processes
            beyond float reduction order. Loss, statistics and test accuracies are reduced over
            ranks; only rank 0 writes. False trains this rank's ensemble alone (a sweep's ranks
            train different ensembles).

    Raises:
        TrainingDiverged: the loss became NaN or infinite (the last finished epoch is kept).

    Example:
        >>> from ensdiv.data import load_dataset
        >>> tr, te, info = load_dataset("digits")
        >>> ens = Ensemble.build("mlp", 2, in_shape=info.in_shape, num_classes=10)
        >>> recs = fit(ens, tr, te, epochs=1, batch_size=128, lr=1e-3, seed=0, progress=False)
        >>> recs[0]["epoch"]
        1
    """
    check_int("epochs", epochs)
    check_int("batch size", batch_size)
    check_real("learning rate", lr, minimum=0, strict=True)
    check_real("weight decay", weight_decay, minimum=0)
    device = next(ensemble.parameters()).device
    # A loss with trainable parts (RRM's projections) trains and checkpoints with the members.
    extra = loss_fn if isinstance(loss_fn, nn.Module) else None
    params = list(ensemble.parameters()) + (list(extra.parameters()) if extra else [])
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    out = Path(out_dir) if out_dir is not None else None
    records: list[dict[str, Any]] = []
    start = 0
    main = is_main_process()
    rank, world = rank_and_world() if distributed else (0, 1)
    _check_global_batch(batch_size, world)
    if resume and out is not None and (out / CHECKPOINT).exists():
        start, records = _restore(ensemble, opt, out, extra)
        if main:
            ensemble.save(out / ENSEMBLE)
    for epoch in range(start + 1, epochs + 1):
        gen = _epoch_generator(seed, epoch)
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=gen)
        ensemble.train()
        t0 = time.perf_counter()
        # running sums stay on the device: reading them is a GPU sync, done every
        # `sync_every` batches (every batch on CPU, where it costs nothing)
        total, sums, n = torch.zeros((), dtype=torch.float64, device=device), {}, 0
        sync_every = _sync_every(device)
        bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False,
                   disable=None if progress and main else True)  # None: off when not a TTY
        for i, (x, y) in enumerate(bar, 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if augment is not None:
                x = augment(x, gen)
            n_global = len(y)
            if world > 1:  # this rank's slice of the global batch (shuffle and noise as one)
                x, y = x[rank::world], y[rank::world]
            b = len(y)
            # Randomness inside the loss (PGD's random starts) is seeded per batch without
            # touching the caller's global RNG, so a resumed run repeats it exactly.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                torch.manual_seed(int(seed) * 100_003 + epoch * 10_007 + i + 7_919 * rank)
                if b:
                    loss, stats = loss_fn(ensemble, x, y)
                else:  # fewer samples than ranks in the last batch: nothing to add here
                    loss, stats = torch.zeros((), device=device), {}
            check = i % sync_every == 0 or i == len(loader)
            if check and not torch.isfinite(_all_sum(total + loss.detach() * b, world)):
                bad = "" if sync_every == 1 else f" (or one of the {sync_every - 1} before it)"
                parts = ", ".join(f"{k}={float(v):.4g}" for k, v in stats.items())
                kept = (f"the run in {out} keeps epoch {epoch - 1}" if out is not None and
                        epoch > 1 else "no epoch was finished")
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch}, batch {i}{bad}: loss is "
                    f"{float(loss.detach()):g} ({parts}); {kept}; try a lower learning rate "
                    "(or lam) in another --out")
            opt.zero_grad(set_to_none=True)
            if b:
                loss.backward()
            if world > 1:  # the global batch's mean gradient on every rank
                all_reduce_gradients(params, b / n_global)
            opt.step()
            total += loss.detach().double() * b
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).double() * b
            n += b
            if check:
                bar.set_postfix(loss=f"{float(total) / n:.3f}")
        train_seconds = time.perf_counter() - t0
        if world > 1:  # one all-reduce of every running sum (keys: the union over ranks)
            keys = sorted({k for part in gather_objects(sorted(sums)) for k in part})
            vec = torch.stack([total, torch.tensor(float(n), dtype=torch.float64, device=device)]
                              + [torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64,
                                                 device=device) for k in keys])
            all_reduce_sum(vec)
            total, n, sums = vec[0], int(vec[1]), dict(zip(keys, vec[2:], strict=True))
        record: dict[str, Any] = {"epoch": epoch, "loss": float(total) / n,
                                  **{k: float(v) / n for k, v in sums.items()}}
        record.update(evaluate(ensemble, test_set, device=device, distributed=world > 1))
        for hook in epoch_hooks:
            record.update(hook(ensemble))
        record["train_seconds"] = train_seconds
        record["seconds"] = time.perf_counter() - t0
        record["time"] = utc_now()
        record = round_floats(record)
        records.append(record)
        if out is not None and main:
            ensemble.save(out / ENSEMBLE)
            atomic_write_jsonl(out / METRICS, records)
            # The thread count changes CPU float reductions: a resume reuses it to stay exact.
            atomic_torch_save({"epoch": epoch, "ensemble": ensemble.state_dict(),
                               "optimizer": opt.state_dict(),
                               "loss": extra.state_dict() if extra else None,
                               "threads": torch.get_num_threads()}, out / CHECKPOINT)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return records


#: On a GPU, batches between two reads of the running loss (each read waits for the GPU).
SYNC_EVERY = 25


def _all_sum(t: Tensor, world: int) -> Tensor:
    """``t`` summed over ranks (a copy), so every rank takes the same decision from it."""
    return all_reduce_sum(t.clone()) if world > 1 else t


def _sync_every(device: torch.device) -> int:
    """How often fit reads the loss back: every batch on CPU, every SYNC_EVERY on a GPU."""
    return 1 if device.type == "cpu" else SYNC_EVERY


def default_device() -> torch.device:
    """cuda if available, else cpu."""
    return resolve_device(None)


RESUME_COMMAND = "ensdiv train"


def train_run(config: TrainConfig, *, out_dir: str | os.PathLike | None = None,
              resume: bool = False, overwrite: bool = False,
              device: str | torch.device | None = None, data_root: str | None = None,
              progress: bool = True,
              on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
              ) -> tuple[Ensemble, list[dict[str, Any]]]:
    """Train the ensemble a :class:`TrainConfig` describes; the driver behind ``ensdiv train``.

    Everything is checked before any work: the config, the device, and the run folder (see
    :func:`ensdiv.io.prepare_run_dir`: a started run continues only with ``resume`` and the
    same config, whose ``epochs`` may grow but not shrink; a folder with no finished epoch
    starts again). The folder is locked while the run trains, so a second process cannot
    write into it at the same time.

    Example:
        >>> ens, recs = train_run(TrainConfig(arch="mlp", members=2, epochs=1), progress=False)
        >>> 0.5 < recs[-1]["ensemble_acc"] <= 1
        True
    """
    config = config.validate()
    _check_global_batch(config.batch_size, rank_and_world()[1])
    device = resolve_device(device)
    data = load_dataset(config.dataset, root=data_root, seed=0)
    teacher = None
    if config.teacher is not None:
        teacher = load_teacher(config.teacher, device=device, noise_sigma=config.noise_sigma)
        teacher.check_data(data[2].in_shape, data[2].num_classes,
                           who=f"data set {config.dataset}")
    if out_dir is None:
        return _train(config, None, False, device, data, progress, on_epoch_end, teacher)
    with run_lock(out_dir) as out:
        def prepare() -> bool:
            resuming = prepare_run_dir(out, config.to_dict(), config_name=CONFIG,
                                       resume=resume, overwrite=overwrite, started=_started,
                                       resumable=RESUMABLE_CHANGES, command=RESUME_COMMAND)
            if resuming:  # everything resuming needs is readable before anything is written
                done = finished_epochs(out)
                _read_metrics(out)
                if done > config.epochs:
                    raise EnsdivError(f"{out} holds {done} finished epochs; --epochs "
                                      f"{config.epochs} cannot shrink it (give --epochs {done} "
                                      "or more to extend it)")
            if not (resuming and _saved_config(out) == config.to_dict()):
                atomic_write_json(out / CONFIG, config.to_dict())
            return resuming

        # under torchrun rank 0 prepares the folder; every rank gets its decision (or error)
        resuming = broadcast_outcome(prepare)
        return _train(config, out, resuming, device, data, progress, on_epoch_end, teacher)


def _check_global_batch(batch_size: int, world: int) -> None:
    if batch_size < world:
        raise EnsdivError(f"batch size {batch_size} is the global batch, split over {world} "
                          f"processes: give at least {world}")


def _started(out: Path) -> bool:
    return (out / CHECKPOINT).exists()


def _train(config: TrainConfig, out: Path | None, resume: bool, device: torch.device,
           data: tuple[Dataset, Dataset, Any], progress: bool,
           on_epoch_end: Callable[[dict[str, Any]], None] | None,
           teacher: Teacher | None = None) -> tuple[Ensemble, list[dict[str, Any]]]:
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
                  weight_decay=config.weight_decay, loss_fn=loss_fn, out_dir=out,
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
