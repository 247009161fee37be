"""``ensdiv certify``: randomized-smoothing certificates (Cohen et al. 2019) of a saved ensemble
or one member, one record per test example, resumable, sharded over torchrun's ranks.

:func:`certify_run` checks the settings (:class:`CertifyConfig`) and the folder, then certifies
with :func:`ensdiv.certification.certify_dataset` (which ``ensdiv compare`` uses too).

Example:
    >>> CertifyConfig(sigma=0.5, radius=0.25).saved()["stages"]
    [1000, 10000, 100000]
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ensdiv.certification import certify_dataset
from ensdiv.distributed import broadcast_outcome
from ensdiv.ensemble import Ensemble, weights_fingerprint
from ensdiv.errors import EnsdivError, EnsdivWarning, check_int, check_real
from ensdiv.io import JsonConfig, atomic_write_json
from ensdiv.rank_parts import rank_parts
from ensdiv.runs.rundir import (
    CERTIFY_CONFIG,
    RECORDS,
    load_run,
    prepare_run_dir,
    run_lock,
    saved_setting,
)
from ensdiv.smoothing import max_certifiable_radius


@dataclasses.dataclass(frozen=True)
class CertifyConfig(JsonConfig):
    """Settings of a certification run (saved, with the ensemble, data set, training sigma and
    a fingerprint of the weights, as ``certify.json``).

    ``sigma``, ``n0``, ``n``, ``alpha``: Cohen et al.'s CERTIFY; ``skip``/``max``: which test
    examples; ``radius`` with ``stages``: only ask whether each example is certified at that
    radius (staged sampling); ``member``: certify that member alone; ``vote``: majority vote
    as the base prediction; ``seed``: the noise; ``amp``: bfloat16 autocast.

    Example:
        >>> CertifyConfig(sigma=0.25).validate().stages
        (1000, 10000, 100000)
    """

    sigma: float | None = None
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    skip: int = 1
    max: int | None = None
    radius: float | None = None
    stages: tuple[int, ...] | None = (1_000, 10_000, 100_000)
    member: int | None = None
    vote: bool = False
    seed: int = 0
    amp: bool = False

    KIND: ClassVar[str] = "certification run"
    SAVED_WITH: ClassVar[tuple[str, ...]] = ("ensemble", "dataset", "trained_sigma", "weights")

    def validate(self) -> CertifyConfig:
        """Check every field; one :class:`EnsdivError` for the first bad one."""
        if self.sigma is None:
            raise EnsdivError("--sigma is needed (the noise std in pixel units, e.g. 0.25)")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma)
                and self.sigma > 0):
            raise EnsdivError(f"--sigma must be a finite number > 0; got {self.sigma!r}")
        for name in ("n0", "n", "skip"):
            check_int(f"--{name}", getattr(self, name))
        if self.max is not None:
            check_int("--max", self.max)
        check_real("--alpha", self.alpha, minimum=0)
        if not 0 < self.alpha < 1:
            raise EnsdivError(f"--alpha must be in (0, 1); got {self.alpha!r}")
        if self.radius is not None:
            check_real("--radius", self.radius, minimum=0)
        stages = self.stages or CertifyConfig.stages
        for size in stages:
            check_int("--stages size", size)
        check_int("--seed", self.seed, minimum=0)
        if self.member is not None:
            check_int("--member", self.member, minimum=0)
        return dataclasses.replace(self, stages=tuple(stages))

    def saved(self) -> dict[str, Any]:
        """The settings as ``certify.json`` states them (``stages`` only with a radius,
        ``amp`` only when set, so folders of earlier runs resume unchanged)."""
        d = self.to_dict()
        d["stages"] = list(self.stages or ()) if self.radius is not None else None
        if not self.amp:
            del d["amp"]
        return d


def certify_run(run: str | os.PathLike, config: CertifyConfig, out_dir: str | os.PathLike, *,
                dataset: str | None = None, resume: bool = False, overwrite: bool = False,
                batch_size: int = 100, device: str | torch.device = "cpu",
                data_root: str | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> tuple[dict[str, Any], list[dict]]:
    """Certify the test split of a saved ensemble (or one ``member``) into ``out_dir``: the
    driver behind ``ensdiv certify``; returns the saved settings and every record.

    Everything is checked before any noise is drawn; ``log`` gets the certifiable-radius cap
    at these settings first. The folder rules are those of every run folder
    (:func:`ensdiv.runs.rundir.prepare_run_dir`); under torchrun the examples are sharded over
    ranks (:func:`certify_dataset`).
    """
    config = config.validate()
    check_int("--batch-size", batch_size)
    if resume and dataset is None:  # the folder alone resumes: the data set it certified
        dataset = saved_setting(out_dir, CERTIFY_CONFIG, "dataset")
    loaded = load_run(run, dataset=dataset, data_root=data_root, device=device)
    ens = loaded.ensemble
    base: nn.Module = ens
    if config.member is not None:
        if config.member >= ens.num_members:
            raise EnsdivError(f"--member {config.member} does not exist; {run} has "
                              f"{ens.num_members} members (0..{ens.num_members - 1})")
        base = Ensemble([ens.members[config.member]]).to(device).eval()
    if config.vote and ens.num_members < 2 and config.member is None:
        raise EnsdivError("--vote needs an ensemble of at least 2 members")
    trained = ens.config.get("noise_sigma")
    settings = {"ensemble": str(loaded.path), "dataset": loaded.dataset, **config.saved(),
                "trained_sigma": trained, "weights": weights_fingerprint(ens)}
    assert config.sigma is not None and config.stages is not None  # validate() ensures both
    if trained is not None and abs(float(trained) - config.sigma) > 1e-12:
        warnings.warn(f"certifying at sigma {config.sigma:g}, but {run} was trained with "
                      f"noise sigma {float(trained):g}: smoothing works best at the training "
                      "sigma", EnsdivWarning, stacklevel=2)
    if config.radius is None:
        cap = max_certifiable_radius(config.sigma, config.n, config.alpha)
        how = f"n={config.n}, alpha={config.alpha:g}"
    else:  # the last stage at alpha/K bounds what staged sampling can reach
        cap = max_certifiable_radius(config.sigma, max(config.stages),
                                     config.alpha / len(config.stages))
        how = f"stages {','.join(map(str, config.stages))}, alpha={config.alpha:g}"
    log(f"certifying {loaded.dataset} with sigma {config.sigma:g}, {how}: "
        f"no radius above {cap:.3f} can be certified at these settings")
    if config.radius is not None and config.radius >= cap:
        warnings.warn(f"--radius {config.radius:g} is at or above {cap:.3f}: every example "
                      "will abstain", EnsdivWarning, stacklevel=2)
    with run_lock(out_dir) as out:
        def prepare() -> None:  # rank 0 under torchrun; the others get its outcome
            prepare_run_dir(out, settings, config_name=CERTIFY_CONFIG, resume=resume,
                            overwrite=overwrite,
                            started=lambda p: (p / RECORDS).exists()
                            or bool(rank_parts(p / RECORDS)),
                            kind="certification run",
                            command=shlex.join(["ensdiv", "certify", str(run)]))
            atomic_write_json(out / CERTIFY_CONFIG, settings)

        broadcast_outcome(prepare)
        records = certify_dataset(base, loaded.test, sigma=config.sigma, n0=config.n0,
                                  n=config.n, alpha=config.alpha, batch_size=batch_size,
                                  out=out / RECORDS, skip=config.skip, max=config.max,
                                  radius=config.radius, stages=config.stages,
                                  vote=config.vote, seed=config.seed, amp=config.amp,
                                  num_classes=loaded.info.num_classes, progress=progress)
    return settings, records
