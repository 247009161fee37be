"""The detection experiment behind ``ensdiv detect``: every score against every adversary.

For one trained ensemble: a :class:`~ensdiv.disagreement.DisagreementDetector` per score, each with
**one** threshold set on clean held-out test images (the last ``n_calib`` of the test split)
at a target false-positive rate, judged on the first ``n_eval`` test images against

- ``transfer`` — PGD at the full budget (last iterate) on member 0, evaluated on the ensemble;
- ``whitebox`` — PGD at the full budget on the ensemble's output, oblivious of the detector;
- ``agreement`` — adaptive (c): every member pushed toward one common wrong class
  (:func:`ensdiv.adaptive.agreement_pgd`), success = misclassified and not flagged;
- ``penalized`` — adaptive (d): margin − κ · score for each κ, best per input
  (:func:`ensdiv.adaptive.penalized_pgd`);
- ``adaptive`` — per input the worse for the defender of (c) and (d): **the detector's
  result**.

Each (score, adversary) becomes one record stating the attack (eps, steps, step size,
keep-rule, seed, κ values, target rule), the threshold, n, the :class:`DetectionResult` and
the ROC curve. :func:`run_detection` returns the records; :func:`detect_into` runs it into a
folder (``detect.json``, ``records.jsonl``), resumable score by score, under the same folder
rules as ``ensdiv train``.

Example:
    >>> DetectConfig().adversaries
    ('transfer', 'whitebox', 'agreement', 'penalized', 'adaptive')
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.metrics import roc_curve
from torch import Tensor

from ensdiv.adaptive import AGREEMENT_TARGETS, KAPPAS, agreement_pgd, penalized_pgd, select_worst
from ensdiv.attacks import default_step_size, pgd
from ensdiv.disagreement import (
    SCORE_NAMES,
    DisagreementDetector,
    evaluate_detector,
)
from ensdiv.ensemble import Ensemble, weights_fingerprint
from ensdiv.errors import EnsdivError, check_choice, check_eps, check_int, check_real, check_unique
from ensdiv.io import (
    JsonConfig,
    atomic_write_json,
    atomic_write_jsonl,
    read_jsonl,
    round_floats,
    utc_now,
)
from ensdiv.runs.rundir import (
    DETECT_CONFIG,
    RECORDS,
    load_run,
    prepare_run_dir,
    run_lock,
    saved_setting,
)

ADVERSARIES: tuple[str, ...] = ("transfer", "whitebox", "agreement", "penalized", "adaptive")


@dataclasses.dataclass(frozen=True)
class DetectConfig(JsonConfig):
    """Settings of a detection run (L∞ throughout; pixels in [0, 1])."""

    eps: float = 0.3
    steps: int = 40
    scores: tuple[str, ...] = SCORE_NAMES
    kappas: tuple[float, ...] = KAPPAS
    agreement_target: str = "runner_up"
    fpr: float = 0.05
    n_eval: int = 500
    n_calib: int = 500
    seed: int = 0

    KIND: ClassVar[str] = "detection"
    SAVED_WITH: ClassVar[tuple[str, ...]] = ("ensemble", "dataset", "weights")

    @property
    def adversaries(self) -> tuple[str, ...]:
        """The adversaries every score is judged against, in report order."""
        return ADVERSARIES

    def validate(self) -> DetectConfig:
        """Check every field; one :class:`EnsdivError` naming the first bad one."""
        check_eps("--eps", self.eps)
        check_int("steps", self.steps)
        if not self.scores:
            raise EnsdivError(f"scores needs at least one of: {', '.join(SCORE_NAMES)}")
        for s in self.scores:
            check_choice("score", s, SCORE_NAMES)
        check_unique("scores", self.scores)
        if not self.kappas:
            raise EnsdivError("kappas needs at least one value")
        for k in self.kappas:
            check_real("kappas", k, minimum=0)
        check_unique("kappas", self.kappas)
        check_choice("agreement target", self.agreement_target, AGREEMENT_TARGETS)
        check_real("fpr", self.fpr, minimum=0)
        if not 0 < self.fpr < 1:
            raise EnsdivError(f"fpr must be in (0, 1); got {self.fpr!r}")
        check_int("n_eval", self.n_eval)
        check_int("n_calib", self.n_calib)
        check_int("seed", self.seed, minimum=0)
        return self


def split_eval_calib(x: Tensor, y: Tensor, config: DetectConfig
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(eval x, eval y, calibration x): the first ``n_eval`` and the last ``n_calib`` test
    images, disjoint."""
    n = len(y)
    if config.n_eval + config.n_calib > n:
        raise EnsdivError(f"n_eval + n_calib = {config.n_eval + config.n_calib} exceeds the "
                          f"{n} test images; lower --n-eval or --n-calib")
    return x[:config.n_eval], y[:config.n_eval], x[n - config.n_calib:]


def _roc(clean: Tensor, adv: Tensor) -> dict[str, list[float]]:
    if not (len(clean) and len(adv)):
        return {"fpr": [], "tpr": []}
    labels = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    f, t, _ = roc_curve(labels, np.r_[clean.double().numpy(), adv.double().numpy()])
    return {"fpr": [round(float(v), 5) for v in f], "tpr": [round(float(v), 5) for v in t]}


def run_detection(ensemble: Ensemble, x: Tensor, y: Tensor, config: DetectConfig, *,
                  done: set[str] | None = None,
                  on_score: Callable[[str, list[dict[str, Any]]], None] | None = None,
                  log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Records for every score × adversary (see the module docstring).

    Args:
        ensemble: in eval mode, on its device; x, y: the whole test split (CPU or device).
        done: scores already recorded (a resumed run skips them).
        on_score: called with (score, its records) as each score finishes (to write them).

    Returns:
        The new records, score-major in ``config.scores`` order.
    """
    config.validate()
    if ensemble.num_members < 2:
        raise EnsdivError(f"detection by disagreement needs at least 2 members; the ensemble "
                          f"has {ensemble.num_members}")
    done = done or set()
    dev = next(ensemble.parameters()).device
    xe, ye, xc = (t.to(dev) for t in split_eval_calib(x, y, config))
    alpha = default_step_size("pgd", config.eps, config.steps)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(config.seed)

    base = {"norm": "linf", "eps": config.eps, "steps": config.steps, "alpha": alpha,
            "random_start": True, "seed": config.seed}
    setups = {
        "transfer": {**base, "attack": "pgd", "on": "member 0", "keep": "last"},
        "whitebox": {**base, "attack": "pgd", "on": "ensemble", "keep": "last"},
        "agreement": {**base, "attack": "agreement-pgd", "on": "ensemble",
                      "target": config.agreement_target,
                      "keep": "best among misclassified and unflagged"},
        "penalized": {**base, "attack": "penalized-pgd", "on": "ensemble",
                      "kappas": list(config.kappas), "confidence": 1.0,
                      "keep": "best among misclassified and unflagged, best κ per input"},
        "adaptive": {**base, "attack": "worst of agreement-pgd and penalized-pgd per input",
                     "on": "ensemble", "keep": "per input, the one misclassified and "
                     "unflagged, else misclassified with the lower score"}}
    t0 = time.perf_counter()
    oblivious = {}
    if set(config.scores) - done:
        oblivious = {
            "transfer": pgd(ensemble.members[0], xe, ye, eps=config.eps, steps=config.steps,
                            keep="last", generator=gen()),
            "whitebox": pgd(ensemble, xe, ye, eps=config.eps, steps=config.steps, keep="last",
                            generator=gen())}
        log(f"oblivious attacks ready ({time.perf_counter() - t0:.0f}s)")
    records = []
    for score in config.scores:
        if score in done:
            continue
        t1 = time.perf_counter()
        det = DisagreementDetector(ensemble, score=score).fit(xc, fpr=config.fpr)
        adv = dict(oblivious)
        adv["agreement"] = agreement_pgd(ensemble, xe, ye, eps=config.eps, steps=config.steps,
                                         target=config.agreement_target, detector=det,
                                         generator=gen())
        adv["penalized"] = penalized_pgd(ensemble, xe, ye, eps=config.eps, steps=config.steps,
                                         kappas=config.kappas, detector=det, generator=gen())
        adv["adaptive"] = select_worst(ensemble, xe, ye, [adv["agreement"], adv["penalized"]],
                                       detector=det)
        clean_scores = det.score(xe)
        with torch.no_grad():
            correct = (ensemble.predict(xe) == ye).cpu()
        mine = []
        for name in ADVERSARIES:
            res = evaluate_detector(det, xe, ye, adv[name])
            with torch.no_grad():
                adv_scores = det.score(adv[name])
                success = correct & (ensemble.predict(adv[name]) != ye).cpu()
            mine.append({"score": score, "adversary": name, "attack": setups[name],
                         "threshold": det.threshold, "fpr_target": config.fpr,
                         "n_calib": det.n_calibration, **res.to_dict(),
                         "roc": _roc(clean_scores[correct], adv_scores[success])})
        records += mine
        if on_score is not None:
            on_score(score, mine)
        by = {r["adversary"]: r for r in mine}
        log(f"{score}: AUROC white-box {by['whitebox']['auroc']:.3f}, adaptive "
            f"{by['adaptive']['auroc']:.3f}; detection-aware robust accuracy adaptive "
            f"{by['adaptive']['detection_robust_acc']:.3f} ({time.perf_counter() - t1:.0f}s)")
    return records


def detect_into(ensemble_path: str | os.PathLike, config: DetectConfig,
                out_dir: str | os.PathLike, *, dataset: str | None = None,
                resume: bool = False, overwrite: bool = False,
                device: str | torch.device | None = None, data_root: str | None = None,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run :func:`run_detection` on a saved ensemble into ``out_dir`` and return every record.

    ``detect.json`` identifies the run (settings, ensemble file, data set, a hash of the
    weights); ``records.jsonl`` is rewritten atomically after each score, so a killed run
    resumes (``resume=True``) at the first score it had not finished. Everything is checked
    before any attack runs.
    """
    config.validate()
    if resume and dataset is None:  # the folder alone resumes: the data set it ran on
        dataset = saved_setting(out_dir, DETECT_CONFIG, "dataset")
    run = load_run(ensemble_path, dataset=dataset, data_root=data_root, device=device or "cpu")
    ens, dataset, test = run.ensemble, run.dataset, run.test
    x, y = test.tensors
    split_eval_calib(x, y, config)  # sizes checked before anything runs
    ident = {**config.to_dict(), "ensemble": str(run.path), "dataset": dataset,
             "weights": weights_fingerprint(ens)}
    with run_lock(out_dir) as out:
        resuming = prepare_run_dir(out, ident, config_name=DETECT_CONFIG, resume=resume,
                                   overwrite=overwrite,
                                   started=lambda p: (p / RECORDS).exists(),
                                   kind="detection run",
                                   command=shlex.join(["ensdiv", "detect", str(run.path)]))
        atomic_write_json(out / DETECT_CONFIG, ident)
        records = read_jsonl(out / RECORDS, what="detection records file",
                             required=("score", "adversary"),
                             fix="restore it, or delete it and resume") if resuming else []
        done = {r["score"] for r in records
                if sum(q["score"] == r["score"] for q in records) == len(ADVERSARIES)}
        records = [r for r in records if r["score"] in done]
        meta = {"ensemble": str(run.path), "dataset": dataset,
                "members": ens.num_members, "diversity": ens.config.get("diversity"),
                "lam": ens.config.get("lam"), "seed": ens.config.get("seed")}

        def write(score: str, new: list[dict[str, Any]]) -> None:
            records.extend(round_floats({**meta, **r, "time": utc_now()}) for r in new)
            atomic_write_jsonl(out / RECORDS, records)

        run_detection(ens, x, y, config, done=done, on_score=write, log=log)
        return records
