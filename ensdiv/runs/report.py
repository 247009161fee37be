"""Markdown tables drawn from records only, so no number in the README or docs/ is typed by hand.

``ensdiv plot gdr-vs-attack RUN --table`` prints :func:`sweep_tables`: per-λ means with their
standard errors over seeds, the fall of transfer from the plainest to the most diverse λ under
both keep-rules, and Spearman's ρ between GDR and each success measure. Records are strict JSON:
an undefined value (``null``) is left out of a mean and shown as "—" when nothing is left.

Example:
    >>> print(mean_se([0.25, 0.27, 0.26]))
    0.260 ± 0.006
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ensdiv.card import CARD_ATTACKS, Card
from ensdiv.errors import EnsdivError
from ensdiv.objective import DIVERSITIES
from ensdiv.stats import binomial_se, mean_and_se, mean_se, number
from ensdiv.sweep_stats import correlations, entry_success, regularizer

Record = dict[str, Any]


def _entry(rec: Record, attack: str, eps: float) -> Record | None:
    return next((a for a in rec.get("attacks", ()) if a["attack"] == attack and a["eps"] == eps),
                None)


Group = tuple[str, float]
"""(regularizer an ensemble was trained with — ``"none"`` when plain — and λ)."""


def _by_lam(records: Sequence[Record]) -> dict[Group, list[Record]]:
    """Records grouped by (regularizer, λ): plain first, then each regularizer in the order
    it first appears, λ ascending — so the records of several sweeps (e.g. a GDR and a GAL
    sweep sharing one plain baseline) make one table."""
    order: dict[str, int] = {"none": -1}
    for r in records:
        order.setdefault(regularizer(r), len(order))
    groups: dict[Group, list[Record]] = {}
    for r in sorted(records, key=lambda r: (order[regularizer(r)], r["lam"], r["seed"])):
        groups.setdefault((regularizer(r), r["lam"]), []).append(r)
    return groups


def _label(group: Group, groups: dict[Group, list[Record]]) -> str:
    """``λ = 1`` — or ``gdr λ = 1`` when the groups hold more than one regularizer."""
    several = len({reg for reg, _ in groups if reg != "none"}) > 1
    reg, lam = group
    return f"{reg} λ = {lam:g}" if several and reg != "none" else f"λ = {lam:g}"


def _row(label: str, groups: dict[float, list[Record]],
         get: Callable[[Record], float | None]) -> str:
    return f"| {label} | " + " | ".join(mean_se([get(r) for r in g]) for g in groups.values()) \
        + " |"


def _attack_value(attack: str, eps: float, *path: str) -> Callable[[Record], float | None]:
    def get(rec: Record) -> float | None:
        node: Any = _entry(rec, attack, eps)
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node
    return get


def lam_table(records: Sequence[Record], eps: float | None = None) -> str:
    """Per-λ means ± standard errors over seeds at one eps (default: the largest)."""
    groups = _by_lam(records)
    all_eps = sorted({a["eps"] for r in records for a in r["attacks"]})
    eps = all_eps[-1] if eps is None else eps
    attacks = {a["attack"] for r in records for a in r["attacks"]}
    seeds = sorted({len(g) for g in groups.values()})
    lines = [f"Mean ± standard error over {'/'.join(map(str, seeds))} seeds per λ; L∞ eps = "
             f"{eps:g}; n = {records[0]['n']} test images per ensemble; success counted over "
             "the inputs the attacked model classifies correctly.", "",
             "| measure | " + " | ".join(_label(g, groups) for g in groups) + " |",
             "|---|" + "---|" * len(groups),
             _row("clean ensemble accuracy", groups, lambda r: r["ensemble_acc"]),
             _row("GDR", groups, lambda r: r["gdr"]),
             _row("mean gradient cosine", groups, lambda r: r["mean_cos"])]
    if "pgd" in attacks:
        lines += [
            _row("member → member transfer, PGD, full budget", groups,
                 _attack_value("pgd", eps, "transfer_mean")),
            _row("member → member transfer, PGD, first-success examples", groups,
                 _attack_value("pgd", eps, "transfer_mean_first_success")),
            _row("member → ensemble, PGD, full budget", groups,
                 _attack_value("pgd", eps, "to_ensemble", "rate")),
            _row("black-box from surrogate, PGD, full budget", groups,
                 _attack_value("pgd", eps, "blackbox", "rate")),
            _row("**white-box on ensemble, worst case PGD / APGD-CE / APGD-DLR**", groups,
                 _attack_value("pgd", eps, "whitebox", "rate"))]
        lines.append(_row("  white-box PGD alone, full budget", groups,
                          _attack_value("pgd", eps, "whitebox", "attacks", "pgd", "rate")))
        lines.append(_row("  white-box worst case at half the budget", groups,
                          _attack_value("pgd", eps, "whitebox", "half_budget", "rate")))
        warned = _attack_value("pgd", eps, "whitebox", "warning")
        lines.append("| ensembles whose worst case had not converged (full − half > 2 points) | "
                     + " | ".join(f"{sum(1 for r in g if warned(r))} of {len(g)}"
                                  for g in groups.values()) + " |")
    for name, label in (("mifgsm", "MI-FGSM"), ("fgsm", "FGSM")):
        if name in attacks:
            lines += [_row(f"member → member transfer, {label}", groups,
                           _attack_value(name, eps, "transfer_mean")),
                      _row(f"white-box on ensemble, {label}", groups,
                           _attack_value(name, eps, "whitebox", "rate"))]
    return "\n".join(lines)


def _pooled_rate(recs: Sequence[Record], get: Callable[[Record], float | None]) -> float:
    v = [x for x in (number(get(r)) for r in recs) if math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def transfer_fall_table(records: Sequence[Record]) -> str:
    """Member → member transfer at the plainest and the most diverse λ, and their ratio, for
    every attack and eps, with full-budget and (PGD) first-success examples."""
    groups = _by_lam(records)
    lo = next(iter(groups))  # the plainest: λ = 0 if present, else the smallest λ
    highest: dict[str, Group] = {}
    for group in groups:  # the most diverse of each regularizer: its largest λ
        if group != lo:
            highest[group[0]] = group
    his = list(highest.values()) or [lo]
    lines = [f"| attack | eps | examples | {_label(lo, groups)} | "
             + " | ".join(f"{_label(hi, groups)} | fall (×)" for hi in his) + " |",
             "|---|---|---|---|" + "---|---|" * len(his)]
    grid = sorted({(a["attack"], a["eps"]) for r in records for a in r["attacks"]},
                  key=lambda t: (["fgsm", "pgd", "mifgsm"].index(t[0])
                                 if t[0] in ("fgsm", "pgd", "mifgsm") else 9, t[1]))
    for attack, eps in grid:
        kinds = [("full budget", "transfer_mean")]
        if attack == "pgd":
            kinds.append(("first success", "transfer_mean_first_success"))
        elif attack == "fgsm":
            kinds = [("one step", "transfer_mean")]
        for label, key in kinds:
            get = _attack_value(attack, eps, key)
            a = _pooled_rate(groups[lo], get)
            cells = []
            for hi in his:
                b = _pooled_rate(groups[hi], get)
                fall = f"{a / b:.1f}" if b > 0 and math.isfinite(a) else "—"
                cells.append(f"{mean_se([get(r) for r in groups[hi]])} | {fall}")
            lines.append(f"| {attack.upper()} | {eps:g} | {label} | "
                         f"{mean_se([get(r) for r in groups[lo]])} | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines)


def correlation_table(records: Sequence[Record]) -> str:
    """Spearman's ρ (p) between ensemble GDR and each success measure, per attack and eps."""
    rows = correlations(records)
    cols = [("whitebox", "white-box ensemble"), ("transfer", "member → member"),
            ("blackbox", "black-box surrogate")]
    grid: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for r in rows:
        grid.setdefault((r["attack"], r["eps"]), {})[r["measure"]] = r
    n = max((r["n"] for r in rows), default=0)
    lines = [f"Spearman ρ (p) over n = {n} ensembles.", "",
             "| attack | eps | " + " | ".join(c for _, c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for (attack, eps), cells in grid.items():
        out = []
        for key, _ in cols:
            c = cells.get(key)
            out.append("—" if c is None or not math.isfinite(c["rho"])
                       else f"{c['rho']:.2f} ({c['p']:.2g})")
        lines.append(f"| {attack.upper()} | {eps:g} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def sweep_tables(records: Sequence[Record]) -> str:
    """All the sweep's tables as one markdown text (what docs/transfer-and-gdr.md shows)."""
    warned = sum(1 for r in records if r.get("warnings"))
    all_eps = sorted({a["eps"] for r in records for a in r["attacks"]})
    parts = [f"**{len(records)} ensembles**, {records[0].get('dataset', '?')}, "
             f"{records[0].get('members', '?')} × {records[0].get('arch', '?')}, "
             f"{records[0].get('epochs', '?')} epochs; {warned} record(s) carry warnings.",
             "", lam_table(records)]
    has_pgd = any(a["attack"] == "pgd" for r in records for a in r["attacks"])
    if len(all_eps) > 1 and has_pgd:
        groups = _by_lam(records)
        lines = ["", "White-box worst case (PGD / APGD-CE / APGD-DLR) on the ensemble by eps:", "",
                 "| eps | " + " | ".join(_label(g, groups) for g in groups) + " |",
                 "|---|" + "---|" * len(groups)]
        for eps in all_eps:
            lines.append(_row(f"{eps:g}", groups, _attack_value("pgd", eps, "whitebox", "rate")))
        parts.append("\n".join(lines))
    parts += ["", "Member → member transfer, plainest vs most diverse λ (mean ± s.e. over seeds; "
              "fall = ratio of the means):", "", transfer_fall_table(records), "",
              correlation_table(records)]
    equal = equal_gdr_table(records, measures=("transfer", "whitebox", "blackbox"))
    if equal:
        parts += ["", "Regularizers compared at equal GDR (residuals from one line log10(success) "
                  "= a + b·GDR fitted to all ensembles; mean ± s.e. in log10 units):", "", equal]
    return "\n".join(parts)


def equal_gdr_table(records: Sequence[Record], measures: Sequence[str] = ("transfer",
                                                                          "whitebox")) -> str:
    """Do two regularizers differ **at equal GDR**? Per attack, eps and measure, one line
    ``log10(success) = a + b·GDR`` is fitted by least squares to every ensemble (plain ones
    included; a zero rate counts as half an input, as in the figure); each regularizer's
    ensembles then sit above or below it on average. The table shows each regularizer's mean
    residual (log10 units, ± standard error over its ensembles) and, for the first two, the
    ratio of their successes at equal GDR, ``10^(r₂ − r₁)``. Empty when the records hold fewer
    than two regularizers.

    Example:
        >>> recs = [{"lam": lam, "seed": 0, "trained_with": reg, "gdr": g, "attacks": [
        ...     {"attack": "pgd", "eps": 0.1, "whitebox": {"rate": rate, "total": 100}}]}
        ...     for reg, lam, g, rate in [("gdr", 1, 0.2, 0.4), ("gdr", 2, 0.1, 0.2),
        ...                               ("gal", 1, 0.2, 0.8), ("gal", 2, 0.1, 0.4)]]
        >>> print(equal_gdr_table(recs, measures=("whitebox",)).splitlines()[-1])
        | PGD | 0.1 | white-box ensemble | -0.151 ± 0.000 | 0.151 ± 0.000 | 2.00 |
    """
    regs = list(dict.fromkeys(regularizer(r) for r in records if regularizer(r) != "none"))
    if len(regs) < 2:
        return ""
    names = {"transfer": "member → member", "whitebox": "white-box ensemble",
             "blackbox": "black-box surrogate"}
    lines = ["| attack | eps | measure | " + " | ".join(f"{g} residual" for g in regs)
             + f" | {regs[1]} ÷ {regs[0]} at equal GDR |",
             "|---|---|---|" + "---|" * (len(regs) + 1)]
    grid = [(a["attack"], a["eps"]) for a in records[0]["attacks"]]
    for attack, eps in sorted(grid, key=lambda k: (["fgsm", "pgd", "mifgsm"].index(k[0])
                                                   if k[0] in ("fgsm", "pgd", "mifgsm")
                                                   else 9, k[1])):
        for measure in measures:
            pts = []
            for r in records:
                a = _entry(r, attack, eps)
                if a is None:
                    continue
                rate, floor = entry_success(a, measure)
                g = number(r.get("gdr"))
                if math.isfinite(rate) and math.isfinite(g):
                    pts.append((regularizer(r), g, math.log10(max(rate, floor))))
            if len(pts) < 3:
                continue
            gdr = np.array([p[1] for p in pts])
            logs = np.array([p[2] for p in pts])
            slope, icpt = np.polyfit(gdr, logs, 1)
            resid = logs - (icpt + slope * gdr)
            by_reg = {g: resid[[p[0] == g for p in pts]] for g in regs}
            cells = [mean_se(list(by_reg[g])) for g in regs]
            if len(by_reg[regs[0]]) and len(by_reg[regs[1]]):
                ratio = f"{10 ** (by_reg[regs[1]].mean() - by_reg[regs[0]].mean()):.2f}"
            else:
                ratio = "—"
            lines.append(f"| {attack.upper()} | {eps:g} | {names.get(measure, measure)} | "
                         + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def train_time_table(records: Sequence[Record]) -> str:
    """Training wall time per ensemble of a sweep, by (regularizer, λ): median and range over
    the ensembles recorded (the sweep's ``train_seconds``: the training loop, without the
    per-epoch evaluation). A median, because one run on a shared machine can be slowed by
    anything else running.

    Example:
        >>> print(train_time_table([{"lam": 0.0, "seed": 0, "train_seconds": 230.0,
        ...                          "epochs": 3}]).splitlines()[-1])
        | λ = 0 | 1 | 230 | 230–230 |
    """
    groups = _by_lam(records)
    lines = [f"| ensemble | n | median seconds ({records[0].get('epochs', '?')} epochs) | range |",
             "|---|---|---|---|"]
    for group, recs in groups.items():
        secs = sorted(float(r["train_seconds"]) for r in recs)
        lines.append(f"| {_label(group, groups)} | {len(secs)} | {float(np.median(secs)):.0f} | "
                     f"{secs[0]:.0f}–{secs[-1]:.0f} |")
    return "\n".join(lines)


def _diff(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Difference of means b − a and its standard error (independent seeds)."""
    (ma, sa), (mb, sb) = mean_and_se(a), mean_and_se(b)
    return mb - ma, math.hypot(sa, sb)


def arch_pair_table(pairs: Sequence[tuple[str, Sequence[Record], Sequence[Record]]],
                    attack: str = "pgd", eps: float = 0.1, max_acc_gap: float = 0.005) -> str:
    """Two architectures trained alike, side by side: for each ``(data set label, records of
    the reference, records of the candidate)`` — sweeps with the same seeds, epochs and λs —
    and each (regularizer, λ), the full test-set accuracy (``test_acc``), the GDR and the
    member → member transfer (``attack`` at ``eps``, full budget), as mean ± s.e. over seeds,
    and the candidate's difference with its standard error ("—" where the records lack the
    measure, e.g. :func:`ensdiv.runs.records.training_records` of plain training runs).

    The marks are the gate a candidate passes to replace the reference, read as "no worse":
    ✓ where its accuracy is at most ``max_acc_gap`` lower, and — for ensembles trained with a
    diversity term only — where its GDR and transfer (lower is more diverse) are at most one
    standard error higher; ✗ otherwise. A plain ensemble's GDR and transfer carry no mark.

    Example:
        >>> r = lambda arch, seed, acc, lam=0.5: {"arch": arch, "lam": lam, "seed": seed,
        ...     "gdr": 0.2, "trained_with": "gal", "test_acc": acc,
        ...     "attacks": [{"attack": "pgd", "eps": 0.1, "transfer_mean": 0.3}]}
        >>> t = arch_pair_table([("digits", [r("cnn", 0, 0.90), r("cnn", 1, 0.92)],
        ...                       [r("cnn-nf", 0, 0.88), r("cnn-nf", 1, 0.90)])])
        >>> print(t.splitlines()[-1])
        | | | difference | −0.020 ± 0.014 ✗ | +0.000 ± 0.000 ✓ | +0.000 ± 0.000 ✓ |
    """
    transfer = _attack_value(attack, eps, "transfer_mean")
    measures: list[tuple[Callable[[Record], Any], bool]] = [  # (value, higher is better)
        (lambda r: r.get("test_acc"), True), (lambda r: r.get("gdr"), False),
        (transfer, False)]
    lines = ["| data set | ensembles | members | clean accuracy (test set) | GDR | member → "
             f"member transfer ({attack.upper()}, ε = {eps:g}) |", "|---|---|---|---|---|---|"]
    for label, ref, cand in pairs:
        a_groups, b_groups = _by_lam(ref), _by_lam(cand)
        for group in (g for g in a_groups if g in b_groups):
            a, b = a_groups[group], b_groups[group]
            name = "plain" if group[0] == "none" else f"{group[0]} λ = {group[1]:g}"
            for i, (recs, arch) in enumerate(((a, a[0]["arch"]), (b, b[0]["arch"]))):
                cells = [mean_se([get(r) for r in recs]) for get, _ in measures]
                lead = f"{label} | {name}" if i == 0 else "|"
                lines.append(f"| {lead} | {arch} | " + " | ".join(cells) + " |")
            cells = []
            for get, accuracy in measures:
                av = [v for v in (number(get(r)) for r in a) if math.isfinite(v)]
                bv = [v for v in (number(get(r)) for r in b) if math.isfinite(v)]
                if not av or not bv:  # e.g. training records only: accuracy, no GDR
                    cells.append("—")
                    continue
                d, se = _diff(av, bv)
                cell = f"{'−' if d < 0 else '+'}{abs(d):.3f} ± {se:.3f}"
                if accuracy:
                    cell += " ✓" if d >= -max_acc_gap else " ✗"
                elif group[0] != "none":
                    cell += " ✓" if d <= se else " ✗"
                cells.append(cell)
            lines.append("| | | difference | " + " | ".join(cells) + " |")
    return "\n".join(lines)


ADVERSARY_LABELS: dict[str, str] = {
    "transfer": "transfer (PGD on member 0)", "whitebox": "white-box PGD, oblivious",
    "agreement": "adaptive: agreement", "penalized": "adaptive: score-penalized",
    "adaptive": "**adaptive, worst of the two**"}


def _pct_se(rate: float | None, n: int) -> str:
    """A rate with its binomial standard error, √(p(1−p)/n)."""
    if rate is None or not math.isfinite(number(rate)) or not n:
        return "—"
    return f"{rate:.3f} ± {math.sqrt(rate * (1 - rate) / n):.3f}"


def detection_table(records: Sequence[Record]) -> str:
    """Score × adversary for one detection run: AUROC, TPR at the calibrated threshold,
    attack success and the detection-aware robust accuracy (± binomial standard errors)."""
    if not records:
        raise ValueError("no detection records")
    r0 = records[0]
    lines = [f"{r0.get('dataset', '?')}, {r0.get('members', '?')} members, "
             f"diversity {r0.get('diversity')} (λ = {r0.get('lam')}); L∞ eps = "
             f"{r0['attack']['eps']:g}, {r0['attack']['steps']} steps, n = {r0['n']} test images "
             f"(clean accuracy {r0['clean_acc']:.3f}); one threshold per score at "
             f"{r0['fpr_target']:.0%} FPR on {r0['n_calib']} held-out clean images.", "",
             "| score | adversary | AUROC | TPR at threshold | realized FPR | attack success "
             "| robust acc., no detector | detection-aware robust acc. |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['score']} | {ADVERSARY_LABELS.get(r['adversary'], r['adversary'])} | "
            f"{'—' if r['auroc'] is None else format(r['auroc'], '.3f')} | "
            f"{_pct_se(r['tpr'], r['n_success'])} | {number(r['fpr']):.3f} | "
            f"{_pct_se(r['attack_success'], r['n_correct'])} | "
            f"{_pct_se(r['robust_acc'], r['n'])} | {_pct_se(r['detection_robust_acc'], r['n'])} |")
    return "\n".join(lines)


def detection_summary(runs: Sequence[Sequence[Record]], adversaries: Sequence[str] = (
        "whitebox", "adaptive")) -> str:
    """One row per run and score: AUROC and detection-aware robust accuracy for a few
    adversaries side by side (plain vs diverse at a glance)."""
    head = "| ensemble | score | " + " | ".join(
        f"AUROC {ADVERSARY_LABELS[a].strip('*')} | det.-aware robust acc. "
        f"{ADVERSARY_LABELS[a].strip('*')}" for a in adversaries) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(adversaries)]
    for recs in runs:
        by = {(r["score"], r["adversary"]): r for r in recs}
        for score in dict.fromkeys(r["score"] for r in recs):
            r0 = by[(score, adversaries[0])]
            label = f"{r0.get('diversity')} λ = {r0.get('lam')}"
            cells = []
            for a in adversaries:
                r = by.get((score, a))
                cells += ["—" if r is None or r["auroc"] is None else f"{r['auroc']:.3f}",
                          "—" if r is None else _pct_se(r["detection_robust_acc"], r["n"])]
            lines.append(f"| {label} | {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CERTIFY_RADII: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25)


def certified_table(runs: Sequence[tuple[str, dict[str, Any], Sequence[Record]]],
                    radii: Sequence[float] = CERTIFY_RADII) -> str:
    """Certified accuracy at each radius, the ACR and the mean seconds per image, one row per
    (label, config, records).

    Example:
        >>> print(certified_table([("m", {"sigma": 0.5, "n": 100, "alpha": 0.001},
        ...     [{"correct": True, "radius": 0.6, "seconds": 1.0},
        ...      {"correct": False, "radius": 0.0, "seconds": 2.0}])],
        ...     radii=(0.5, 1.0)).splitlines()[-1])
        | m | 0.5 | 100 | 0.001 | 2 | 0.500 | 0.000 | 0.300 | 1.50 |
    """
    from ensdiv.smoothing import average_certified_radius, certified_accuracy

    lines = ["| model | σ | n | α | test points | " + " | ".join(f"r = {r:g}" for r in radii)
             + " | ACR | s / image |", "|---|---|---|---|---|" + "---|" * (len(radii) + 2)]
    for label, cfg, recs in runs:
        acc = certified_accuracy(recs, radii)
        secs = sum(r.get("seconds", math.nan) for r in recs) / len(recs) if recs else math.nan
        lines.append(f"| {label} | {cfg.get('sigma')} | {cfg.get('n')} | {cfg.get('alpha')} | "
                     f"{len(recs)} | " + " | ".join(f"{a:.3f}" for a in acc)
                     + f" | {average_certified_radius(recs):.3f} | {secs:.2f} |")
    return "\n".join(lines)


def _num3(value: Any) -> str:
    return "—" if value is None or not math.isfinite(number(value)) else f"{value:.3f}"


def compare_table(records: Sequence[Record]) -> str:
    """One row per compared run (records of ``ensdiv compare``): training minutes (a
    student's teacher apart: by its row's label when the teacher is compared too, so its time
    is listed once, else its minutes), clean and white-box robust accuracy of the ensemble (the
    card's cascade, or in older records the worst of PGD / APGD-CE / APGD-DLR; ± binomial
    standard error), pooled member → member transfer
    of full-budget PGD, GDR, certified accuracy at each radius (±) and the ACR.

    Example:
        >>> rec = {"label": "plain", "run": "runs/plain", "members": 3, "train_seconds": 120,
        ...        "clean_acc": 0.9, "robust_acc": 0.1, "n_eval": 900,
        ...        "transfer_mean": 0.8, "gdr": 0.3,
        ...        "whitebox": {"attacks": {"pgd": {"setup": {"eps": 0.1}}}},
        ...        "certified": {"radii": [0.5], "accuracy": [0.2], "points": 100,
        ...                      "acr": 0.12, "sigma": 0.5}}
        >>> print(compare_table([rec]).splitlines()[-1])
        | plain | 3 | 2.0 | — | 0.900 | 0.100 ± 0.010 | 0.800 | 0.300 | 0.200 ± 0.040 | 0.120 |
    """
    if not records:
        return "(no records)"
    radii = records[0]["certified"]["radii"]
    sigma = records[0]["certified"]["sigma"]
    white = records[0]["whitebox"]  # a card's cascade, or (older records) PGD/APGD's worst case
    eps = white["eps"] if "eps" in white else white["attacks"]["pgd"]["setup"]["eps"]
    labels = {os.path.normpath(r["run"]): r["label"] for r in records}
    lines = [f"| run | M | train min | teacher | clean acc | robust acc (ε = {eps:g}) | "
             "member → member transfer | GDR | "
             + " | ".join(f"certified r = {r:g} (σ = {sigma:g})" for r in radii) + " | ACR |",
             "|---" * (9 + len(radii)) + "|"]
    for r in records:
        teacher = r.get("teacher")
        if teacher:
            shown = labels.get(os.path.normpath(teacher["run"]),
                               f"{teacher['train_seconds'] / 60:.1f} min")
        cert = r["certified"]
        cells = [r["label"], str(r["members"]), f"{r['train_seconds'] / 60:.1f}",
                 shown if teacher else "—",
                 f"{r['clean_acc']:.3f}", _pct_se(r["robust_acc"], r["n_eval"]),
                 _num3(r.get("transfer_mean")), _num3(r.get("gdr")),
                 *(_pct_se(a, cert["points"]) for a in cert["accuracy"]),
                 _num3(cert["acr"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_ratios(records: Sequence[Record], pairs: Sequence[tuple[str, str]]) -> str:
    """For each ``(a, b)`` pair of compared runs' labels: a's robust accuracy, ACR and training
    time as fractions of b's (a student's teacher time not included — listed in its own row).

    Example:
        >>> recs = [{"label": "s", "robust_acc": 0.6, "train_seconds": 60,
        ...          "certified": {"acr": 0.5}},
        ...         {"label": "t", "robust_acc": 0.8, "train_seconds": 600,
        ...          "certified": {"acr": 1.0}}]
        >>> print(compare_ratios(recs, [("s", "t")]).splitlines()[-1])
        | s / t | 0.750 | 0.500 | 0.100 |
    """
    by = {r["label"]: r for r in records}
    lines = ["| runs | robust acc ratio | ACR ratio | training time ratio |", "|---|---|---|---|"]
    for a, b in pairs:
        ra, rb = by[a], by[b]
        cells = [ra["robust_acc"] / rb["robust_acc"] if rb["robust_acc"] else math.nan,
                 ra["certified"]["acr"] / rb["certified"]["acr"] if rb["certified"]["acr"]
                 else math.nan, ra["train_seconds"] / rb["train_seconds"]]
        lines.append(f"| {a} / {b} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def sweep_summary(records: Sequence[Record], corr: Sequence[Record], high: Record, low: Record,
                  out: str | os.PathLike) -> str:
    """What ``ensdiv plot gdr-vs-attack`` prints: the GDR range, Spearman's ρ of every attack,
    eps and measure (:func:`ensdiv.sweep_stats.correlations`), and the two heatmaps' ensembles.
    """
    gdrs = [r["gdr"] for r in records if r["gdr"] is not None]
    lines = [f"{len(records)} ensembles, GDR {min(gdrs):.4f} .. {max(gdrs):.4f}; figures in {out}",
             "attack  eps    measure    spearman_rho  p       n"]
    lines += [f"{c['attack']:<7} {c['eps']:<6g} {c['measure']:<10} {c['rho']:>12.3f}  "
              f"{c['p']:<7.3g} {c['n']}" for c in corr]
    lines.append(f"heatmaps: plain-most λ={high['lam']:g} (GDR {high['gdr']:.4f}) vs "
                 f"diverse-most λ={low['lam']:g} (GDR {low['gdr']:.4f})")
    return "\n".join(lines)


# ---------------------------------------------------------------------- robustness cards


def _pct(p: float | None, se: float | None = None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    return f"{p:.3f}" + (f" ± {se:.3f}" if se is not None and math.isfinite(se) else "")


def _rate(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("rate") is None:
        return "—"
    return f"{entry['rate']:.3f} ({entry['fooled']}/{entry['total']})"


def card_table(cards: Sequence[Card]) -> str:
    """The leaderboard of ``ensdiv evaluate --table``: one row per card and aggregation rule —
    clean accuracy, the card's robust accuracy (worst case incl. MORA and Square) and the
    averaged-output one (APGD-CE + APGD-DLR), both ± binomial s.e., the inputs MORA and Square
    broke after them, mean member → member transfer, surrogate transfer, GDR, warnings.

    Example:
        >>> ev = {"aggregation": "softmax", "clean_acc": 0.9, "robust_acc": 0.2,
        ...       "robust_acc_se": 0.02, "averaged_output_robust_acc": 0.3,
        ...       "averaged_output_robust_acc_se": 0.02, "warnings": [], "surrogate": None,
        ...       "attacks": {"mora": {"broke_first": 40}, "square": {"broke_first": 10}}}
        >>> card = Card(name="gal", dataset="mnist5k", eps=0.1, n=500, aggregation="softmax",
        ...             clean_acc=0.9, robust_acc=0.2, robust_acc_se=0.02, evaluations=[ev],
        ...             gdr=0.05, transfer={"mean": 0.4})
        >>> print(card_table([card]).splitlines()[-1])
        | gal | mnist5k | 0.1 | softmax | 0.900 | 0.200 ± 0.020 | 0.300 ± 0.020 | 40 + 10 | \
0.400 | — | 0.050 | 0 |
    """
    lines = ["| ensemble | data set | ε | rule | clean acc | robust acc (card) | "
             "robust acc (averaged output) | broken by MORA + Square | member → member "
             "transfer | surrogate transfer | GDR | warnings |",
             "|---" * 12 + "|"]
    setups: dict[tuple[str, Any, float], set[tuple[int, str]]] = {}
    for c in cards:
        setups.setdefault((c.name, c.dataset, c.eps), set()).add((c.n, _budget(c)))
    for c in cards:
        # one ensemble carded at one ε with another n or budget must not read as two numbers
        # of one thing: such rows name their n and budget
        label = (c.name if len(setups[(c.name, c.dataset, c.eps)]) == 1
                 else f"{c.name} (n {c.n}, {_budget(c)})")
        for e in c.evaluations:
            att = e["attacks"]
            after = " + ".join(str(att[a]["broke_first"]) if att.get(a) else "—"
                               for a in ("mora", "square"))
            sur = e.get("surrogate")
            lines.append("| " + " | ".join([
                label, str(c.dataset), f"{c.eps:g}", e["aggregation"],
                _pct(e["clean_acc"]), _pct(e["robust_acc"], e["robust_acc_se"]),
                _pct(e["averaged_output_robust_acc"], e["averaged_output_robust_acc_se"]),
                after, _pct(c.transfer["mean"] if c.transfer else None),
                _pct(sur["rate"]) if sur else "—", _pct(c.gdr), str(len(e["warnings"]))]) + " |")
    return "\n".join(lines)


def method_table(cards: Sequence[Card], step_cost: dict[str, float] | None = None) -> str:
    """One row per training method over its cards (several seeds): what ``ensdiv evaluate
    --table DIR... --by-method`` prints. Every cell is the mean over the method's cards ± the
    standard error over them (sample s.d. / √seeds; one card: no s.e.), from each card's first
    rule: clean accuracy, GDR, mean member → member transfer (full-budget PGD), transfer from
    the surrogate, the card's robust accuracy (worst case incl. MORA and Square) and the
    averaged-output one (APGD-CE + APGD-DLR), the training minutes the card records, and how
    many warnings (gradient masking, non-converged attacks) its cards carry. ``step_cost`` maps
    a method to its step ÷ plain step (a benchmark's; "—" when missing).

    Example:
        >>> ev = {"aggregation": "softmax", "clean_acc": 0.9, "robust_acc": 0.2,
        ...       "averaged_output_robust_acc": 0.3, "surrogate": {"rate": 0.5}}
        >>> cards = [Card(name=f"gal{s}", dataset="mnist5k", eps=0.1, n=500,
        ...               aggregation="softmax", clean_acc=0.9, robust_acc=0.2,
        ...               robust_acc_se=0.02, evaluations=[ev], gdr=g, transfer={"mean": 0.1},
        ...               training={"diversity": "gal", "lam": 0.5, "seed": s, "seconds": 60})
        ...          for s, g in ((0, 0.04), (1, 0.06))]
        >>> print(method_table(cards, {"gal": 2.5}).splitlines()[-1])
        | gal λ = 0.5 | 2 | 0.900 ± 0.000 | 0.050 ± 0.010 | 0.100 ± 0.000 | 0.500 ± 0.000 | \
0.200 ± 0.000 | 0.300 ± 0.000 | 2.50 | 1.0 ± 0.0 | 0 |
    """
    settings = {(c.dataset, c.n, c.eps, _budget(c)) for c in cards}
    if len(settings) > 1:
        raise EnsdivError("a method table averages cards of one evaluation setting; these mix "
                          + "; ".join(f"{d} n {n} ε {e:g} {b}" for d, n, e, b in sorted(
                              settings, key=str)) + " (make one table per setting)")
    runs = [c.run or c.name for c in cards]
    twice = sorted({r for r in runs if runs.count(r) > 1})
    if twice:
        raise EnsdivError(f"{', '.join(map(str, twice))} is carded more than once: a method "
                          "table counts each trained ensemble (seed) once; give one card per run")
    groups = group_by_method(cards)

    lines = ["| method | seeds | clean acc | GDR | member → member transfer | surrogate "
             "transfer | robust acc (card) | robust acc (averaged output) | step / plain "
             "step | training min | warnings |", "|---" * 11 + "|"]
    for key, group in groups.items():
        div = key[0]
        heads = [c.evaluations[0] for c in group]
        name = method_label(key)
        cost = (step_cost or {}).get("plain" if div == "none" else div)
        minutes = [c.training["seconds"] / 60 if c.training.get("seconds") else None
                   for c in group]
        lines.append("| " + " | ".join([
            name, str(len(group)), mean_se([e["clean_acc"] for e in heads]),
            mean_se([c.gdr for c in group]),
            mean_se([c.transfer["mean"] if c.transfer else None for c in group]),
            mean_se([e["surrogate"]["rate"] if e.get("surrogate") else None for e in heads]),
            mean_se([e["robust_acc"] for e in heads]),
            mean_se([e["averaged_output_robust_acc"] for e in heads]),
            f"{cost:.2f}" if cost is not None else "—", mean_se(minutes, 1),
            str(sum(len(c.warnings) for c in group))]) + " |")
    return "\n".join(lines)


MethodKey = tuple[str, Any, float]
"""How a card's ensemble was trained, as a comparison groups it: (diversity term, λ, training
noise σ)."""


def method_key(training: dict[str, Any]) -> MethodKey:
    """The :data:`MethodKey` of a card's ``training`` record (λ is None for plain).

    Example:
        >>> method_key({"diversity": "drt", "lam": 0.5, "noise_sigma": 0.25, "seed": 1})
        ('drt', 0.5, 0.25)
    """
    div = training.get("diversity") or "none"
    return div, training.get("lam") if div != "none" else None, \
        float(training.get("noise_sigma") or 0.0)


def method_label(key: MethodKey) -> str:
    """A :data:`MethodKey` in words: ``plain``, ``gal λ = 2``, ``drt λ = 0.5, σ = 0.25``.

    Example:
        >>> method_label(("drt", 0.5, 0.25)), method_label(("none", None, 0.0))
        ('drt λ = 0.5, σ = 0.25', 'plain')
    """
    div, lam, sigma = key
    name = "plain" if div == "none" else f"{div} λ = {lam:g}"
    return name + (f", σ = {sigma:g}" if sigma else "")


def group_by_method(cards: Sequence[Card]) -> dict[MethodKey, list[Card]]:
    """The cards of each training method (one per seed), methods in ensdiv's order (plain,
    then each diversity term as :data:`ensdiv.vocab.DIVERSITIES` lists them, then λ, σ)."""
    groups: dict[MethodKey, list[Card]] = {}
    for c in cards:
        groups.setdefault(method_key(c.training), []).append(c)

    def order(key: MethodKey) -> tuple[int, str, float, float]:
        div, lam, sigma = key
        rank = DIVERSITIES.index(div) if div in DIVERSITIES else len(DIVERSITIES)
        return rank, div, lam or 0.0, sigma

    return {k: groups[k] for k in sorted(groups, key=order)}


def _budget(card: Card) -> str:
    """A card's attack budget in a few words (what two cards of one run may differ in)."""
    b = card.budget
    return (f"APGD {b.get('apgd_steps')}, MORA {b.get('mora_steps')}, Square "
            f"{b.get('square_queries')}, transfer {b.get('transfer_steps')}, seed {b.get('seed')}")


def card_time(card: Card) -> str:
    """One sentence: how long the card took, stage by stage (the README states it).

    Example:
        >>> card = Card(name="g", dataset="mnist5k", eps=0.1, n=500, aggregation="softmax",
        ...             clean_acc=0.9, robust_acc=0.2, robust_acc_se=0.02,
        ...             architecture="3 × cnn", seconds={"members": 60, "whitebox-softmax": 240,
        ...             "total": 300}, evaluations=[{"aggregation": "softmax", "attacks": {
        ...             "apgd-ce": {"seconds": 50}, "square": {"seconds": 150}}}])
        >>> card_time(card)  # doctest: +NORMALIZE_WHITESPACE
        'g (mnist5k, 3 × cnn, n = 500, L∞ ε = 0.1, rule softmax): 5.0 min in all — members 60 s,
         whitebox-softmax 240 s (apgd-ce 50 s, square 150 s)'
    """
    rule = card.evaluations[0]["aggregation"]
    attacks = card.evaluations[0]["attacks"]
    inner = ", ".join(f"{a} {v['seconds']:.0f} s" for a, v in attacks.items() if v)
    stages = ", ".join(f"{k} {v:.0f} s" + (f" ({inner})" if k == f"whitebox-{rule}" else "")
                      for k, v in card.seconds.items() if k != "total")
    return (f"{card.name} ({card.dataset}, {card.architecture}, n = {card.n}, "
            f"L∞ ε = {card.eps:g}, rule {rule}): {card.seconds['total'] / 60:.1f} min in "
            f"all — {stages}")


def card_contrasts(cards: Sequence[Card]) -> str:
    """The two questions of the cards, answered in points of robust accuracy (100 × fraction):

    - **what the member-aware evaluation adds**: per card and rule, the averaged-output robust
      accuracy (APGD-CE + APGD-DLR) minus the card's (with MORA and Square) — the share of
      inputs only MORA or Square broke, ± its binomial standard error over n;
    - **vote against averaged softmax** (and mean logits), each attacked properly: the card's
      robust accuracy under ``vote`` minus under ``softmax`` (and ``logits`` minus
      ``softmax``), ± the standard error of a difference of two independent proportions (the
      same inputs, so this s.e. is conservative).

    Example:
        >>> def ev(rule, rob, avg):
        ...     return {"aggregation": rule, "robust_acc": rob, "averaged_output_robust_acc": avg}
        >>> card = Card(name="g", dataset="mnist5k", eps=0.1, n=100, aggregation="softmax",
        ...             clean_acc=0.9, robust_acc=0.2, robust_acc_se=0.04,
        ...             evaluations=[ev("softmax", 0.2, 0.3), ev("vote", 0.1, 0.1)])
        >>> print(card_contrasts([card]).splitlines()[2])
        | g | mnist5k | 0.1 | 10.0 ± 3.0 | — | 0.0 ± 0.0 | -10.0 ± 5.0 | — |
    """
    rules = ("softmax", "logits", "vote")
    lines = ["| ensemble | data set | ε | "
             + " | ".join(f"{r}: averaged-output − card" for r in rules)
             + " | vote − softmax (card) | logits − softmax (card) |",
             "|---" * (3 + len(rules) + 2) + "|"]
    for c in cards:
        n = c.n
        by = {e["aggregation"]: e for e in c.evaluations}
        cells = [c.name, str(c.dataset), f"{c.eps:g}"]
        for r in rules:
            e = by.get(r)
            if e is None:
                cells.append("—")
                continue
            d = e["averaged_output_robust_acc"] - e["robust_acc"]
            cells.append(f"{100 * d:.1f} ± {100 * binomial_se(d, n):.1f}")
        for r in ("vote", "logits"):
            if r not in by or "softmax" not in by:
                cells.append("—")
                continue
            a, b = by[r]["robust_acc"], by["softmax"]["robust_acc"]
            se = math.sqrt(binomial_se(a, n) ** 2 + binomial_se(b, n) ** 2)
            cells.append(f"{100 * (a - b):.1f} ± {100 * se:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cards_report(cards: Sequence[Card]) -> str:
    """What ``ensdiv evaluate --table`` prints: :func:`card_table` and
    :func:`card_contrasts`."""
    return (card_table(cards) + "\n\nIn points of robust accuracy (± s.e.):\n\n"
            + card_contrasts(cards))


def card_markdown(card: Card) -> str:
    """The card for people (``card.md``): every number of ``card.json`` with its setup.

    Example:
        >>> card = Card(name="g", dataset="digits", eps=0.1, n=4, aggregation="softmax",
        ...             clean_acc=1.0, robust_acc=0.5, robust_acc_se=0.25, evaluations=[])
        >>> card_markdown(card).splitlines()[0]
        '# g — robustness card'
    """
    b = card.budget
    out = [f"# {card.name} — robustness card",
           "",
           f"{card.dataset}, L∞ ε = {card.eps:g}, {card.architecture} "
           f"({card.number_forward_passes} forward passes), n = {card.n} (the first test "
           f"images), seed {card.seed}; weights {card.weights_fingerprint}, ensdiv "
           f"{card.ensdiv_version}, {card.reported}. Training: "
           + ", ".join(f"{k} {v}" for k, v in card.training.items() if v is not None) + ".",
           "",
           f"Attacks: APGD-CE and APGD-DLR {b.get('apgd_steps')} steps, MORA "
           f"{b.get('mora_steps')} steps per mixing weight, Square {b.get('square_queries')} "
           f"queries, transfer PGD {b.get('transfer_steps')} steps (last iterate). Robust "
           "accuracy is over all n inputs; each attack's success is over the inputs it ran on "
           "(those correct under the rule that no earlier attack broke); ± is the binomial "
           "standard error.",
           "",
           "| rule | clean acc | robust acc (card) | robust acc (averaged output) | "
           + " | ".join(f"{a}: fooled (broke first, s)" for a in CARD_ATTACKS)
           + " | surrogate transfer |",
           "|---" * (5 + len(CARD_ATTACKS)) + "|"]
    for e in card.evaluations:
        cells = [e["aggregation"] + (f" (via {e['stand_in']})" if e.get("stand_in") else ""),
                 _pct(e["clean_acc"]), _pct(e["robust_acc"], e["robust_acc_se"]),
                 _pct(e["averaged_output_robust_acc"], e["averaged_output_robust_acc_se"])]
        for a in CARD_ATTACKS:
            entry = e["attacks"].get(a)
            cells.append("—" if entry is None else
                         f"{_rate(entry)} ({entry['broke_first']}, {entry['seconds']:.0f})")
        cells.append(_rate(e.get("surrogate")))
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "| member | clean acc | robust acc (APGD-CE) |", "|---|---|---|"]
    out += [f"| {m['member']} | {_pct(m['clean_acc'], m.get('clean_acc_se'))} | "
            f"{_pct(m['robust_acc'], m.get('robust_acc_se'))} |" for m in card.members]
    t = card.transfer or {"fooled": [], "total": [], "mean": None, "crafted_with": {}}
    m = len(t["fooled"])
    out += ["", f"Member → member transfer (row crafts, column is fooled; PGD "
                f"{t['crafted_with'].get('steps')} steps, mean {_pct(t['mean'])}):", "",
            "| from \\ to | " + " | ".join(str(j) for j in range(m)) + " |",
            "|---" * (m + 1) + "|"]
    for i in range(m):
        row = [("—" if i == j or t["total"][i][j] == 0 else
                f"{t['fooled'][i][j] / t['total'][i][j]:.3f}") for j in range(m)]
        out.append(f"| {i} | " + " | ".join(row) + " |")
    zero = card.zero_grad_fraction
    out += ["", f"GDR {_pct(card.gdr)}, mean gradient cosine "
                f"{_pct(card.mean_cos)}, inputs with a zero member gradient "
                + ("—" if zero is None else f"{zero:.1%}") + "."]
    s = card.surrogate
    if s:
        out.append(f"Surrogate: {s['given']} ({s['members']} × {s['arch']}, "
                   f"{s['diversity']}, seed {s['seed']}, weights {s['weights']}).")
    c = card.certified
    if c:
        out += ["", f"Certified (Cohen et al., σ = {c['sigma']:g}, n0 = {c['n0']}, n = {c['n']},"
                    f" α = {c['alpha']:g}, first {c['points']} images, base: {c['base']}): "
                + ", ".join(f"r = {r:g}: {_pct(a, se)}" for r, a, se in
                            zip(c["radii"], c["accuracy"], c["accuracy_se"], strict=True))
                + f"; ACR {_pct(c['acr'])}."]
    out += ["", "Warnings: " + ("none." if not card.warnings else "")]
    out += [f"- {w}" for w in card.warnings]
    out += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in card.seconds.items())
            + "."]
    return "\n".join(out) + "\n"
