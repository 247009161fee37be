"""The training loop of every ensdiv objective, with atomic checkpoints and exact resume.

:func:`fit` knows nothing about the objective: it calls a :data:`LossFn`
``(ensemble, x, y) -> (loss, stats)`` on each batch. Plain training sums the members'
cross-entropies (:func:`ensdiv.objective.ce_loss`); diversity, noise and teacher terms plug in
as other loss functions, never as copies of the loop (:func:`ensdiv.training.make_loss` picks one
from a :class:`~ensdiv.training.TrainConfig`).

Given a folder, per epoch it writes, atomically and on rank 0 only, one JSON line of metrics
(``metrics.jsonl``: loss, the loss's stats, each member's and the ensemble's test accuracy,
seconds), the ensemble (``ensemble.pt``, loadable with :meth:`Ensemble.load`) and a training
checkpoint (``checkpoint.pt``: weights, optimizer, epoch). Shuffling and noise draw from
generators seeded by (seed, epoch), so a resumed run continues bit-for-bit like an
uninterrupted one.

Example:
    >>> from ensdiv.data import load_dataset
    >>> tr, te, info = load_dataset("digits")
    >>> ens = Ensemble.build("mlp", 2, in_shape=info.in_shape, num_classes=10)
    >>> [r["epoch"] for r in fit(ens, tr, te, epochs=2, batch_size=256, lr=1e-3, seed=0,
    ...                          progress=False)]
    [1, 2]
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ensdiv.distributed import (
    all_reduce_gradients,
    all_reduce_sum,
    gather_objects,
    is_main,
    rank_and_world,
)
from ensdiv.ensemble import Ensemble, majority_vote, mean_log_softmax
from ensdiv.errors import EnsdivError, check_input, check_int
from ensdiv.io import (
    atomic_torch_save,
    atomic_write_jsonl,
    first_sentence,
    read_jsonl,
    read_torch,
    round_floats,
    utc_now,
)
from ensdiv.optim import Optim

LossFn = Callable[[Ensemble, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]
"""A training objective: ``(ensemble, x [B,C,H,W], y [B]) -> (scalar loss, stats)``, stats being
detached 0-dim tensors (or floats) on any device. An objective with a schedule has a method
``set_epoch(epoch, epochs)``, which :func:`fit` calls before every epoch (1-based; also after a
resume), like ``DistributedSampler.set_epoch``."""

EpochHook = Callable[[Ensemble], dict[str, Any]]
"""Extra per-epoch metrics computed on the trained ensemble (e.g. GDR on a held-out batch)."""

CHECKPOINT = "checkpoint.pt"
"""The training checkpoint :func:`fit` keeps in its folder (weights, optimizer, epoch)."""
ENSEMBLE = "ensemble.pt"
"""The ensemble :func:`fit` saves in its folder after every epoch."""
METRICS = "metrics.jsonl"
"""One JSON line of metrics per finished epoch."""


def ce_loss(ensemble: Ensemble, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum over members of each member's batch-mean cross-entropy: independent training, the
    default objective of :func:`fit` (also :func:`ensdiv.objective.ce_loss`).

    Example:
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
        >>> loss, stats = ce_loss(ens, torch.rand(4, 1, 8, 8), torch.arange(4))
        >>> sorted(stats)
        ['ce_0', 'ce_1']
    """
    logits = ensemble.member_logits(x)  # [M, B, K]
    m, b, k = logits.shape
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(m * b, k), y.repeat(m), reduction="none").view(m, b).mean(1)
    return ce.sum(), {f"ce_{i}": v for i, v in enumerate(ce.detach())}


class TrainingDiverged(EnsdivError):
    """The loss became NaN or infinite; the message names the epoch, batch and loss parts."""


@torch.no_grad()
def accuracies(ensemble: Ensemble, dataset: Dataset, *, batch_size: int = 512,
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
        >>> sorted(accuracies(ens, te))
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
        raise EnsdivError("accuracies need a non-empty dataset")
    return round_floats({"member_acc": [c / n for c in correct_members],
                         "ensemble_acc": correct_ens / n, "vote_acc": correct_vote / n, "n": n})


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))


_CHECKPOINT_FIX = ("the run cannot be resumed from it: restore the file, or start the run "
                   "anew in another folder")


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
             extra: nn.Module | None = None,
             sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> tuple[int, list]:
    """Load the run's checkpoint into ``ensemble``/``opt``/``sched`` (and a trainable loss's
    parts); its epoch and earlier records. A checkpoint from before schedules (no
    ``scheduler``) was a constant learning rate: its optimizer state says it all."""
    path = out / CHECKPOINT
    ckpt = read_checkpoint(path)
    try:
        ensemble.load_state_dict(ckpt["ensemble"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None and ckpt.get("scheduler") is not None:
            sched.load_state_dict(ckpt["scheduler"])
        if extra is not None:
            extra.load_state_dict(ckpt.get("loss") or {})
    except (RuntimeError, ValueError, KeyError) as e:
        raise EnsdivError(f"{path} does not fit this run's ensemble ({first_sentence(e)}); "
                          f"{_CHECKPOINT_FIX}") from None
    start = int(ckpt["epoch"])
    return start, [r for r in read_metrics(out)
                   if isinstance(r["epoch"], int) and r["epoch"] <= start]


def read_metrics(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records of a run folder's ``metrics.jsonl`` (none if it is missing); a
    damaged line is one :class:`EnsdivError` naming it."""
    return read_jsonl(Path(out) / METRICS, what="metrics file", required=("epoch",),
                      fix="restore it, or delete its damaged lines and resume again (their "
                          "epochs' metrics are then lost)")


def fit(ensemble: Ensemble, train_set: Dataset, test_set: Dataset, *, epochs: int,
        batch_size: int, seed: int, lr: float | None = None, loss_fn: LossFn = ce_loss,
        weight_decay: float = 0.0, optim: Optim | None = None,
        out_dir: str | os.PathLike | None = None,
        resume: bool = False,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        epoch_hooks: Sequence[EpochHook] = (), progress: bool = True,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        amp: bool = False, distributed: bool = True) -> list[dict[str, Any]]:
    """Train all members with ``loss_fn`` and return the per-epoch metric records.

    Args:
        ensemble: the ensemble to train, already on its device.
        train_set, test_set: datasets of (x [C,H,W] in [0,1], int label).
        lr, weight_decay: Adam's, at a constant rate — or give ``optim``.
        optim: the optimizer and its learning-rate schedule (:class:`ensdiv.optim.Optim`),
            stepped after every optimizer step; its state is in the checkpoint, so a resumed
            run continues the schedule exactly. A resume that extends ``epochs`` stretches the
            schedule's remaining part to the new length.
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
    if optim is None:
        if lr is None:
            raise EnsdivError("fit needs a learning rate (lr) or an optimizer (optim)")
        optim = Optim(lr=lr, weight_decay=weight_decay)
    elif lr is not None:
        raise EnsdivError("give fit either lr (Adam, constant) or optim, not both")
    optim = optim.validate()
    device = next(ensemble.parameters()).device
    # A loss with trainable parts (RRM's projections) trains and checkpoints with the members.
    extra = loss_fn if isinstance(loss_fn, nn.Module) else None
    params = list(ensemble.parameters()) + (list(extra.parameters()) if extra else [])
    steps_per_epoch = math.ceil(len(train_set) / batch_size)  # type: ignore[arg-type]
    opt, sched = optim.build(params, steps_per_epoch=steps_per_epoch, epochs=epochs)
    out = Path(out_dir) if out_dir is not None else None
    records: list[dict[str, Any]] = []
    start = 0
    main = is_main()
    rank, world = rank_and_world() if distributed else (0, 1)
    check_global_batch(batch_size, world)
    if resume and out is not None and (out / CHECKPOINT).exists():
        start, records = _restore(ensemble, opt, out, extra, sched)
        if main:
            ensemble.save(out / ENSEMBLE)
    for epoch in range(start + 1, epochs + 1):
        gen = _epoch_generator(seed, epoch)
        set_epoch = getattr(loss_fn, "set_epoch", None)
        if set_epoch is not None:  # a schedule (TRS's radius, DVERGE's layer), as samplers do
            set_epoch(epoch, epochs)
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=gen)
        lr_first = opt.param_groups[0]["lr"]  # the rate of the epoch's first step (recorded)
        ensemble.train()
        t0 = time.perf_counter()
        # running sums stay on the device: reading them is a GPU sync, done every
        # `sync_every` batches (every batch on CPU, where it costs nothing)
        total, sums, n = torch.zeros((), dtype=torch.float64, device=device), {}, 0
        sync_every = _sync_every(device)
        bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False,
                   disable=None if progress and main else True)  # None: off when not a TTY
        # no bar (a log file, nohup): a plain line every PROGRESS_EVERY seconds instead
        plain = progress and main and bool(bar.disable)
        last_line = t0
        for i, (x, y) in enumerate(bar, 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if i == 1 and epoch == start + 1:  # the data's contract, before any step: labels
                check_input(ensemble, x, y)  # out of range would be a raw IndexError in the CE
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
                    "(or lam) in another folder")
            opt.zero_grad(set_to_none=True)
            if b:
                loss.backward()
            if world > 1:  # the global batch's mean gradient on every rank
                all_reduce_gradients(params, b / n_global)
            opt.step()
            sched.step()
            total += loss.detach().double() * b
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).double() * b
            n += b
            if check:
                bar.set_postfix(loss=f"{float(total) / n:.3f}")
            if plain and time.perf_counter() - last_line >= PROGRESS_EVERY:
                last_line = time.perf_counter()
                print(f"epoch {epoch}/{epochs}: batch {i}/{len(loader)} "
                      f"({100 * i / len(loader):.0f}%), loss {float(total) / max(n, 1):.4f}, "
                      f"{last_line - t0:.0f}s", file=sys.stderr, flush=True)
        train_seconds = time.perf_counter() - t0
        if world > 1:  # one all-reduce of every running sum (keys: the union over ranks)
            keys = sorted({k for part in gather_objects(sorted(sums)) for k in part})
            vec = torch.stack([total, torch.tensor(float(n), dtype=torch.float64, device=device)]
                              + [torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64,
                                                 device=device) for k in keys])
            all_reduce_sum(vec)
            total, n, sums = vec[0], int(vec[1]), dict(zip(keys, vec[2:], strict=True))
        record: dict[str, Any] = {"epoch": epoch, "loss": float(total) / n,
                                  **{k: float(v) / n for k, v in sums.items()}, "lr": lr_first}
        record.update(accuracies(ensemble, test_set, device=device, distributed=world > 1))
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
                               "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "loss": extra.state_dict() if extra else None,
                               "threads": torch.get_num_threads()}, out / CHECKPOINT)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return records


#: On a GPU, batches between two reads of the running loss (each read waits for the GPU).
SYNC_EVERY = 25

#: Seconds between two plain progress lines when there is no terminal for the bar.
PROGRESS_EVERY = 30.0


def _all_sum(t: Tensor, world: int) -> Tensor:
    """``t`` summed over ranks (a copy), so every rank takes the same decision from it."""
    return all_reduce_sum(t.clone()) if world > 1 else t


def _sync_every(device: torch.device) -> int:
    """How often fit reads the loss back: every batch on CPU, every SYNC_EVERY on a GPU."""
    return 1 if device.type == "cpu" else SYNC_EVERY


def check_global_batch(batch_size: int, world: int) -> None:
    """A global batch of ``batch_size`` split over ``world`` processes gives each at least one
    sample; else one :class:`EnsdivError`.

    Example:
        >>> check_global_batch(128, 4)
    """
    if batch_size < world:
        raise EnsdivError(f"batch size {batch_size} is the global batch, split over {world} "
                          f"processes: give at least {world}")
