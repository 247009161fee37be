"""Reading the records that runs leave: each kind of records file (sweeps, detections,
certifications, robustness cards) with the check that it is there and whole, and a training
run's cost and final accuracy. The sweep records' (GDR, success) series and correlations are
the library's (:mod:`ensdiv.sweep_stats`).

Drivers read each other's records through here, never through each other.

Example:
    >>> run_name(0.5, 1)
    'lam0.5-seed1'
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ensdiv.card import Card
from ensdiv.errors import EnsdivError
from ensdiv.io import read_json, read_jsonl
from ensdiv.loop import METRICS, read_metrics
from ensdiv.runs.rundir import CARD, CERTIFY_CONFIG, CONFIG, RECORDS


def run_name(lam: float, seed: int) -> str:
    """Folder name of one sweep point (inside the sweep's folder)."""
    return f"lam{lam:g}-seed{seed}"


def final_test_accuracy(final: dict[str, Any]) -> dict[str, Any]:
    """A sweep record's full test-set accuracy, from its training's last metrics record:
    ``test_acc`` (ensemble), ``test_member_acc`` and ``test_n`` (the record's ``ensemble_acc``
    is on its ``n`` evaluation points only)."""
    return {"test_acc": final["ensemble_acc"], "test_member_acc": final["member_acc"],
            "test_n": final.get("n")}


def training_records(runs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """One sweep-like record per ``ensdiv train`` run folder — its config's arch, data set, λ,
    seed and regularizer and its last epoch's :func:`final_test_accuracy` — so runs trained
    alone (no GDR or attacks) sit in the same tables as a sweep's ensembles."""
    records = []
    for run in map(Path, runs):
        config = read_json(run / CONFIG, what="run config",
                           fix="give the folder of an `ensdiv train` run")
        metrics = read_metrics(run)
        if not metrics:
            raise EnsdivError(f"{run} has no finished epoch; finish it with `ensdiv train "
                              f"--out {run} --resume`")
        records.append({"arch": config["arch"], "dataset": config["dataset"],
                        "lam": config["lam"] or 0.0, "seed": config["seed"],
                        "trained_with": config["diversity"], "epochs": metrics[-1]["epoch"],
                        **final_test_accuracy(metrics[-1])})
    return records


def read_sweep_records(path: str | os.PathLike, *, missing_ok: bool = False,
                       required: Sequence[str] = ("lam", "seed")) -> list[dict]:
    """A sweep's records (``records.jsonl`` of a sweep folder, or the file itself), each
    holding the ``required`` keys; a missing file is an error unless ``missing_ok``.

    Records written before sweeps kept the full test-set accuracy get it
    (:func:`final_test_accuracy`) from their run folder's metrics, where that folder is present."""
    path = Path(path)
    path = path / RECORDS if path.is_dir() or path.suffix != ".jsonl" else path
    if not missing_ok and not path.exists():
        raise EnsdivError(f"no sweep records at {path}; run "
                          f"`{shlex.join(['ensdiv', 'sweep', '--out', str(path.parent)])}` first")
    records = read_jsonl(path, what="sweep records file", required=required,
                         fix="restore it, or delete its damaged lines and resume (those "
                             "ensembles are then evaluated again)")
    for rec in records:
        if "test_acc" in rec:
            continue
        final = [m for m in read_metrics(path.parent / run_name(rec["lam"], rec["seed"]))
                 if m["epoch"] == rec.get("epochs")]
        if final:
            rec.update(final_test_accuracy(final[-1]))
    return records


def read_sweeps(paths: Sequence[str | os.PathLike], *,
                required: Sequence[str] = ("lam", "seed", "gdr", "attacks", "n")) -> list[dict]:
    """The records of several sweeps (e.g. a GDR and a GAL sweep that make one figure and
    table) in order; a sweep given twice or one with no finished ensemble is an error."""
    if len(set(map(str, paths))) != len(paths):
        raise EnsdivError("a sweep folder is listed twice; give each once")
    records = []
    for path in paths:
        got = read_sweep_records(path, required=required)
        if not got:
            raise EnsdivError(f"no sweep records in {path}; the sweep has not finished an "
                              "ensemble")
        records += got
    return records


def read_detection_records(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """A detection run's records (its folder or its ``records.jsonl``); none is an error."""
    path = Path(folder)
    path = path / RECORDS if path.is_dir() else path
    if not path.exists():
        raise EnsdivError(f"no detection records at {path}; run `ensdiv detect RUN --out "
                          f"{shlex.quote(str(folder))}` first")
    records = read_jsonl(path, what="detection records file", missing_ok=False,
                         required=("score", "adversary", "roc", "auroc"),
                         fix="restore it, or resume the detection run to rewrite it")
    if not records:
        raise EnsdivError(f"no detection records in {path}")
    return records


def read_certification(folder: str | os.PathLike) -> tuple[dict[str, Any], list[dict]]:
    """A certification run's settings (``certify.json``) and records."""
    path = Path(folder)
    if not (path / RECORDS).exists():
        raise EnsdivError(f"no certification records at {path / RECORDS}; run "
                          f"`ensdiv certify RUN --out {shlex.quote(str(folder))}` first")
    config = read_json(path / CERTIFY_CONFIG, what="certification config",
                       fix="restore it, or certify again into another --out")
    records = read_jsonl(path / RECORDS, what="certification records file",
                         missing_ok=False, required=("idx", "radius", "correct"),
                         fix="delete its damaged lines and resume the certification")
    return config, records


def train_cost(run: str | os.PathLike) -> dict[str, Any]:
    """Training wall time of a run folder: ``{"train_seconds", "epochs"}`` summed from its
    metrics (the loop's time, without the per-epoch evaluation)."""
    recs = read_jsonl(Path(run) / METRICS, what="metrics file", required=("epoch",),
                      fix="compare a run folder made by ensdiv train")
    return {"train_seconds": round(sum(float(r.get("train_seconds", 0.0)) for r in recs), 2),
            "epochs": len(recs)}


def read_card(path: str | os.PathLike) -> Card:
    """The card in ``path`` (a card file or an evaluation folder); a missing or foreign file is
    one :class:`EnsdivError` naming what to do.

    Example:
        >>> import tempfile
        >>> read_card(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: ...card.json...make it with `ensdiv evaluate RUN --out DIR`...
    """
    p = Path(path)
    if p.is_dir():
        p = p / CARD
    d = read_json(p, what="robustness card", fix="make it with `ensdiv evaluate RUN --out DIR`")
    try:
        return Card.from_dict(d)
    except EnsdivError as e:
        raise EnsdivError(f"{p} is {e}; make one with `ensdiv evaluate RUN --out DIR`") from None
