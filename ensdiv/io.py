"""Atomic writes, one reader per format, and the JSON round trip of settings: how ensdiv writes
and reads its files. Three writers go their own way on purpose: the run-folder lock
(:mod:`ensdiv.runs.rundir`, an ``flock``ed file rewritten in place), certification records
(:mod:`ensdiv.certification`, appended and synced one line at a time, so a killed run loses at
most the example in progress) and ``ensdiv data fetch`` (:mod:`ensdiv.fetch`, a staging folder
renamed into place once verified).

- **Writes** are atomic: the bytes are built in memory, written to a temporary file in the same
  folder, fsynced and renamed over the target, so an interrupted run leaves the previous good
  state. The file gets the mode a plain ``open()`` would give (``0666 & ~umask``, 0644 by
  default), not ``mkstemp``'s private 0600. A write that fails (full disk, read-only folder) is
  one :class:`EnsdivError` naming the file and the operating system's reason.
- **JSON is strict**: NaN and ±inf are written as ``null`` (a rate over zero inputs, an undefined
  GDR); readers treat ``null`` as "not defined".
- **Reads** (:func:`read_json`, :func:`read_jsonl`, :func:`read_torch`) turn a missing, empty,
  truncated or foreign file into one :class:`EnsdivError` naming the file and what to do.
- **Configs** (:class:`JsonConfig`): a frozen dataclass of settings round-trips through JSON.

Run folders (locks, resume rules) belong to the drivers: :mod:`ensdiv.runs.rundir`; records
files of several torchrun ranks: :mod:`ensdiv.rank_parts`.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.json"
    >>> _ = atomic_write_json(p, {"a": 1, "b": float("nan")}); p.read_text().split()
    ['{', '"a":', '1,', '"b":', 'null', '}']
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, ClassVar, TypeVar

import torch

from ensdiv.errors import EnsdivError, Remedy

_OS_HINTS: dict[int, tuple[str, Remedy]] = {
    errno.ENOSPC: ("free some disk space, then resume", "resume"),
    errno.EDQUOT: ("free some disk space, then resume", "resume"),
    errno.EROFS: ("the file system is read-only; write to another folder", "elsewhere"),
    errno.EACCES: ("you may not write there; write to another folder or fix its permissions",
                   "elsewhere"),
    errno.EPERM: ("you may not write there; write to another folder or fix its permissions",
                  "elsewhere"),
}


def os_error(action: str, path: str | os.PathLike, e: OSError) -> EnsdivError:
    """One-line :class:`EnsdivError` for an ``OSError`` while ``action``-ing ``path``, with the
    system's reason (e.g. "No space left on device") and what to do about it.

    Example:
        >>> str(os_error("write", "r/x.pt", OSError(28, "No space left on device")))[:52]
        'cannot write r/x.pt: No space left on device; free s'
    """
    reason = e.strerror or str(e)
    hint, remedy = _OS_HINTS.get(e.errno or 0, (None, None))
    return EnsdivError(f"cannot {action} {path}: {reason}" + (f"; {hint}" if hint else ""),
                       remedy=remedy)


def _umask() -> int:
    try:  # Linux: read it without the set-and-restore race of os.umask
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on an in-memory buffer, then put its bytes at ``path`` atomically.

    The temporary file lives beside ``path`` and is renamed onto it after an fsync; its mode is
    ``0666 & ~umask``. Serializing in memory first means a full disk or a read-only folder
    surfaces as the operating system's own error, raised as one :class:`EnsdivError`.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = atomic_write(p, lambda f: f.write(b"ok")); p.read_bytes()
        b'ok'
    """
    path = Path(path)
    buf = io.BytesIO()
    write(buf)
    data = buf.getbuffer()
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise os_error("write", path, e) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN/±inf float replaced by ``None`` (JSON ``null``), recursively.

    Example:
        >>> strict_json({"a": [1.0, float("inf")], "b": float("nan")})
        {'a': [1.0, None], 'b': None}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def round_floats(obj: Any, digits: int = 6) -> Any:
    """``obj`` with every float rounded to ``digits`` significant digits, recursively (records
    show 0.9125, not float32's 0.9125000238418579).

    Example:
        >>> round_floats({"acc": [0.9125000238418579], "n": 3})
        {'acc': [0.9125], 'n': 3}
    """
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def _dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(strict_json(obj), indent=indent, sort_keys=True, allow_nan=False)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented strict JSON (NaN/inf as ``null``)."""
    return atomic_write_text(path, _dumps(obj, indent=2) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Atomically write ``records`` as strict JSON lines (the whole file is rewritten)."""
    return atomic_write_text(path, "".join(_dumps(r) + "\n" for r in records))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def utc_now() -> str:
    """The current time as ISO 8601 UTC, seconds precision (the ``time`` field of records).

    Example:
        >>> utc_now().endswith("Z")
        True
    """
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------- readers
def first_sentence(e: BaseException, limit: int = 160) -> str:
    r"""The first line and sentence of an exception's message (torch's are long), for a
    one-line error.

    Example:
        >>> first_sentence(RuntimeError("failed reading zip. This is an internal error\nmore"))
        'failed reading zip'
    """
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return text.splitlines()[0].split(". ")[0][:limit]



def _a(what: str) -> str:
    return f"an {what}" if what[:1].lower() in "aeiou" else f"a {what}"


def _read_bytes(path: Path, what: str, fix: str) -> bytes:
    if not path.is_file():
        raise EnsdivError(f"no {what} at {path}; {fix}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise os_error("read", path, e) from None
    if not data:
        raise EnsdivError(f"{path} is empty (0 bytes), not {_a(what)}; {fix}")
    return data


def read_json(path: str | os.PathLike, *, what: str = "JSON file",
              fix: str = "restore it or start again", kind: type = dict) -> Any:
    """Read a JSON file written by ensdiv; anything but a valid JSON ``kind`` is one error.

    Args:
        path: the file.
        what: what the file should be, for the message (e.g. "run config").
        fix: what the user should do if it is missing or damaged.
        kind: the expected top-level JSON type (``dict`` or ``list``).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.json"
        >>> _ = p.write_text('{"a": 1'); read_json(p, what="run config", fix="x")
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: ... is not a valid run config (truncated or not JSON: ...); x
    """
    path = Path(path)
    data = _read_bytes(path, what, fix)
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EnsdivError(f"{path} is not a valid {what} (truncated or not JSON: {e}); "
                          f"{fix}") from None
    if not isinstance(obj, kind):
        raise EnsdivError(f"{path} is not {_a(what)} (a JSON {type(obj).__name__}, expected a "
                          f"{kind.__name__}); {fix}")
    return obj


def read_jsonl(path: str | os.PathLike, *, what: str = "JSON-lines file",
               fix: str = "restore it or start again", missing_ok: bool = True,
               required: Iterable[str] = ()) -> list[dict]:
    """Read a JSON-lines file written by ensdiv: one object per line, each holding the keys in
    ``required``. A missing file is an empty list when ``missing_ok``; a damaged line is one
    error naming the file, the line and ``fix``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
        >>> _ = p.write_text('{"epoch": 1}\\n{"epoch": 2}\\n'); read_jsonl(p)
        [{'epoch': 1}, {'epoch': 2}]
    """
    path = Path(path)
    if missing_ok and not path.exists():
        return []
    try:
        text = _read_bytes(path, what, fix).decode("utf-8")
    except EnsdivError:
        if missing_ok and path.is_file() and path.stat().st_size == 0:
            return []
        raise
    except UnicodeDecodeError:
        raise EnsdivError(f"{path} is not a valid {what} (not UTF-8 text); {fix}") from None
    need = tuple(required)
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EnsdivError(f"{path} line {i} is not valid JSON (truncated or edited? {e}); "
                              f"{fix}") from None
        missing = [k for k in need if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise EnsdivError(f"{path} line {i} has no {', '.join(missing)}, so the file is "
                              f"not {_a(what)}; {fix}")
        records.append(rec)
    return records


def read_torch(path: str | os.PathLike, *, what: str, fix: str,
               required: Iterable[str] = ()) -> dict[str, Any]:
    """Load a torch file written by ensdiv (``weights_only``, onto the CPU) as a dict holding
    the keys in ``required``; missing, empty, truncated and foreign files are one error.

    Tensors always load onto the CPU: move them afterwards, so that a missing GPU is never
    mistaken for a damaged file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.pt"
        >>> _ = atomic_torch_save({"epoch": 1}, p)
        >>> read_torch(p, what="checkpoint", fix="x", required=["epoch"])
        {'epoch': 1}
    """
    path = Path(path)
    data = _read_bytes(path, what, fix)
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged files; name the file instead
        raise EnsdivError(f"{path} is not {_a('readable ' + what)} (truncated, damaged or another "
                          f"kind of file: {first_sentence(e)}); {fix}") from None
    missing = [k for k in required if not isinstance(blob, dict) or k not in blob]
    if not isinstance(blob, dict) or missing:
        raise EnsdivError(f"{path} is not {_a(what)} (it lacks {', '.join(missing) or 'a dict'}); "
                          f"{fix}")
    return blob


# ---------------------------------------------------------------------------------- configs
_C = TypeVar("_C", bound="JsonConfig")


class JsonConfig:
    """Mixin for a frozen dataclass of settings saved as JSON (a run's ``config.json``, a
    sweep's ``sweep.json``, ...): :meth:`to_dict` and its inverse :meth:`from_dict`.

    Tuples are written as JSON lists and read back as tuples. ``KIND`` names the settings in
    messages; ``SAVED_WITH`` lists keys a folder's file stores beside the settings (e.g. the
    ensemble it concerns), which :meth:`from_dict` skips.

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class Demo(JsonConfig):
        ...     eps: tuple[float, ...] = (0.1,)
        >>> Demo.from_dict(Demo().to_dict()) == Demo(), Demo().to_dict()
        (True, {'eps': [0.1]})
    """

    KIND: ClassVar[str] = "config"
    SAVED_WITH: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """Inverse of :meth:`to_dict` (lists become tuples); an unknown key is one
        :class:`EnsdivError` naming it."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names - set(cls.SAVED_WITH))
        if unknown:
            raise EnsdivError(f"unknown {cls.KIND} settings: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in d.items() if k in names})
