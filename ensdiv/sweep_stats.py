"""The sweep records' (GDR, attack success) series and their correlations: what the GDR-vs-attack
figure draws and its tables state (Adam & Speciel 2020 relate an ensemble's GDR to how well
attacks transfer between its members).

A sweep record (``ensdiv sweep``) holds one ensemble's GDR and, per attack and eps, its success
white-box on the ensemble, member → member and from a surrogate (:data:`MEASURES`). Records are
strict JSON: an undefined value (``null``) is NaN here, left out of series and correlations.

Example:
    >>> rec = {"lam": 0.5, "gdr": 0.2, "attacks": [{"attack": "pgd", "eps": 0.1,
    ...        "whitebox": {"rate": 0.9, "total": 100}}]}
    >>> sweep_grid([rec]), sweep_series([rec], "pgd", 0.1, "whitebox")[1].tolist()
    ((['pgd'], [0.1]), [0.9])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ensdiv.stats import number, spearman

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
