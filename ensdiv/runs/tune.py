"""``ensdiv tune``: the fair tuning protocol of :mod:`ensdiv.tuning` as a resumable run — each
method's declared grid trained once on the training split minus a held-out validation split,
judged on that validation split only, and the declared rule's choice written to a file the final
runs read.

``ensdiv tune --out DIR [--dataset mnist5k --methods gal,trs,... --eps 0.1 ...]`` trains the
plain ensemble and every grid point (one seed, ``--epochs``) into ``DIR/<point>/`` (ordinary run
folders, resumable; DVERGE's points start from the plain point's trained weights, as its paper
starts from a pre-trained ensemble, so they train ``--epochs`` more), then measures on the
first ``n`` validation images the cheap proxies: clean validation accuracy (the whole
validation split, from the last epoch), mean member →
member transfer of full-budget PGD (``--transfer-steps``) and the ensemble's accuracy under a
short APGD-CE (``--apgd-steps``), all at ε. One record per point goes to
``DIR/records.jsonl`` as it finishes (a killed run loses at most the point in progress), and
``DIR/chosen.json`` holds the rule, the plain ensemble's validation accuracy and each method's
chosen settings (or why none passed). Nothing here reads the test split.

Example:
    >>> TuneConfig(methods=("gal",)).validate().points()[:2]
    [('plain', {'diversity': 'none'}), ('gal-0', {'diversity': 'gal', 'lam': 0.1})]
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from ensdiv.aggregation import Aggregated
from ensdiv.attacks import apgd
from ensdiv.card import CardBudget
from ensdiv.card_stages import card_transfer
from ensdiv.data import load_dataset, validation_split
from ensdiv.errors import EnsdivError, check_choice, check_eps, check_int, check_real, check_unique
from ensdiv.io import (
    JsonConfig,
    atomic_write_json,
    atomic_write_jsonl,
    read_json,
    read_jsonl,
    round_floats,
    utc_now,
)
from ensdiv.loop import CHECKPOINT, read_metrics
from ensdiv.runs.rundir import CONFIG, RECORDS, prepare_run_dir, run_lock
from ensdiv.training import DEFAULT_LR, TrainConfig, load_init, train
from ensdiv.transferability import worst_case_success
from ensdiv.tuning import FROM_PLAIN, METHODS, grid_points, select

TUNE_CONFIG = "tune.json"
"""A tuning run's settings."""
CHOSEN = "chosen.json"
"""The rule's choice per method, which the final runs read."""
RULE = ("per method, the grid point with the lowest mean member → member transfer on the "
        "validation split among those whose clean validation accuracy is at least the plain "
        "ensemble's minus the tolerance; ties: higher white-box (APGD-CE) accuracy")


@dataclasses.dataclass(frozen=True)
class TuneConfig(JsonConfig):
    """Settings of a tuning run: what is trained (data set, architecture, members, epochs,
    batch, learning rate and its decaying ``schedule``, seed — one seed for every point), the
    validation split
    (``val_fraction``, ``val_seed``), the methods whose grids run (:data:`ensdiv.tuning.GRIDS`),
    the threat model the radii are scaled to and the proxies measured at (``eps``), the proxies'
    budgets and inputs (``n``, ``transfer_steps``, ``apgd_steps``, ``eval_seed``) and the rule's
    ``tolerance``."""

    dataset: str = "mnist5k"
    arch: str = "cnn"
    members: int = 3
    methods: tuple[str, ...] = METHODS
    epochs: int = 3
    batch_size: int = 128
    lr: float = DEFAULT_LR
    schedule: str = "cosine"
    seed: int = 0
    val_fraction: float = 0.1
    val_seed: int = 0
    eps: float = 0.1
    n: int = 200
    transfer_steps: int = 10
    apgd_steps: int = 20
    eval_seed: int = 0
    tolerance: float = 0.01

    KIND: ClassVar[str] = "tuning"

    def validate(self) -> TuneConfig:
        """Check every field and every grid point's training config; one
        :class:`EnsdivError` for the first bad one."""
        if not self.methods:
            raise EnsdivError(f"--methods needs at least one of: {', '.join(METHODS)}")
        for m in self.methods:
            check_choice("method", m, METHODS)
        check_unique("methods", self.methods)
        check_eps("--eps", self.eps)
        for f in ("n", "transfer_steps", "apgd_steps"):
            check_int("--" + f.replace("_", "-"), getattr(self, f))
        check_int("--eval-seed", self.eval_seed, minimum=0)
        check_real("--tolerance", self.tolerance, minimum=0)
        if self.members < 2:
            raise EnsdivError(f"tuning diversity needs at least 2 members; got {self.members}")
        for _, settings in self.points():
            self.train_config(settings).validate()
        return dataclasses.replace(self, methods=tuple(self.methods))

    def points(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, training settings) of the plain ensemble and every grid point, in order."""
        out: list[tuple[str, dict[str, Any]]] = [("plain", {"diversity": "none"})]
        for m in self.methods:
            out += [(f"{m}-{i}", p) for i, p in enumerate(grid_points(m, self.eps))]
        return out

    def train_config(self, settings: dict[str, Any],
                     plain: str | os.PathLike | None = None) -> TrainConfig:
        """The training run of one point: these settings with the point's own; a method of
        :data:`~ensdiv.tuning.FROM_PLAIN` starts from the run folder ``plain`` (the tuning's
        plain point) when given."""
        init = ({"init_from": str(plain)}
                if plain is not None and settings["diversity"] in FROM_PLAIN else {})
        return TrainConfig(**init, dataset=self.dataset, arch=self.arch, members=self.members,
                           epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           schedule=self.schedule, seed=self.seed,
                           val_fraction=self.val_fraction,
                           val_seed=self.val_seed, **settings)


def tune_into(config: TuneConfig, out_dir: str | os.PathLike, *, resume: bool = False,
              overwrite: bool = False, device: str | torch.device = "cpu",
              data_root: str | None = None, progress: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the tuning protocol into ``out_dir`` and return the choice
    (``chosen.json``); see the module docstring. Everything is checked before any training."""
    config = config.validate()
    data = load_dataset(config.dataset, root=data_root, seed=0)
    val = validation_split(data[0], config.val_fraction, seed=config.val_seed)[1]
    n = min(config.n, len(val))
    x, y = (t.to(device) for t in val[:n])
    settings = config.to_dict()
    with run_lock(out_dir) as out:
        prepare_run_dir(out, settings, config_name=TUNE_CONFIG, resume=resume,
                        overwrite=overwrite, started=lambda p: (p / RECORDS).exists(),
                        kind="tuning", command="ensdiv tune")
        atomic_write_json(out / TUNE_CONFIG, settings)
        path = out / RECORDS
        records = read_jsonl(path, what="tuning records", required=("point", "method"),
                             fix="delete its damaged lines and resume (those points are "
                                 "measured again)") if path.exists() else []
        done = {r["point"] for r in records}
        for name, point in config.points():
            if name in done:
                continue
            tcfg = config.train_config(point, plain=out / "plain").validate()
            if tcfg.init_from is not None:  # its fingerprint recorded, as ensdiv train does
                tcfg = dataclasses.replace(tcfg, init_weights=load_init(tcfg, data[2])[1])
            folder = out / name
            folder.mkdir(exist_ok=True)
            log(f"{name}: training {tcfg.diversity} {_shown(point)}")
            t0 = time.perf_counter()
            atomic_write_json(folder / CONFIG, tcfg.to_dict())
            ens, _ = train(tcfg, data, device=device, out_dir=folder,
                           resume=(folder / CHECKPOINT).exists(), progress=progress)
            last = read_metrics(folder)[-1]  # a resumed run's records include earlier epochs
            t1 = time.perf_counter()
            rec = {"point": name, "method": tcfg.diversity, "settings": point,
                   "init": None if tcfg.init_from is None else "plain",
                   "val_acc": last["val_acc"], "val_n": last["val_n"],
                   **_proxies(ens, x, y, config), "n": n, "eps": config.eps,
                   "transfer_steps": config.transfer_steps, "apgd_steps": config.apgd_steps,
                   "eval_seed": config.eval_seed, "epochs": last["epoch"],
                   "train_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1,
                   "time": utc_now()}
            records.append(round_floats(rec))
            atomic_write_jsonl(path, records)
            log(f"{name}: val acc {rec['val_acc']:.4f}, transfer {_num(rec['transfer'])}, "
                f"APGD-CE acc {_num(rec['whitebox_acc'])}")
        picked = select(records, tolerance=config.tolerance)
        chosen = {"rule": RULE, "tolerance": config.tolerance,
                  "plain_val_acc": picked["plain_val_acc"],
                  "chosen": {m: _summary(r) for m, r in picked["chosen"].items()},
                  "rejected": picked["rejected"],
                  "fallback": {m: _summary(r) for m, r in picked["fallback"].items()},
                  "tuning": settings}
        atomic_write_json(out / CHOSEN, chosen)
    return chosen


def _proxies(ens: Any, x: torch.Tensor, y: torch.Tensor, config: TuneConfig) -> dict[str, Any]:
    """Mean member → member transfer and APGD-CE accuracy of the averaged softmax at ε."""
    ens.eval()
    budget = CardBudget(transfer_steps=config.transfer_steps, apgd_steps=config.apgd_steps,
                        seed=config.eval_seed)
    transfer = card_transfer(ens, x, y, eps=config.eps, budget=budget)["mean"]
    # APGD-CE on the inputs the averaged softmax classifies correctly (the cascade's rule)
    wc = worst_case_success(Aggregated(ens, "softmax"), x, y, cascade=True, attacks={
        "apgd-ce": functools.partial(apgd, eps=config.eps, loss="ce", steps=config.apgd_steps,
                                     seed=config.eval_seed)})
    n = len(y)
    return {"transfer": transfer, "whitebox_acc": (wc.union.total - wc.union.fooled) / n,
            "clean_proxy_acc": wc.union.total / n}


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    """What ``chosen.json`` keeps of a grid point's record: its name, settings and proxies."""
    return {k: record[k] for k in ("point", "settings", "val_acc", "transfer", "whitebox_acc")}


def _num(v: float | None) -> str:
    """A proxy as printed: undefined (no member classified a pair right, stored as null) is
    said, not a crash."""
    return "undefined" if v is None or v != v else f"{v:.3f}"


def _shown(point: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in point.items() if k != "diversity") or "(plain)"


def read_chosen(folder: str | os.PathLike) -> dict[str, Any]:
    """The choice a tuning run wrote (``chosen.json`` in its folder)."""
    return read_json(Path(folder) / CHOSEN, what="tuning choice",
                     fix="run `ensdiv tune --out DIR` (or resume it) to write it")
