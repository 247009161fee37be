"""The robustness card: one typed record of every number that says how robust one ensemble is
at one L∞ radius, with the attack setup beside each (:class:`Card`), and how one is put
together from its stages (:func:`assemble_card`).

The stages themselves — AutoAttack's cascade made ensemble-aware (APGD-CE, APGD-DLR, MORA,
Square), the members, the transfer matrix, the surrogate's transfer, the gradients — are the
functions of :mod:`ensdiv.card_stages`; :func:`ensdiv.card_stages.robustness_card` runs them all
and returns a :class:`Card`, ``ensdiv evaluate`` runs them one by one (saving each) and writes
:meth:`Card.to_dict` as ``card.json``, and every table of cards reads them back with
:meth:`Card.from_dict`.

Example:
    >>> card = Card(name="gal", dataset="mnist5k", eps=0.1, n=500, aggregation="softmax",
    ...             clean_acc=0.9, robust_acc=0.2, robust_acc_se=0.02, evaluations=[])
    >>> card.to_dict()["threat_model"], card.evaluation("vote") is None
    ('Linf', True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ensdiv._version import __version__
from ensdiv.ensemble import Ensemble, weights_fingerprint
from ensdiv.errors import EnsdivError
from ensdiv.io import strict_json, utc_now
from ensdiv.stats import binomial_se

CARD_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "mora", "square")
"""The cascade, in order; the first two are the averaged-output attacks."""

AVERAGED_OUTPUT_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-dlr")


@dataclass(frozen=True)
class CardBudget:
    """Every attack's budget (the defaults are the field's: AutoAttack's 100 APGD iterations and
    5,000 Square queries, MORA's 100 iterations per mixing weight) and the seed of every random
    start. ``transfer_steps`` is the full-budget PGD that crafts transfer examples."""

    apgd_steps: int = 100
    mora_steps: int = 100
    square_queries: int = 5000
    transfer_steps: int = 10
    seed: int = 0

    def validate(self) -> CardBudget:
        """The budget itself, or one :class:`EnsdivError` naming the bad field."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            low = 0 if f.name == "seed" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise EnsdivError(f"{f.name} must be an integer >= {low}; got {v!r}")
        return self


CARD_FORMAT = "ensdiv.card/1"
"""The ``format`` of a card's JSON (:meth:`Card.to_dict`)."""

TRAINING_KEYS: tuple[str, ...] = ("diversity", "lam", "epochs", "seed", "objective",
                                  "noise_sigma", "eps", "teacher", "transfer", "batch_size", "lr")
"""The settings of an ensemble's training a card repeats (from the ensemble's config)."""


@dataclass(frozen=True)
class Card:
    """One robustness card: everything one evaluation says about one ensemble at one L∞ radius.

    RobustBench's model-card fields come first (``name``, ``dataset``, ``eps``,
    ``architecture``, ``number_forward_passes``, ``clean_acc``, ``robust_acc`` and its s.e.,
    ``reported``; ``threat_model`` is always ``"Linf"``); the headline numbers are those of the
    first rule (``aggregation``). Then what an ensemble needs:

    - ``evaluations``: one dict per aggregation rule, ``card_whitebox``'s (the cascade
      APGD-CE → APGD-DLR → MORA → Square, which attack broke each input first, the
      averaged-output robust accuracy, the sanity values and warnings) plus ``surrogate``: the
      transfer from the surrogate to the ensemble under that rule (or None);
    - ``members`` (``card_members`` with binomial s.e.), ``transfer`` (``card_transfer``),
      ``gdr``, ``gdr_sem``, ``gdr_n``, ``gdr_excluded``, ``mean_cos`` and
      ``zero_grad_fraction`` (``card_gradients``) — the stages of :mod:`ensdiv.card_stages`;
    - ``surrogate``: *which model* crafted the black-box examples (given as, weights'
      fingerprint, architecture, size, training) — the transfer numbers are in the evaluations;
    - ``certified``: Cohen et al.'s certified accuracy and ACR
      (:func:`ensdiv.certification.certified_summary`), if asked for;
    - ``warnings`` (gradient masking, attacks that did not converge), ``seconds`` per stage;
    - provenance: ``run``, ``weights_fingerprint``, ``training`` (its settings and seconds),
      ``seed``, ``budget``, ``ensdiv_version``.

    Build one with :func:`~ensdiv.card_stages.robustness_card` (or :func:`assemble_card` from
    saved stages); write it with :meth:`to_dict` (strict JSON), read it with :meth:`from_dict`.

    Example:
        >>> card = Card(name="gal", dataset="mnist5k", eps=0.1, n=500, aggregation="softmax",
        ...             clean_acc=0.9, robust_acc=0.2, robust_acc_se=0.02, evaluations=[])
        >>> Card.from_dict(card.to_dict()) == card, card.to_dict()["format"]
        (True, 'ensdiv.card/1')
    """

    name: str
    dataset: str | None
    eps: float
    n: int
    aggregation: str
    clean_acc: float | None
    robust_acc: float | None
    robust_acc_se: float | None
    evaluations: list[dict[str, Any]]
    architecture: str = "?"
    members_count: int = 0
    number_forward_passes: int = 0
    seed: int = 0
    budget: dict[str, int] = field(default_factory=dict)
    members: list[dict[str, Any]] = field(default_factory=list)
    transfer: dict[str, Any] | None = None
    gdr: float | None = None
    gdr_sem: float | None = None
    gdr_n: int | None = None
    gdr_excluded: int | None = None
    mean_cos: float | None = None
    zero_grad_fraction: float | None = None
    surrogate: dict[str, Any] | None = None
    certified: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    run: str | None = None
    weights_fingerprint: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    reported: str | None = None
    ensdiv_version: str | None = None

    THREAT_MODEL: ClassVar[str] = "Linf"
    KEEP_RULE: ClassVar[str] = ("per-input worst case over the cascade; success counted only on "
                                "inputs correct under the rule")

    def to_dict(self) -> dict[str, Any]:
        """The card as strict JSON (an undefined number is None), with its ``format``,
        ``threat_model`` and ``keep_rule``."""
        return strict_json({"format": CARD_FORMAT, "threat_model": self.THREAT_MODEL,
                            "keep_rule": self.KEEP_RULE, **dataclasses.asdict(self)})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Card:
        """The card a :meth:`to_dict` (a ``card.json``) holds; anything else is one
        :class:`EnsdivError` saying what is missing."""
        if not isinstance(d, dict) or d.get("format") != CARD_FORMAT:
            raise EnsdivError(f"not an ensdiv robustness card (no format {CARD_FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise EnsdivError(f"not an ensdiv robustness card (it lacks {', '.join(missing)})")
        return cls(**{k: v for k, v in d.items() if k in names})

    def evaluation(self, rule: str) -> dict[str, Any] | None:
        """The evaluation under aggregation rule ``rule``, None if the card has none."""
        return next((e for e in self.evaluations if e["aggregation"] == rule), None)


def describe_surrogate(surrogate: nn.Module, given: str | None = None) -> dict[str, Any]:
    """What a card says about the model that crafted its black-box examples: how it was
    ``given`` (a run folder, ``"plain"``...), its weights' fingerprint and, for an ensemble,
    its architecture, size, regularizer, seed and epochs.

    Example:
        >>> other = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=1)
        >>> describe_surrogate(other)["members"]
        2
    """
    c = getattr(surrogate, "config", None) or {}
    return {"given": given, "weights": weights_fingerprint(surrogate), "arch": c.get("arch"),
            "members": getattr(surrogate, "num_members", 1), "diversity": c.get("diversity"),
            "seed": c.get("seed"), "epochs": c.get("epochs")}


def assemble_card(ensemble: Ensemble, *, eps: float, n: int, budget: CardBudget,
                  whitebox: dict[str, dict[str, Any]], members: list[dict[str, Any]],
                  transfer: dict[str, Any], gradients: dict[str, Any],
                  surrogate_transfer: dict[str, dict[str, Any]] | None = None,
                  surrogate: dict[str, Any] | None = None,
                  certified: dict[str, Any] | None = None,
                  seconds: dict[str, float] | None = None, name: str = "ensemble",
                  run: str | None = None, dataset: str | None = None,
                  train_seconds: float | None = None,
                  trained_epochs: int | None = None) -> Card:
    """The :class:`Card` made of finished stages (of :mod:`ensdiv.card_stages`): ``whitebox``
    maps each rule, the headline first, to its ``card_whitebox``; ``members``, ``transfer``,
    ``gradients`` and ``surrogate_transfer`` (rule → transfer) are ``card_members``,
    ``card_transfer``, ``card_gradients`` and ``card_surrogate``; ``surrogate`` is
    :func:`describe_surrogate`; ``seconds`` each stage's wall time. ``dataset`` defaults to the
    one in the ensemble's config. ``trained_epochs``: the epochs the run actually finished
    (when fewer than its config's, the card records those and warns that the run is
    unfinished). What ``ensdiv evaluate`` calls once its stages are saved.
    """
    evaluations = [{**w, "surrogate": None if surrogate_transfer is None
                    else surrogate_transfer[rule]} for rule, w in whitebox.items()]
    head = evaluations[0]
    zero = gradients["zero_grad_fraction"]
    config = getattr(ensemble, "config", None) or {}
    seconds = dict(seconds or {})
    training = {**{k: config.get(k) for k in TRAINING_KEYS if k in config},
                "seconds": train_seconds}
    unfinished = []
    planned = config.get("epochs")
    if trained_epochs is not None and planned is not None and trained_epochs < planned:
        training.update(epochs=trained_epochs, epochs_planned=planned)
        unfinished = [f"the run finished {trained_epochs} of its {planned} epochs: an "
                      "unfinished ensemble (resume its training before citing this card)"]
    return Card(
        name=name, dataset=dataset or config.get("dataset"), eps=eps, n=n,
        aggregation=head["aggregation"], clean_acc=head["clean_acc"],
        robust_acc=head["robust_acc"], robust_acc_se=head["robust_acc_se"],
        evaluations=evaluations,
        architecture=f"{ensemble.num_members} × {config.get('arch', '?')}",
        members_count=ensemble.num_members, number_forward_passes=ensemble.num_members,
        seed=budget.seed, budget=dataclasses.asdict(budget),
        members=[{**m, "clean_acc_se": binomial_se(m["clean_acc"], n),
                  "robust_acc_se": binomial_se(m["robust_acc"], n)} for m in members],
        transfer=transfer,
        **{k: v for k, v in gradients.items() if k != "zero_grad_fraction"},
        zero_grad_fraction=zero, surrogate=surrogate, certified=certified,
        warnings=unfinished + zero_grad_warning(zero)
        + [f"{e['aggregation']}: {w}" for e in evaluations for w in e["warnings"]],
        seconds={**seconds, "total": sum(seconds.values())},
        run=run, weights_fingerprint=weights_fingerprint(ensemble),
        training=training,
        reported=utc_now(), ensdiv_version=__version__)


def zero_grad_warning(zero: float) -> list[str]:
    """The card's warning about zero input gradients (none below 5% of the inputs)."""
    if zero > 0.05:
        return [f"{zero:.1%} of inputs have a zero input gradient for some member "
                "(gradient masking?)"]
    return []
