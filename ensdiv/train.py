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
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ensdiv.data import DATASETS, load_dataset
from ensdiv.diversity import cosine_loss
from ensdiv.ensemble import Ensemble, majority_vote, mean_log_softmax
from ensdiv.errors import EnsdivError, check_choice
from ensdiv.gdr import gdr, summarize_gdr
from ensdiv.gradients import input_gradients
from ensdiv.io import (
    atomic_torch_save,
    atomic_write_jsonl,
    is_main_process,
    prepare_run_dir,
    read_jsonl,
)
from ensdiv.models import ARCHS
from ensdiv.objective import DIVERSITIES, ce_loss, ensemble_loss

DIVERSITY_CHOICES: tuple[str, ...] = DIVERSITIES

LossFn = Callable[[Ensemble, Tensor, Tensor], tuple[Tensor, dict[str, float]]]
"""A training objective: ``(ensemble, x [B,C,H,W], y [B]) -> (scalar loss, detached stats)``."""

EpochHook = Callable[[Ensemble], dict[str, Any]]
"""Extra per-epoch metrics computed on the trained ensemble (e.g. GDR on a held-out batch)."""

CHECKPOINT = "checkpoint.pt"
ENSEMBLE = "ensemble.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"

# Fields that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"epochs"})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the run folder).

    ``diversity``/``lam``/``noise_sigma`` select the objective (see :func:`make_loss`).
    """

    dataset: str = "digits"
    arch: str = "cnn"
    members: int = 3
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    diversity: str = "none"
    lam: float = 0.5
    noise_sigma: float = 0.0

    def validate(self) -> TrainConfig:
        """Check every field; raise :class:`EnsdivError` with one clear message if bad."""
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("arch", self.arch, ARCHS)
        check_choice("diversity", self.diversity, DIVERSITY_CHOICES)
        if self.members < 1:
            raise EnsdivError(f"members must be >= 1; got {self.members}")
        if self.epochs < 1:
            raise EnsdivError(f"epochs must be positive; got {self.epochs}")
        if self.batch_size < 1:
            raise EnsdivError(f"batch size must be positive; got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise EnsdivError(f"learning rate must be positive; got {self.lr}")
        if self.weight_decay < 0:
            raise EnsdivError(f"weight decay must be >= 0; got {self.weight_decay}")
        if not self.noise_sigma >= 0:
            raise EnsdivError(f"noise sigma must be >= 0; got {self.noise_sigma}")
        if not self.lam >= 0:
            raise EnsdivError(f"lam must be >= 0; got {self.lam}")
        if self.diversity != "none" and self.members < 2:
            raise EnsdivError(f"diversity {self.diversity!r} needs at least 2 members; "
                              f"got {self.members}")
        return self

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


def make_loss(config: TrainConfig) -> LossFn:
    """The objective a config asks for: summed CE plus λ·regularizer (:func:`ensemble_loss`)."""
    check_choice("diversity", config.diversity, DIVERSITY_CHOICES)
    if config.diversity == "none":
        return ce_loss
    return functools.partial(ensemble_loss, diversity=config.diversity, lam=config.lam)


def gaussian_noise(sigma: float) -> Callable[[Tensor, torch.Generator], Tensor] | None:
    """Augmentation adding N(0, σ²) pixel noise (clipped to [0, 1]); None for σ = 0."""
    if sigma <= 0:
        return None

    def augment(x: Tensor, gen: torch.Generator) -> Tensor:
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        return (x + sigma * noise).clamp(0, 1)

    return augment


@torch.no_grad()
def evaluate(ensemble: Ensemble, dataset: Dataset, *, batch_size: int = 512,
             device: torch.device | str | None = None) -> dict[str, Any]:
    """Test accuracies: each member's, the ensemble's (mean softmax) and the majority vote's.

    Returns ``{"member_acc": [M floats], "ensemble_acc": float, "vote_acc": float, "n": N}``.
    The ensemble's mode is restored afterwards.
    """
    device = device or next(ensemble.parameters()).device
    was_training = ensemble.training
    ensemble.eval()
    m = ensemble.num_members
    correct_members = torch.zeros(m)
    correct_ens = correct_vote = n = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        logits = ensemble.member_logits(x)  # one pass serves all three accuracies
        correct_members += (logits.argmax(-1) == y).sum(1).cpu()
        correct_ens += int((mean_log_softmax(logits).argmax(-1) == y).sum())
        correct_vote += int((majority_vote(logits) == y).sum())
        n += len(y)
    ensemble.train(was_training)
    return {"member_acc": [float(c) / n for c in correct_members],
            "ensemble_acc": correct_ens / n, "vote_acc": correct_vote / n, "n": n}


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))


def fit(ensemble: Ensemble, train_set: Dataset, test_set: Dataset, *, epochs: int,
        batch_size: int, lr: float, seed: int, loss_fn: LossFn = ce_loss,
        weight_decay: float = 0.0, out_dir: str | os.PathLike | None = None,
        resume: bool = False,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        epoch_hooks: Sequence[EpochHook] = (), progress: bool = True,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train all members with ``loss_fn`` (Adam) and return the per-epoch metric records.

    Args:
        ensemble: the ensemble to train, already on its device.
        train_set, test_set: datasets of (x [C,H,W] in [0,1], int label).
        loss_fn: the objective, see :data:`LossFn`.
        out_dir: run folder for metrics/ensemble/checkpoint (nothing is written if None).
        resume: continue from ``out_dir/checkpoint.pt`` if present.
        augment: ``(x, generator) -> x'`` applied to each training batch (e.g. noise).
        epoch_hooks: extra metrics merged into each epoch's record.
        on_epoch_end: called with each record after it is written (progress, interruption).

    Example:
        >>> from ensdiv.data import load_dataset
        >>> tr, te, info = load_dataset("digits")
        >>> ens = Ensemble.build("mlp", 2, in_shape=info.in_shape, num_classes=10)
        >>> recs = fit(ens, tr, te, epochs=1, batch_size=128, lr=1e-3, seed=0, progress=False)
        >>> recs[0]["epoch"]
        1
    """
    device = next(ensemble.parameters()).device
    opt = torch.optim.Adam(ensemble.parameters(), lr=lr, weight_decay=weight_decay)
    out = Path(out_dir) if out_dir is not None else None
    records: list[dict[str, Any]] = []
    start = 0
    if resume and out is not None and (out / CHECKPOINT).exists():
        ckpt = torch.load(out / CHECKPOINT, map_location=device, weights_only=True)
        ensemble.load_state_dict(ckpt["ensemble"])
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["epoch"])
        records = [r for r in read_jsonl(out / METRICS) if r["epoch"] <= start]
    main = is_main_process()
    for epoch in range(start + 1, epochs + 1):
        gen = _epoch_generator(seed, epoch)
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=gen)
        ensemble.train()
        t0 = time.perf_counter()
        total, sums, n = 0.0, {}, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False,
                   disable=None if progress and main else True)  # None: off when not a TTY
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            if augment is not None:
                x = augment(x, gen)
            loss, stats = loss_fn(ensemble, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch}: {stats}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            b = len(y)
            total += float(loss.detach()) * b
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * b
            n += b
            bar.set_postfix(loss=f"{total / n:.3f}")
        train_seconds = time.perf_counter() - t0
        record: dict[str, Any] = {"epoch": epoch, "loss": total / n,
                                  **{k: v / n for k, v in sums.items()}}
        record.update(evaluate(ensemble, test_set, device=device))
        for hook in epoch_hooks:
            record.update(hook(ensemble))
        record["train_seconds"] = train_seconds
        record["seconds"] = time.perf_counter() - t0
        records.append(record)
        if out is not None and main:
            ensemble.save(out / ENSEMBLE)
            atomic_write_jsonl(out / METRICS, records)
            atomic_torch_save({"epoch": epoch, "ensemble": ensemble.state_dict(),
                               "optimizer": opt.state_dict()}, out / CHECKPOINT)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return records


def default_device() -> torch.device:
    """cuda if available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_run(config: TrainConfig, *, out_dir: str | os.PathLike | None = None,
              resume: bool = False, overwrite: bool = False,
              device: str | torch.device | None = None, data_root: str | None = None,
              progress: bool = True,
              on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
              ) -> tuple[Ensemble, list[dict[str, Any]]]:
    """Train the ensemble a :class:`TrainConfig` describes; the driver behind ``ensdiv train``.

    Example:
        >>> ens, recs = train_run(TrainConfig(arch="mlp", members=2, epochs=1), progress=False)
        >>> 0.5 < recs[-1]["ensemble_acc"] <= 1
        True
    """
    config.validate()
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EnsdivError("--device cuda requested but CUDA is not available")
    out = (prepare_run_dir(out_dir, config.to_dict(), config_name=CONFIG, resume=resume,
                           overwrite=overwrite, resumable=RESUMABLE_CHANGES)
           if out_dir is not None else None)
    train_set, test_set, info = load_dataset(config.dataset, root=data_root, seed=0)
    torch.manual_seed(config.seed)
    ensemble = Ensemble.build(config.arch, config.members, in_shape=info.in_shape,
                              num_classes=info.num_classes, seed=config.seed, mean=info.mean,
                              std=info.std, config=config.to_dict()).to(device)
    records = fit(ensemble, train_set, test_set, epochs=config.epochs,
                  batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                  weight_decay=config.weight_decay, loss_fn=make_loss(config), out_dir=out,
                  resume=resume, augment=gaussian_noise(config.noise_sigma),
                  epoch_hooks=make_epoch_hooks(config, test_set),
                  progress=progress, on_epoch_end=on_epoch_end)
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
        res = summarize_gdr(gdr(grads))
        return {"mean_cos": float(cosine_loss(grads)), "gdr": res.mean,
                "gdr_sem": res.sem, "gdr_n": res.n_used, "gdr_excluded": res.n_excluded}

    return hook


def make_epoch_hooks(config: TrainConfig, test_set: Dataset) -> list[EpochHook]:
    """Per-epoch extra metrics for a config: diversity metrics whenever M ≥ 2."""
    return [diversity_hook(test_set)] if config.members >= 2 else []
