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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ensdiv.attack_suite import (
    HUGE_EPS,
    TRANSFER_ATTACKS,
    AttackSpec,
    sanity_warnings,
    transfer_spec,
    whitebox_entry,
    whitebox_suite,
)
from ensdiv.data import DatasetInfo, load_dataset, validation_split
from ensdiv.distributed import (
    broadcast_outcome,
    independent,
    rank_and_world,
    shard,
)
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_choice, check_eps, check_int, check_real, check_unique
from ensdiv.gdr import gradient_diversity
from ensdiv.gradients import input_gradients
from ensdiv.io import JsonConfig, atomic_write_json, atomic_write_jsonl, round_floats, utc_now
from ensdiv.rank_parts import merge_rank_parts, rank_part, rank_parts, read_with_parts
from ensdiv.runs.records import final_test_accuracy, read_sweep_records, run_name
from ensdiv.runs.rundir import (
    CHECKPOINT,
    RECORDS,
    SWEEP_CONFIG,
    open_run_folder,
    prepare_run_dir,
    run_lock,
)
from ensdiv.runtime import resolve_device
from ensdiv.training import DEFAULT_LR, DIVERSITY_CHOICES, TrainConfig, train
from ensdiv.transferability import (
    Success,
    success_counts,
    surrogate_transfer,
    transfer_matrix,
)

SURROGATE = "surrogate"
"""The sweep folder's sub-folder holding the plain surrogate ensemble of the black-box attack."""


EVAL_SPLITS: tuple[str, ...] = ("test", "val")
"""Where a sweep evaluates its ensembles (``--eval-split``)."""


@dataclasses.dataclass(frozen=True)
class SweepConfig(JsonConfig):
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
    val_fraction: float | None = None
    val_seed: int = 0
    eval_split: str = "test"

    KIND: ClassVar[str] = "sweep"

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
            check_eps("--eps", e)
        check_unique("eps", self.eps)
        check_int("steps", self.steps)
        check_int("apgd steps", self.apgd_steps)
        check_int("n_eval", self.n_eval)
        check_int("eval seed", self.eval_seed, minimum=0)
        check_choice("eval split", self.eval_split, EVAL_SPLITS)
        if self.eval_split == "val" and self.val_fraction is None:
            raise EnsdivError("--eval-split val evaluates on held-out training data: give "
                              "--val-fraction F (e.g. 0.1)")
        return self

    def train_config(self, lam: float, seed: int) -> TrainConfig:
        """The training run of one sweep point (λ = 0 trains plain: the term would be 0)."""
        plain = lam == 0
        return TrainConfig(dataset=self.dataset, arch=self.arch, members=self.members,
                           epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           seed=seed, diversity="none" if plain else self.diversity,
                           lam=None if plain else lam, noise_sigma=self.noise_sigma,
                           val_fraction=self.val_fraction, val_seed=self.val_seed).validate()

    def eval_data(self, data: tuple[Dataset, Dataset, DatasetInfo]) -> Dataset:
        """The split the sweep attacks: the test split, or with ``eval_split="val"`` the
        validation split its ensembles were trained without (so tuning never sees test
        images)."""
        if self.eval_split == "val":
            assert self.val_fraction is not None  # validate()
            return validation_split(data[0], self.val_fraction, seed=self.val_seed)[1]
        return data[1]


SWEEP_ATTACKS: tuple[str, ...] = TRANSFER_ATTACKS
"""Attacks a sweep crafts transfer examples with (:data:`ensdiv.attack_suite.TRANSFER_ATTACKS`)."""


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


def _train_into(folder: Path, config: TrainConfig, data: tuple[Any, Any, DatasetInfo],
                device: torch.device, progress: bool,
                on_epoch_end: Callable[[dict[str, Any]], None],
                ) -> tuple[Ensemble, list[dict[str, Any]]]:
    """Train (or resume) one of the sweep's ensembles in its own run folder, under the rules
    of ``ensdiv train`` (:func:`ensdiv.runs.rundir.open_run_folder`)."""
    with run_lock(folder) as sub:
        resuming = broadcast_outcome(lambda: open_run_folder(
            sub, config.to_dict(), epochs=config.epochs, resume=True, overwrite=False,
            added=TrainConfig().to_dict()))
        return train(config, data, device=device, out_dir=sub, resume=resuming,
                     progress=progress, on_epoch_end=on_epoch_end)


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
                                       kind="sweep", command="ensdiv sweep",
                                       added=SweepConfig().to_dict())
            atomic_write_json(out / SWEEP_CONFIG, config.to_dict())
            return resuming

        resuming = broadcast_outcome(prepare)
        records = read_with_parts(out / RECORDS, read_sweep_records) if resuming else []
        return _sweep(config, out, records, dev, data_root, progress, log)


def _sweep(config: SweepConfig, out: Path, records: list[dict[str, Any]], dev: torch.device,
           data_root: str | None, progress: bool,
           log: Callable[[str], None]) -> list[dict[str, Any]]:
    done = {(r["lam"], r["seed"]) for r in records}
    if all((lam, seed) in done for lam in config.lams for seed in range(config.seeds)) \
            and not rank_parts(out / RECORDS):
        return records
    data = load_dataset(config.dataset, root=data_root, seed=0)
    test = config.eval_data(data)
    n = min(config.n_eval, len(test))
    x, y = test[:n]

    rank, world = rank_and_world()
    shared = log if rank == 0 else (lambda line: None)  # the same line on every rank
    mine_log = log if world == 1 else (lambda line: log(f"[rank {rank}] {line}"))
    t0 = time.perf_counter()
    surrogate, _ = _train_into(out / SURROGATE, config.train_config(0.0, config.surrogate_seed),
                               data, dev, progress,
                               _epoch_logger(shared, "surrogate", config.epochs))
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
    mine = read_sweep_records(own) if world > 1 and own.exists() else []
    for lam, seed in todo:
        with independent():
            t1 = time.perf_counter()
            tcfg = config.train_config(lam, seed)
            ens, hist = _train_into(out / run_name(lam, seed), tcfg, data, dev, progress,
                                    _epoch_logger(mine_log, f"lam={lam:g} seed={seed}",
                                                  config.epochs))
            t2 = time.perf_counter()
            rec = {"lam": lam, "seed": seed, "diversity": config.diversity,
                   "trained_with": tcfg.diversity, "dataset": config.dataset,
                   "arch": config.arch, "members": config.members, "epochs": config.epochs,
                   "n": n, "eval_split": config.eval_split, "eval_seed": config.eval_seed,
                   "surrogate_seed": config.surrogate_seed,
                   **evaluate_point(ens, x, y, config, surrogate_adv, surrogate),
                   **final_test_accuracy(hist[-1]),
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
        records = merge_rank_parts(out / RECORDS, read_sweep_records,
                                   key=lambda r: (order.get(r["lam"], len(order)), r["lam"],
                                                  r["seed"]))
    return records
