"""``ensdiv train``: train one ensemble into a run folder, resumable, under torchrun too.

The run folder (``--out``) holds the settings (``config.json``), the per-epoch metrics, the
ensemble and a training checkpoint; :func:`train_run` checks the folder's rules
(:func:`ensdiv.runs.rundir.open_run_folder`), locks it, loads the data and the teacher, and
hands the rest to the library's :func:`ensdiv.training.train`.

Example:
    >>> ens, recs = train_run(TrainConfig(arch="mlp", members=2, epochs=1), progress=False)
    >>> 0.5 < recs[-1]["ensemble_acc"] <= 1
    True
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ensdiv.data import load_dataset
from ensdiv.distributed import broadcast_outcome, rank_and_world
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivWarning
from ensdiv.loop import check_global_batch
from ensdiv.robust_transfer import Teacher
from ensdiv.runs.rundir import ensemble_path, open_run_folder, run_lock
from ensdiv.runtime import resolve_device
from ensdiv.training import TrainConfig, load_init, train


def train_run(config: TrainConfig, *, out_dir: str | os.PathLike | None = None,
              resume: bool = False, overwrite: bool = False,
              device: str | torch.device | None = None, data_root: str | None = None,
              progress: bool = True,
              on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
              ) -> tuple[Ensemble, list[dict[str, Any]]]:
    """Train the ensemble a :class:`TrainConfig` describes; the driver behind ``ensdiv train``.

    Everything is checked before any work: the config, the device, and the run folder (see
    :func:`ensdiv.runs.rundir.prepare_run_dir`: a started run continues only with ``resume``
    and the same config, whose ``epochs`` may grow but not shrink; a folder with no finished
    epoch starts again). The folder is locked while the run trains, so a second process cannot
    write into it at the same time. Without ``out_dir`` nothing is written.
    """
    config = config.validate()
    check_global_batch(config.batch_size, rank_and_world()[1])
    device = resolve_device(device)
    data = load_dataset(config.dataset, root=data_root, seed=0)
    if config.init_from is not None:  # checked, and its fingerprint recorded, before any work
        _, fingerprint = load_init(config, data[2])
        config = dataclasses.replace(config, init_weights=fingerprint)
    teacher = None
    if config.teacher is not None:
        teacher = load_teacher(config.teacher, device=device, noise_sigma=config.noise_sigma)
        teacher.check_data(data[2].in_shape, data[2].num_classes,
                           who=f"data set {config.dataset}")
    if out_dir is None:
        return train(config, data, device=device, teacher=teacher, progress=progress,
                     on_epoch_end=on_epoch_end)
    with run_lock(out_dir) as out:
        # under torchrun rank 0 prepares the folder; every rank gets its decision (or error)
        resuming = broadcast_outcome(lambda: open_run_folder(
            out, config.to_dict(), epochs=config.epochs, resume=resume, overwrite=overwrite,
            added=TrainConfig().to_dict()))
        return train(config, data, device=device, out_dir=out, resume=resuming,
                     teacher=teacher, progress=progress, on_epoch_end=on_epoch_end)


def load_teacher(run: str | os.PathLike, *, device: torch.device | str = "cpu",
                 noise_sigma: float = 0.0) -> Teacher:
    """The frozen :class:`Teacher` saved in ``run`` (one model). Warns when a CRT teacher was
    trained with another noise sigma than the students will see."""
    ens = Ensemble.load(ensemble_path(run), map_location=device)
    teacher = Teacher(ens)
    trained = float(ens.config.get("noise_sigma") or 0.0)
    if noise_sigma > 0 and abs(trained - noise_sigma) > 1e-12:
        warnings.warn(f"the students train with noise sigma {noise_sigma:g} but the teacher "
                      f"{run} was trained with {trained:g}", EnsdivWarning, stacklevel=2)
    return teacher


def epoch_line(record: dict[str, Any]) -> str:
    """One epoch's record as ``ensdiv train`` prints it (loss, member and ensemble accuracy,
    the diversity metrics when recorded, wall time).

    Example:
        >>> epoch_line({"epoch": 1, "loss": 0.5, "member_acc": [0.9, 0.8],
        ...             "ensemble_acc": 0.91, "gdr": 0.2, "seconds": 1.0})
        'epoch   1  loss 0.5000  members 0.900 0.800  ensemble 0.9100 gdr=0.2000  (1.0s)'
    """
    extra = "".join(f" {k}={record[k]:.4f}" for k in ("mean_cos", "gdr")
                    if record.get(k) is not None)
    members = " ".join(f"{a:.3f}" for a in record["member_acc"])
    compiled = (f", compiling {record['compile_seconds']:.1f}s so far"
                if record.get("compiled_kernels") else "")
    return (f"epoch {record['epoch']:>3}  loss {record['loss']:.4f}  members {members}  "
            f"ensemble {record['ensemble_acc']:.4f}{extra}  ({record['seconds']:.1f}s"
            f"{compiled})")
