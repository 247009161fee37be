"""``ensdiv evaluate``: one robustness card per ensemble — the driver around :mod:`ensdiv.card`.

``ensdiv evaluate RUN --out DIR`` evaluates a trained ensemble on the first ``n`` test images
and writes ``DIR/card.json`` (:meth:`ensdiv.card.Card.to_dict`, strict JSON) and ``DIR/card.md``
(the same, for people: :func:`ensdiv.runs.report.card_markdown`). This driver only runs the
stages, saves them and writes the files; the card itself is the library's
:class:`~ensdiv.card.Card` (RobustBench's model-card fields, then one evaluation per
aggregation rule, the members, the member → member transfer matrix, transfer from an
independent surrogate, GDR and, with ``sigma``, certified accuracy and ACR; every number with
its attack setup, n and seed, the weights' fingerprint, ensdiv's version and each stage's wall
time).

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
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from ensdiv.aggregation import AGGREGATIONS
from ensdiv.card import Card, CardBudget, assemble_card, describe_surrogate
from ensdiv.card_stages import (
    card_gradients,
    card_members,
    card_surrogate,
    card_transfer,
    card_whitebox,
    check_card_inputs,
)
from ensdiv.certification import certified_summary, certify_dataset
from ensdiv.data import load_dataset
from ensdiv.ensemble import Ensemble, weights_fingerprint
from ensdiv.errors import EnsdivError, check_choice, check_eps, check_int, check_real
from ensdiv.io import (
    JsonConfig,
    atomic_write_json,
    atomic_write_text,
    read_json,
)
from ensdiv.loop import CHECKPOINT, ENSEMBLE, finished_epochs
from ensdiv.runs.records import train_cost
from ensdiv.runs.report import card_markdown
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
from ensdiv.training import TrainConfig, train

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
        check_eps("--eps", self.eps)
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
        # the certificate settings are checked with or without --sigma: a saved card must not
        # hold a value that would fail once certificates are asked for
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
    not there yet (resuming a killed training from its checkpoint). An entry counts only once
    every epoch is done: a killed training leaves an ``ensemble.pt`` of its last finished epoch,
    which no card may take for the finished surrogate."""
    folder = (cache / "surrogates" / f"{config.dataset}-{config.arch}-m{config.members}-"
              f"e{config.epochs}-b{config.batch_size}-lr{config.lr:g}-seed{config.seed}")

    def complete(path: Path) -> bool:
        return (path / ENSEMBLE).is_file() and finished_epochs(path) >= config.epochs

    if complete(folder):
        return folder
    with run_lock(folder) as out:
        if not complete(out):
            log(f"training the plain surrogate once into {out} ({config.epochs} epochs)")
            atomic_write_json(out / CONFIG, config.to_dict())
            train(config, load_dataset(config.dataset, root=data_root), device=device,
                  out_dir=out, resume=(out / CHECKPOINT).exists(), progress=progress)
    return folder


def write_card(config: EvaluateConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                 overwrite: bool = False, device: str | torch.device = "cpu",
                 data_root: str | None = None, cache: Path | None = None,
                 progress: bool = False,
                 log: Callable[[str], None] = print) -> Card:
    """Write the card of ``config.run`` into ``out_dir`` (``card.json``, ``card.md``) and return
    it: the driver behind ``ensdiv evaluate`` (see the module docstring). The card is
    :func:`ensdiv.card.assemble_card` of the saved stages.

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
                        kind="evaluation",
                        command=shlex.join(["ensdiv", "evaluate", str(config.run)]))
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
            ens, x, y, eps=eps, aggregation=rule, budget=budget, log=log))
            for rule in config.aggregations}
        black = None if surrogate is None else stage("surrogate", lambda: card_surrogate(
            surrogate, ens, x, y, eps=eps, aggregations=config.aggregations, budget=budget))
        certified = None
        if config.sigma is not None:
            certified = stage("certified", lambda: _certified(ens, test, config, parts,
                                                              progress))
        card = assemble_card(
            ens, eps=eps, n=n, budget=budget, whitebox=white, members=members,
            transfer=transfer, gradients=grads, surrogate_transfer=black,
            surrogate=None if surrogate is None else describe_surrogate(surrogate,
                                                                        config.surrogate),
            certified=certified, seconds=seconds, name=config.name or Path(config.run).name,
            run=config.run, dataset=dataset,
            **training_done(loaded.path.parent))
        atomic_write_json(out / CARD, card.to_dict())
        atomic_write_text(out / CARD_MARKDOWN, card_markdown(card))
    return card


def training_done(folder: Path) -> dict[str, Any]:
    """The run's training time in seconds and the epochs it finished, as
    :func:`~ensdiv.card.assemble_card` takes them (``train_seconds``, ``trained_epochs``), from
    one read of its metrics (:func:`~ensdiv.runs.records.train_cost`); None for both if the
    folder keeps no metrics (an ensemble file given alone)."""
    try:
        cost = train_cost(folder)
    except EnsdivError:
        cost = {"epochs": 0}
    done = cost["epochs"] > 0
    return {"train_seconds": cost["train_seconds"] if done else None,
            "trained_epochs": cost["epochs"] if done else None}


def _certified(ens: Ensemble, test: Any, config: EvaluateConfig, parts: Path,
               progress: bool) -> dict[str, Any]:
    assert config.sigma is not None
    certs = certify_dataset(ens, test, sigma=config.sigma, n0=config.cert_n0, n=config.cert_n,
                            alpha=config.alpha, batch_size=100, max=config.cert_points,
                            out=parts / "certify.jsonl", seed=config.seed, progress=progress)
    return {**certified_summary(certs, radii=config.radii, sigma=config.sigma,
                                n0=config.cert_n0, n=config.cert_n, alpha=config.alpha),
            "base": "averaged softmax", "seed": config.seed}
