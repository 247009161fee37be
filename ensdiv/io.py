"""Atomic file writes and the rank-0 rule, shared by every driver that writes results.

A checkpoint or record is written to a temporary file in the same folder, flushed to disk and
renamed over the target, so an interrupted run leaves the previous good state. Under
``torch.distributed`` only rank 0 writes.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.json"
    >>> atomic_write_json(p, {"a": 1}); p.read_text().strip()
    '{\\n  "a": 1\\n}'
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

from ensdiv.errors import EnsdivError


def is_main_process() -> bool:
    """True unless running under an initialized ``torch.distributed`` group with rank != 0."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename onto ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = atomic_write(p, lambda f: f.write(b"ok")); p.read_bytes()
        b'ok'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Atomically write ``records`` as JSON lines (the whole file is rewritten)."""
    return atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; a missing file is an empty list."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def prepare_run_dir(out_dir: str | os.PathLike, config: dict[str, Any], *, config_name: str,
                    resume: bool, overwrite: bool, resumable: frozenset[str] = frozenset(),
                    kind: str = "run") -> Path:
    """Create or check a result folder identified by ``config`` (saved as ``config_name``).

    A folder already holding a ``kind`` is continued only with ``resume`` and a config equal
    but for the ``resumable`` keys, and replaced (emptied) only with ``overwrite``; a non-empty
    folder holding no ``kind`` is refused unless ``overwrite``. Raises :class:`EnsdivError`.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = prepare_run_dir(d, {"a": 1}, config_name="c.json", resume=False, overwrite=False)
        >>> _ = prepare_run_dir(d, {"a": 1}, config_name="c.json", resume=True, overwrite=False)
    """
    if resume and overwrite:
        raise EnsdivError("--resume and --overwrite exclude each other")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EnsdivError(f"{out} exists and is not a folder")
    cfg_path = out / config_name
    if overwrite and out.exists():
        shutil.rmtree(out)
    elif cfg_path.exists():
        try:
            old = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise EnsdivError(f"{cfg_path} is not valid JSON ({e})") from e
        diff = sorted(k for k in set(old) | set(config)
                      if old.get(k) != config.get(k) and k not in resumable)
        if not resume:
            what = f"a different {kind}" if old != config else f"this {kind} already"
            raise EnsdivError(f"{out} holds {what}; pass --resume to continue it or "
                              "--overwrite to replace it")
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise EnsdivError(f"{out} holds a different {kind} ({changes}); use another --out "
                              "or --overwrite")
    elif out.exists() and any(out.iterdir()):
        raise EnsdivError(f"{out} is not empty and holds no ensdiv {kind}; choose another "
                          "--out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        atomic_write_json(cfg_path, config)
    return out
