"""Run folders: what every driver that owns one (``--out``) creates, locks, checks, resumes
and loads through here.

A run folder holds one piece of work, identified by its settings file, plus its records (read
through :mod:`ensdiv.runs.records`):

- **File names** of every kind of folder (:data:`CONFIG`, :data:`RECORDS`, ...).
- **Locking and the resume rules** (:func:`run_lock`, :func:`prepare_run_dir`,
  :func:`resolve_config`, :func:`open_run_folder`): a folder holds one run; a second process
  writing into it is refused; a started run continues only with ``resume`` and the same
  settings, which ``resume`` alone recovers from the folder.
- **Loading a run** (:func:`ensemble_path`, :func:`load_run`): the ensemble, its data set and
  the check that one fits the other.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with run_lock(d) as out:
    ...     prepare_run_dir(out, {"a": 1}, config_name=CONFIG, resume=False, overwrite=False,
    ...                     started=lambda p: False)
    False
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import Dataset

from ensdiv import distributed
from ensdiv.data import DATASETS, DatasetInfo, load_dataset
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_choice
from ensdiv.io import (
    JsonConfig,
    atomic_write_json,
    os_error,
    read_json,
    utc_now,
)
from ensdiv.loop import CHECKPOINT, ENSEMBLE, finished_epochs, read_metrics

CONFIG = "config.json"
"""A training run's settings (:class:`ensdiv.training.TrainConfig`)."""
SWEEP_CONFIG = "sweep.json"
"""A sweep's settings."""
DETECT_CONFIG = "detect.json"
"""A detection run's settings, ensemble, data set and weights' fingerprint."""
CERTIFY_CONFIG = "certify.json"
"""A certification run's settings, ensemble, data set and weights' fingerprint."""
COMPARE_CONFIG = "compare.json"
"""A comparison's settings."""
EVALUATE_CONFIG = "evaluate.json"
"""An evaluation's settings, data set and weights' fingerprint (``ensdiv evaluate``)."""
CARD = "card.json"
"""A robustness card (``ensdiv evaluate``)."""
CARD_MARKDOWN = "card.md"
"""The same card for people."""
RECORDS = "records.jsonl"
"""The records of a sweep, detection, certification or comparison: one JSON object a line."""
LOCK = ".ensdiv.lock"
"""Lock file inside a run folder, held (``flock``) while a process writes into the folder."""

RESUMABLE_CHANGES = frozenset({"epochs"})
"""Training settings that may differ between an interrupted run and its resumption."""


# ---------------------------------------------------------------------------- locks and rules
def _lock_owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"process {info['pid']} on {info['host']} since {info['time']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) while the block runs.

    The lock is an ``flock`` on ``folder/.ensdiv.lock``: the kernel releases it when the
    holder exits or is killed, so a stale lock from a dead process never blocks a rerun. A
    second process asking for a held lock gets an :class:`EnsdivError` naming the holder.
    Only rank 0 locks under ``torch.distributed``.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with run_lock(d):
        ...     pass
    """
    folder = checked_out(folder)
    if not distributed.is_main():
        yield folder
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    path = folder / LOCK
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise os_error("write", path, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EnsdivError(f"{folder} is in use by {_lock_owner(path)}; wait for it to "
                              "finish (or stop it) before writing into the same folder") from None
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": utc_now()})
        try:
            os.ftruncate(fd, 0)
            os.write(fd, me.encode())
        except OSError as e:
            raise os_error("write", path, e) from None
        yield folder
    finally:
        os.close(fd)  # closing releases the flock


def _entries(folder: Path) -> list[Path]:
    """The folder's entries that are not the lock or a leftover temporary file."""
    return [p for p in folder.iterdir()
            if p.name != LOCK and not (p.name.startswith(".") and p.name.endswith(".tmp"))]


def prepare_run_dir(out_dir: str | os.PathLike, config: dict[str, Any], *, config_name: str,
                    resume: bool, overwrite: bool, started: Callable[[Path], bool],
                    resumable: frozenset[str] = frozenset(), kind: str = "run",
                    command: str = "ensdiv train",  # its words before --out, shell-quoted
                    added: dict[str, Any] | None = None) -> bool:
    """Check (and with ``overwrite`` empty) a result folder identified by ``config``.

    Call it while holding :func:`run_lock`. The rules, the same for runs and sweeps:

    - a folder where nothing was ``started`` (no finished epoch or record, e.g. a run that
      failed while loading its data) is simply started again, whatever its config;
    - a folder holding a started ``kind`` is continued only with ``resume`` and a config equal
      but for the ``resumable`` keys; any other difference is an error listing it;
    - ``overwrite`` empties a folder holding a ``kind`` (its config file) first; a non-empty
      folder holding no ``kind`` is refused, with or without ``overwrite``: ensdiv never
      deletes files it did not write;
    - a setting the saved config does not have (a folder written before the setting existed)
      is no difference when its value is the one ``added`` gives it (the setting's default).

    Nothing is written: the caller writes the config once all its checks pass.

    Returns:
        True if the caller continues earlier work, False if it starts afresh.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> prepare_run_dir(d, {"a": 1}, config_name="c.json", resume=False, overwrite=False,
        ...                 started=lambda p: False)
        False
    """
    if resume and overwrite:
        raise EnsdivError("--resume and --overwrite exclude each other")
    out = checked_out(out_dir)  # blank or a file: one error
    cfg_path = out / config_name
    if not out.exists():
        return False
    if overwrite and not cfg_path.exists() and _entries(out):
        raise EnsdivError(f"{out} is not empty and holds no ensdiv {kind}; --overwrite only "
                          f"replaces an ensdiv {kind}'s own folder (it never deletes other "
                          "files): choose another --out")
    if overwrite:
        for p in _entries(out):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        return False
    if cfg_path.exists():
        old = read_json(cfg_path, what=f"{kind} config",
                        fix=f"restore it, or start the {kind} in another --out")
        if not started(out):
            return False
        newer = {k for k, v in (added or {}).items() if k not in old and config.get(k) == v}
        diff = sorted(k for k in set(old) | set(config)
                      if old.get(k) != config.get(k) and k not in resumable | newer)
        if not resume:
            what = f"a different {kind}" if diff else f"this {kind} already"
            raise EnsdivError(f"{out} holds {what}; continue it with `{command} --out "
                              f"{shlex.quote(str(out))} --resume`, or choose another --out")
        if diff:
            changes = ", ".join(f"{k} (saved {old.get(k)!r}, given {config.get(k)!r})"
                                for k in diff)
            raise EnsdivError(f"{out} holds a {kind} that differs in {changes}; to continue it "
                              f"run `{command} --out {shlex.quote(str(out))} --resume` without "
                              "those options; for "
                              "the new settings choose another --out")
        return True
    if _entries(out):
        raise EnsdivError(f"{out} is not empty and holds no ensdiv {kind}; choose another "
                          "--out (an empty or new folder)")
    return False


def checked_out(folder: str | os.PathLike) -> Path:
    """``folder`` as a path, or one :class:`EnsdivError` if it is empty or blank (``--out ''``
    would otherwise mean the current folder) or names an existing file.

    Example:
        >>> checked_out(" ")
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: --out must name a folder; got an empty name
    """
    if not str(folder).strip():
        raise EnsdivError("--out must name a folder; got an empty name")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise EnsdivError(f"--out {path} is a file, not a folder; choose another --out")
    return path


_C = TypeVar("_C", bound=JsonConfig)


def resolve_config(cls: type[_C], given: dict[str, Any], out: str | os.PathLike, *,
                   resume: bool, config_name: str, command: str, kind: str | None = None,
                   ) -> _C:
    """The settings a command runs with: the ``given`` ones over the defaults, or, with
    ``resume``, over those saved in ``out`` — so a run resumes from its folder alone. A
    difference between given and saved settings is reported later by
    :func:`prepare_run_dir`. ``kind`` names the work in messages (default: the config's
    ``KIND``).

    Example:
        >>> import tempfile
        >>> from ensdiv.training import TrainConfig
        >>> resolve_config(TrainConfig, {"epochs": 2}, tempfile.mkdtemp(), resume=False,
        ...                config_name=CONFIG, command="ensdiv train").epochs
        2
    """
    kind = kind or cls.KIND
    path = Path(out) / config_name
    if resume and path.exists():
        saved = read_json(path, what=f"{kind} config",
                          fix=f"restore it, or start the {kind} in another --out")
        try:
            base = cls.from_dict(saved)
        except (EnsdivError, TypeError) as e:
            raise EnsdivError(f"{path} is not a valid {kind} config ({e}); restore it, or "
                              f"start the {kind} in another --out") from None
        return dataclasses.replace(base, **given)  # type: ignore[type-var]
    if resume and not given:
        raise EnsdivError(f"{out} holds no {kind} to resume (no {config_name}); start one with "
                          f"`{command} --out {shlex.quote(str(out))} [options]`")
    return cls(**given)


def open_run_folder(out: Path, settings: dict[str, Any], *, epochs: int, resume: bool,
                    overwrite: bool, added: dict[str, Any] | None = None) -> bool:
    """Prepare ``out`` for a training run (call it holding :func:`run_lock`): the rules of
    :func:`prepare_run_dir` with a started run being one with a checkpoint and ``epochs``
    allowed to grow, never to shrink; everything resuming reads is checked before anything is
    written; then the settings are saved as ``config.json``. True if the run continues.
    ``added``: the defaults of settings newer than some saved folders (see
    :func:`prepare_run_dir`).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> open_run_folder(Path(tempfile.mkdtemp()), {"epochs": 1}, epochs=1, resume=False,
        ...                 overwrite=False)
        False
    """
    resuming = prepare_run_dir(out, settings, config_name=CONFIG, resume=resume,
                               overwrite=overwrite, started=lambda p: (p / CHECKPOINT).exists(),
                               resumable=RESUMABLE_CHANGES, command="ensdiv train",
                               added=added)
    if resuming:
        done = finished_epochs(out)
        read_metrics(out)  # readable before anything is written
        if done > epochs:
            raise EnsdivError(f"{out} holds {done} finished epochs; --epochs {epochs} cannot "
                              f"shrink it (give --epochs {done} or more to extend it)")
    if not (resuming and read_json(out / CONFIG, what="run config",
                                   fix="restore it, or start the run in another --out")
            == settings):
        atomic_write_json(out / CONFIG, settings)
    return resuming


def saved_setting(out: str | os.PathLike, config_name: str, key: str) -> Any:
    """What the settings file of the folder ``out`` says about ``key`` (None when the folder,
    the file or the key is missing): what a resumed run takes when the user does not repeat
    an option that is not part of its config (e.g. the data set a detection ran on).

    Example:
        >>> import tempfile
        >>> saved_setting(tempfile.mkdtemp(), DETECT_CONFIG, "dataset") is None
        True
    """
    path = Path(out) / config_name
    if not path.is_file():
        return None
    return read_json(path, what="settings file",
                     fix="restore it, or start again in another --out").get(key)


# ------------------------------------------------------------------------------- loading a run


def ensemble_path(run: str | os.PathLike) -> Path:
    """The ensemble file of a run folder (``RUN/ensemble.pt``) or ``run`` itself if a file;
    a missing one is one :class:`EnsdivError`."""
    p = Path(run)
    if p.is_dir():
        p = p / ENSEMBLE
    if not p.is_file():
        raise EnsdivError(f"no ensemble at {run} (expected a run folder with {ENSEMBLE} "
                          "or an ensemble file)")
    return p


@dataclasses.dataclass
class LoadedRun:
    """A saved ensemble with the data set it is evaluated on (see :func:`load_run`)."""

    ensemble: Ensemble
    path: Path
    dataset: str
    train: Dataset
    test: Dataset
    info: DatasetInfo


def load_run(run: str | os.PathLike, *, dataset: str | None = None,
             data_root: str | None = None,
             device: str | torch.device = "cpu") -> LoadedRun:
    """Load the ensemble of ``run`` (a run folder or an ensemble file) in eval mode and the data
    set it is evaluated on (``dataset``, else the one it was trained on), checking that the
    data's input shape is the ensemble's — the start of every evaluating command.

    Example:
        >>> import tempfile, pathlib
        >>> from ensdiv.ensemble import Ensemble
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "ens.pt"
        >>> _ = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10,
        ...                    config={"dataset": "digits"}).save(p)
        >>> run = load_run(p); run.dataset, len(run.test)
        ('digits', 360)
    """
    if dataset is not None:
        check_choice("dataset", dataset, DATASETS)
    path = ensemble_path(run)
    ens = Ensemble.load(path, map_location=device).eval()
    dataset = dataset or ens.config.get("dataset")
    if not dataset:
        raise EnsdivError("the ensemble records no dataset; pass --dataset")
    train, test, info = load_dataset(dataset, root=data_root)
    check_fits(ens, dataset, info, run)
    return LoadedRun(ens, path, dataset, train, test, info)


def check_fits(ens: Ensemble, dataset: str, info: DatasetInfo,
               run: str | os.PathLike) -> None:
    """One :class:`EnsdivError` if ``dataset``'s input shape is not the one ``ens`` (saved at
    ``run``) takes."""
    if ens.in_shape is not None and tuple(info.in_shape) != tuple(ens.in_shape):
        trained = ens.config.get("dataset")
        raise EnsdivError(f"{run} takes inputs of shape {tuple(ens.in_shape)}, but {dataset} "
                          f"has {tuple(info.in_shape)}" + (f"; it was trained on {trained}"
                                                          if trained else ""))
