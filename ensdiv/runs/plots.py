"""Figures drawn from sweep records only (``records.jsonl``), never from live models.

- :func:`plot_gdr_vs_attack`: attack success (log y) against ensemble GDR, one panel per attack
  (columns) and success measure (rows: white-box on the ensemble, mean transfer between members,
  black-box from the surrogate), one colour per eps, a fitted line of log10(success) on GDR,
  and Spearman's ρ in the legend.
- :func:`plot_transfer_heatmaps`: the member-to-member transfer matrix of the plainest and the
  most diverse ensemble, side by side.
- :func:`plot_detection`: ROC curves of disagreement detectors from ``ensdiv detect`` records.

Figures are written atomically (a partial PNG never replaces a good one).

Records are strict JSON: an undefined value (a GDR with every sample excluded, a rate over zero
inputs) is ``null`` and is read as NaN, i.e. left out of fits and correlations.

Example:
    >>> records = []  # from ensdiv.io.read_jsonl("runs/sweep/records.jsonl")
    >>> correlations(records)  # Spearman's ρ per attack, eps and measure (from records)
    []
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ensdiv.errors import EnsdivError, check_choice
from ensdiv.io import atomic_write, os_error
from ensdiv.stats import number
from ensdiv.sweep_stats import MEASURES, correlations, regularizer, sweep_grid, sweep_series


def figure_dir(out_dir: str | None, records_folder: Path) -> Path:
    """Where a plot command writes: ``--out-dir``, else ``figures/`` beside the records."""
    out = Path(out_dir) if out_dir is not None else records_folder / "figures"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error("write", out, e) from None
    return out


def check_plot_options(records: Sequence[dict[str, Any]], *, attack: str | None,
                       eps: float | None) -> tuple[str, float]:
    """Check the heatmaps' ``attack`` and ``eps`` against what the records hold, before
    anything is drawn; return the (attack, eps) to draw (defaults: PGD if the records hold
    it, else their first attack; the largest eps).

    Example:
        >>> recs = [{"gdr": 0.1, "attacks": [{"attack": "pgd", "eps": 0.1}]}]
        >>> check_plot_options(recs, attack=None, eps=None)
        ('pgd', 0.1)
    """
    attacks, eps_values = sweep_grid(records)
    if not attacks:
        raise EnsdivError("the records hold no attack results to draw")
    if attack is None:
        attack = "pgd" if "pgd" in attacks else attacks[0]
    check_choice("attack (in these records)", attack, attacks)
    if not any(math.isfinite(number(r["gdr"])) for r in records):
        raise EnsdivError("no record has a defined GDR to draw")
    if eps is None:
        return attack, eps_values[-1]
    if eps not in eps_values:
        raise EnsdivError(f"the records hold no eps {eps:g}; choose one of: "
                          f"{', '.join(f'{e:g}' for e in eps_values)}")
    return attack, eps


def plot_gdr_vs_attack(records: Sequence[dict[str, Any]], path: str | os.PathLike,
                       *, title: str | None = None) -> list[dict[str, Any]]:
    """Draw success (log y) vs GDR panels to ``path`` and return :func:`correlations`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks, eps_values = sweep_grid(records)
    corr = {(c["attack"], c["eps"], c["measure"]): c for c in correlations(records)}
    # one marker per regularizer when the records come from sweeps of several
    parts: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        parts.setdefault(regularizer(r), []).append(r)
    if len(parts) <= 2:  # plain and one regularizer: one marker, as before
        parts = {"all": list(records)}
    markers = dict(zip(parts, "os^Dv", strict=False))
    colours = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(len(eps_values), 1)))
    fig, axes = plt.subplots(len(MEASURES), len(attacks), squeeze=False,
                             figsize=(4.2 * len(attacks), 3.3 * len(MEASURES)))
    for col, attack in enumerate(attacks):
        for row, measure in enumerate(MEASURES):
            ax = axes[row][col]
            for eps, colour in zip(eps_values, colours, strict=True):
                g, s, floor = sweep_series(records, attack, eps, measure)
                if not len(g):
                    continue
                shown = np.maximum(s, floor)
                c = corr[(attack, eps, measure)]
                label = f"eps={eps:g}  ρ={c['rho']:.2f}"
                for marker, part in zip(markers.values(), parts.values(), strict=True):
                    pg, ps, pf = sweep_series(part, attack, eps, measure)
                    if len(pg):
                        ax.scatter(pg, np.maximum(ps, pf), color=colour, s=18, marker=marker,
                                   label=label)
                        label = None  # one legend entry per eps
                if len(g) >= 2 and np.ptp(g) > 0:
                    slope, icpt = np.polyfit(g, np.log10(shown), 1)
                    xs = np.linspace(g.min(), g.max(), 20)
                    ax.plot(xs, 10 ** (icpt + slope * xs), color=colour, lw=1)
            ax.set_yscale("log")
            ax.set_title(f"{attack.upper()}: {MEASURES[measure]}", fontsize=9)
            ax.set_xlabel("ensemble GDR (lower = more diverse)", fontsize=8)
            ax.set_ylabel("attack success", fontsize=8)
            ax.legend(fontsize=7, loc="lower right")
            ax.grid(alpha=0.3, which="both")
    n = records[0]["n"] if records else 0
    shapes = {"o": "circles", "s": "squares", "^": "triangles", "D": "diamonds",
              "v": "down-triangles"}
    key = "" if "all" in parts else "; " + ", ".join(
        f"{shapes[m]}: {'plain' if reg == 'none' else reg}" for reg, m in markers.items())
    fig.suptitle(title or f"GDR vs attack success ({len(records)} ensembles, n={n} each; "
                 f"zero success drawn at half a count{key})", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return list(corr.values())


def plot_transfer_heatmaps(records: Sequence[dict[str, Any]], path: str | os.PathLike, *,
                           attack: str = "pgd", eps: float | None = None) -> tuple[dict, dict]:
    """Transfer matrices of the highest-GDR and the lowest-GDR ensemble, side by side.

    Returns the two records drawn (plain-most, diverse-most).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in records if math.isfinite(number(r["gdr"]))]
    if not usable:
        raise ValueError("no record with a finite GDR to draw")
    _, eps_values = sweep_grid(usable)
    eps = eps_values[-1] if eps is None else eps
    high = max(usable, key=lambda r: r["gdr"])
    low = min(usable, key=lambda r: r["gdr"])
    entries = []
    for rec in (high, low):
        entry = next((a for a in rec["attacks"] if a["attack"] == attack and a["eps"] == eps),
                     None)
        if entry is None:
            raise ValueError(f"records hold no {attack} at eps={eps}")
        entries.append(entry)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, rec, entry in zip(axes, (high, low), entries, strict=True):
        mat = np.array([[number(v) for v in row] for row in entry["transfer"]["matrix"]])
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="magma")
        m = mat.shape[0]
        for i in range(m):
            for j in range(m):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center",
                        color="white" if mat[i, j] < 0.5 else "black", fontsize=9)
        ax.set_xticks(range(m))
        ax.set_yticks(range(m))
        ax.set_xlabel("evaluated on member j")
        ax.set_ylabel("crafted on member i")
        reg = regularizer(rec)
        ax.set_title(f"{'' if reg == 'none' else reg + ' '}λ={rec['lam']:g} seed {rec['seed']}: "
                     f"GDR {rec['gdr']:.3f}, "
                     f"acc {rec['ensemble_acc']:.3f}", fontsize=9)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="attack success")
    keep = entries[0]["transfer"].get("crafted_with", {}).get("keep")
    kept = {"last": ", last iterate", "success": ", first success"}.get(keep, "")
    fig.suptitle(f"{attack.upper()} eps={eps:g} ({entries[0]['steps']} steps{kept}), "
                 f"n={high['n']}: success on member j of adversarials crafted on member i",
                 fontsize=10)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return high, low


def plot_detection(runs: Sequence[Sequence[dict[str, Any]]], path: str | os.PathLike, *,
                   labels: Sequence[str] | None = None) -> None:
    """ROC curves from detection records: one row per run (e.g. a plain and a diverse
    ensemble), one panel per adversary, one curve per score, AUROC in the legend.

    Example:
        >>> plot_detection([], "/dev/null")
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: no detection records to draw
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [list(r) for r in runs if r]
    if not runs:
        raise EnsdivError("no detection records to draw")
    adversaries = list(dict.fromkeys(r["adversary"] for recs in runs for r in recs))
    fig, axes = plt.subplots(len(runs), len(adversaries), squeeze=False,
                             figsize=(3.1 * len(adversaries), 3.0 * len(runs)))
    for i, recs in enumerate(runs):
        r0 = recs[0]
        name = labels[i] if labels else f"{r0.get('diversity')} λ={r0.get('lam')}"
        for j, adv in enumerate(adversaries):
            ax = axes[i][j]
            for r in (q for q in recs if q["adversary"] == adv):
                roc = r["roc"]
                auc = "—" if r["auroc"] is None else f"{r['auroc']:.2f}"
                ax.plot(roc["fpr"], roc["tpr"], lw=1.2, label=f"{r['score']} {auc}")
            ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
            ax.axvline(r0["fpr_target"], color="grey", lw=0.6, ls="--")
            ax.set_title(f"{name}\n{adv}", fontsize=8)
            ax.set_xlabel("false-positive rate (clean)", fontsize=7)
            ax.set_ylabel("true-positive rate (adversarial)", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=5, loc="lower right")
    fig.suptitle(f"Disagreement detectors, L∞ eps {r0['attack']['eps']:g}, "
                 f"n = {r0['n']} (AUROC in the legend)", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def plot_certified(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]],
                   path: str | os.PathLike, *, max_radius: float | None = None) -> None:
    """Certified accuracy against ℓ2 radius, one curve per (label, certification records).

    Example:
        >>> plot_certified([], "/dev/null")
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: no certification records to draw
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ensdiv.smoothing import certified_accuracy

    runs = [(label, list(recs)) for label, recs in runs if recs]
    if not runs:
        raise EnsdivError("no certification records to draw")
    top = max_radius or max(max(r["radius"] for r in recs) for _, recs in runs) * 1.05 or 1.0
    grid = np.linspace(0, top, 200)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, recs in runs:
        ax.plot(grid, certified_accuracy(recs, grid), lw=1.5, label=f"{label} (n={len(recs)})")
    ax.set_xlabel("ℓ2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def plot_methods(cards: Sequence[Any], path: str | os.PathLike) -> dict[str, int]:
    """Each training method's price and gain, one point per card (seed), one colour per method
    (:func:`ensdiv.runs.report.group_by_method`): clean accuracy against the card's robust
    accuracy (its worst case, the member-aware attacks included) and against mean member →
    member transfer. Cards of one evaluation setting (data set, n, ε). Returns the points
    drawn per method.

    Example:
        >>> plot_methods([], "/dev/null")
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: no robustness cards to draw
    """
    if not cards:
        raise EnsdivError("no robustness cards to draw")
    settings = {(c.dataset, c.n, c.eps) for c in cards}
    if len(settings) > 1:
        raise EnsdivError("one figure compares cards of one setting; these mix "
                          + "; ".join(f"{d} n {n} ε {e:g}" for d, n, e in sorted(settings)))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ensdiv.runs.report import group_by_method, method_label

    dataset, n, eps = settings.pop()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.9), sharey=True)
    colours = plt.get_cmap("tab10")
    drawn: dict[str, int] = {}
    for i, (key, group) in enumerate(group_by_method(cards).items()):
        clean = [c.evaluations[0]["clean_acc"] for c in group]
        robust = [c.evaluations[0]["robust_acc"] for c in group]
        transfer = [c.transfer["mean"] if c.transfer else math.nan for c in group]
        style = dict(color=colours(i % 10), s=28, alpha=0.85,
                     label=f"{method_label(key)} ({len(group)})")
        axes[0].scatter(robust, clean, **style)
        axes[1].scatter(transfer, clean, **style)
        drawn[method_label(key)] = len(group)
    axes[0].set_xlabel(f"robust accuracy, card worst case (L∞ ε = {eps:g})")
    axes[1].set_xlabel("mean member → member transfer (PGD)")
    axes[0].set_ylabel("clean accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{dataset}: one point per seed, n = {n}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return drawn
