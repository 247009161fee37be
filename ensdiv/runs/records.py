"""Reading the records that runs leave: each kind of records file with the check that it is
there and whole, a training run's cost and final accuracy, and the sweep records' (GDR,
success) series with their correlations, which tables and figures both draw on.

Drivers read each other's records through here, never through each other.

Example:
    >>> run_name(0.5, 1), regularizer({"lam": 0.0})
    ('lam0.5-seed1', 'none')
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ensdiv.errors import EnsdivError
from ensdiv.io import read_json, read_jsonl
from ensdiv.loop import METRICS, read_metrics
from ensdiv.runs.rundir import CERTIFY_CONFIG, CONFIG, RECORDS
from ensdiv.stats import number, spearman


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
        raise EnsdivError(f"no sweep records at {path}; run `ensdiv sweep --out "
                          f"{path.parent}` first")
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
                          f"{folder}` first")
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
                          f"`ensdiv certify RUN --out {folder}` first")
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




# ------------------------------------------------------- sweep records: (GDR, success) series
MEASURES: dict[str, str] = {"whitebox": "white-box on ensemble",
                            "transfer": "member → member transfer",
                            "blackbox": "black-box from surrogate"}


def entry_success(entry: dict[str, Any], measure: str) -> tuple[float, float]:
    """(rate, floor) of one attack entry of a sweep record for a measure (:data:`MEASURES`): a
    zero rate is drawn (and fitted) at half a count, 0.5 / total."""
    if measure == "transfer":
        t = entry["transfer"]
        off = [(f, n) for i, (fr, nr) in enumerate(zip(t["fooled"], t["total"], strict=True))
               for j, (f, n) in enumerate(zip(fr, nr, strict=True)) if i != j]
        total = sum(n for _, n in off)
        return number(entry["transfer_mean"]), 0.5 / max(total, 1)
    s = entry[measure]
    return number(s["rate"]), 0.5 / max(s["total"], 1)


def sweep_series(records: Sequence[dict[str, Any]], attack: str, eps: float,
                 measure: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(GDR, success rate, drawing floor) of every record with a defined GDR and rate, for one
    attack, eps and measure (:data:`MEASURES`)."""
    g, rate, floor = [], [], []
    for r in records:
        for a in r["attacks"]:
            if a["attack"] == attack and a["eps"] == eps and math.isfinite(number(r["gdr"])):
                s, f = entry_success(a, measure)
                if math.isfinite(s):
                    g.append(number(r["gdr"]))
                    rate.append(s)
                    floor.append(f)
    return np.array(g), np.array(rate), np.array(floor)


def regularizer(rec: dict[str, Any]) -> str:
    """What a sweep record's ensemble was trained with: ``"none"`` (plain, λ = 0) or its
    regularizer.

    Example:
        >>> regularizer({"lam": 0.0}), regularizer({"lam": 1.0, "trained_with": "gdr"})
        ('none', 'gdr')
    """
    return "none" if rec["lam"] == 0 else rec.get("trained_with") or rec.get("diversity", "?")


def sweep_grid(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[float]]:
    """The attacks (in record order) and the sorted eps values the records hold."""
    attacks: list[str] = []
    eps: list[float] = []
    for r in records:
        for a in r["attacks"]:
            if a["attack"] not in attacks:
                attacks.append(a["attack"])
            if a["eps"] not in eps:
                eps.append(a["eps"])
    return attacks, sorted(eps)


def correlations(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spearman's ρ (scipy) between ensemble GDR and each success measure, per attack × eps.

    Returns rows ``{"attack", "eps", "measure", "rho", "p", "n"}``.
    """
    attacks, eps_values = sweep_grid(records)
    rows = []
    for attack in attacks:
        for eps in eps_values:
            for measure in MEASURES:
                g, s, _ = sweep_series(records, attack, eps, measure)
                rho, p = spearman(g, s)
                rows.append({"attack": attack, "eps": eps, "measure": measure, "rho": rho,
                             "p": p, "n": int(len(g))})
    return rows


