"""Compare trained runs side by side: cost, clean and robust accuracy, transfer, GDR, certificates.

The driver behind ``ensdiv compare RUN... --out DIR`` — the table a user needs to choose between
plain, diverse, adversarially trained and robustness-transfer ensembles (issue: one robust
teacher, every member a student). For every run, on the same first ``n_eval`` test images and
the same seeds:

- **cost**: the training wall time summed from the run's ``metrics.jsonl`` (``train_seconds``)
  and, for a student, its teacher's, reported separately (a teacher is trained once);
- **clean accuracy** of the ensemble and each member;
- **white-box robust accuracy** on the ensemble (averaged softmax): the share of *all* images
  still classified correctly after the robustness card's cascade — APGD-CE, APGD-DLR, the
  member-aware MORA (M ≥ 2) and Square — with the card's sanity checks
  (:func:`ensdiv.card_stages.card_whitebox`, the code ``ensdiv evaluate`` runs; records made before
  it hold the worst case over PGD, APGD-CE and APGD-DLR, with their setups);
- **transfer** between members: full-budget PGD examples crafted on member i, success on
  member j (:func:`ensdiv.card_stages.card_transfer`), and the **GDR** (M ≥ 2);
- **certified accuracy** of the Gaussian-smoothed ensemble at ``radii`` and its ACR (Cohen's
  CERTIFY on the first ``cert_points`` images, per-image noise seeds shared by all runs).

One JSON line per run in ``records.jsonl``; a rerun with the same settings skips runs already
recorded (more runs may be added to it later), and the certificates themselves resume per
image.

Example:
    >>> CompareConfig(eps=0.1, radii=(0.25, 0.5)).validate().radii
    (0.25, 0.5)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ensdiv.card import CardBudget
from ensdiv.card_stages import card_transfer, card_whitebox
from ensdiv.certification import certified_summary, certify_dataset
from ensdiv.errors import EnsdivError, check_eps, check_int, check_real
from ensdiv.gdr import gradient_diversity
from ensdiv.gradients import input_gradients
from ensdiv.io import (
    JsonConfig,
    atomic_write_json,
    atomic_write_jsonl,
    read_json,
    read_jsonl,
    utc_now,
)
from ensdiv.runs.records import train_cost
from ensdiv.runs.rundir import (
    COMPARE_CONFIG,
    CONFIG,
    RECORDS,
    ensemble_path,
    load_run,
    prepare_run_dir,
    run_lock,
)


@dataclasses.dataclass(frozen=True)
class CompareConfig(JsonConfig):
    """The evaluation every compared run gets (saved as ``compare.json``).

    ``eps``/``steps``/``apgd_steps``/``mora_steps``/``square_queries``/``eval_seed``: the L∞
    attacks on the first ``n_eval`` test images — the card's cascade (APGD-CE and APGD-DLR with
    ``apgd_steps``, MORA with ``mora_steps`` per mixing weight, Square with ``square_queries``)
    and the transfer PGD with ``steps``, every random start seeded by ``eval_seed``.
    ``sigma``/``radii``/``cert_n0``/``cert_n``/``alpha``: Cohen's CERTIFY on the first
    ``cert_points`` images.
    """

    eps: float = 0.1
    steps: int = 20
    apgd_steps: int = CardBudget.apgd_steps
    mora_steps: int = CardBudget.mora_steps
    square_queries: int = CardBudget.square_queries
    n_eval: int = 500
    eval_seed: int = 0
    sigma: float = 0.5
    radii: tuple[float, ...] = (0.5, 1.0)
    cert_n0: int = 100
    cert_n: int = 1_000
    cert_points: int = 100
    alpha: float = 0.001

    KIND: ClassVar[str] = "comparison"

    def validate(self) -> CompareConfig:
        """Check every field; one clear :class:`EnsdivError` for the first bad one."""
        check_eps("--eps", self.eps)
        if self.eps > 1:
            raise EnsdivError(f"eps must be at most 1 (pixels are in [0, 1]); got {self.eps:g}")
        for name in ("steps", "apgd_steps", "mora_steps", "square_queries", "n_eval", "cert_n0",
                     "cert_n", "cert_points"):
            check_int(name.replace("_", " "), getattr(self, name))
        check_int("eval seed", self.eval_seed, minimum=0)
        check_real("sigma", self.sigma, minimum=0, strict=True)
        if not self.radii:
            raise EnsdivError("radii needs at least one radius")
        for r in self.radii:
            check_real("radius", r, minimum=0)
        check_real("alpha", self.alpha, minimum=0, strict=True)
        if not self.alpha < 1:
            raise EnsdivError(f"alpha must be in (0, 1); got {self.alpha!r}")
        return dataclasses.replace(self, radii=tuple(float(r) for r in self.radii))

    def budget(self) -> CardBudget:
        """The robustness card's budget these settings give."""
        return CardBudget(apgd_steps=self.apgd_steps, mora_steps=self.mora_steps,
                          square_queries=self.square_queries, transfer_steps=self.steps,
                          seed=self.eval_seed)


def comparison_row(label: str, run: str | Path, config: CompareConfig, out: Path, *,
                 device: torch.device | str = "cpu", data_root: str | None = None,
                 progress: bool = False,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every number of one row of the comparison for the run folder ``run`` (see the module
    docstring); certificates go to ``out/certify-<label>.jsonl`` (resumable)."""
    say = log or (lambda s: None)
    run = Path(run)
    train_cfg = read_json(run / CONFIG, what="run config", fix="compare a run folder made by "
                          "ensdiv train")
    dataset = train_cfg.get("dataset")
    loaded = load_run(run, dataset=dataset, data_root=data_root, device=device)
    ens, test = loaded.ensemble, loaded.test
    n = min(config.n_eval, len(test))
    x = torch.stack([test[i][0] for i in range(n)]).to(device)
    y = torch.tensor([int(test[i][1]) for i in range(n)], device=device)
    rec: dict[str, Any] = {"label": label, "run": str(run), "dataset": dataset,
                           "members": ens.num_members, "train": train_cfg, **train_cost(run)}
    teacher = train_cfg.get("teacher")
    if teacher:
        rec["teacher"] = {"run": teacher, **train_cost(teacher)}
    budget = config.budget()
    say(f"{label}: transfer matrix")
    transfer = card_transfer(ens, x, y, eps=config.eps, budget=budget)
    rec.update(n_eval=n, clean_acc=transfer["ensemble_acc"], member_acc=transfer["member_acc"])
    if ens.num_members >= 2:
        rec["transfer"] = transfer
        rec["transfer_mean"] = transfer["mean"]
        rec.update(gradient_diversity(input_gradients(ens, x, y)))
    say(f"{label}: white-box cascade (APGD-CE, APGD-DLR, MORA, Square) at eps {config.eps:g}")
    white = card_whitebox(ens, x, y, eps=config.eps, budget=budget)
    rec.update(whitebox=white, robust_acc=white["robust_acc"],
               robust_acc_se=white["robust_acc_se"])
    say(f"{label}: certifying {config.cert_points} images at sigma {config.sigma:g}")
    certs = certify_dataset(ens, test, sigma=config.sigma, n0=config.cert_n0, n=config.cert_n,
                            alpha=config.alpha, batch_size=100, max=config.cert_points,
                            out=out / f"certify-{label}.jsonl", seed=config.eval_seed,
                            progress=progress)
    rec["certified"] = certified_summary(certs, radii=config.radii, sigma=config.sigma,
                                         n0=config.cert_n0, n=config.cert_n, alpha=config.alpha)
    rec["time"] = utc_now()
    return rec


def compare_runs(runs: Sequence[tuple[str, str | Path]], config: CompareConfig,
                 out: str | Path, *, device: torch.device | str = "cpu",
                 data_root: str | None = None, progress: bool = False,
                 log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Evaluate each ``(label, run folder)`` not yet in ``out/records.jsonl`` and return all
    records in the order given. The caller prepares ``out`` (settings, lock)."""
    out = Path(out)
    path = out / RECORDS
    done = {r["label"]: r for r in (read_jsonl(path, what="comparison records",
                                               required=("label",),
                                               fix="delete its damaged lines and run again")
                                    if path.exists() else [])}
    for label, run in runs:
        if label in done:
            if done[label]["run"] != str(run):
                raise EnsdivError(f"{path} holds {label!r} for {done[label]['run']}, not {run}; "
                                  "give this run another label or another --out")
            continue
        done[label] = comparison_row(label, run, config, out, device=device,
                                     data_root=data_root, progress=progress, log=log)
        atomic_write_jsonl(path, list(done.values()))
    return [done[label] for label, _ in runs]


def compare_into(runs: Sequence[tuple[str, str | Path]], config: CompareConfig,
                 out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                 device: torch.device | str = "cpu", data_root: str | None = None,
                 progress: bool = False,
                 log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The driver behind ``ensdiv compare``: prepare ``out_dir`` (settings in
    ``compare.json``, a lock, the folder rules) and :func:`compare_runs` into it. Runs may be
    added on resume; each record names its run. Runs of different data sets are refused: the
    comparison's numbers are on the same images or not at all."""
    config = config.validate()
    runs = [(label, ensemble_path(run).parent) for label, run in runs]
    datasets = {}
    for label, run in runs:
        saved = read_json(run / CONFIG, what="run config",
                          fix="compare run folders made by ensdiv train")
        datasets.setdefault(saved.get("dataset"), []).append(label)
    if len(datasets) > 1:
        raise EnsdivError("ensdiv compare measures every run on the same images, but these "
                          "runs were trained on different data sets: " + "; ".join(
                              f"{d}: {', '.join(labels)}" for d, labels in datasets.items())
                          + " (compare each data set's runs separately)")
    settings = config.to_dict()
    with run_lock(out_dir) as out:
        prepare_run_dir(out, settings, config_name=COMPARE_CONFIG, resume=resume,
                        overwrite=overwrite, started=lambda p: (p / RECORDS).exists(),
                        kind="comparison", command="ensdiv compare")
        atomic_write_json(out / COMPARE_CONFIG, settings)
        return compare_runs(runs, config, out, device=device, data_root=data_root,
                            progress=progress, log=log)
