"""Certifying a data set with randomized smoothing into a records file, one example a line,
resumable per example — Cohen et al.'s ``certify.py`` loop around :class:`~ensdiv.smoothing.Smooth`
(``ensdiv certify``, ``ensdiv compare`` and the cards' certified stage run it).

Where ensdiv departs from Cohen et al.'s script: each example's noise comes from its own seed
(so a resumed or sharded run gives every example the answer of an uninterrupted one), every
record is flushed and synced as it is written, and under torchrun the examples are sharded over
ranks (:mod:`ensdiv.rank_parts`).

Example:
    >>> import tempfile, torch
    >>> from torch.utils.data import TensorDataset
    >>> from ensdiv.ensemble import Ensemble
    >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
    >>> data = TensorDataset(torch.rand(2, 1, 8, 8), torch.arange(2))
    >>> recs = certify_dataset(ens, data, sigma=0.5, n0=10, n=100, alpha=0.001,
    ...                        batch_size=100, out=tempfile.mkdtemp() + "/c.jsonl",
    ...                        progress=False)
    >>> [r["idx"] for r in recs]
    [0, 1]
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ensdiv import distributed
from ensdiv.errors import EnsdivError, check_int, check_real
from ensdiv.io import atomic_write_jsonl, os_error, read_jsonl
from ensdiv.rank_parts import merge_rank_parts, rank_part, rank_parts, read_with_parts
from ensdiv.smoothing import ABSTAIN, Smooth, average_certified_radius, certified_accuracy
from ensdiv.stats import binomial_se

RECORD_KEYS: tuple[str, ...] = ("idx", "label", "predict", "radius", "correct", "samples",
                                "seconds")


def _done_records(path: Path) -> list[dict[str, Any]]:
    """Records already in ``path``; a torn last line (killed mid-write) is dropped and the
    file rewritten without it."""
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    if lines and not lines[-1].rstrip().endswith("}"):
        atomic_write_jsonl(path, [json.loads(x) for x in lines[:-1] if x.strip()])
    return read_jsonl(path, what="certification records file", required=RECORD_KEYS,
                      fix="delete its damaged lines and run again (those examples are redone)")


def certify_dataset(base: nn.Module, dataset: Dataset, *, sigma: float, n0: int, n: int,
                    alpha: float, batch_size: int, out: str | os.PathLike, skip: int = 1,
                    max: int | None = None, radius: float | None = None,
                    stages: tuple[int, ...] = (1_000, 10_000, 100_000), beta: float = 1e-4,
                    vote: bool = False, seed: int = 0, num_classes: int | None = None,
                    progress: bool = True, amp: bool = False,
                    log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Certify every ``skip``-th example of ``dataset`` (the first ``max`` of those) and
    return all records of ``out`` (old and new), sorted by ``idx`` — Cohen et al.'s
    ``certify.py`` loop, resumable.

    Each example's record — ``idx, label, predict, radius, correct, samples, seconds`` — is
    appended to the JSON-lines file ``out``, flushed and synced per line, so a killed run loses
    at most the example in progress. Run again on the same file, it skips the examples already
    there (a torn last line is dropped first). Each example's noise comes from a generator
    seeded with ``(seed, idx)``, so a resumed run, or one with another ``skip``/``max``, gives
    every example exactly the same answer as an uninterrupted one. The smoothed classifier
    holds a channels-last copy of ``base`` (faster; ``base`` is left as it was).

    Under torchrun the examples are sharded over ranks (every world-th to each) and merged into
    one file; each example's noise comes from its own seed, so the records are those of a
    single-process run (timings aside).

    Args:
        base: a member or an ensemble (eval mode) returning logits.
        dataset: yields ``(x [C, H, W] in [0, 1], label)``.
        sigma, n0, n, alpha, batch_size: as in :meth:`Smooth.certify`.
        out: the JSON-lines file (appended to; resumable).
        radius: if given, ask :meth:`Smooth.certify_radius` whether each example is certified
            at this radius (``radius`` in the record is then ``radius`` or 0) with ``stages``
            and ``beta``; ``samples`` counts the noise samples it used.
        vote: majority vote of the members as the base prediction.
        seed: the noise of example ``idx`` comes from a generator (on the model's device)
            seeded with ``seed * 1_000_003 + idx``.
        amp: bfloat16 autocast for the noisy forward passes (see :class:`Smooth`).

    Example:
        >>> import tempfile
        >>> from torch.utils.data import TensorDataset
        >>> from ensdiv.ensemble import Ensemble
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
        >>> data = TensorDataset(torch.rand(4, 1, 8, 8), torch.arange(4))
        >>> out = tempfile.mkdtemp() + "/certify.jsonl"
        >>> recs = certify_dataset(ens, data, sigma=0.5, n0=10, n=100, alpha=0.001,
        ...                        batch_size=100, out=out, progress=False)
        >>> [r["idx"] for r in recs], sorted(recs[0])
        ([0, 1, 2, 3], ['correct', 'idx', 'label', 'predict', 'radius', 'samples', 'seconds'])
    """
    check_int("skip", skip)
    if max is not None:
        check_int("max", max)
    check_int("seed", seed, minimum=0)
    if radius is not None:
        check_real("radius", radius, minimum=0)
    k = num_classes or getattr(base, "num_classes", None)
    if k is None:
        raise EnsdivError("num_classes is needed: the model does not declare it")
    # a channels-last copy: faster noisy forward passes (see Smooth), the caller's model
    # untouched
    smooth = Smooth(base, num_classes=k, sigma=sigma, vote=vote, amp=amp, channels_last=True)
    indices = list(range(0, len(dataset), skip))[:max]
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error("write", path.parent, e) from None
    rank, world = distributed.rank_and_world()
    # under torchrun each rank certifies every world-th example into its own part file; rank 0
    # merges them into `out` at the end (and a resumed run counts them as done)
    distributed.barrier()  # every rank reads the folder as it was before anyone writes
    records = read_with_parts(path, _done_records)
    distributed.barrier()
    done = {r["idx"] for r in records}
    todo = distributed.shard([i for i in indices if i not in done], rank, world)
    own = path if world == 1 else rank_part(path, rank)
    bar = None
    if progress and todo and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="certify", unit="example")
    try:
        with open(own, "a", encoding="utf-8") as f:
            for i in todo:
                x, label = dataset[i]
                smooth.generator = torch.Generator(device=smooth._device()).manual_seed(
                    seed * 1_000_003 + i)
                t0 = time.perf_counter()
                if radius is None:
                    pred, rad = smooth.certify(x, n0=n0, n=n, alpha=alpha,
                                               batch_size=batch_size)
                    samples = n0 + n
                else:
                    pred, samples = smooth.certify_radius(x, radius, alpha=alpha, stages=stages,
                                                          beta=beta, n0=n0,
                                                          batch_size=batch_size)
                    rad = radius if pred != ABSTAIN else 0.0
                rec = {"idx": i, "label": int(label), "predict": pred, "radius": round(rad, 6),
                       "correct": pred == int(label), "samples": samples,
                       "seconds": round(time.perf_counter() - t0, 4)}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
                records.append(rec)
                if bar is not None:
                    bar.update()
                if log is not None:
                    log(f"idx {i}: label {rec['label']} predict {pred} radius {rad:.3f} "
                        f"({rec['seconds']:.1f}s)")
    except OSError as e:
        raise os_error("write", own, e) from None
    finally:
        if bar is not None:
            bar.close()
    if world > 1 or rank_parts(path):
        records = merge_rank_parts(path, _done_records, key=lambda r: r["idx"])
    return sorted(records, key=lambda r: r["idx"])


def certified_summary(records: Sequence[dict[str, Any]], *, radii: Sequence[float],
                      sigma: float, n0: int, n: int, alpha: float) -> dict[str, Any]:
    """Certified accuracy at each of ``radii`` (with its binomial s.e. over the certified
    points) and the average certified radius of :func:`certify_dataset`'s ``records``, with the
    CERTIFY settings that made them: what a card's and a comparison's ``certified`` entry holds.

    Example:
        >>> recs = [{"radius": 0.5, "correct": True}, {"radius": 0.0, "correct": False}]
        >>> s = certified_summary(recs, radii=(0.0, 0.25), sigma=0.25, n0=100, n=1000,
        ...                       alpha=0.001)
        >>> s["accuracy"], s["acr"], s["points"]
        ([0.5, 0.5], 0.25, 2)
    """
    acc = certified_accuracy(records, radii)
    points = len(records)
    return {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "points": points,
            "radii": [float(r) for r in radii], "accuracy": acc,
            "accuracy_se": [binomial_se(a, points) for a in acc],
            "acr": average_certified_radius(records)}
