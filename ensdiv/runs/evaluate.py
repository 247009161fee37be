"""``ensdiv evaluate``: one robustness card per ensemble — the driver around :mod:`ensdiv.card`.

``ensdiv evaluate RUN --out DIR`` evaluates a trained ensemble on the first ``n`` test images
and writes ``DIR/card.json`` (strict JSON) and ``DIR/card.md`` (the same, for people). The card
follows RobustBench's model cards (``name``, ``dataset``, ``threat_model``, ``eps``,
``architecture``, ``clean_acc``, ``robust_acc``, ``number_forward_passes``, ``reported``) and adds
what an ensemble needs: one evaluation per aggregation rule (``evaluations``: the cascade
APGD-CE → APGD-DLR → MORA → Square, which attack broke each input first, the averaged-output
robust accuracy beside the member-aware one, the sanity checks), the members' clean and robust
accuracy, the member → member transfer matrix, transfer from an independent surrogate, GDR and
the mean gradient cosine, and, with ``sigma``, certified accuracy and ACR. Every number carries
its attack setup, n and seed; the card names the weights' fingerprint and ensdiv's version, and
the wall time of every stage. The top-level ``clean_acc``/``robust_acc`` are those of the first
rule given (``aggregation``).

Resuming: every stage (gradients, members, transfer, one white-box cascade per rule, surrogate,
certificates — these per image) is saved under ``DIR/parts/`` as it finishes, so a killed run
continues with ``ensdiv evaluate --out DIR --resume`` and loses at most the stage in progress;
every stage is seeded, so the card equals an uninterrupted run's (wall times aside). The
rule-free stages are computed once for all rules.

``--surrogate plain`` trains a plain ensemble of the run's data set, architecture, size and
epochs once (seed :data:`SURROGATE_SEED`, the sweep's) into ``$ENSDIV_CACHE/surrogates/`` (default
``~/.cache/ensdiv``) and reuses it for every later card.

Example:
    >>> EvaluateConfig(run="runs/gal", aggregations=("softmax", "vote")).validate().budget()
    CardBudget(apgd_steps=100, mora_steps=100, square_queries=5000, transfer_steps=10, seed=0)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ensdiv._version import __version__
from ensdiv.aggregation import AGGREGATIONS
from ensdiv.card import (
    CARD_ATTACKS,
    CardBudget,
    card_gradients,
    card_members,
    card_surrogate,
    card_transfer,
    card_whitebox,
    check_card_inputs,
    zero_grad_warning,
)
from ensdiv.certification import certify_dataset
from ensdiv.data import load_dataset
from ensdiv.detect import weights_fingerprint
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_choice, check_int, check_real
from ensdiv.io import (
    JsonConfig,
    atomic_write_json,
    atomic_write_text,
    read_json,
    strict_json,
    utc_now,
)
from ensdiv.loop import CHECKPOINT, ENSEMBLE
from ensdiv.objective import DIVERSITIES
from ensdiv.runs.records import train_cost
from ensdiv.runs.rundir import (
    CARD,
    CARD_MARKDOWN,
    CONFIG,
    EVALUATE_CONFIG,
    check_fits,
    ensemble_path,
    load_run,
    prepare_run_dir,
    run_lock,
)
from ensdiv.smoothing import average_certified_radius, certified_accuracy
from ensdiv.stats import binomial_se, mean_se
from ensdiv.train import TrainConfig, train

CARD_FORMAT = "ensdiv.card/1"
PARTS = "parts"
"""Sub-folder of an evaluation holding each finished stage (what resuming reuses)."""
SURROGATE_SEED = 10_000
"""Seed of the cached plain surrogate (the one ``ensdiv sweep`` uses for its surrogate)."""
PLAIN = "plain"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(JsonConfig):
    """Settings of one card (saved, with the data set and the weights' fingerprint, as
    ``evaluate.json``).

    ``run``: the run folder evaluated; ``eps``: L∞ radius; ``n``: the first n test images;
    ``aggregations``: the rules, the first one the card's headline; the budgets and ``seed``
    of :class:`~ensdiv.card.CardBudget`; ``surrogate``: a run folder, ``"plain"`` (trained once
    and cached) or None; ``sigma`` with ``radii``/``cert_n0``/``cert_n``/``cert_points``/
    ``alpha``: Cohen's CERTIFY of the ensemble (its averaged-softmax prediction) on the first
    ``cert_points`` images; ``name``: the card's name (default: the run folder's).
    """

    run: str | None = None
    eps: float = 0.1
    n: int = 500
    aggregations: tuple[str, ...] = ("softmax",)
    apgd_steps: int = CardBudget.apgd_steps
    mora_steps: int = CardBudget.mora_steps
    square_queries: int = CardBudget.square_queries
    transfer_steps: int = CardBudget.transfer_steps
    seed: int = 0
    surrogate: str | None = None
    sigma: float | None = None
    radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    cert_n0: int = 100
    cert_n: int = 1_000
    cert_points: int = 100
    alpha: float = 0.001
    name: str | None = None

    KIND: ClassVar[str] = "evaluation"
    SAVED_WITH: ClassVar[tuple[str, ...]] = ("dataset", "weights", "surrogate_weights")

    def budget(self) -> CardBudget:
        """The attacks' budgets and seed."""
        return CardBudget(apgd_steps=self.apgd_steps, mora_steps=self.mora_steps,
                          square_queries=self.square_queries,
                          transfer_steps=self.transfer_steps, seed=self.seed)

    def validate(self) -> EvaluateConfig:
        """Check every field; one :class:`EnsdivError` for the first bad one."""
        if not self.run:
            raise EnsdivError("a run folder to evaluate is needed (RUN)")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not (
                math.isfinite(self.eps) and 0 < self.eps <= 1):
            raise EnsdivError(f"--eps must be a number in (0, 1] (pixels are in [0, 1]); got "
                              f"{self.eps!r}")
        check_int("--n", self.n)
        if not self.aggregations:
            raise EnsdivError(f"--aggregation needs at least one of {', '.join(AGGREGATIONS)}")
        for rule in self.aggregations:
            check_choice("aggregation rule", rule, AGGREGATIONS)
        if len(set(self.aggregations)) != len(self.aggregations):
            raise EnsdivError(f"--aggregation names a rule twice: {','.join(self.aggregations)}")
        for f in ("apgd_steps", "mora_steps", "square_queries", "transfer_steps"):
            check_int("--" + f.replace("_", "-"), getattr(self, f))
        check_int("--seed", self.seed, minimum=0)
        if self.sigma is not None:
            check_real("--sigma", self.sigma, minimum=0, strict=True)
            if not self.radii:
                raise EnsdivError("--radii needs at least one radius")
            for r in self.radii:
                check_real("radius", r, minimum=0)
            for f in ("cert_n0", "cert_n", "cert_points"):
                check_int("--" + f.replace("_", "-"), getattr(self, f))
            check_real("--alpha", self.alpha, minimum=0, strict=True)
            if not self.alpha < 1:
                raise EnsdivError(f"--alpha must be in (0, 1); got {self.alpha!r}")
        return dataclasses.replace(self, aggregations=tuple(self.aggregations),
                                   radii=tuple(float(r) for r in self.radii))


def default_cache() -> Path:
    """Where cached surrogates live: ``$ENSDIV_CACHE``, else ``~/.cache/ensdiv``."""
    return Path(os.environ.get("ENSDIV_CACHE") or Path.home() / ".cache" / "ensdiv")


def plain_surrogate_config(ens: Ensemble, dataset: str) -> TrainConfig:
    """The plain surrogate of a run: its data set, architecture, size, epochs, batch size and
    learning rate, no diversity term, seed :data:`SURROGATE_SEED`."""
    c = ens.config
    return TrainConfig(dataset=dataset, arch=c.get("arch", "cnn"),
                       members=ens.num_members, epochs=int(c.get("epochs", 10)),
                       batch_size=int(c.get("batch_size", 128)),
                       lr=float(c.get("lr", TrainConfig.lr)), seed=SURROGATE_SEED).validate()


def plain_surrogate(config: TrainConfig, *, cache: Path, data_root: str | None = None,
                    device: str | torch.device = "cpu", progress: bool = False,
                    log: Callable[[str], None] = print) -> Path:
    """The run folder of the cached plain surrogate ``config`` describes, trained first if it is
    not there yet (resuming a killed training from its checkpoint)."""
    folder = (cache / "surrogates" / f"{config.dataset}-{config.arch}-m{config.members}-"
              f"e{config.epochs}-b{config.batch_size}-lr{config.lr:g}-seed{config.seed}")
    if (folder / ENSEMBLE).is_file():
        return folder
    with run_lock(folder) as out:
        if not (out / ENSEMBLE).is_file():
            log(f"training the plain surrogate once into {out} ({config.epochs} epochs)")
            atomic_write_json(out / CONFIG, config.to_dict())
            train(config, load_dataset(config.dataset, root=data_root), device=device,
                  out_dir=out, resume=(out / CHECKPOINT).exists(), progress=progress)
    return folder


def evaluate_run(config: EvaluateConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                 overwrite: bool = False, device: str | torch.device = "cpu",
                 data_root: str | None = None, cache: Path | None = None,
                 progress: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the card of ``config.run`` into ``out_dir`` (``card.json``, ``card.md``) and return
    it: the driver behind ``ensdiv evaluate`` (see the module docstring).

    Everything — settings, the run, the surrogate, the folder — is checked before any attack
    runs; a run of one model, a surrogate trained on another data set or with another input
    shape is one :class:`EnsdivError`.
    """
    config = config.validate()
    assert config.run is not None  # validate() ensures it
    budget = config.budget()
    loaded = load_run(config.run, data_root=data_root, device=device)
    ens, dataset = loaded.ensemble, loaded.dataset
    if ens.num_members < 2:
        raise EnsdivError(f"{config.run} holds a single model, not an ensemble: a robustness "
                          "card needs at least 2 members")
    settings: dict[str, Any] = {**config.to_dict(), "dataset": dataset,
                                "weights": weights_fingerprint(ens)}
    surrogate: Ensemble | None = None
    surrogate_cfg: TrainConfig | None = None
    if config.surrogate == PLAIN:
        surrogate_cfg = plain_surrogate_config(ens, dataset)
    elif config.surrogate is not None:
        # the surrogate's own data set is never loaded: it must be the run's
        surrogate = Ensemble.load(ensemble_path(config.surrogate), map_location=device).eval()
        theirs = surrogate.config.get("dataset")
        if theirs != dataset:
            raise EnsdivError(f"the surrogate {config.surrogate} was trained on {theirs}, "
                              f"{config.run} on {dataset}: a surrogate must come from the "
                              "same data set")
        check_fits(surrogate, dataset, loaded.info, config.surrogate)
        settings["surrogate_weights"] = weights_fingerprint(surrogate)
    test = loaded.test
    n = min(config.n, len(test))
    x = torch.stack([test[i][0] for i in range(n)]).to(device)
    y = torch.tensor([int(test[i][1]) for i in range(n)], device=device)
    check_card_inputs(ens, x, y, eps=config.eps, aggregations=config.aggregations,
                      budget=budget)
    with run_lock(out_dir) as out:
        prepare_run_dir(out, settings, config_name=EVALUATE_CONFIG, resume=resume,
                        overwrite=overwrite,
                        started=lambda p: (p / PARTS).is_dir() and any((p / PARTS).iterdir()),
                        kind="evaluation", command=f"ensdiv evaluate {config.run}")
        atomic_write_json(out / EVALUATE_CONFIG, settings)
        if surrogate_cfg is not None:
            folder = plain_surrogate(surrogate_cfg, cache=cache or default_cache(),
                                     data_root=data_root, device=device, progress=progress,
                                     log=log)
            surrogate = load_run(folder, data_root=data_root, device=device).ensemble
        parts = out / PARTS
        parts.mkdir(exist_ok=True)
        seconds: dict[str, float] = {}

        def stage(name: str, compute: Callable[[], Any]) -> Any:
            path = parts / f"{name}.json"
            if path.is_file():
                saved = read_json(path, what="evaluation stage",
                                  fix="delete it to compute that stage again")
                seconds[name] = saved["seconds"]
                return saved["value"]
            log(f"{config.name or Path(config.run).name}: {name} ...")
            t0 = time.perf_counter()
            value = compute()
            seconds[name] = time.perf_counter() - t0
            atomic_write_json(path, {"value": value, "seconds": seconds[name]})
            log(f"  {name} done ({seconds[name]:.0f}s)")
            return value

        eps = config.eps
        grads = stage("gradients", lambda: card_gradients(ens, x, y))
        members = stage("members", lambda: card_members(ens, x, y, eps=eps, budget=budget))
        transfer = stage("transfer", lambda: card_transfer(ens, x, y, eps=eps, budget=budget))
        white = {rule: stage(f"whitebox-{rule}", lambda rule=rule: card_whitebox(
            ens, x, y, eps=eps, aggregation=rule, budget=budget))
            for rule in config.aggregations}
        black = None if surrogate is None else stage("surrogate", lambda: card_surrogate(
            surrogate, ens, x, y, eps=eps, aggregations=config.aggregations, budget=budget))
        certified = None
        if config.sigma is not None:
            certified = stage("certified", lambda: _certified(ens, test, config, parts,
                                                              progress))
        card = _assemble(config, settings, loaded.ensemble, n, grads, members, transfer, white,
                         black, certified, seconds, surrogate,
                         training_seconds(loaded.path.parent))
        atomic_write_json(out / CARD, card)
        atomic_write_text(out / CARD_MARKDOWN, card_markdown(card))
    return card


def training_seconds(folder: Path) -> float | None:
    """The run's training time in seconds (:func:`~ensdiv.runs.records.train_cost`), None if
    the folder keeps no metrics (an ensemble file given alone)."""
    try:
        cost = train_cost(folder)
    except EnsdivError:
        return None
    return cost["train_seconds"] if cost["epochs"] else None


def _certified(ens: Ensemble, test: Any, config: EvaluateConfig, parts: Path,
               progress: bool) -> dict[str, Any]:
    assert config.sigma is not None
    certs = certify_dataset(ens, test, sigma=config.sigma, n0=config.cert_n0, n=config.cert_n,
                            alpha=config.alpha, batch_size=100, max=config.cert_points,
                            out=parts / "certify.jsonl", seed=config.seed, progress=progress)
    acc = certified_accuracy(certs, config.radii)
    points = len(certs)
    return {"sigma": config.sigma, "n0": config.cert_n0, "n": config.cert_n,
            "alpha": config.alpha, "points": points, "base": "averaged softmax",
            "radii": list(config.radii), "accuracy": acc,
            "accuracy_se": [binomial_se(a, points) for a in acc],
            "acr": average_certified_radius(certs), "seed": config.seed}


def _assemble(config: EvaluateConfig, settings: dict[str, Any], ens: Ensemble, n: int,
              grads: dict[str, Any], members: list[dict[str, Any]], transfer: dict[str, Any],
              white: dict[str, dict[str, Any]], black: dict[str, Any] | None,
              certified: dict[str, Any] | None, seconds: dict[str, float],
              surrogate: Ensemble | None, train_time: float | None = None) -> dict[str, Any]:
    """The card: RobustBench's fields first, then the ensemble's own."""
    assert config.run is not None
    arch = ens.config.get("arch", "?")
    evaluations = []
    for rule in config.aggregations:
        e = dict(white[rule])
        e["surrogate"] = None if black is None else black[rule]
        evaluations.append(e)
    head = evaluations[0]
    zero = grads["zero_grad_fraction"]
    warnings = zero_grad_warning(zero) + [f"{e['aggregation']}: {w}" for e in evaluations
                                          for w in e["warnings"]]
    surrogate_info = None
    if surrogate is not None:
        c = surrogate.config
        surrogate_info = {"given": config.surrogate, "weights": weights_fingerprint(surrogate),
                          "arch": c.get("arch"), "members": surrogate.num_members,
                          "diversity": c.get("diversity"), "seed": c.get("seed"),
                          "epochs": c.get("epochs")}
    train_keys = ("diversity", "lam", "epochs", "seed", "objective", "noise_sigma", "eps",
                  "teacher", "transfer", "batch_size", "lr")
    return strict_json({
        "format": CARD_FORMAT,
        "name": config.name or Path(config.run).name,
        "run": config.run,
        "dataset": settings["dataset"],
        "threat_model": "Linf",
        "eps": config.eps,
        "architecture": f"{ens.num_members} × {arch}",
        "number_forward_passes": ens.num_members,
        "n": n,
        "aggregation": head["aggregation"],
        "clean_acc": head["clean_acc"],
        "robust_acc": head["robust_acc"],
        "robust_acc_se": head["robust_acc_se"],
        "reported": utc_now(),
        "ensdiv_version": __version__,
        "weights_fingerprint": settings["weights"],
        "training": {**{k: ens.config.get(k) for k in train_keys if k in ens.config},
                     "seconds": train_time},
        "members_count": ens.num_members,
        "seed": config.seed,
        "budget": dataclasses.asdict(config.budget()),
        "keep_rule": "per-input worst case over the cascade; success counted only on inputs "
                     "correct under the rule",
        "evaluations": evaluations,
        "members": [{**m, "clean_acc_se": binomial_se(m["clean_acc"], n),
                     "robust_acc_se": binomial_se(m["robust_acc"], n)} for m in members],
        "transfer": transfer,
        "surrogate": surrogate_info,
        **{k: v for k, v in grads.items() if k != "zero_grad_fraction"},
        "zero_grad_fraction": zero,
        "certified": certified,
        "warnings": warnings,
        "seconds": {**seconds, "total": sum(seconds.values())},
    })


# ------------------------------------------------------------------------------------ reading


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The card in ``path`` (a card file or an evaluation folder); a missing or foreign file is
    one :class:`EnsdivError` naming what to do."""
    p = Path(path)
    if p.is_dir():
        p = p / CARD
    card = read_json(p, what="robustness card",
                     fix="make it with `ensdiv evaluate RUN --out DIR`")
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise EnsdivError(f"{p} is not an ensdiv robustness card (no format {CARD_FORMAT!r}); "
                          "make one with `ensdiv evaluate RUN --out DIR`")
    return card


# ---------------------------------------------------------------------------------- rendering


def _pct(p: float | None, se: float | None = None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    return f"{p:.3f}" + (f" ± {se:.3f}" if se is not None and math.isfinite(se) else "")


def _rate(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("rate") is None:
        return "—"
    return f"{entry['rate']:.3f} ({entry['fooled']}/{entry['total']})"


def card_table(cards: Sequence[dict[str, Any]]) -> str:
    """The leaderboard of ``ensdiv evaluate --table``: one row per card and aggregation rule —
    clean accuracy, the card's robust accuracy (worst case incl. MORA and Square) and the
    averaged-output one (APGD-CE + APGD-DLR), both ± binomial s.e., the inputs MORA and Square
    broke after them, mean member → member transfer, surrogate transfer, GDR, warnings.

    Example:
        >>> ev = {"aggregation": "softmax", "clean_acc": 0.9, "robust_acc": 0.2,
        ...       "robust_acc_se": 0.02, "averaged_output_robust_acc": 0.3,
        ...       "averaged_output_robust_acc_se": 0.02, "warnings": [], "surrogate": None,
        ...       "attacks": {"mora": {"broke_first": 40}, "square": {"broke_first": 10}}}
        >>> card = {"name": "gal", "dataset": "mnist5k", "eps": 0.1, "n": 500, "gdr": 0.05,
        ...         "transfer": {"mean": 0.4}, "evaluations": [ev]}
        >>> print(card_table([card]).splitlines()[-1])
        | gal | mnist5k | 0.1 | softmax | 0.900 | 0.200 ± 0.020 | 0.300 ± 0.020 | 40 + 10 | \
0.400 | — | 0.050 | 0 |
    """
    lines = ["| ensemble | data set | ε | rule | clean acc | robust acc (card) | "
             "robust acc (averaged output) | broken by MORA + Square | member → member "
             "transfer | surrogate transfer | GDR | warnings |",
             "|---" * 12 + "|"]
    for c in cards:
        for e in c["evaluations"]:
            att = e["attacks"]
            after = " + ".join(str(att[a]["broke_first"]) if att.get(a) else "—"
                               for a in ("mora", "square"))
            sur = e.get("surrogate")
            lines.append("| " + " | ".join([
                c["name"], c["dataset"], f"{c['eps']:g}", e["aggregation"],
                _pct(e["clean_acc"]), _pct(e["robust_acc"], e["robust_acc_se"]),
                _pct(e["averaged_output_robust_acc"], e["averaged_output_robust_acc_se"]),
                after, _pct(c["transfer"]["mean"]), _pct(sur["rate"]) if sur else "—",
                _pct(c.get("gdr")), str(len(e["warnings"]))]) + " |")
    return "\n".join(lines)


def method_table(cards: Sequence[dict[str, Any]],
                 step_cost: dict[str, float] | None = None) -> str:
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
        >>> cards = [{"training": {"diversity": "gal", "lam": 0.5, "seed": s, "seconds": 60},
        ...           "gdr": g, "transfer": {"mean": 0.1}, "evaluations": [ev], "warnings": []}
        ...          for s, g in ((0, 0.04), (1, 0.06))]
        >>> print(method_table(cards, {"gal": 2.5}).splitlines()[-1])
        | gal λ = 0.5 | 2 | 0.900 ± 0.000 | 0.050 ± 0.010 | 0.100 ± 0.000 | 0.500 ± 0.000 | \
0.200 ± 0.000 | 0.300 ± 0.000 | 2.50 | 1.0 ± 0.0 | 0 |
    """
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for c in cards:
        tr = c.get("training", {})
        div = tr.get("diversity") or "none"
        groups.setdefault((div, tr.get("lam") if div != "none" else None), []).append(c)

    def order(key: tuple[str, Any]) -> tuple[int, str, float]:
        div, lam = key
        rank = DIVERSITIES.index(div) if div in DIVERSITIES else len(DIVERSITIES)
        return rank, div, lam or 0.0

    lines = ["| method | seeds | clean acc | GDR | member → member transfer | surrogate "
             "transfer | robust acc (card) | robust acc (averaged output) | step / plain "
             "step | training min | warnings |", "|---" * 11 + "|"]
    for key in sorted(groups, key=order):
        div, lam = key
        group = groups[key]
        heads = [c["evaluations"][0] for c in group]
        name = "plain" if div == "none" else f"{div} λ = {lam:g}"
        cost = (step_cost or {}).get("plain" if div == "none" else div)
        minutes = [c["training"]["seconds"] / 60 if c["training"].get("seconds") else None
                   for c in group]
        lines.append("| " + " | ".join([
            name, str(len(group)), mean_se([e["clean_acc"] for e in heads]),
            mean_se([c.get("gdr") for c in group]),
            mean_se([c["transfer"]["mean"] for c in group]),
            mean_se([e["surrogate"]["rate"] if e.get("surrogate") else None for e in heads]),
            mean_se([e["robust_acc"] for e in heads]),
            mean_se([e["averaged_output_robust_acc"] for e in heads]),
            f"{cost:.2f}" if cost is not None else "—", mean_se(minutes, 1),
            str(sum(len(c.get("warnings", [])) for c in group))]) + " |")
    return "\n".join(lines)


def card_time(card: dict[str, Any]) -> str:
    """One sentence: how long the card took, stage by stage (the README states it).

    Example:
        >>> card = {"name": "g", "dataset": "mnist5k", "eps": 0.1, "n": 500,
        ...         "architecture": "3 × cnn", "seconds": {"members": 60, "whitebox-softmax": 240,
        ...         "total": 300}, "evaluations": [{"aggregation": "softmax", "attacks": {
        ...         "apgd-ce": {"seconds": 50}, "square": {"seconds": 150}}}]}
        >>> card_time(card)  # doctest: +NORMALIZE_WHITESPACE
        'g (mnist5k, 3 × cnn, n = 500, L∞ ε = 0.1, rule softmax): 5.0 min in all — members 60 s,
         whitebox-softmax 240 s (apgd-ce 50 s, square 150 s)'
    """
    rule = card["evaluations"][0]["aggregation"]
    attacks = card["evaluations"][0]["attacks"]
    inner = ", ".join(f"{a} {v['seconds']:.0f} s" for a, v in attacks.items() if v)
    stages = ", ".join(f"{k} {v:.0f} s" + (f" ({inner})" if k == f"whitebox-{rule}" else "")
                      for k, v in card["seconds"].items() if k != "total")
    return (f"{card['name']} ({card['dataset']}, {card['architecture']}, n = {card['n']}, "
            f"L∞ ε = {card['eps']:g}, rule {rule}): {card['seconds']['total'] / 60:.1f} min in "
            f"all — {stages}")


def card_contrasts(cards: Sequence[dict[str, Any]]) -> str:
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
        >>> card = {"name": "g", "dataset": "mnist5k", "eps": 0.1, "n": 100, "evaluations": [
        ...     ev("softmax", 0.2, 0.3), ev("vote", 0.1, 0.1)]}
        >>> print(card_contrasts([card]).splitlines()[2])
        | g | mnist5k | 0.1 | 10.0 ± 3.0 | — | 0.0 ± 0.0 | -10.0 ± 5.0 | — |
    """
    rules = ("softmax", "logits", "vote")
    lines = ["| ensemble | data set | ε | "
             + " | ".join(f"{r}: averaged-output − card" for r in rules)
             + " | vote − softmax (card) | logits − softmax (card) |",
             "|---" * (3 + len(rules) + 2) + "|"]
    for c in cards:
        n = c["n"]
        by = {e["aggregation"]: e for e in c["evaluations"]}
        cells = [c["name"], c["dataset"], f"{c['eps']:g}"]
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


def cards_report(cards: Sequence[dict[str, Any]]) -> str:
    """What ``ensdiv evaluate --table`` prints: :func:`card_table` and
    :func:`card_contrasts`."""
    return (card_table(cards) + "\n\nIn points of robust accuracy (± s.e.):\n\n"
            + card_contrasts(cards))


def card_markdown(card: dict[str, Any]) -> str:
    """The card for people (``card.md``): every number of ``card.json`` with its setup.

    Example:
        >>> "robustness card" in card_markdown.__doc__
        True
    """
    b = card["budget"]
    out = [f"# {card['name']} — robustness card",
           "",
           f"{card['dataset']}, L∞ ε = {card['eps']:g}, {card['architecture']} "
           f"({card['number_forward_passes']} forward passes), n = {card['n']} (the first test "
           f"images), seed {card['seed']}; weights {card['weights_fingerprint']}, ensdiv "
           f"{card['ensdiv_version']}, {card['reported']}. Training: "
           + ", ".join(f"{k} {v}" for k, v in card["training"].items() if v is not None) + ".",
           "",
           f"Attacks: APGD-CE and APGD-DLR {b['apgd_steps']} steps, MORA {b['mora_steps']} "
           f"steps per mixing weight, Square {b['square_queries']} queries, transfer PGD "
           f"{b['transfer_steps']} steps (last iterate). Robust accuracy is over all n inputs; "
           "each attack's success is over the inputs it ran on (those correct under the rule "
           "that no earlier attack broke); ± is the binomial standard error.",
           "",
           "| rule | clean acc | robust acc (card) | robust acc (averaged output) | "
           + " | ".join(f"{a}: fooled (broke first, s)" for a in CARD_ATTACKS)
           + " | surrogate transfer |",
           "|---" * (5 + len(CARD_ATTACKS)) + "|"]
    for e in card["evaluations"]:
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
            f"{_pct(m['robust_acc'], m.get('robust_acc_se'))} |" for m in card["members"]]
    t = card["transfer"]
    m = len(t["fooled"])
    out += ["", f"Member → member transfer (row crafts, column is fooled; PGD "
                f"{t['crafted_with']['steps']} steps, mean {_pct(t['mean'])}):", "",
            "| from \\ to | " + " | ".join(str(j) for j in range(m)) + " |",
            "|---" * (m + 1) + "|"]
    for i in range(m):
        row = [("—" if i == j or t["total"][i][j] == 0 else
                f"{t['fooled'][i][j] / t['total'][i][j]:.3f}") for j in range(m)]
        out.append(f"| {i} | " + " | ".join(row) + " |")
    out += ["", f"GDR {_pct(card.get('gdr'))}, mean gradient cosine "
                f"{_pct(card.get('mean_cos'))}, inputs with a zero member gradient "
                f"{card['zero_grad_fraction']:.1%}."]
    s = card.get("surrogate")
    if s:
        out.append(f"Surrogate: {s['given']} ({s['members']} × {s['arch']}, "
                   f"{s['diversity']}, seed {s['seed']}, weights {s['weights']}).")
    c = card.get("certified")
    if c:
        out += ["", f"Certified (Cohen et al., σ = {c['sigma']:g}, n0 = {c['n0']}, n = {c['n']},"
                    f" α = {c['alpha']:g}, first {c['points']} images, base: {c['base']}): "
                + ", ".join(f"r = {r:g}: {_pct(a, se)}" for r, a, se in
                            zip(c["radii"], c["accuracy"], c["accuracy_se"], strict=True))
                + f"; ACR {_pct(c['acr'])}."]
    out += ["", "Warnings: " + ("none." if not card["warnings"] else "")]
    out += [f"- {w}" for w in card["warnings"]]
    out += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in card["seconds"].items())
            + "."]
    return "\n".join(out) + "\n"
