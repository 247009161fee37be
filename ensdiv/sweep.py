"""The GDR-vs-attack-success experiment (after Adam & Speciel 2020, Fig. 3).

Trains one ensemble per (λ, seed) with a diversity regularizer, measures its GDR, and attacks it
(FGSM, L∞ PGD, MI-FGSM at several eps): white-box on the ensemble, transfer between its members,
and black-box from a held-out plain surrogate ensemble. One JSON record per ensemble goes to
``records.jsonl`` (rewritten atomically). The sweep is resumable: an ensemble with a record is
not retrained, an interrupted one resumes from its checkpoint.

Sanity warnings (printed and stored): many zero input gradients, L∞ PGD at eps = 1 not reaching
~100% success, and black-box success above white-box success — signs of gradient masking or a
broken evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ensdiv.attacks import apgd, fgsm, mifgsm, pgd
from ensdiv.data import load_dataset
from ensdiv.distributed import (
    broadcast_outcome,
    independent,
    rank_and_world,
    shard,
)
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_choice, check_int, check_real, check_unique
from ensdiv.gdr import gradient_diversity
from ensdiv.gradients import input_gradients
from ensdiv.io import (
    atomic_write_json,
    atomic_write_jsonl,
    merge_rank_parts,
    prepare_run_dir,
    rank_part,
    rank_parts,
    read_jsonl,
    read_with_parts,
    round_floats,
    run_lock,
    utc_now,
)
from ensdiv.runtime import resolve_device
from ensdiv.train import CHECKPOINT, DEFAULT_LR, DIVERSITY_CHOICES, TrainConfig, train_run
from ensdiv.transferability import (
    Success,
    convergence_warning,
    success_counts,
    surrogate_transfer,
    transfer_matrix,
    worst_case_success,
)

RECORDS = "records.jsonl"
SWEEP_CONFIG = "sweep.json"
SURROGATE = "surrogate"
HUGE_EPS = 1.0
"""L∞ radius of the sanity attack: at eps = 1 every input can become any image."""


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Settings of a sweep; the defaults (12 ensembles, white-box worst case over PGD-10 and
    50-step APGD-CE / APGD-DLR) take about 45 minutes on 2 CPU cores on mnist5k."""

    dataset: str = "mnist5k"
    arch: str = "cnn"
    members: int = 3
    diversity: str = "gal"
    lams: tuple[float, ...] = (0.0, 0.3, 1.0, 3.0)
    seeds: int = 3
    epochs: int = 3
    batch_size: int = 128
    lr: float = DEFAULT_LR
    noise_sigma: float = 0.0
    attacks: tuple[str, ...] = ("fgsm", "pgd", "mifgsm")
    eps: tuple[float, ...] = (0.03, 0.06, 0.09)
    steps: int = 10
    apgd_steps: int = 50
    n_eval: int = 200
    eval_seed: int = 0
    surrogate_seed: int = 10_000

    def validate(self) -> SweepConfig:
        """Check every field (each λ's training run included); raise :class:`EnsdivError`
        with one clear message if bad. Lists must not repeat a value."""
        check_choice("diversity", self.diversity, DIVERSITY_CHOICES)
        if not self.lams:
            raise EnsdivError("lams needs at least one value")
        for lam in self.lams:
            check_real("lams", lam, minimum=0)
        check_unique("lams", self.lams)
        if self.diversity == "none" and any(lam != 0 for lam in self.lams):
            raise EnsdivError("a sweep over lam needs a diversity term; with diversity 'none' "
                              "every lam trains the same plain ensemble (choose --diversity "
                              "cos, gal or gdr)")
        check_int("seeds", self.seeds)
        if self.members < 2:
            raise EnsdivError(f"a diversity sweep needs at least 2 members; got {self.members}")
        for lam in self.lams:
            self.train_config(lam, 0).validate()
        check_int("surrogate seed", self.surrogate_seed, minimum=0)
        if not self.attacks:
            raise EnsdivError(f"attacks needs at least one of: {', '.join(sorted(SWEEP_ATTACKS))}")
        for a in self.attacks:
            check_choice("attack", a, SWEEP_ATTACKS)
        check_unique("attacks", self.attacks)
        if not self.eps:
            raise EnsdivError("eps needs at least one value")
        for e in self.eps:
            check_real("eps", e, minimum=0)
        check_unique("eps", self.eps)
        check_int("steps", self.steps)
        check_int("apgd steps", self.apgd_steps)
        check_int("n_eval", self.n_eval)
        check_int("eval seed", self.eval_seed, minimum=0)
        return self

    def train_config(self, lam: float, seed: int) -> TrainConfig:
        """The training run of one sweep point (λ = 0 trains plain: the term would be 0)."""
        plain = lam == 0
        return TrainConfig(dataset=self.dataset, arch=self.arch, members=self.members,
                           epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           seed=seed, diversity="none" if plain else self.diversity,
                           lam=None if plain else lam, noise_sigma=self.noise_sigma).validate()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepConfig:
        """Inverse of :meth:`to_dict` (lists become tuples); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise EnsdivError(f"unknown sweep config keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def run_name(lam: float, seed: int) -> str:
    """Folder name of one sweep point."""
    return f"lam{lam:g}-seed{seed}"


SWEEP_ATTACKS: tuple[str, ...] = ("fgsm", "pgd", "mifgsm")
"""Attacks a sweep crafts transfer examples with; white-box PGD is the worst case over PGD,
APGD-CE and APGD-DLR."""


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack configuration, exactly as a record states it (L∞, one restart).

    ``name`` is one of fgsm, pgd, mifgsm, apgd-ce, apgd-dlr; ``keep`` the keep-rule of
    :mod:`ensdiv.attacks`; ``seed`` seeds PGD's and APGD's random starts.
    """

    name: str
    eps: float
    steps: int
    keep: str
    seed: int

    @property
    def budget(self) -> int:
        """Gradient steps the attack may spend per sample."""
        return 1 if self.name == "fgsm" else self.steps

    def craft(self, model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """This attack's adversarial examples for ``model`` (an ``Attack`` callable)."""
        if self.name == "fgsm":
            return fgsm(model, x, y, eps=self.eps)
        if self.name == "pgd":
            return pgd(model, x, y, eps=self.eps, steps=self.steps, keep=self.keep,
                       generator=torch.Generator().manual_seed(self.seed))
        if self.name == "mifgsm":
            return mifgsm(model, x, y, eps=self.eps, steps=self.steps, keep=self.keep)
        return apgd(model, x, y, eps=self.eps, steps=self.steps, loss=self.name[5:],
                    seed=self.seed)

    def halved(self) -> AttackSpec:
        """The same attack with half the steps (at least 1)."""
        return dataclasses.replace(self, steps=max(1, self.steps // 2))

    def to_dict(self) -> dict[str, Any]:
        """What a record says about this attack: name, norm, eps, steps, step size, keep-rule,
        restarts and seed."""
        d: dict[str, Any] = {"attack": self.name, "norm": "linf", "eps": self.eps,
                             "steps": self.budget, "restarts": 1}
        if self.name == "fgsm":
            d.update(keep="last")  # one step: there is only one iterate to keep
        elif self.name == "pgd":
            d.update(alpha=2.5 * self.eps / self.steps, random_start=True, keep=self.keep,
                     seed=self.seed)
        elif self.name == "mifgsm":
            d.update(alpha=self.eps / self.steps, decay=1.0, keep=self.keep)
        elif self.name.startswith("apgd"):
            d.update(keep="success", seed=self.seed)
        return d


def whitebox_suite(name: str, eps: float, config: SweepConfig) -> list[AttackSpec]:
    """The white-box attacks behind one (attack, eps) entry: FGSM alone, MI-FGSM alone, and for
    PGD the worst case over PGD, APGD-CE and APGD-DLR; all keep the first success."""
    if name == "pgd":
        return [AttackSpec("pgd", eps, config.steps, "success", config.eval_seed),
                AttackSpec("apgd-ce", eps, config.apgd_steps, "success", config.eval_seed),
                AttackSpec("apgd-dlr", eps, config.apgd_steps, "success", config.eval_seed)]
    return [AttackSpec(name, eps, config.steps, "success", config.eval_seed)]


def transfer_spec(name: str, eps: float, config: SweepConfig, keep: str = "last") -> AttackSpec:
    """The attack that crafts transfer examples (full budget unless ``keep="success"``)."""
    return AttackSpec(name, eps, config.steps, keep, config.eval_seed)


def sanity_warnings(zero_grad_fraction: float, huge_eps_success: float,
                    attacks: Sequence[dict[str, Any]]) -> list[str]:
    """The gradient-masking checks of the field (AutoAttack's habits) as messages, plus the
    convergence warnings the white-box entries carry."""
    out = []
    if zero_grad_fraction > 0.05:
        out.append(f"{zero_grad_fraction:.1%} of inputs have a zero input gradient for some "
                   "member (gradient masking?)")
    if not huge_eps_success >= 0.99:
        out.append(f"L∞ PGD at eps={HUGE_EPS} fooled only {huge_eps_success:.1%} of the "
                   "ensemble's correct inputs (should be ~100%: gradient masking or a bug)")
    for a in attacks:
        if a["blackbox"]["rate"] > a["whitebox"]["rate"]:
            out.append(f"black-box {a['attack']} at eps={a['eps']} beats white-box "
                       f"({a['blackbox']['rate']:.3f} > {a['whitebox']['rate']:.3f})")
        if a["whitebox"].get("warning"):
            out.append(a["whitebox"]["warning"])
    return out


def whitebox_entry(ensemble: Ensemble, x: Tensor, y: Tensor,
                   specs: Sequence[AttackSpec]) -> dict[str, Any]:
    """Worst-case white-box success of ``specs`` on the ensemble, with a convergence check.

    AutoAttack's cascade in two stages. Stage one runs every attack at **half** its steps, each
    on the correctly classified inputs no earlier attack broke. Stage two runs the first attack
    (the cheap one, PGD) at its full steps on **every** correctly classified input, so its own
    full-budget rate stands beside the worst case, then every other attack at its full steps
    on the inputs nothing has broken yet. The full-budget success is the union of both stages;
    the half-budget success is stage one's. If the full budget breaks more than 2 points more
    inputs, the entry carries a convergence warning (the rate is then a lower bound).

    Returns:
        ``{"rate", "fooled", "total", "attacks": {name: {..., "setup"}}, "half_budget": {...},
        "warning"}``; each attack's ``fooled``/``total`` count the inputs it was run on.
    """
    half_specs = [s.halved() for s in specs]
    half = worst_case_success(ensemble, x, y, cascade=True,
                              attacks={s.name: s.craft for s in half_specs})
    first = worst_case_success(ensemble, x, y, attacks={specs[0].name: specs[0].craft})
    broken = half.broken | first.broken
    rest = specs[1:]
    if rest:
        full = worst_case_success(ensemble, x, y, cascade=True, skip=broken,
                                  attacks={s.name: s.craft for s in rest})
        union, per_attack = full.union, {**first.per_attack, **full.per_attack}
    else:
        union = Success(int(broken.sum()), first.union.total)
        per_attack = first.per_attack
    entry: dict[str, Any] = {**union.to_dict(),
                             "attacks": {k: v.to_dict() for k, v in per_attack.items()},
                             "half_budget": half.to_dict()}
    for s, h in zip(specs, half_specs, strict=True):
        entry["attacks"][s.name]["setup"] = s.to_dict()
        entry["half_budget"]["attacks"][s.name]["setup"] = h.to_dict()
    entry["warning"] = convergence_warning(
        union, half.union,
        what=f"white-box {' + '.join(s.name for s in specs)} at eps={specs[0].eps:g}")
    return entry


def evaluate_point(ensemble: Ensemble, x: Tensor, y: Tensor, config: SweepConfig,
                   surrogate_adv: dict[tuple[str, float], Tensor],
                   surrogate: Ensemble) -> dict[str, Any]:
    """GDR, gradient cosine and every attack's success for one trained ensemble.

    Per attack and eps: transfer member → member and member → ensemble with full-budget
    examples (for PGD also with first-success examples, ``transfer_first_success``), black-box
    success of the surrogate's full-budget examples, and white-box success on the ensemble
    (:func:`whitebox_entry`). Every number sits beside the attack setup that produced it.
    """
    ensemble.eval()
    grads = input_gradients(ensemble, x, y)  # one pass serves GDR, cosine and the zero check
    zero = float((grads.flatten(2).abs().amax(-1) == 0).any(0).float().mean())
    attacks = []
    tm = None
    for name in config.attacks:
        for eps in config.eps:
            spec = transfer_spec(name, eps, config)
            tm = transfer_matrix(ensemble, x, y, attack=spec.craft, whitebox=False)
            to_ens = Success(sum(s.fooled for s in tm.to_ensemble),
                             sum(s.total for s in tm.to_ensemble))
            black = surrogate_transfer(surrogate, ensemble, x, y,
                                       x_adv=surrogate_adv[(name, eps)])
            entry = {"attack": name, "eps": eps, "steps": spec.budget,
                     "transfer": {**tm.to_dict(), "crafted_with": spec.to_dict()},
                     "transfer_mean": tm.mean_transfer,
                     "to_ensemble": {**to_ens.to_dict(), "crafted_with": spec.to_dict()},
                     "blackbox": {**black.to_dict(), "crafted_with": {**spec.to_dict(),
                                                                      "on": "surrogate"}},
                     "whitebox": whitebox_entry(ensemble, x, y,
                                                whitebox_suite(name, eps, config))}
            if name == "pgd":
                first = transfer_spec(name, eps, config, keep="success")
                tm1 = transfer_matrix(ensemble, x, y, attack=first.craft, whitebox=False)
                entry["transfer_first_success"] = {**tm1.to_dict(),
                                                   "crafted_with": first.to_dict()}
                entry["transfer_mean_first_success"] = tm1.mean_transfer
            attacks.append(entry)
    huge = success_counts(ensemble, x, y, AttackSpec("pgd", HUGE_EPS, config.steps, "success",
                                                     config.eval_seed).craft(ensemble, x, y))
    assert tm is not None  # validate() guarantees at least one attack and eps
    return {"member_acc": list(tm.member_acc), "ensemble_acc": tm.ensemble_acc,
            **gradient_diversity(grads), "zero_grad_fraction": zero,
            "huge_eps_pgd": huge.to_dict(), "attacks": attacks,
            "warnings": sanity_warnings(zero, huge.rate, attacks)}


def _started(out: Path) -> bool:
    """A sweep has started once a record or any of its runs' checkpoints exists."""
    return (out / RECORDS).exists() or any(out.glob(f"*/{CHECKPOINT}"))


def _epoch_logger(log: Callable[[str], None], label: str,
                  epochs: int) -> Callable[[dict[str, Any]], None]:
    def on_epoch_end(rec: dict[str, Any]) -> None:
        log(f"  {label} epoch {rec['epoch']}/{epochs}: loss {rec['loss']:.4f}, ensemble "
            f"acc {rec['ensemble_acc']:.3f} ({rec['seconds']:.0f}s)")
    return on_epoch_end


def run_sweep(config: SweepConfig, out_dir: str | Path, *, resume: bool = False,
              overwrite: bool = False, device: str | torch.device | None = None,
              data_root: str | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run (or, with ``resume``, finish) a sweep into ``out_dir`` and return all its records.

    The folder rules are those of ``ensdiv train`` (:func:`ensdiv.io.prepare_run_dir`): a
    started sweep continues only with ``resume`` and the same config; the folder is locked
    while the sweep runs. Every argument is checked before anything is trained. ``log`` gets
    a line per trained epoch and per finished ensemble, so a log file shows progress. Under
    torchrun the surrogate's lines (trained by all ranks together) come from rank 0 only, and
    every rank logs its own ensembles' lines prefixed ``[rank r]``.

    Example (tiny):
        >>> cfg = SweepConfig(dataset="digits", arch="mlp", members=2, lams=(0.0, 1.0),
        ...                   seeds=1, epochs=1, n_eval=20, attacks=("fgsm",), eps=(0.1,))
        >>> import tempfile
        >>> recs = run_sweep(cfg, tempfile.mkdtemp(), progress=False, log=lambda s: None)
        >>> [r["lam"] for r in recs]
        [0.0, 1.0]
    """
    config.validate()
    dev = resolve_device(device)
    with run_lock(out_dir) as out:
        def prepare() -> bool:  # rank 0 under torchrun; the others get its outcome
            resuming = prepare_run_dir(out, config.to_dict(), config_name=SWEEP_CONFIG,
                                       resume=resume, overwrite=overwrite, started=_started,
                                       kind="sweep", command="ensdiv sweep")
            atomic_write_json(out / SWEEP_CONFIG, config.to_dict())
            return resuming

        resuming = broadcast_outcome(prepare)
        records = read_with_parts(out / RECORDS, _read_records) if resuming else []
        return _sweep(config, out, records, dev, data_root, progress, log)


def _read_records(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path, what="sweep records file", required=("lam", "seed"),
                      fix="restore it, or delete its damaged lines and resume (those "
                          "ensembles are then evaluated again)")


def _sweep(config: SweepConfig, out: Path, records: list[dict[str, Any]], dev: torch.device,
           data_root: str | None, progress: bool,
           log: Callable[[str], None]) -> list[dict[str, Any]]:
    done = {(r["lam"], r["seed"]) for r in records}
    if all((lam, seed) in done for lam in config.lams for seed in range(config.seeds)) \
            and not rank_parts(out / RECORDS):
        return records
    _, test, _ = load_dataset(config.dataset, root=data_root)
    n = min(config.n_eval, len(test))
    x, y = test[:n]

    rank, world = rank_and_world()
    shared = log if rank == 0 else (lambda line: None)  # the same line on every rank
    mine_log = log if world == 1 else (lambda line: log(f"[rank {rank}] {line}"))
    t0 = time.perf_counter()
    surrogate, _ = train_run(config.train_config(0.0, config.surrogate_seed),
                             out_dir=out / SURROGATE, resume=True, device=dev,
                             data_root=data_root, progress=progress,
                             on_epoch_end=_epoch_logger(shared, "surrogate", config.epochs))
    x, y = x.to(dev), y.to(dev)
    surrogate_adv = {(a, e): transfer_spec(a, e, config).craft(surrogate, x, y)
                     for a in config.attacks for e in config.eps}
    shared(f"surrogate ready ({time.perf_counter() - t0:.0f}s)")

    # under torchrun the ensembles are spread over the ranks (the surrogate above was trained
    # by all of them together); each rank trains its own alone and keeps its records in a part
    # file, which rank 0 merges into records.jsonl in the single-process order at the end
    todo = shard([(lam, seed) for lam in config.lams for seed in range(config.seeds)
                  if (lam, seed) not in done], rank, world)
    own = out / RECORDS if world == 1 else rank_part(out / RECORDS, rank)
    mine = _read_records(own) if world > 1 and own.exists() else []
    for lam, seed in todo:
        with independent():
            t1 = time.perf_counter()
            tcfg = config.train_config(lam, seed)
            ens, hist = train_run(tcfg, out_dir=out / run_name(lam, seed), resume=True,
                                  device=dev, data_root=data_root, progress=progress,
                                  on_epoch_end=_epoch_logger(mine_log,
                                                             f"lam={lam:g} seed={seed}",
                                                             config.epochs))
            t2 = time.perf_counter()
            rec = {"lam": lam, "seed": seed, "diversity": config.diversity,
                   "trained_with": tcfg.diversity, "dataset": config.dataset,
                   "arch": config.arch, "members": config.members, "epochs": config.epochs,
                   "n": n, "eval_seed": config.eval_seed, "surrogate_seed": config.surrogate_seed,
                   **evaluate_point(ens, x, y, config, surrogate_adv, surrogate),
                   "train_seconds": sum(h["train_seconds"] for h in hist),
                   "eval_seconds": time.perf_counter() - t2, "time": utc_now()}
            rec = round_floats(rec)
            records.append(rec)
            mine.append(rec)
            atomic_write_jsonl(own, records if world == 1 else mine)
            pgd_mid = [a for a in rec["attacks"] if a["attack"] == "pgd"]
            mine_log(f"lam={lam:g} seed={seed}: acc {rec['ensemble_acc']:.3f} "
                     f"GDR {rec['gdr']:.4f}±{rec['gdr_sem']:.4f} cos {rec['mean_cos']:.3f}"
                     + (f" PGD@{pgd_mid[0]['eps']} white {pgd_mid[0]['whitebox']['rate']:.3f}"
                        if pgd_mid else "") + f" ({time.perf_counter() - t1:.0f}s)")
            for w in rec["warnings"]:
                mine_log(f"  warning: {w}")
    if world > 1 or rank_parts(out / RECORDS):
        order = {lam: i for i, lam in enumerate(config.lams)}
        records = merge_rank_parts(out / RECORDS, _read_records,
                                   key=lambda r: (order.get(r["lam"], len(order)), r["lam"],
                                                  r["seed"]))
    return records
