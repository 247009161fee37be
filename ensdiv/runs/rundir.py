"""Run folders and the records in them: the one module every driver shares.

A run folder (``--out``) holds one piece of work, identified by its settings file, plus its
records; every driver (:mod:`ensdiv.runs`) creates, locks, checks and resumes folders through
here, and reads other drivers' records through here, never through each other:

- **File names** of every kind of folder (:data:`CONFIG`, :data:`RECORDS`, ...).
- **Locking and the resume rules** (:func:`run_lock`, :func:`prepare_run_dir`,
  :func:`resolve_config`, :func:`open_run_folder`): a folder holds one run; a second process
  writing into it is refused; a started run continues only with ``resume`` and the same
  settings, which ``resume`` alone recovers from the folder.
- **Loading a run** (:func:`ensemble_path`, :func:`load_run`): the ensemble, its data set and
  the check that one fits the other.
- **Rank part files** of torchrun runs (:func:`rank_part`, :func:`merge_rank_parts`).
- **Certifying a data set** into a records file (:func:`certify_dataset`), resumable per
  example, as ``ensdiv certify`` and ``ensdiv compare`` do.
- **Readers** of each kind of records, and the sweep records' (GDR, success) series with their
  correlations, which tables and figures both draw on.

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
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.utils.data import Dataset

from ensdiv import distributed
from ensdiv.data import DATASETS, DatasetInfo, load_dataset
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_choice, check_int, check_real
from ensdiv.io import (
    JsonConfig,
    atomic_write_json,
    atomic_write_jsonl,
    os_error,
    read_json,
    read_jsonl,
    utc_now,
)
from ensdiv.loop import CHECKPOINT, ENSEMBLE, METRICS, finished_epochs, read_metrics
from ensdiv.smoothing import ABSTAIN, Smooth

CONFIG = "config.json"
"""A training run's settings (:class:`ensdiv.train.TrainConfig`)."""
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
    folder = Path(folder)
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
                    command: str = "ensdiv train") -> bool:
    """Check (and with ``overwrite`` empty) a result folder identified by ``config``.

    Call it while holding :func:`run_lock`. The rules, the same for runs and sweeps:

    - a folder where nothing was ``started`` (no finished epoch or record, e.g. a run that
      failed while loading its data) is simply started again, whatever its config;
    - a folder holding a started ``kind`` is continued only with ``resume`` and a config equal
      but for the ``resumable`` keys; any other difference is an error listing it;
    - ``overwrite`` empties the folder first; a non-empty folder holding no ``kind`` is refused.

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
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EnsdivError(f"{out} exists and is not a folder")
    cfg_path = out / config_name
    if not out.exists():
        return False
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
        diff = sorted(k for k in set(old) | set(config)
                      if old.get(k) != config.get(k) and k not in resumable)
        if not resume:
            what = f"a different {kind}" if diff else f"this {kind} already"
            raise EnsdivError(f"{out} holds {what}; continue it with `{command} --out {out} "
                              f"--resume`, or choose another --out")
        if diff:
            changes = ", ".join(f"{k} (saved {old.get(k)!r}, given {config.get(k)!r})"
                                for k in diff)
            raise EnsdivError(f"{out} holds a {kind} that differs in {changes}; to continue it "
                              f"run `{command} --out {out} --resume` without those options; for "
                              "the new settings choose another --out")
        return True
    if _entries(out):
        raise EnsdivError(f"{out} is not empty and holds no ensdiv {kind}; choose another "
                          "--out or pass --overwrite")
    return False


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
        >>> from ensdiv.train import TrainConfig
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
                          f"`{command} --out {out} [options]`")
    return cls(**given)


def open_run_folder(out: Path, settings: dict[str, Any], *, epochs: int, resume: bool,
                    overwrite: bool) -> bool:
    """Prepare ``out`` for a training run (call it holding :func:`run_lock`): the rules of
    :func:`prepare_run_dir` with a started run being one with a checkpoint and ``epochs``
    allowed to grow, never to shrink; everything resuming reads is checked before anything is
    written; then the settings are saved as ``config.json``. True if the run continues.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> open_run_folder(Path(tempfile.mkdtemp()), {"epochs": 1}, epochs=1, resume=False,
        ...                 overwrite=False)
        False
    """
    resuming = prepare_run_dir(out, settings, config_name=CONFIG, resume=resume,
                               overwrite=overwrite, started=lambda p: (p / CHECKPOINT).exists(),
                               resumable=RESUMABLE_CHANGES, command="ensdiv train")
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


# ---------------------------------------------------------------------------- rank part files
def rank_part(path: Path, rank: int) -> Path:
    """Rank ``rank``'s part of the records file ``path`` under torchrun (records.rank1.jsonl)."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def rank_parts(path: Path) -> list[Path]:
    """The part files of ``path`` that ranks of a distributed run left, merged or not yet."""
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


def read_with_parts(path: Path, read: Callable[[Path], list[dict]]) -> list[dict]:
    """The records of ``path`` and of its part files (what a resumed run counts as done)."""
    return [r for p in [path, *rank_parts(path)] if p.exists() for r in read(p)]


def merge_rank_parts(path: Path, read: Callable[[Path], list[dict]],
                     key: Callable[[dict], Any]) -> list[dict]:
    """Merge the ranks' part files into ``path`` and return its records sorted by ``key``.

    Every rank waits for the others; rank 0 writes ``path`` (one record per key, a part's
    over the file's) atomically and deletes the parts; then every rank reads the result.
    Without part files or a process group this just reads ``path``.
    """
    distributed.barrier()
    if distributed.rank_and_world()[0] == 0 and rank_parts(path):
        merged = {key(r): r for r in read_with_parts(path, read)}
        atomic_write_jsonl(path, sorted(merged.values(), key=key))
        for part in rank_parts(path):
            part.unlink()
    distributed.barrier()
    return read(path) if path.exists() else []


# ------------------------------------------------------------------------------------ readers
def figure_dir(out_dir: str | None, records_folder: Path) -> Path:
    """Where a plot command writes: ``--out-dir``, else ``figures/`` beside the records."""
    out = Path(out_dir) if out_dir is not None else records_folder / "figures"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error("write", out, e) from None
    return out


def run_name(lam: float, seed: int) -> str:
    """Folder name of one sweep point (inside the sweep's folder)."""
    return f"lam{lam:g}-seed{seed}"


def final_test_accuracy(final: dict[str, Any]) -> dict[str, Any]:
    """A sweep record's full test-set accuracy, from its training's last metrics record:
    ``test_acc`` (ensemble), ``test_member_acc`` and ``test_n`` (the record's ``ensemble_acc``
    is on its ``n`` evaluation points only)."""
    return {"test_acc": final["ensemble_acc"], "test_member_acc": final["member_acc"],
            "test_n": final.get("n")}


def training_records(runs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """One sweep-like record per ``ensdiv train`` run folder — its config's arch, data set, λ,
    seed and regularizer and its last epoch's :func:`final_test_accuracy` — so runs trained
    alone (no GDR or attacks) sit in the same tables as a sweep's ensembles."""
    records = []
    for run in map(Path, runs):
        config = read_json(run / CONFIG, what="run config",
                           fix="give the folder of an `ensdiv train` run")
        metrics = read_metrics(run)
        if not metrics:
            raise EnsdivError(f"{run} has no finished epoch; finish it with `ensdiv train "
                              f"--out {run} --resume`")
        records.append({"arch": config["arch"], "dataset": config["dataset"],
                        "lam": config["lam"] or 0.0, "seed": config["seed"],
                        "trained_with": config["diversity"], "epochs": metrics[-1]["epoch"],
                        **final_test_accuracy(metrics[-1])})
    return records


def read_sweep_records(path: str | os.PathLike, *, missing_ok: bool = False,
                       required: Sequence[str] = ("lam", "seed")) -> list[dict]:
    """A sweep's records (``records.jsonl`` of a sweep folder, or the file itself), each
    holding the ``required`` keys; a missing file is an error unless ``missing_ok``.

    Records written before sweeps kept the full test-set accuracy get it
    (:func:`final_test_accuracy`) from their run folder's metrics, where that folder is present."""
    path = Path(path)
    path = path / RECORDS if path.is_dir() or path.suffix != ".jsonl" else path
    if not missing_ok and not path.exists():
        raise EnsdivError(f"no sweep records at {path}; run `ensdiv sweep --out "
                          f"{path.parent}` first")
    records = read_jsonl(path, what="sweep records file", required=required,
                         fix="restore it, or delete its damaged lines and resume (those "
                             "ensembles are then evaluated again)")
    for rec in records:
        if "test_acc" in rec:
            continue
        final = [m for m in read_metrics(path.parent / run_name(rec["lam"], rec["seed"]))
                 if m["epoch"] == rec.get("epochs")]
        if final:
            rec.update(final_test_accuracy(final[-1]))
    return records


def read_sweeps(paths: Sequence[str | os.PathLike], *,
                required: Sequence[str] = ("lam", "seed", "gdr", "attacks", "n")) -> list[dict]:
    """The records of several sweeps (e.g. a GDR and a GAL sweep that make one figure and
    table) in order; a sweep given twice or one with no finished ensemble is an error."""
    if len(set(map(str, paths))) != len(paths):
        raise EnsdivError("a sweep folder is listed twice; give each once")
    records = []
    for path in paths:
        got = read_sweep_records(path, required=required)
        if not got:
            raise EnsdivError(f"no sweep records in {path}; the sweep has not finished an "
                              "ensemble")
        records += got
    return records


def read_detection_records(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """A detection run's records (its folder or its ``records.jsonl``); none is an error."""
    path = Path(folder)
    path = path / RECORDS if path.is_dir() else path
    if not path.exists():
        raise EnsdivError(f"no detection records at {path}; run `ensdiv detect RUN --out "
                          f"{folder}` first")
    records = read_jsonl(path, what="detection records file", missing_ok=False,
                         required=("score", "adversary", "roc", "auroc"),
                         fix="restore it, or resume the detection run to rewrite it")
    if not records:
        raise EnsdivError(f"no detection records in {path}")
    return records


def read_certification(folder: str | os.PathLike) -> tuple[dict[str, Any], list[dict]]:
    """A certification run's settings (``certify.json``) and records."""
    path = Path(folder)
    if not (path / RECORDS).exists():
        raise EnsdivError(f"no certification records at {path / RECORDS}; run "
                          f"`ensdiv certify RUN --out {folder}` first")
    config = read_json(path / CERTIFY_CONFIG, what="certification config",
                       fix="restore it, or certify again into another --out")
    records = read_jsonl(path / RECORDS, what="certification records file",
                         missing_ok=False, required=("idx", "radius", "correct"),
                         fix="delete its damaged lines and resume the certification")
    return config, records


def train_cost(run: str | os.PathLike) -> dict[str, Any]:
    """Training wall time of a run folder: ``{"train_seconds", "epochs"}`` summed from its
    metrics (the loop's time, without the per-epoch evaluation)."""
    recs = read_jsonl(Path(run) / METRICS, what="metrics file", required=("epoch",),
                      fix="compare a run folder made by ensdiv train")
    return {"train_seconds": round(sum(float(r.get("train_seconds", 0.0)) for r in recs), 2),
            "epochs": len(recs)}


# ------------------------------------------------------- sweep records: (GDR, success) series
MEASURES: dict[str, str] = {"whitebox": "white-box on ensemble",
                            "transfer": "member → member transfer",
                            "blackbox": "black-box from surrogate"}


def number(v: Any) -> float:
    """A record's number; ``null`` (None) is NaN.

    Example:
        >>> number(None), number(0.5)
        (nan, 0.5)
    """
    return math.nan if v is None else float(v)


def mean_and_se(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and standard error (std with ddof 1 over √n) of the defined values; NaN for what
    they do not define (no value: both; one value: the standard error).

    Example:
        >>> [round(v, 3) for v in mean_and_se([0.25, 0.27, None])], mean_and_se([0.5])
        ([0.26, 0.01], (0.5, nan))
    """
    v = np.array([number(x) for x in values], dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, math.nan
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return float(v.mean()), se


def mean_se(values: Sequence[float | None], digits: int = 3) -> str:
    """``mean ± standard error`` (:func:`mean_and_se`) of the defined values; "—" if none.

    Example:
        >>> mean_se([0.5]), mean_se([None])
        ('0.500', '—')
    """
    mean, se = mean_and_se(values)
    if math.isnan(mean):
        return "—"
    if math.isnan(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def check_plot_options(records: Sequence[dict[str, Any]], *, attack: str | None,
                       eps: float | None) -> tuple[str, float]:
    """Check the heatmaps' ``attack`` and ``eps`` against what the records hold, before
    anything is drawn; return the (attack, eps) to draw (defaults: PGD if the records hold
    it, else their first attack; the largest eps).

    Example:
        >>> recs = [{"gdr": 0.1, "attacks": [{"attack": "pgd", "eps": 0.1}]}]
        >>> check_plot_options(recs, attack=None, eps=None)
        ('pgd', 0.1)
    """
    attacks, eps_values = sweep_grid(records)
    if not attacks:
        raise EnsdivError("the records hold no attack results to draw")
    if attack is None:
        attack = "pgd" if "pgd" in attacks else attacks[0]
    check_choice("attack (in these records)", attack, attacks)
    if not any(math.isfinite(number(r["gdr"])) for r in records):
        raise EnsdivError("no record has a defined GDR to draw")
    if eps is None:
        return attack, eps_values[-1]
    if eps not in eps_values:
        raise EnsdivError(f"the records hold no eps {eps:g}; choose one of: "
                          f"{', '.join(f'{e:g}' for e in eps_values)}")
    return attack, eps


def entry_success(entry: dict[str, Any], measure: str) -> tuple[float, float]:
    """(rate, floor) of one attack entry of a sweep record for a measure (:data:`MEASURES`): a
    zero rate is drawn (and fitted) at half a count, 0.5 / total."""
    if measure == "transfer":
        t = entry["transfer"]
        off = [(f, n) for i, (fr, nr) in enumerate(zip(t["fooled"], t["total"], strict=True))
               for j, (f, n) in enumerate(zip(fr, nr, strict=True)) if i != j]
        total = sum(n for _, n in off)
        return number(entry["transfer_mean"]), 0.5 / max(total, 1)
    s = entry[measure]
    return number(s["rate"]), 0.5 / max(s["total"], 1)


def sweep_series(records: Sequence[dict[str, Any]], attack: str, eps: float,
                 measure: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(GDR, success rate, drawing floor) of every record with a defined GDR and rate, for one
    attack, eps and measure (:data:`MEASURES`)."""
    g, rate, floor = [], [], []
    for r in records:
        for a in r["attacks"]:
            if a["attack"] == attack and a["eps"] == eps and math.isfinite(number(r["gdr"])):
                s, f = entry_success(a, measure)
                if math.isfinite(s):
                    g.append(number(r["gdr"]))
                    rate.append(s)
                    floor.append(f)
    return np.array(g), np.array(rate), np.array(floor)


def regularizer(rec: dict[str, Any]) -> str:
    """What a sweep record's ensemble was trained with: ``"none"`` (plain, λ = 0) or its
    regularizer.

    Example:
        >>> regularizer({"lam": 0.0}), regularizer({"lam": 1.0, "trained_with": "gdr"})
        ('none', 'gdr')
    """
    return "none" if rec["lam"] == 0 else rec.get("trained_with") or rec.get("diversity", "?")


def sweep_grid(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[float]]:
    """The attacks (in record order) and the sorted eps values the records hold."""
    attacks: list[str] = []
    eps: list[float] = []
    for r in records:
        for a in r["attacks"]:
            if a["attack"] not in attacks:
                attacks.append(a["attack"])
            if a["eps"] not in eps:
                eps.append(a["eps"])
    return attacks, sorted(eps)


def correlations(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spearman's ρ (scipy) between ensemble GDR and each success measure, per attack × eps.

    Returns rows ``{"attack", "eps", "measure", "rho", "p", "n"}``.
    """
    attacks, eps_values = sweep_grid(records)
    rows = []
    for attack in attacks:
        for eps in eps_values:
            for measure in MEASURES:
                g, s, _ = sweep_series(records, attack, eps, measure)
                if len(g) >= 3 and np.ptp(g) > 0 and np.ptp(s) > 0:
                    res = stats.spearmanr(g, s)
                    rho, p = float(res.statistic), float(res.pvalue)
                else:
                    rho = p = math.nan
                rows.append({"attack": attack, "eps": eps, "measure": measure, "rho": rho,
                             "p": p, "n": int(len(g))})
    return rows


# ---------------------------------------------------------------------------- certified records
RECORD_KEYS: tuple[str, ...] = ("idx", "label", "predict", "radius", "correct", "samples",
                                "seconds")


def _done_records(path: Path) -> list[dict[str, Any]]:
    """Records already in ``path``; a torn last line (killed mid-write) is dropped and the
    file rewritten without it."""
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    if lines and not lines[-1].rstrip().endswith("}"):
        atomic_write_jsonl(path, [json.loads(x) for x in lines[:-1] if x.strip()])
    return read_jsonl(path, what="certification records file", required=RECORD_KEYS,
                      fix="delete its damaged lines and run again (those examples are redone)")


def certify_dataset(base: nn.Module, dataset: Dataset, *, sigma: float, n0: int, n: int,
                    alpha: float, batch_size: int, out: str | os.PathLike, skip: int = 1,
                    max: int | None = None, radius: float | None = None,
                    stages: tuple[int, ...] = (1_000, 10_000, 100_000), beta: float = 1e-4,
                    vote: bool = False, seed: int = 0, num_classes: int | None = None,
                    progress: bool = True, amp: bool = False,
                    log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Certify every ``skip``-th example of ``dataset`` (the first ``max`` of those) and
    return all records of ``out`` (old and new), sorted by ``idx`` — Cohen et al.'s
    ``certify.py`` loop, resumable.

    Each example's record — ``idx, label, predict, radius, correct, samples, seconds`` — is
    appended to the JSON-lines file ``out``, flushed and synced per line, so a killed run loses
    at most the example in progress. Run again on the same file, it skips the examples already
    there (a torn last line is dropped first). Each example's noise comes from a generator
    seeded with ``(seed, idx)``, so a resumed run, or one with another ``skip``/``max``, gives
    every example exactly the same answer as an uninterrupted one. The smoothed classifier
    holds a channels-last copy of ``base`` (faster; ``base`` is left as it was).

    Under torchrun the examples are sharded over ranks (every world-th to each) and merged into
    one file; each example's noise comes from its own seed, so the records are those of a
    single-process run (timings aside).

    Args:
        base: a member or an ensemble (eval mode) returning logits.
        dataset: yields ``(x [C, H, W] in [0, 1], label)``.
        sigma, n0, n, alpha, batch_size: as in :meth:`Smooth.certify`.
        out: the JSON-lines file (appended to; resumable).
        radius: if given, ask :meth:`Smooth.certify_radius` whether each example is certified
            at this radius (``radius`` in the record is then ``radius`` or 0) with ``stages``
            and ``beta``; ``samples`` counts the noise samples it used.
        vote: majority vote of the members as the base prediction.
        seed: the noise of example ``idx`` comes from a generator (on the model's device)
            seeded with ``seed * 1_000_003 + idx``.
        amp: bfloat16 autocast for the noisy forward passes (see :class:`Smooth`).

    Example:
        >>> import tempfile
        >>> from torch.utils.data import TensorDataset
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()
        >>> data = TensorDataset(torch.rand(4, 1, 8, 8), torch.arange(4))
        >>> out = tempfile.mkdtemp() + "/certify.jsonl"
        >>> recs = certify_dataset(ens, data, sigma=0.5, n0=10, n=100, alpha=0.001,
        ...                        batch_size=100, out=out, progress=False)
        >>> [r["idx"] for r in recs], sorted(recs[0])
        ([0, 1, 2, 3], ['correct', 'idx', 'label', 'predict', 'radius', 'samples', 'seconds'])
    """
    check_int("skip", skip)
    if max is not None:
        check_int("max", max)
    check_int("seed", seed, minimum=0)
    if radius is not None:
        check_real("radius", radius, minimum=0)
    k = num_classes or getattr(base, "num_classes", None)
    if k is None:
        raise EnsdivError("num_classes is needed: the model does not declare it")
    # a channels-last copy: faster noisy forward passes (see Smooth), the caller's model
    # untouched
    smooth = Smooth(base, num_classes=k, sigma=sigma, vote=vote, amp=amp, channels_last=True)
    indices = list(range(0, len(dataset), skip))[:max]
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error("write", path.parent, e) from None
    rank, world = distributed.rank_and_world()
    # under torchrun each rank certifies every world-th example into its own part file; rank 0
    # merges them into `out` at the end (and a resumed run counts them as done)
    distributed.barrier()  # every rank reads the folder as it was before anyone writes
    records = read_with_parts(path, _done_records)
    distributed.barrier()
    done = {r["idx"] for r in records}
    todo = distributed.shard([i for i in indices if i not in done], rank, world)
    own = path if world == 1 else rank_part(path, rank)
    bar = None
    if progress and todo and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="certify", unit="example")
    try:
        with open(own, "a", encoding="utf-8") as f:
            for i in todo:
                x, label = dataset[i]
                smooth.generator = torch.Generator(device=smooth._device()).manual_seed(
                    seed * 1_000_003 + i)
                t0 = time.perf_counter()
                if radius is None:
                    pred, rad = smooth.certify(x, n0=n0, n=n, alpha=alpha,
                                               batch_size=batch_size)
                    samples = n0 + n
                else:
                    pred, samples = smooth.certify_radius(x, radius, alpha=alpha, stages=stages,
                                                          beta=beta, n0=n0,
                                                          batch_size=batch_size)
                    rad = radius if pred != ABSTAIN else 0.0
                rec = {"idx": i, "label": int(label), "predict": pred, "radius": round(rad, 6),
                       "correct": pred == int(label), "samples": samples,
                       "seconds": round(time.perf_counter() - t0, 4)}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
                records.append(rec)
                if bar is not None:
                    bar.update()
                if log is not None:
                    log(f"idx {i}: label {rec['label']} predict {pred} radius {rad:.3f} "
                        f"({rec['seconds']:.1f}s)")
    except OSError as e:
        raise os_error("write", own, e) from None
    finally:
        if bar is not None:
            bar.close()
    if world > 1 or rank_parts(path):
        records = merge_rank_parts(path, _done_records, key=lambda r: r["idx"])
    return sorted(records, key=lambda r: r["idx"])
